"""Report statistics against scipy / statsmodels / scikit-posthocs on hand-made data, and confounders."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scikit_posthocs
from scipy import stats as scipy_stats
from test_report import make_record, write

from poolbench import report
from poolbench.report import stats

# The issue's case: avg on grey 64² images, dgmp with dataset.channels=3 dataset.image_size=48.
GREY_64 = {"cfg.dataset.channels": 1, "cfg.dataset.image_size": 64}
RGB_48 = {"cfg.dataset.channels": 3, "cfg.dataset.image_size": 48}


@pytest.fixture
def confounded(tmp_path: Path) -> Path:
    for seed in range(3):
        write(tmp_path, make_record("avg", seed, **{"acc@1": 0.5 + seed / 100, **GREY_64}))
        write(tmp_path, make_record("dgmp", seed, **{"acc@1": 0.875 + seed / 100, **RGB_48}))
    return tmp_path


def test_keys_that_differ_with_the_operator_are_confounded_not_hidden(confounded: Path) -> None:
    built = report.build(confounded, metrics=["acc@1"], baseline="avg")
    assert built.design is not None
    assert set(built.design.confounded) == {"cfg.dataset.channels", "cfg.dataset.image_size"}
    assert built.keys == ["cfg.dataset.channels", "cfg.dataset.image_size", "choice.pooling"]
    assert "cfg.pooling.lam" in built.design.hidden and "cfg.pooling.name" in built.design.hidden
    assert built.comparison.empty  # not compared without --allow-confounded
    warned = [w for w in built.warnings if w.startswith("CONFOUNDED")]
    assert len(warned) == 2 and "dataset.channels differs with the operator (avg: 1; dgmp: 3)" in warned[0]
    assert "not compared" in warned[0]

    allowed = report.build(confounded, metrics=["acc@1"], baseline="avg", allow_confounded=True)
    row = allowed.comparison.iloc[0]
    assert row["mean_delta"] == pytest.approx(0.375) and row["n"] == 3
    assert row["confounded_by"] == "dataset.channels, dataset.image_size"
    assert "CONFOUNDED with dataset.channels, dataset.image_size" in allowed.comparison_lines[0]
    assert "compared anyway" in allowed.warnings[0]


def test_confounding_is_warned_in_console_and_every_file(
    run_cli: Callable[..., int], confounded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert run_cli("report", str(confounded), "-b", "avg", "-m", "acc@1", "--out", str(out), "--html") == 0
    captured = capsys.readouterr()
    assert "CONFOUNDED: dataset.channels" in captured.err and "dgmp vs avg" not in captured.out
    assert "nothing compared: the operators are confounded" in captured.out
    for path in out.iterdir():
        if path.name == report.output.OWNED:  # poolbench's manifest of its own files: names and hashes only
            continue
        if path.suffix == ".png":
            from PIL import Image

            assert "CONFOUNDED: dataset.channels" in Image.open(path).info["Description"]
        elif path.suffix != ".pdf":
            assert "CONFOUNDED: dataset.channels" in path.read_text(), path.name


def test_a_value_set_by_hand_is_a_key_even_when_it_varies_with_the_pooling(tmp_path: Path) -> None:
    for seed in range(2):
        write(tmp_path, make_record("avg", seed, mAP=0.5))
        write(tmp_path, make_record("dgmp", seed, mAP=0.6, **{"cfg.pooling.lr_mult": 1000.0}))  # default is 1
    built = report.build(tmp_path, metrics=["mAP"], baseline="avg")
    assert built.keys == ["choice.pooling", "cfg.pooling.lr_mult"]
    assert list(built.comparison["pooling"]) == ["dgmp (lr_mult=1000.0)"]


def test_an_option_that_cannot_be_composed_is_not_hidden(tmp_path: Path) -> None:
    for seed in range(2):
        write(tmp_path, make_record("avg", seed, mAP=0.5, **{"cfg.dataset.channels": 1}))
        plugin = make_record("avg", seed, dataset="plugin_set", mAP=0.6, **{"cfg.dataset.channels": 3})
        write(tmp_path, plugin)
    found = report.design(report.load(tmp_path)[0])
    assert "cfg.dataset.channels" in found.keys and "cfg.dataset.channels" not in found.hidden


def test_paired_statistics_match_scipy() -> None:
    values = np.array([0.66, 0.68, 0.65, 0.70, 0.69, 0.64])
    base = np.array([0.61, 0.64, 0.66, 0.62, 0.60, 0.63])
    got = stats.paired(values, base)
    deltas = values - base
    exact = scipy_stats.permutation_test(
        (deltas,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", vectorized=True
    )
    assert got["p_perm"] == pytest.approx(exact.pvalue)
    assert got["p_ttest"] == pytest.approx(scipy_stats.ttest_rel(values, base).pvalue)
    assert got["p_wilcoxon"] == pytest.approx(scipy_stats.wilcoxon(values, base).pvalue)
    assert got["effect_dz"] == pytest.approx(deltas.mean() / deltas.std(ddof=1))
    assert got["p_improve"] == pytest.approx(5 / 6)  # seed 2 is worse
    low, high = scipy_stats.t.interval(0.95, 5, loc=deltas.mean(), scale=scipy_stats.sem(deltas))
    assert (got["ci_low"], got["ci_high"]) == (pytest.approx(low), pytest.approx(high))
    assert "boot_low" not in got  # the BCa bootstrap interval did not keep its coverage (issue 23): gone
    # lower is better for latency: the same deltas improve when negative
    assert stats.paired(base, values, higher_better=False)["p_improve"] == pytest.approx(5 / 6)
    assert not stats.higher_is_better("latency.peak_mem_mb") and stats.higher_is_better("acc@1")
    # beyond 16 pairs: Monte Carlo over random sign patterns with a fixed seed, the same every time
    many = np.random.default_rng(3).normal(0.001, 0.01, 20)
    assert stats.sign_flip_p(many) == stats.sign_flip_p(many)
    assert stats.sign_flip(many)[1] == stats.resamples_for(0.05) and stats.sign_flip(values - base)[1] == 0


def _scipy_sign_flip(deltas: np.ndarray, **kwargs: object) -> float:
    return scipy_stats.permutation_test(
        (deltas,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", vectorized=True, **kwargs
    ).pvalue


def _two_sided_error(p: float, resamples: int) -> float:
    """Standard error of a Monte Carlo two-sided p: twice a proportion near p / 2."""
    return 2 * math.sqrt(p / 2 * (1 - p / 2) / resamples)


_RNG = np.random.default_rng(2)  # exact p: 0.93, 0.069, 9e-5, 0.047


@pytest.mark.parametrize(
    "deltas",
    [
        _RNG.normal(0.0, 1.0, 17),  # no effect
        _RNG.normal(0.5, 1.0, 17),  # a p of a few percent
        _RNG.normal(1.3, 1.0, 17),  # below Holm's threshold for a few comparisons
        _RNG.integers(-2, 4, 17) * 0.01,  # a quantised metric: null means tie with the observed one
    ],
    ids=["null", "weak", "strong", "quantised"],
)
def test_monte_carlo_sign_flip_agrees_with_scipys_exact_enumeration(deltas: np.ndarray) -> None:
    """17 pairs: scipy enumerates all 2^17 sign patterns; the Monte Carlo p lies within its own error."""
    resamples = stats.resamples_for(0.05 / 4)
    ours, used = stats.sign_flip(deltas, resamples=resamples)
    exact = _scipy_sign_flip(deltas, n_resamples=2**17)
    assert used == resamples
    assert abs(ours - exact) <= 5 * _two_sided_error(exact, resamples) + 2 / resamples, (ours, exact)


def test_monte_carlo_sign_flip_agrees_with_scipys_monte_carlo_at_many_pairs() -> None:
    deltas = np.random.default_rng(4).normal(0.05, 1.0, 600)
    resamples = 20_000
    ours = stats.sign_flip_p(deltas, resamples=resamples)
    theirs = _scipy_sign_flip(deltas, n_resamples=resamples, rng=np.random.default_rng(1))
    assert 0.05 < theirs < 0.8  # a p whose Monte Carlo error is visible
    assert abs(ours - theirs) <= 5 * math.sqrt(2) * _two_sided_error(theirs, resamples), (ours, theirs)


@pytest.mark.parametrize("n", [17, 40, 1001])
def test_sign_flip_null_is_the_mean_under_the_drawn_signs(n: int) -> None:
    """The byte-table computation gives, for each drawn pattern, mean(sign * Δ) with bit 1 = sign +."""
    deltas = np.random.default_rng(n).normal(0.0, 1.0, n)
    null = stats.sign_flip_null(deltas, 500, np.random.default_rng(9))
    drawn = np.random.default_rng(9).integers(0, 256, size=(500, -(-n // 8)), dtype=np.uint8)  # one batch
    signs = np.unpackbits(drawn, axis=1, bitorder="little")[:, :n] * 2.0 - 1.0
    assert null == pytest.approx((signs * deltas).mean(axis=1), abs=1e-12)


@pytest.mark.parametrize("family", [1, 4, 30, 400, 10_000])
def test_monte_carlo_resamples_resolve_holms_threshold(family: int) -> None:
    """Enough sign patterns that a p at Holm's strictest threshold alpha/m has <= 10% relative error
    (up to the cap), and never fewer than MIN_RESAMPLES."""
    threshold = 0.05 / family
    resamples = stats.resamples_for(threshold)
    assert stats.MIN_RESAMPLES <= resamples <= stats.MAX_RESAMPLES
    relative_error = math.sqrt((1 - threshold) / (resamples * threshold))
    assert relative_error <= 0.1 or resamples == stats.MAX_RESAMPLES


def test_holm_matches_the_definition_over_the_whole_report(results_three_contexts: Path) -> None:
    p = pd.Series([0.01, 0.04, math.nan, 0.03])
    adjusted = stats.holm(p)
    # Holm by hand: sorted 0.01, 0.03, 0.04 times 3, 2, 1, made monotone
    assert adjusted[0] == pytest.approx(0.03) and adjusted[3] == pytest.approx(0.06)
    assert adjusted[1] == pytest.approx(0.06) and math.isnan(adjusted[2])
    built = report.build(results_three_contexts, metrics=["mAP"], baseline="avg")
    assert built.family_size == len(built.comparison) == 9  # 3 operators × 3 datasets
    assert list(built.comparison["p_ttest_holm"]) == pytest.approx(list(stats.holm(built.comparison["p_ttest"])))


@pytest.fixture
def results_three_contexts(tmp_path: Path) -> Path:
    """4 operators × 3 datasets × 3 seeds with a clear order gem > dgmp > max > avg on two of them."""
    rng = np.random.default_rng(1)
    offsets = {"avg": 0.0, "max": 0.01, "dgmp": 0.03, "gem": 0.05}
    for d, dataset in enumerate(("synthwriters", "icdar17", "clamm")):
        for pooling, offset in offsets.items():
            for seed in range(3):
                swapped = offset if d < 2 else offsets["max"] if pooling == "dgmp" else offset
                value = 0.5 + d / 10 + swapped + rng.normal(0, 0.002)
                write(tmp_path, make_record(pooling, seed, dataset=dataset, mAP=value))
    return tmp_path


def test_ranks_friedman_and_nemenyi_match_the_libraries(results_three_contexts: Path) -> None:
    built = report.build(results_three_contexts, metrics=["mAP"], baseline="avg")
    ranking = built.ranking
    assert ranking is not None and list(ranking["scores"].index) == ["clamm", "icdar17", "synthwriters"]
    scores = ranking["scores"]
    expected_ranks = scores.rank(axis=1, ascending=False).mean()
    assert ranking["average_ranks"].to_dict() == pytest.approx(expected_ranks.to_dict())
    assert ranking["average_ranks"].index[0] == "gem" and ranking["average_ranks"]["gem"] == 1.0
    friedman = scipy_stats.friedmanchisquare(*(scores[c] for c in scores.columns))
    assert ranking["friedman_p"] == pytest.approx(friedman.pvalue)
    nemenyi = scikit_posthocs.posthoc_nemenyi_friedman(scores.to_numpy())
    assert np.allclose(ranking["nemenyi"].to_numpy(), nemenyi.to_numpy())
    lines = report.ranking_lines(ranking)
    expected = "average rank over 3 contexts (dataset) by mAP (clamm), mAP (icdar17), mAP (synthwriters)"
    assert lines[0].startswith(expected)
    assert not ranking["cd_diagram"] and any("no critical-difference diagram: 3 contexts" in line for line in lines)


def _real_record(overrides: list[str], value: float) -> dict[str, object]:
    """A record with the exact identity fields `poolbench train` writes for these overrides."""
    from poolbench.config import compose
    from poolbench.run import _identity_fields

    return {**_identity_fields(compose(overrides)), "status": "completed", "acc@1": value}


def test_composed_configs_hide_option_definitions_and_commands_rebuild_the_same_runs(tmp_path: Path) -> None:
    from poolbench.config import compose, run_id
    from poolbench.report.html import commands

    for seed in range(2):
        for dataset in ("digits", "synthwriters"):
            for pooling in ("avg", "gem", "dgmp"):
                extra = ["trainer.epochs=2"] + (["pooling.p=4.0"] if pooling == "gem" else [])
                record = _real_record([f"pooling={pooling}", f"dataset={dataset}", f"seed={seed}", *extra], 0.5)
                write(tmp_path, record)
    built = report.build(tmp_path, baseline="avg")
    assert built.keys == ["choice.dataset", "choice.pooling", "cfg.pooling.p"]  # p=4 set by hand; gem's own is 3
    assert not built.design.confounded and "cfg.dataset.task" in built.design.hidden
    rebuilt = set()
    for command in commands(built):
        words = command.split()
        assert words[:2] == ["poolbench", "sweep"] and words[-1].startswith("seed=")
        for seed in words[-1][len("seed=") :].split(","):
            rebuilt.add(run_id(compose([*words[2:-1], f"seed={seed}"])))
    assert rebuilt == set(built.runs["run_id"])


def test_the_issue_case_with_composed_configs(tmp_path: Path) -> None:
    for seed in range(2):
        write(tmp_path, _real_record(["pooling=avg", "dataset=digits", f"seed={seed}"], 0.5))
        write(tmp_path, _real_record(["pooling=dgmp", "dataset=digits", "dataset.image_size=48", f"seed={seed}"], 0.9))
    built = report.build(tmp_path, baseline="avg")
    assert list(built.design.confounded) == ["cfg.dataset.image_size"] and built.comparison.empty


def test_each_sign_flip_p_says_whether_it_is_exact_or_monte_carlo(tmp_path: Path) -> None:
    """Two datasets: 6 seeds on one (exact), 30 on the other (Monte Carlo with B for Holm's alpha / m)."""
    rng = np.random.default_rng(2)
    for dataset, seeds in (("synthwriters", 6), ("icdar17", 30)):
        for seed in range(seeds):
            write(tmp_path, make_record("avg", seed, dataset=dataset, mAP=0.5 + rng.normal(0, 0.01)))
            write(tmp_path, make_record("gem", seed, dataset=dataset, mAP=0.51 + rng.normal(0, 0.01)))
    built = report.build(tmp_path, metrics=["mAP"], baseline="avg")
    rows = built.comparison.set_index("context")
    expected = stats.resamples_for(0.05 / built.family_size)
    assert built.family_size == 2 and rows.loc["synthwriters", "p_perm_resamples"] == 0
    assert rows.loc["icdar17", "p_perm_resamples"] == expected
    lines = dict(zip(built.comparison["context"], built.comparison_lines, strict=True))
    assert f"[Monte Carlo, {expected:,} sign patterns]" in lines["icdar17"] and "[exact]" in lines["synthwriters"]
    shown = report.display_comparison(built).set_index("context")["sign-flip p is"]
    assert shown["synthwriters"] == "exact" and shown["icdar17"].startswith("Monte Carlo")
