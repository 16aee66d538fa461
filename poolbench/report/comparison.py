"""Statistics across operators: paired comparisons against a baseline (Holm over the family), their
one-line summaries, and average ranks with Friedman / Nemenyi over contexts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from poolbench.errors import PoolbenchError, unknown_choice
from poolbench.report import stats
from poolbench.report.columns import (
    POOLING_KEY,
    SEED_KEY,
    column_key,
    column_label,
    context_label,
    group_frames,
    is_treatment,
    present,
    treatment_label,
)
from poolbench.report.loading import FROM_SIDE_BY_SIDE

if TYPE_CHECKING:
    from poolbench.report.core import Report


def compare(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    keys: Sequence[str],
    baseline: str,
    *,
    confounded: Sequence[str] = (),
    side_by_side: Sequence[str] = (),
    dropped: list[str] | None = None,
) -> pd.DataFrame:
    """Paired differences (operator − baseline) over seeds shared within each context.

    ``confounded`` context columns are left out of the pairing (used with ``allow_confounded``); the
    rows that pair across them name them in ``confounded_by``. Columns: context, pooling, baseline,
    metric, the statistics of :func:`poolbench.report.stats.paired`, ``p_ttest_holm`` /
    ``<p>_holm`` for every p-value of ``stats.P_VALUES`` (Holm over every row), per_seed, mean,
    baseline_mean, confounded_by. Runs left out of the pairing (a seed without a partner, an operator
    without a baseline run in its context) are named in ``dropped``.
    Metrics in ``side_by_side`` are not tested for pairs measured side by side (one value per
    configuration, no spread over seeds); their ratios are in :func:`poolbench.report.loading.side_by_side_lines`.
    """
    if POOLING_KEY not in frame.columns:
        raise PoolbenchError("records carry no pooling choice (choice.pooling); cannot compare operators")
    operators = sorted(frame[POOLING_KEY].dropna().astype(str).unique())
    if baseline not in operators:
        raise PoolbenchError(unknown_choice("baseline pooling", baseline, operators))
    treatment_keys = [k for k in keys if is_treatment(k)]
    context_keys = [k for k in keys if not is_treatment(k) and k not in confounded]
    # (row before its statistics, values, baseline values, row after): the statistics wait until the family
    # size m is known, since the Monte Carlo sign-flip p resolves Holm's threshold alpha / m (stats.resamples_for)
    pending: list[tuple[dict[str, Any], np.ndarray, np.ndarray, dict[str, Any]]] = []
    dropped = [] if dropped is None else dropped
    for _, context in group_frames(frame, context_keys):
        base = context[context[POOLING_KEY] == baseline]
        if base.empty:
            where = context_label(context.iloc[0], context_keys)
            for _, treated in group_frames(context, treatment_keys or [POOLING_KEY]):
                dropped.append(
                    f"unpaired: {treatment_label(treated.iloc[0], keys)}{f' on {where}' if where else ''}"
                    f" has no '{baseline}' run to pair with ({len(treated)} runs, seeds "
                    f"{_seed_list(treated[SEED_KEY])}): not compared"
                )
            continue
        if base[SEED_KEY].duplicated().any():
            raise PoolbenchError(
                f"baseline '{baseline}' has several variants per seed"
                f" in {context_label(base.iloc[0], keys) or 'the runs'}; "
                "narrow it down with --where pooling.<param>=<value>"
            )
        others = context[context[POOLING_KEY] != baseline]
        for _, treated in group_frames(others, treatment_keys or [POOLING_KEY]):
            first = treated.iloc[0]
            _name_unpaired(dropped, first, keys, context_keys, baseline, treated[SEED_KEY], base[SEED_KEY])
            mixed = [
                column_label(c) for c in confounded if set(treated[c].map(column_key)) != set(base[c].map(column_key))
            ]
            for metric in metrics:
                if metric in side_by_side and (treated[FROM_SIDE_BY_SIDE].any() or base[FROM_SIDE_BY_SIDE].any()):
                    continue  # one interleaved measurement per configuration: no spread over seeds to test
                pairs = treated[[SEED_KEY, metric]].merge(base[[SEED_KEY, metric]], on=SEED_KEY, suffixes=("", ".base"))
                pairs = pairs.dropna().sort_values(SEED_KEY)
                if pairs.empty:
                    continue
                values, base_values = pairs[metric].to_numpy(float), pairs[f"{metric}.base"].to_numpy(float)
                deltas = values - base_values
                head = {
                    "context": context_label(first, context_keys),
                    "pooling": treatment_label(first, keys),
                    "baseline": baseline,
                    "metric": metric,
                    "higher_is_better": stats.higher_is_better(metric),
                }
                tail = {
                    "per_seed": " ".join(f"{s}:{d:+.4g}" for s, d in zip(pairs[SEED_KEY], deltas, strict=True)),
                    "mean": float(values.mean()),
                    "baseline_mean": float(base_values.mean()),
                    "confounded_by": ", ".join(mixed),
                }
                pending.append((head, values, base_values, tail))
    from poolbench.report.power import family_alpha

    resamples = stats.resamples_for(family_alpha(len(pending)))
    rows = [
        {**head, **stats.paired(values, base, higher_better=head["higher_is_better"], resamples=resamples), **tail}
        for head, values, base, tail in pending
    ]
    order = {m: i for i, m in enumerate(metrics)}
    result = pd.DataFrame(rows)
    if result.empty:
        return result
    for name in stats.P_VALUES:
        result[f"{name}_holm"] = stats.holm(result[name])
    return result.sort_values(
        ["metric", "context", "pooling"], key=lambda c: c.map(order) if c.name == "metric" else c
    ).reset_index(drop=True)


def _seed_list(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(set(seeds)))


def _name_unpaired(
    dropped: list[str],
    first: pd.Series,
    keys: Sequence[str],
    context_keys: Sequence[str],
    baseline: str,
    treated: pd.Series,
    base: pd.Series,
) -> None:
    """One line per side whose seeds have no partner on the other side."""
    where = context_label(first, context_keys)
    name = f"{treatment_label(first, keys)} vs {baseline}{f' on {where}' if where else ''}"
    for side, own, other in ((treatment_label(first, keys), treated, base), (baseline, base, treated)):
        lonely = set(own) - set(other)
        if lonely:
            dropped.append(f"unpaired: {name}: seeds {_seed_list(lonely)} of {side} have no partner, left out")


def format_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def _p_clause(p: float) -> str:
    text = format_p(p)
    return text if text.startswith("<") else f"= {text}"


def _p_with_holm(row: dict[str, Any], name: str, title: str) -> str:
    """``sign-flip p = 0.25 (Holm 0.5)``; empty where that test was not run."""
    p = row.get(name, math.nan)
    if not present(p) or math.isnan(p):
        return ""
    return f", {title} p {_p_clause(p)} (Holm {format_p(row[f'{name}_holm'])})"


def sign_flip_kind(row: dict[str, Any]) -> str:
    """``exact`` or ``Monte Carlo, 10,000 sign patterns``: how a row's sign-flip p was computed."""
    resamples = row.get("p_perm_resamples", 0)
    if not present(resamples) or not resamples:
        return "exact"
    return f"Monte Carlo, {int(resamples):,} sign patterns"


def too_few(row: dict[str, Any]) -> bool:
    return int(row["n"]) < stats.DECIDE_MIN_N


TOO_FEW = f"too few seeds to decide (n < {stats.DECIDE_MIN_N})"


def comparison_line(row: dict[str, Any]) -> str:
    """``[ctx] dgmp vs avg: ΔmAP = +0.041 ± 0.012 (95% t-interval), sign-flip p = 0.03 (Holm 0.06), ...``.

    Every p-value stands beside its Holm-adjusted value; below ``stats.DECIDE_MIN_N`` pairs the line
    ends with a plain note that the comparison cannot decide.
    """
    from poolbench.report.power import power_clause

    where = f"[{row['context']}] " if row["context"] else ""
    if row.get("all_equal"):
        interval = " (every seed's Δ is the same: no spread, no interval)"
    elif math.isnan(row["ci95"]):
        interval = " (no interval from one pair)"
    else:
        interval = f" ± {row['ci95']:.3g} (95% t-interval)"
    tests = (
        _p_with_holm(row, "p_perm", "sign-flip")
        + (f" [{sign_flip_kind(row)}]" if present(row.get("p_perm")) else "")
        + _p_with_holm(row, "p_ttest", "t-test")
        + _p_with_holm(row, "p_wilcoxon", "Wilcoxon")
    )
    effect = "" if math.isnan(row["effect_dz"]) else f", d_z = {row['effect_dz']:+.2g}"
    better = round(row["p_improve"] * row["n"])
    power = power_clause(row)
    confounded = f" — CONFOUNDED with {row['confounded_by']}" if row.get("confounded_by") else ""
    note = f" — {TOO_FEW}" if too_few(row) else ""
    return (
        f"{where}{row['pooling']} vs {row['baseline']}: Δ{row['metric']} = {row['mean_delta']:+.3g}{interval}"
        f"{tests}{effect}, better in {better}/{row['n']} seeds, n = {row['n']}"
        f"{f'; {power}' if power else ''}{confounded}{note}"
    )


def quality_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics that measure what the model learnt (not its cost)."""
    return [m for m in metrics if stats.higher_is_better(m) and not m.startswith("learned.")]


def rank_operators(report: Report) -> dict[str, Any] | None:
    """Average ranks, Friedman and Nemenyi over the contexts (independent data sets) of a report.

    A context is a distinct value of ``report.contexts`` (dataset and backbone by default). Every other
    varying key (an image size, a learning rate) is not a data set: an operator's score in a context is
    its mean over those keys' values (an operator must have all of them). Each context is scored by its
    first quality metric that it recorded (mAP for a retrieval set, acc@1 for a classification one):
    ranks make different metrics comparable. Only operators present in every ranked context take part
    (a complete block design). None with fewer than 2 contexts or 2 operators.
    """
    quality = quality_metrics(report.metrics)
    context_keys = [k for k in report.contexts if k in report.summary.columns and not is_treatment(k)]
    within = [k for k in report.keys if not is_treatment(k) and k not in context_keys]
    if not quality or not context_keys:
        return None
    scores: dict[str, dict[str, list[float]]] = {}
    groups: dict[str, set[str]] = {}
    metric_of: dict[str, str] = {}
    for _, row in report.summary.iterrows():
        context = context_label(row, context_keys)
        metric = metric_of.get(context) or next((m for m in quality if present(row[f"{m}.mean"])), None)
        if metric is None or not present(row[f"{metric}.mean"]):
            continue
        metric_of[context] = metric
        groups.setdefault(context, set()).add(context_label(row, within))
        per_op = scores.setdefault(context, {}).setdefault(treatment_label(row, report.keys), [])
        per_op.append(float(row[f"{metric}.mean"]))
    # an operator's score in a context: its mean over every within-context group, or none if it misses one
    table = pd.DataFrame(
        {c: {op: float(np.mean(v)) for op, v in ops.items() if len(v) == len(groups[c])} for c, ops in scores.items()}
    ).T
    if table.empty:
        return None
    complete = table[table.notna().sum(axis=1) >= 2].dropna(axis=1)  # contexts with a choice, then full columns
    if complete.shape[0] < 2 or complete.shape[1] < 2:
        return None
    result = stats.rank_analysis(complete[sorted(complete.columns)])
    result.update(
        scores=complete[sorted(complete.columns)],
        metric_of={c: metric_of[c] for c in complete.index},
        left_out=sorted(set(table.columns) - set(complete.columns)),
        contexts=[column_label(k) for k in context_keys],
        within=[column_label(k) for k in within],
        cd_diagram=complete.shape[0] >= stats.CD_MIN_CONTEXTS and result["nemenyi"] is not None,
    )
    return result


def ranking_lines(ranking: dict[str, Any]) -> list[str]:
    metrics = ", ".join(f"{m} ({c})" for c, m in ranking["metric_of"].items())
    ranks = ", ".join(f"{op} {r:.2f}" for op, r in ranking["average_ranks"].items())
    contexts = len(ranking["scores"])
    what = " × ".join(ranking.get("contexts", [])) or "context"
    lines = [f"average rank over {contexts} contexts ({what}) by {metrics} (1 = best): {ranks}"]
    if ranking.get("within"):
        lines.append(
            f"within a context, {', '.join(ranking['within'])} are not data sets: each operator's score is its "
            "mean over their values"
        )
    if not math.isnan(ranking["friedman_p"]):
        lines.append(
            f"Friedman test: χ² = {ranking['friedman_stat']:.3g}, p {_p_clause(ranking['friedman_p'])}"
            + (" (Nemenyi post-hoc in cd_diagram.png)" if ranking.get("cd_diagram") else "")
        )
    if not ranking.get("cd_diagram") and ranking["nemenyi"] is not None:
        lines.append(
            f"no critical-difference diagram: {contexts} contexts, fewer than {stats.CD_MIN_CONTEXTS} "
            "(the Nemenyi procedure assumes many independent data sets; autorank refuses fewer than 5)"
        )
    if ranking["left_out"]:
        lines.append(f"not ranked (missing in some context): {', '.join(ranking['left_out'])}")
    return lines
