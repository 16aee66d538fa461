"""Statistics of a report: paired comparisons, Holm adjustment, ranks across contexts.

Every test comes from scipy, statsmodels or scikit-posthocs; this module only arranges the data.

- Paired comparison of an operator with the baseline over shared seeds: mean Δ with a 95% t-interval,
  paired t-test, Wilcoxon signed-rank (n ≥ 6), a paired bootstrap interval of the mean Δ
  (``scipy.stats.bootstrap``, BCa, seeded; n ≥ 6), Cohen's d_z = mean Δ / sd Δ, and the probability of
  improvement (share of seeds where the operator beats the baseline, in the metric's direction).
- Holm–Bonferroni step-down adjustment over every p-value of one report (Holm 1979).
- Across contexts (datasets / backbones): ranks per context, average ranks, Friedman test and the
  Nemenyi post-hoc test behind the critical-difference diagram (Demšar, JMLR 7, 2006).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pandas as pd

# Smallest n at which a two-sided exact Wilcoxon signed-rank test can reach p < 0.05 (2/2^6).
WILCOXON_MIN_N = 6
# Below 6 pairs a bootstrap has too few distinct resamples (10 for n = 3) and its interval is far too
# narrow (it excluded 0 where the t-interval did not, on 3 seeds): not reported.
BOOTSTRAP_MIN_N = 6
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # fixed: the same records give the same report
# Metrics where a smaller value is better: time, memory, cost and loss.
LOWER_IS_BETTER = ("latency.", "cost.", "loss", "train.train_loss", "wall_time_s", "train.train_seconds")
LOWER_IS_BETTER_SUFFIXES = ("_ms", "_mb", "_s", "_seconds", "loss")


def higher_is_better(metric: str) -> bool:
    """Direction of a metric: False for latency, memory, time, cost and loss; True otherwise."""
    if metric.startswith(("latency.", "cost.")) or metric in LOWER_IS_BETTER:
        return False
    return not metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def _mean_difference(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(a - b, axis=axis)


def paired(values: np.ndarray, base: np.ndarray, *, higher_better: bool = True) -> dict[str, float]:
    """Statistics of ``values − base`` over paired seeds (NaN where n is too small to say anything)."""
    from scipy import stats

    deltas = values - base
    n = len(deltas)
    out: dict[str, float] = {
        "n": n,
        "mean_delta": float(deltas.mean()),
        "std_delta": math.nan,
        "ci95": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "boot_low": math.nan,
        "boot_high": math.nan,
        "p_ttest": math.nan,
        "p_wilcoxon": math.nan,
        "effect_dz": math.nan,
        "p_improve": float(np.mean(deltas > 0 if higher_better else deltas < 0)),
    }
    if n < 2:
        return out
    std = float(np.std(deltas, ddof=1))
    half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n))
    out.update(std_delta=std, ci95=half, ci_low=out["mean_delta"] - half, ci_high=out["mean_delta"] + half)
    with warnings.catch_warnings():  # constant differences: scipy warns and returns nan, which is what we show
        warnings.simplefilter("ignore")
        out["p_ttest"] = float(stats.ttest_rel(values, base).pvalue)
        if n >= WILCOXON_MIN_N and np.any(deltas != 0):
            out["p_wilcoxon"] = float(stats.wilcoxon(values, base).pvalue)
        if std > 0:
            out["effect_dz"] = out["mean_delta"] / std
        if std > 0 and n >= BOOTSTRAP_MIN_N:
            out["boot_low"], out["boot_high"] = bootstrap_interval(values, base)
    return out


def bootstrap_interval(values: np.ndarray, base: np.ndarray) -> tuple[float, float]:
    """95% paired bootstrap (BCa) interval of the mean difference, deterministic (fixed seed)."""
    from scipy import stats

    result = stats.bootstrap(
        (values, base),
        _mean_difference,
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        confidence_level=0.95,
        rng=np.random.default_rng(BOOTSTRAP_SEED),
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def holm(p_values: pd.Series) -> pd.Series:
    """Holm-adjusted p-values over the non-NaN entries (NaN stays NaN)."""
    from statsmodels.stats.multitest import multipletests

    adjusted = pd.Series(math.nan, index=p_values.index, dtype=float)
    present = p_values.dropna()
    if len(present):
        adjusted[present.index] = multipletests(present.to_numpy(float), method="holm")[1]
    return adjusted


def rank_analysis(table: pd.DataFrame, *, higher_better: bool = True) -> dict[str, Any]:
    """Ranks of operators (columns) over contexts (rows) of one score table without gaps.

    Returns ``ranks`` (rank 1 = best, ties averaged, per context), ``average_ranks`` (ascending),
    ``friedman_stat``/``friedman_p`` (scipy.stats.friedmanchisquare, needs ≥ 3 operators) and
    ``nemenyi`` (scikit-posthocs' Nemenyi–Friedman p-value matrix; needs ≥ 2 contexts and ≥ 3 operators).
    """
    from scipy import stats

    ranks = table.rank(axis=1, ascending=not higher_better, method="average")
    out: dict[str, Any] = {
        "ranks": ranks,
        "average_ranks": ranks.mean().sort_values(),
        "friedman_stat": math.nan,
        "friedman_p": math.nan,
        "nemenyi": None,
    }
    if table.shape[1] >= 3 and table.shape[0] >= 2:
        import scikit_posthocs

        with warnings.catch_warnings():  # all-tied contexts: scipy warns and returns nan
            warnings.simplefilter("ignore")
            result = stats.friedmanchisquare(*(table[c].to_numpy(float) for c in table.columns))
        out["friedman_stat"], out["friedman_p"] = float(result.statistic), float(result.pvalue)
        # Its p-values depend on |rank difference| only, so the metric's direction does not matter here.
        out["nemenyi"] = scikit_posthocs.posthoc_nemenyi_friedman(table.to_numpy(float))
        out["nemenyi"].index = out["nemenyi"].columns = list(table.columns)
    return out
