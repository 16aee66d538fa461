"""Statistics of a report: paired comparisons, Holm adjustment, ranks across contexts.

Every test comes from scipy, statsmodels or scikit-posthocs; this module only arranges the data.

- Paired comparison of an operator with the baseline over shared seeds. The primary p-value is the
  sign-flip permutation test of the mean difference (``scipy.stats.permutation_test``, one sample,
  ``permutation_type="samples"``): exact over all 2^n sign patterns up to n = 16; beyond, Monte Carlo over
  random sign patterns with a fixed seed, as many as Holm's strictest threshold needs (:func:`resamples_for`),
  computed in numpy and checked against scipy in the tests. It is valid at any n without assuming normality,
  and it cannot be fooled by
  constant or quantised differences: with n pairs its smallest two-sided p is 2 / 2^n (0.25 at n = 3).
  Beside it: the paired t-test (left out where all differences are equal, where scipy returns p = 0),
  the Wilcoxon signed-rank test (n >= 6), the mean Δ with its 95% t-interval (the one interval whose
  coverage the tests prove at n = 3..20, see ``tests/test_report_stats.py``), Cohen's
  d_z = mean Δ / sd Δ (n >= 3) and the share of seeds where the operator beats the baseline.
- Holm–Bonferroni step-down adjustment over every p-value of one kind in a report (Holm 1979).
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
# Below this many pairs a comparison cannot decide anything (the sign-flip test cannot reach p < 0.0625
# at n = 4, and a standard deviation from 4 differences is itself very uncertain): said on every line.
DECIDE_MIN_N = 5
# d_z needs a standard deviation worth the name: from 2 differences it is one absolute difference.
EFFECT_MIN_N = 3
# The sign-flip test is exact (scipy enumerates all 2^n sign patterns) up to this many pairs.
EXACT_MAX_N = 16
PERMUTATIONS = 2**EXACT_MAX_N
# Beyond EXACT_MAX_N pairs the p is Monte Carlo over B random sign patterns. The decision it feeds is Holm's,
# whose strictest step compares the smallest p with t = alpha / m (m comparisons in the report). An estimate
# of a p near t has a relative standard error of sqrt((1 - t) / (B t)); B = (1 - t) / (t r^2) with r = 10%
# puts a p of half or twice t on its own side of t in all but 7-standard-error cases (probability < 1e-11),
# while costing B x n / 8 table look-ups per comparison (0.1 s for 5,000 pairs and m = 4), not 2^16 x n.
MONTE_CARLO_RELATIVE_ERROR = 0.1
# At least this many, so a p far above the threshold still reads to two digits (standard error <= 0.005).
MIN_RESAMPLES = 10_000
# At most this many (t is resolved more coarsely beyond ~500 comparisons; the report states B per p).
MAX_RESAMPLES = 2**20
# Sign patterns evaluated per batch: at most this many table look-ups at once (~70 MB of temporaries).
BATCH_VALUES = 2**22
PERMUTATION_SEED = 0  # fixed: the same records give the same report
# Null means within this much (relative to mean |Δ|) of the observed mean count as reaching it: a quantised
# metric's Δ can tie exactly, and the table sums below add the same values in another order than np.mean
# (rounding ~n x 1e-16), while distinct means of such Δ differ by at least (its step) / n (~1e-7 relative).
TIE_RTOL = 1e-9
CONFIDENCE = 0.95
# Demšar's critical-difference diagram needs many independent data sets; autorank refuses fewer than 5.
CD_MIN_CONTEXTS = 5
# Differences that agree to this precision, relative to the compared values, are "all equal": the
# rounding noise of a quantised metric (1/|test set| steps, often stored as float32, whose relative
# precision is 6e-8) must not pass for a spread, while a real step of 1/100,000 still counts.
EQUAL_RTOL = 1e-6
# Metrics where a smaller value is better: time, memory, cost and loss.
LOWER_IS_BETTER = ("latency.", "cost.", "loss", "train.train_loss", "wall_time_s", "train.train_seconds")
LOWER_IS_BETTER_SUFFIXES = ("_ms", "_mb", "_s", "_seconds", "loss")
P_VALUES = ("p_perm", "p_ttest", "p_wilcoxon")  # every p-value of a comparison; each gets a ``<name>_holm``
P_DESCRIPTIONS = {
    "p_perm": (
        f"sign-flip permutation test of the mean Δ (primary; exact up to {EXACT_MAX_N} pairs, Monte Carlo over"
        " random sign patterns beyond, as many as resolve Holm's threshold alpha / m)"
    ),
    "p_ttest": "paired t-test (not shown where all Δ are equal)",
    "p_wilcoxon": f"Wilcoxon signed-rank test (from {WILCOXON_MIN_N} pairs)",
}


def higher_is_better(metric: str) -> bool:
    """Direction of a metric: False for latency, memory, time, cost and loss; True otherwise."""
    if metric.startswith(("latency.", "cost.")) or metric in LOWER_IS_BETTER:
        return False
    return not metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def all_equal(deltas: np.ndarray, scale: float | None = None) -> bool:
    """Whether the differences carry no spread: every one the same up to the floating noise of the values
    they come from (``scale``, their magnitude; a float32 metric of 0.61 carries ~1e-8 of it)."""
    if len(deltas) == 0:
        return True
    scale = max(float(np.max(np.abs(deltas))) if scale is None else scale, 1e-300)
    return float(np.ptp(deltas)) <= EQUAL_RTOL * scale


def _mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def resamples_for(threshold: float) -> int:
    """Monte Carlo sign patterns that resolve a p-value threshold (Holm's ``alpha / m``): see
    ``MONTE_CARLO_RELATIVE_ERROR``; between ``MIN_RESAMPLES`` and ``MAX_RESAMPLES``."""
    needed = math.ceil((1 - threshold) / (threshold * MONTE_CARLO_RELATIVE_ERROR**2))
    return int(min(max(needed, MIN_RESAMPLES), MAX_RESAMPLES))


def sign_flip(deltas: np.ndarray, scale: float | None = None, resamples: int | None = None) -> tuple[float, int]:
    """Two-sided p of the sign-flip permutation test of mean(deltas) = 0, and the number of random sign
    patterns it was estimated from (0: exact, every pattern counted).

    ``scale``: the magnitude of the compared values, for :func:`all_equal`. ``resamples``: Monte Carlo
    patterns beyond ``EXACT_MAX_N`` pairs (default: what a report of one comparison needs)."""
    from scipy import stats

    deltas = np.asarray(deltas, dtype=float)
    if len(deltas) == 0:
        return math.nan, 0
    if not np.any(deltas):
        return 1.0, 0  # every sign pattern gives the same (zero) mean
    if all_equal(deltas, scale):  # floating noise must not split the tie: exactly 2 of the 2^n patterns reach |mean|
        return min(1.0, 2.0 / 2 ** len(deltas)), 0
    if len(deltas) > EXACT_MAX_N:
        if resamples is None:
            from poolbench.report.power import family_alpha

            resamples = resamples_for(family_alpha(1))
        return _monte_carlo_p(deltas, resamples), resamples
    result = stats.permutation_test(
        (deltas,),
        _mean,
        permutation_type="samples",  # one sample: the signs are permuted
        vectorized=True,
        n_resamples=PERMUTATIONS,
        alternative="two-sided",
        rng=np.random.default_rng(PERMUTATION_SEED),
    )
    return float(result.pvalue), 0


def sign_flip_p(deltas: np.ndarray, scale: float | None = None, resamples: int | None = None) -> float:
    """The p-value of :func:`sign_flip`."""
    return sign_flip(deltas, scale, resamples)[0]


def sign_flip_null(deltas: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``deltas`` under ``resamples`` random sign patterns (each sign + or − with probability 1/2).

    Vectorised by bytes: the pairs are cut into chunks of 8, and for each chunk a table holds the sum of
    its Δ whose sign stays + for each of the 256 patterns of 8 signs. A pattern is then n / 8 random bytes,
    and its sum of kept Δ is n / 8 look-ups instead of n multiplications; the mean is (2 kept − total) / n.
    """
    n = len(deltas)
    chunks = -(-n // 8)
    padded = np.zeros(chunks * 8)
    padded[:n] = deltas  # padding Δ of 0 change no sum
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")  # 256 x 8
    table = (padded.reshape(chunks, 8) @ bits.T.astype(float)).ravel()  # chunk c, byte b at c * 256 + b
    offsets = np.arange(chunks, dtype=np.intp) * 256
    total = float(deltas.sum())
    null = np.empty(resamples)
    step = max(1, BATCH_VALUES // chunks)
    for start in range(0, resamples, step):
        count = min(step, resamples - start)
        patterns = rng.integers(0, 256, size=(count, chunks), dtype=np.uint8)
        kept = table[patterns + offsets].sum(axis=1)
        null[start : start + count] = (2 * kept - total) / n
    return null


def _monte_carlo_p(deltas: np.ndarray, resamples: int) -> float:
    """Two-sided Monte Carlo p as scipy.stats.permutation_test computes it: each side's share of null
    means at least as extreme as the observed one, counting the observed pattern ((k + 1) / (B + 1)),
    the smaller side doubled, at most 1."""
    observed = float(np.mean(deltas))
    null = sign_flip_null(deltas, resamples, np.random.default_rng(PERMUTATION_SEED))
    tie = TIE_RTOL * float(np.mean(np.abs(deltas)))
    greater = (np.count_nonzero(null >= observed - tie) + 1) / (resamples + 1)
    less = (np.count_nonzero(null <= observed + tie) + 1) / (resamples + 1)
    return min(1.0, 2 * min(greater, less))


def t_interval(deltas: np.ndarray, confidence: float = CONFIDENCE) -> tuple[Any, Any]:
    """Half-width of the t-interval of the mean over the last axis, and the standard deviation (NaN
    below 2 values). Vectorised: the coverage tests run it on thousands of simulated samples at once."""
    from scipy import stats

    deltas = np.asarray(deltas, dtype=float)
    n = deltas.shape[-1]
    if n < 2:
        return math.nan, math.nan
    std = np.std(deltas, axis=-1, ddof=1)
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return (float(half), float(std)) if deltas.ndim == 1 else (half, std)


def paired(
    values: np.ndarray, base: np.ndarray, *, higher_better: bool = True, resamples: int | None = None
) -> dict[str, Any]:
    """Statistics of ``values − base`` over paired seeds (NaN where n or the data cannot say it).

    ``resamples``: Monte Carlo sign patterns of the sign-flip p beyond ``EXACT_MAX_N`` pairs (see
    :func:`resamples_for`); ``p_perm_resamples`` says how many it used, 0 where the p is exact."""
    from scipy import stats

    values, base = np.asarray(values, dtype=float), np.asarray(base, dtype=float)
    deltas = values - base
    n = len(deltas)
    scale = float(max(np.max(np.abs(values), initial=0.0), np.max(np.abs(base), initial=0.0)))
    equal = all_equal(deltas, scale)
    p_perm, p_resamples = sign_flip(deltas, scale, resamples)
    out: dict[str, Any] = {
        "n": n,
        "mean_delta": float(deltas.mean()),
        "std_delta": math.nan,
        "ci95": math.nan,
        "ci_low": math.nan,
        "ci_high": math.nan,
        "p_perm": p_perm,
        "p_perm_resamples": p_resamples,
        "p_ttest": math.nan,
        "p_wilcoxon": math.nan,
        "effect_dz": math.nan,
        "p_improve": float(np.mean(deltas > 0 if higher_better else deltas < 0)),
        "all_equal": bool(equal and n >= 2),
    }
    if n < 2:
        return out
    half, std = t_interval(deltas)
    out["std_delta"] = std
    if equal:  # no spread to estimate: an interval of width ~0 and a t-test p of 0 would be false certainty
        return out
    out.update(ci95=half, ci_low=out["mean_delta"] - half, ci_high=out["mean_delta"] + half)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["p_ttest"] = float(stats.ttest_1samp(deltas, 0.0).pvalue)
        if n >= WILCOXON_MIN_N:
            out["p_wilcoxon"] = float(stats.wilcoxon(deltas).pvalue)
    if n >= EFFECT_MIN_N:
        out["effect_dz"] = out["mean_delta"] / std
    return out


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
