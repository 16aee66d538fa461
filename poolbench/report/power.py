"""Seeds enough to decide: minimum detectable effect, needed seeds, and a seed count from pilot runs.

All power figures are statsmodels' ``TTestPower`` (the one-sample t-test on paired differences),
two-sided, at 80% power. The significance level is the family's corrected one: ``alpha / m`` over the
``m`` comparisons of a report, the most stringent step of Holm's procedure. It is a conservative,
documented choice: a comparison that reaches it is significant after Holm whatever the other p-values.
The primary test of a report is the sign-flip permutation test, whose power approaches the t-test's
from about 6 pairs; below that it cannot reach small p-values at all (2 / 2^n at best), which is why
below ``stats.DECIDE_MIN_N`` pairs a comparison is called too small to decide.

No optional stopping: :func:`propose_seeds` fixes n from the pilot runs' spread and the effect the user
cares about, never from an observed p-value, and the sweep then runs exactly that many seeds.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poolbench.errors import PoolbenchError
from poolbench.grammar import override_key
from poolbench.report.stats import DECIDE_MIN_N

POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 10_000  # beyond this the answer is "not feasible", not a number


def family_alpha(family_size: int, alpha: float = ALPHA) -> float:
    """Holm's most stringent step: ``alpha / m`` (``alpha`` for a family of one or none)."""
    return alpha / max(int(family_size), 1)


def sign_flip_floor(alpha: float) -> int:
    """Fewest pairs at which the two-sided sign-flip test can reach ``alpha`` at all (2 / 2^n <= alpha)."""
    return max(2, math.ceil(math.log2(2 / alpha) - 1e-12))


def _solve(**kwargs: Any) -> float:
    from statsmodels.stats.power import TTestPower
    from statsmodels.tools import sm_exceptions  # imported first: its import resets the filter for its warnings

    with warnings.catch_warnings():  # a root finder that gives up warns and returns nan: handled as nan
        warnings.simplefilter("ignore", sm_exceptions.ConvergenceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            return float(TTestPower().solve_power(alternative="two-sided", **kwargs))
        except (ValueError, RuntimeError, ZeroDivisionError):
            return math.nan


def minimum_detectable_effect(n: int, sd: float, alpha: float, power: float = POWER) -> float:
    """Smallest true mean Δ (in the metric's unit) that ``n`` pairs detect with ``power`` at ``alpha``.

    NaN below 2 pairs or without a spread (sd 0 or unknown): then no t-based power exists. ``inf``
    below :func:`sign_flip_floor`: the primary test cannot reach ``alpha`` with so few pairs.
    """
    if n < 2 or not math.isfinite(sd) or sd <= 0:
        return math.nan
    if n < sign_flip_floor(alpha):
        return math.inf
    d = _solve(effect_size=None, nobs=n, alpha=alpha, power=power)
    return d * sd if math.isfinite(d) else math.nan


def needed_pairs(delta: float, sd: float, alpha: float, power: float = POWER) -> float:
    """Pairs (seeds per configuration) that detect a true mean Δ of ``delta`` with ``power`` at ``alpha``
    in the paired t-test (statsmodels), rounded up and at least 2.

    ``inf`` when more than :data:`MAX_SEEDS` would be needed; NaN without a spread or an effect. The
    report and the seed plan use :func:`needed_seeds`, which also respects the sign-flip test's floor.
    """
    if not (math.isfinite(delta) and math.isfinite(sd)) or sd <= 0 or delta == 0:
        return math.nan
    effect = abs(delta) / sd
    from statsmodels.stats.power import TTestPower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reachable = TTestPower().power(effect_size=effect, nobs=MAX_SEEDS, alpha=alpha, alternative="two-sided")
    if reachable < power:
        return math.inf
    n = _solve(effect_size=effect, nobs=None, alpha=alpha, power=power)
    return float(max(2, math.ceil(n - 1e-9))) if math.isfinite(n) else math.nan


def needed_seeds(delta: float, sd: float, alpha: float, power: float = POWER) -> float:
    """:func:`needed_pairs`, but never fewer than the primary sign-flip test needs to reach ``alpha``."""
    n = needed_pairs(delta, sd, alpha, power)
    return max(n, float(sign_flip_floor(alpha))) if not math.isnan(n) else n


def power_columns(
    comparison: pd.DataFrame, family_size: int, mre: float | None = None, power: float = POWER
) -> pd.DataFrame:
    """``alpha_planned``, ``mde`` and ``n_needed`` (for ``mre`` when given, else the observed Δ) per row."""
    alpha = family_alpha(family_size)
    out = comparison.copy()
    out["alpha_planned"] = alpha
    # every Δ equal: the sd is rounding noise, not a spread to plan with
    spread = out["std_delta"].where(~out["all_equal"].astype(bool)) if "all_equal" in out else out["std_delta"]
    out["mde"] = [minimum_detectable_effect(int(n), sd, alpha, power) for n, sd in zip(out["n"], spread, strict=True)]
    target = [mre if mre is not None else d for d in out["mean_delta"]]
    out["n_needed_for"] = target
    out["n_needed_ttest"] = [needed_pairs(t, sd, alpha, power) for t, sd in zip(target, spread, strict=True)]
    out["n_needed"] = [needed_seeds(t, sd, alpha, power) for t, sd in zip(target, spread, strict=True)]
    return out


def power_clause(row: dict[str, Any]) -> str:
    """``MDE 0.021 at n = 5 (80% power, α = 0.0167); n = 12 to detect Δ = 0.01``."""
    if "mde" not in row:
        return ""
    alpha, n = row["alpha_planned"], row["n"]
    if math.isinf(row["mde"]):
        floor = sign_flip_floor(alpha)
        text = f"no effect detectable at n = {n} (the sign-flip test needs {floor} pairs for α = {alpha:.3g})"
    elif math.isnan(row["mde"]):
        return f"MDE n/a (no spread over {n} pairs)"
    else:
        text = f"MDE {row['mde']:.3g} at n = {n} ({POWER:.0%} power, α = {alpha:.3g})"
    needed, target = row["n_needed"], row["n_needed_for"]
    if math.isinf(needed):
        return text + f"; Δ = {target:.3g} needs more than {MAX_SEEDS} seeds"
    if math.isfinite(needed):
        return text + f"; n = {int(needed)} to detect Δ = {target:.3g}"
    return text


# ------------------------------------------------------------------------------ seed count from pilot runs


@dataclass
class SeedPlan:
    """What :func:`propose_seeds` found in the pilot runs and the seed count it proposes."""

    metric: str
    delta: float
    sd_run: float  # pooled seed-to-seed sd of one configuration
    df: int  # degrees of freedom of that pooled sd
    sd_pair: float  # assumed sd of a paired difference
    configurations: int
    comparisons: int
    alpha: float
    seeds_now: int  # smallest number of completed seeds of any configuration of the grid
    seeds: float  # proposed seeds per configuration (inf: not feasible)

    def lines(self) -> list[str]:
        needed = f"more than {MAX_SEEDS}" if math.isinf(self.seeds) else str(int(self.seeds))
        return [
            f"pilot: {self.configurations} configurations, pooled seed sd of {self.metric} = {self.sd_run:.3g} "
            f"({self.df} degrees of freedom); a paired difference's sd taken as √2 × that = {self.sd_pair:.3g}",
            f"to detect Δ{self.metric} = {self.delta:g} in each of {self.comparisons} comparisons against one "
            f"baseline ({POWER:.0%} power, two-sided α = 0.05 / {self.comparisons} = {self.alpha:.3g}): "
            f"{needed} seeds per configuration (the grid has {self.seeds_now})",
            "the seed count is fixed here from the pilot's spread and Δ, not from any p-value: run all of them, "
            "then report (no optional stopping)",
        ]


def propose_seeds(
    run_dirs: Iterable[Path], delta: float, *, metric: str | None = None, power: float = POWER
) -> SeedPlan:
    """Seeds per configuration that detect ``delta`` in the grid whose completed runs are in ``run_dirs``.

    The spread is the pooled within-configuration standard deviation of the task metric over seeds;
    a paired difference of two independent runs has √2 times that sd (pairing on seeds can only
    reduce it, so this errs on the side of more seeds). The family is one comparison per non-baseline
    treatment and context, corrected as in :func:`family_alpha`.
    """
    from poolbench import records
    from poolbench.report import core
    from poolbench.report.columns import group_frames, is_treatment
    from poolbench.report.design import design

    if not (math.isfinite(delta) and delta > 0):
        raise PoolbenchError(f"--seeds-for takes a positive effect size in the metric's unit, got {delta}")
    found = []
    for folder in run_dirs:
        try:
            record = records.read_record(folder)
        except ValueError:
            continue
        if record and record.get("status") == "completed":
            found.append(record)
    frame = pd.DataFrame.from_records(found) if found else pd.DataFrame()
    for column in frame.columns:  # lists cannot be grouped (as in core.load)
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    chosen = metric or next((m for m in core.DEFAULT_METRICS[:3] if m in frame.columns), None)
    if chosen is None or chosen not in frame.columns:
        raise PoolbenchError(
            "--seeds-for needs pilot runs of this grid that recorded a task metric (mAP, top1 or acc@1): "
            f"found {len(frame)} completed runs; run the grid with 2 or more seeds first"
        )
    frame = frame[frame[chosen].notna()]
    keys = design(frame).keys if len(frame) > 1 else []
    groups = [g[chosen].to_numpy(float) for _, g in group_frames(frame, keys)] if len(frame) else []
    variances = [(len(g) - 1, float(np.var(g, ddof=1))) for g in groups if len(g) >= 2]
    df = sum(d for d, _ in variances)
    if df == 0:
        raise PoolbenchError(
            f"--seeds-for needs pilot runs: at least 2 completed seeds of one configuration of this grid "
            f"(found {len(frame)} completed runs with {chosen}); run it with seed=range(0,3) first"
        )
    sd_run = math.sqrt(sum(d * v for d, v in variances) / df)
    treatments = [k for k in keys if is_treatment(k)]
    contexts = [k for k in keys if not is_treatment(k)]
    n_treatments = frame.groupby(treatments).ngroups if treatments else 1
    n_contexts = frame.groupby(contexts).ngroups if contexts else 1
    comparisons = max(1, (n_treatments - 1) * n_contexts)
    alpha = family_alpha(comparisons)
    sd_pair = math.sqrt(2) * sd_run
    seeds = needed_seeds(delta, sd_pair, alpha, power)
    if math.isnan(seeds):  # no spread at all in the pilot: the smallest design the primary test can decide with
        seeds = float(sign_flip_floor(alpha))
    return SeedPlan(
        metric=chosen,
        delta=delta,
        sd_run=sd_run,
        df=df,
        sd_pair=sd_pair,
        configurations=len(groups),
        comparisons=comparisons,
        alpha=alpha,
        seeds_now=min(len(g) for g in groups),
        seeds=max(seeds, float(DECIDE_MIN_N)),
    )


def with_seeds(overrides: Sequence[str], seeds: int) -> list[str]:
    """The sweep's overrides with its seed axis replaced by ``seed=range(0,seeds)`` (pilot seeds reused)."""
    kept = [o for o in overrides if override_key(o) != "seed"]
    return [*kept, f"seed=range(0,{int(seeds)})"]
