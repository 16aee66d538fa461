"""Statistics that cannot mislead at small n (issue 23) and seeds enough to decide (issue 18 §3).

Every case runs on records the tests write themselves (as `poolbench train` does) and checks the
numbers against scipy and statsmodels.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.power import TTestPower
from test_report import make_record, write

from poolbench import records, report
from poolbench.report import power, stats

QUANTUM = 1 / 450  # one test image of 450


def _paired_runs(
    folder: Path, deltas: list[float], *, base: float = 0.6, metric: str = "acc@1", **extra: object
) -> Path:
    for seed, delta in enumerate(deltas):
        write(folder, make_record("avg", seed, **{metric: base + seed / 100}, **extra))
        write(folder, make_record("dgmp", seed, **{metric: base + seed / 100 + delta}, **extra))
    return folder


# ------------------------------------------------------------------------ constant and quantised differences


@pytest.mark.parametrize(
    ("deltas", "expected_p", "float32"),
    [
        ([QUANTUM] * 3, 0.25, False),  # one more test image in each of 3 seeds: 2 of the 8 sign patterns
        ([QUANTUM] * 3, 0.25, True),  # the same, from metrics stored as float32 (the "± 2.83e-08")
        ([-0.0444, -0.0444], 0.5, False),  # the held-out writer case: 2 seeds, the same difference
        ([0.0, 0.0, 0.0], 1.0, False),
        ([QUANTUM] * 6, 2 / 64, True),
    ],
)
def test_constant_and_quantised_differences_get_the_exact_permutation_p(
    tmp_path: Path, deltas: list[float], expected_p: float, float32: bool
) -> None:
    for seed, delta in enumerate(deltas):
        base = 0.6 + seed / 100 + seed * QUANTUM / 7
        treated = base + delta
        if float32:
            base, treated = float(np.float32(base)), float(np.float32(treated))
        write(tmp_path, make_record("avg", seed, **{"acc@1": base}))
        write(tmp_path, make_record("dgmp", seed, **{"acc@1": treated}))
    built = report.build(tmp_path, metrics=["acc@1"], baseline="avg")
    row = built.comparison.iloc[0]
    assert row["n"] == len(deltas)
    # the records hold 0.6 + s/100 + 1/450: floating noise that must not pass for a spread
    assert row["p_perm"] == pytest.approx(expected_p) and row["p_perm_holm"] == pytest.approx(expected_p)
    assert math.isnan(row["p_ttest"])  # scipy's t-test says p = 0 at zero variance: never shown
    assert math.isnan(row["ci95"]) and math.isnan(row["effect_dz"]) and math.isnan(row["p_wilcoxon"])
    line = built.comparison_lines[0]
    assert "p < 0.001" not in line and "± 0 " not in line and "t-test" not in line
    assert f"sign-flip p = {expected_p:.2g}" in line and "MDE n/a (no spread" in line
    assert math.isnan(row["mde"]) and math.isnan(row["n_needed"])  # no planning on rounding noise
    if len(deltas) < stats.DECIDE_MIN_N:
        assert line.endswith("too few seeds to decide (n < 5)")


def test_quantised_differences_with_a_spread_match_scipy(tmp_path: Path) -> None:
    deltas = [QUANTUM, 2 * QUANTUM, QUANTUM, 0.0, 3 * QUANTUM]
    row = report.build(_paired_runs(tmp_path, deltas), metrics=["acc@1"], baseline="avg").comparison.iloc[0]
    exact = scipy_stats.permutation_test(
        (np.array(deltas),), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples", vectorized=True
    )
    assert row["p_perm"] == pytest.approx(exact.pvalue, abs=1e-9)
    assert row["p_perm"] >= 2 / 2**5


# ------------------------------------------------------------------------------- one run per configuration, seed


@pytest.mark.parametrize("side", ["dgmp", "avg"])
def test_a_duplicate_seed_is_used_once_and_named_on_either_side(tmp_path: Path, side: str) -> None:
    rng = np.random.default_rng(4)
    folder = _paired_runs(tmp_path / "runs", list(rng.normal(0.05, 0.02, 6)))
    original = next(p for p in sorted(folder.iterdir()) if p.name.startswith(f"{side}-") and "-s0-" in p.name)
    copy = folder / f"{original.name}-copy"
    shutil.copytree(original, copy)
    record = json.loads((copy / records.RECORD).read_text())
    record["run_id"] = copy.name  # a copy whose id was edited
    (copy / records.RECORD).write_text(json.dumps(record))
    built = report.build(folder, metrics=["acc@1"], baseline="avg")
    assert len(built.runs) == 12 and built.comparison.iloc[0]["n"] == 6  # not 7, not an error
    assert built.summary.set_index("choice.pooling")["n"].to_dict() == {"avg": 6, "dgmp": 6}
    assert built.comparison.iloc[0]["per_seed"].count("0:") == 1
    duplicates = [line for line in built.dropped if line.startswith("duplicate")]
    assert len(duplicates) == 1 and original.name in duplicates[0] and copy.name in duplicates[0]
    assert f"{side} seed 0" in duplicates[0]


# ------------------------------------------------------------------------------------------- everything named


def test_unpaired_seeds_and_operators_without_a_baseline_are_named(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "runs"
    for seed in (0, 1, 4):
        write(folder, make_record("avg", seed, mAP=0.6 + seed / 100))
    for seed in (0, 1, 2, 3):
        write(folder, make_record("dgmp", seed, mAP=0.65 + seed / 100))
        write(folder, make_record("dgmp", seed, dataset="digits", mAP=0.9))  # no avg run on digits at all
    built = report.build(folder, metrics=["mAP"], baseline="avg")
    assert built.comparison.iloc[0]["n"] == 2
    assert "unpaired: dgmp vs avg on synthwriters: seeds 2, 3 of dgmp have no partner, left out" in built.dropped
    assert "unpaired: dgmp vs avg on synthwriters: seeds 4 of avg have no partner, left out" in built.dropped
    assert any(line.startswith("unpaired: dgmp on digits has no 'avg' run") for line in built.dropped)
    out = tmp_path / "out"
    assert run_cli("report", str(folder), "-b", "avg", "-m", "mAP", "--out", str(out), "--no-plots", "--html") == 0
    err = capsys.readouterr().err
    assert "seeds 2, 3 of dgmp have no partner" in err and "no 'avg' run" in err
    assert json.loads((out / "report.json").read_text())["left_out"] == built.dropped
    assert "seeds 2, 3 of dgmp have no partner" in (out / "report.html").read_text()


def test_below_five_pairs_every_line_says_it_cannot_decide(tmp_path: Path) -> None:
    built = report.build(_paired_runs(tmp_path, [0.05, 0.09]), metrics=["acc@1"], baseline="avg")
    row = built.comparison.iloc[0]
    assert math.isnan(row["effect_dz"])  # an sd from two differences is one absolute difference
    line = built.comparison_lines[0]
    assert "d_z" not in line and line.endswith("too few seeds to decide (n < 5)")
    shown = report.display_comparison(built).iloc[0]
    assert shown["note"] == "too few seeds to decide (n < 5)" and shown["P(better)"] == "1.00 (few seeds)"
    assert "no effect detectable at n = 2" in line  # the sign-flip test cannot reach α with 2 pairs
    five = report.build(_paired_runs(tmp_path / "five", [0.05, 0.09, 0.07, 0.06, 0.08]), baseline="avg")
    assert not any("too few" in line for line in five.comparison_lines)


# ------------------------------------------------------------------------------------------------ coverage

COVERAGE_N = (3, 5, 6, 10, 20)
REPS = 4000


def _nulls(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Paired differences under no operator effect: the two runs of a seed are exchangeable, each with
    its own noise (normal, or skewed: centred lognormal, centred exponential), plus a seed effect that
    both share (skewed too; pairing removes it)."""

    def lognormal(size: tuple[int, int]) -> np.ndarray:
        return rng.lognormal(0.0, 1.0, size) - math.exp(0.5)

    shape = (REPS, n)
    seed_effect = rng.exponential(1.0, shape)
    return {
        "normal": rng.normal(size=shape) - rng.normal(size=shape),
        "lognormal": (seed_effect + lognormal(shape)) - (seed_effect + lognormal(shape)),
        "exponential": (seed_effect + rng.exponential(1.0, shape)) - (seed_effect + rng.exponential(1.0, shape)),
    }


def coverage_table(seed: int = 0) -> pd.DataFrame:
    """Share of simulated comparisons whose 95% interval holds the true mean Δ (0), per null and n."""
    rng = np.random.default_rng(seed)
    rows = {}
    for n in COVERAGE_N:
        for null, deltas in _nulls(rng, n).items():
            half, _ = stats.t_interval(deltas)
            rows[(null, n)] = float(np.mean(np.abs(deltas.mean(axis=1)) <= half))
    return pd.Series(rows).unstack(level=1)


def test_the_interval_shown_keeps_its_coverage_at_small_n() -> None:
    table = coverage_table()
    assert table.shape == (3, len(COVERAGE_N))
    assert (table >= 0.93).all().all(), table
    assert (table <= 0.99).all().all(), table  # not a uselessly wide interval either
    # the interval a comparison shows is exactly this one
    deltas = np.array([0.01, 0.03, -0.005, 0.02, 0.015])
    row = stats.paired(deltas + 0.5, np.full(5, 0.5))
    half, _ = stats.t_interval(deltas)
    assert row["ci95"] == pytest.approx(half) and set(row) & {"boot_low", "boot_high"} == set()


# ------------------------------------------------------------------------------------------ contexts and ranks


def _sizes_of_one_dataset(folder: Path, datasets: tuple[str, ...] = ("synthwriters",)) -> Path:
    offsets = {"avg": 0.0, "max": 0.04, "gem": 0.01, "dgmp": 0.02}
    rng = np.random.default_rng(7)
    for dataset in datasets:
        for size in (32, 48, 64):
            for pooling, offset in offsets.items():
                for seed in range(3):
                    value = 0.5 + size / 1000 + offset + rng.normal(0, 0.03)
                    write(
                        folder,
                        make_record(pooling, seed, dataset=dataset, mAP=value, **{"cfg.dataset.image_size": size}),
                    )
    return folder


def test_hyperparameter_values_of_one_dataset_are_not_contexts(tmp_path: Path) -> None:
    folder = _sizes_of_one_dataset(tmp_path / "runs")
    built = report.build(folder, metrics=["mAP"], baseline="avg")
    assert "cfg.dataset.image_size" in built.keys and built.contexts == ["choice.dataset", "choice.model"]
    assert built.ranking is None  # one data set: nothing to rank across
    assert report.write_plots(built, tmp_path / "out") and not (tmp_path / "out" / "cd_diagram.png").exists()
    # named explicitly, the sizes are contexts: average ranks, but no CD diagram below 5
    chosen = report.build(folder, metrics=["mAP"], baseline="avg", contexts=["dataset.image_size"])
    assert chosen.ranking is not None and len(chosen.ranking["scores"]) == 3 and not chosen.ranking["cd_diagram"]
    assert any("no critical-difference diagram: 3 contexts" in line for line in report.ranking_lines(chosen.ranking))


def test_five_datasets_rank_with_sizes_as_groups_inside_each(tmp_path: Path) -> None:
    datasets = ("synthwriters", "icdar17", "clamm", "digits", "cifar10")
    built = report.build(_sizes_of_one_dataset(tmp_path / "runs", datasets), metrics=["mAP"], baseline="avg")
    ranking = built.ranking
    assert ranking is not None and len(ranking["scores"]) == 5 and ranking["cd_diagram"]
    assert ranking["within"] == ["dataset.image_size"]
    # each dataset's score is the operator's mean over its three sizes
    runs = built.runs[built.runs["choice.dataset"] == "clamm"]
    expected = runs.groupby(["choice.pooling", "cfg.dataset.image_size"])["mAP"].mean().groupby(level=0).mean()
    assert ranking["scores"].loc["clamm"].to_dict() == pytest.approx(expected.to_dict())
    written = report.write_plots(built, tmp_path / "out")
    assert (tmp_path / "out" / "cd_diagram.png") in written


def test_bad_contexts_and_mre_are_one_line_errors(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _paired_runs(tmp_path / "runs", [0.01, 0.02, 0.03])
    for args in (["--contexts", "datset"], ["--mre", "0"], ["--mre", "-0.01"], ["--mre", "nan"]):
        out = tmp_path / "out"
        assert run_cli("report", str(folder), "-b", "avg", "--out", str(out), *args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and not out.exists(), err


# --------------------------------------------------------------------------- every p-value beside its Holm value


def test_every_export_shows_each_p_value_with_its_holm_value(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "2000")  # one comparison per console line
    rng = np.random.default_rng(11)
    folder = tmp_path / "runs"
    for seed in range(7):
        write(folder, make_record("avg", seed, mAP=0.6 + rng.normal(0, 0.01)))
        write(folder, make_record("dgmp", seed, mAP=0.61 + rng.normal(0, 0.01)))
        write(folder, make_record("max", seed, mAP=0.6 + rng.normal(0, 0.01)))
    out = tmp_path / "out"
    assert (
        run_cli("report", str(folder), "-b", "avg", "-m", "mAP", "--out", str(out), "--html", "-f", "csv,md,tex") == 0
    )
    printed = capsys.readouterr().out
    built = report.build(folder, metrics=["mAP"], baseline="avg")
    comparison = built.comparison
    for name in stats.P_VALUES:
        assert list(comparison[f"{name}_holm"]) == pytest.approx(list(stats.holm(comparison[name])))
    assert (comparison["p_wilcoxon_holm"] >= comparison["p_wilcoxon"]).all()
    assert (comparison["p_wilcoxon_holm"] > comparison["p_wilcoxon"]).any()  # two tests: the adjusted value differs
    csv = pd.read_csv(out / "comparison.csv", comment="#")
    for name in stats.P_VALUES:
        assert list(csv[f"{name}_holm"]) == pytest.approx(list(comparison[f"{name}_holm"]))
    shown = report.display_comparison(built)
    for column in ("p Holm", "t-test Holm", "Wilcoxon Holm"):
        assert column in shown.columns
    texts = {ext: (out / f"comparison.{ext}").read_text() for ext in ("md", "tex")}
    texts["html"] = (out / "report.html").read_text()
    texts["console"] = printed
    for row in comparison.to_dict("records"):
        for name in stats.P_VALUES:
            adjusted = f"{row[f'{name}_holm']:.2g}"
            for where, text in texts.items():
                assert adjusted in text, (where, name)
        line = next(line for line in printed.splitlines() if line.startswith(f"{row['pooling']} vs avg"))
        assert f"Wilcoxon p = {row['p_wilcoxon']:.2g} (Holm {row['p_wilcoxon_holm']:.2g})" in line
        assert f"sign-flip p = {row['p_perm']:.2g} (Holm {row['p_perm_holm']:.2g})" in line
    for where in ("md", "tex", "html"):
        assert "sign-flip permutation test" in texts[where] and "Holm-adjusted" in texts[where], where


# ------------------------------------------------------------------------------------- seeds enough to decide


def test_mde_and_needed_seeds_match_statsmodels(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    folder = tmp_path / "runs"
    for seed in range(8):
        write(folder, make_record("avg", seed, mAP=0.6 + rng.normal(0, 0.01)))
        for pooling in ("dgmp", "gem"):
            write(folder, make_record(pooling, seed, mAP=0.61 + rng.normal(0, 0.01)))
    built = report.build(folder, metrics=["mAP"], baseline="avg")
    alpha = 0.05 / 2  # Holm's strictest step over the two comparisons
    solver = TTestPower()
    for row in built.comparison.to_dict("records"):
        assert row["alpha_planned"] == pytest.approx(alpha)
        d = solver.solve_power(effect_size=None, nobs=8, alpha=alpha, power=0.8, alternative="two-sided")
        assert row["mde"] == pytest.approx(d * row["std_delta"], rel=1e-6)
        effect = abs(row["mean_delta"]) / row["std_delta"]
        n = solver.solve_power(effect_size=effect, nobs=None, alpha=alpha, power=0.8, alternative="two-sided")
        assert row["n_needed_ttest"] == max(2, math.ceil(n))
        assert row["n_needed"] == max(math.ceil(n), power.sign_flip_floor(alpha))
        assert (
            f"MDE {row['mde']:.3g} at n = 8 (80% power, α = 0.025)"
            in built.comparison_lines[0 if row["pooling"] == "dgmp" else 1]
        )
    with_mre = report.build(folder, metrics=["mAP"], baseline="avg", mre=0.01)
    for row in with_mre.comparison.to_dict("records"):
        n = solver.solve_power(
            effect_size=0.01 / row["std_delta"], nobs=None, alpha=alpha, power=0.8, alternative="two-sided"
        )
        assert row["n_needed_for"] == 0.01 and row["n_needed"] == max(math.ceil(n), 7)
        assert f"n = {int(row['n_needed'])} to detect Δ = 0.01" in " ".join(with_mre.comparison_lines)
    # the primary test's floor: 2/2^n <= α
    assert power.sign_flip_floor(0.05) == 6 and power.sign_flip_floor(0.025) == 7
    assert math.isinf(power.minimum_detectable_effect(5, 0.01, 0.025))
    assert math.isinf(power.needed_pairs(1e-9, 1.0, 0.05))


def _pilot(results: Path, pooling: str, seeds: int, values: list[float]) -> None:
    from poolbench.config import compose
    from poolbench.run import _identity_fields

    for seed in range(seeds):
        cfg = compose([f"pooling={pooling}", "dataset=digits", f"seed={seed}", f"results_dir={results}"])
        fields = _identity_fields(cfg)
        records.atomic_write_json(
            results / fields["run_id"] / records.RECORD, {**fields, "status": "completed", "acc@1": values[seed]}
        )


def test_sweep_seeds_for_reads_the_pilot_and_never_stops_on_a_p_value(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = ["pooling=avg,max", "dataset=digits", "seed=range(0,3)"]
    quiet = tmp_path / "quiet"
    # the same seed-to-seed spread; in `far` the operators differ by a mile (p would be tiny)
    far = tmp_path / "far"
    for folder, shift in ((quiet, 0.0), (far, 0.3)):
        _pilot(folder, "avg", 3, [0.50, 0.52, 0.54])
        _pilot(folder, "max", 3, [0.51 + shift, 0.53 + shift, 0.55 + shift])
    planned = {}
    for folder in (quiet, far):
        assert run_cli("sweep", *grid, f"results_dir={folder}", "--seeds-for", "0.01") == 0
        planned[folder] = " ".join(capsys.readouterr().out.split())  # rich may wrap at any width
    assert planned[quiet] == planned[far].replace(str(far), str(quiet))  # the observed Δ plays no part
    sd_pair = math.sqrt(2) * 0.02  # pooled seed sd of both configurations, √2 for a difference
    n = TTestPower().solve_power(effect_size=0.01 / sd_pair, nobs=None, alpha=0.05, power=0.8, alternative="two-sided")
    expected = max(math.ceil(n), 6)
    assert f"{expected} seeds per configuration (the grid has 3)" in planned[quiet]
    plan = power.propose_seeds([p for p in quiet.iterdir() if p.is_dir()], 0.01)
    assert plan.seeds == expected and plan.sd_run == pytest.approx(0.02) and plan.comparisons == 1
    # with --run-seeds the grid's seed axis becomes range(0, n); pilot seeds are reused (dry run: nothing runs)
    code = run_cli("sweep", *grid, f"results_dir={quiet}", "--seeds-for", "0.01", "--run-seeds", "--dry-run")
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0 and f"{2 * expected - 6} of {2 * expected} runs would start" in out


def test_sweep_seeds_for_needs_a_pilot(
    run_cli: Callable[..., int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = ["pooling=avg,max", "dataset=digits", "seed=0", f"results_dir={tmp_path}"]
    assert run_cli("sweep", *grid, "--seeds-for", "0.01") == 2
    assert "needs pilot runs" in capsys.readouterr().err
    assert run_cli("sweep", *grid, "--seeds-for", "-1") == 2
    assert run_cli("sweep", *grid, "--run-seeds") == 2
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------- figures


def test_means_are_dots_with_intervals_and_significant_panels_stay(tmp_path: Path) -> None:
    from matplotlib.collections import LineCollection

    from poolbench.report import plots

    folder = tmp_path / "runs"
    for seed in range(8):
        # a tiny but consistent gain: within 1% of the value (below the noise rule), yet significant
        write(folder, make_record("avg", seed, mAP=0.6 + seed / 1000, **{"latency.peak_mem_mb": 41.0}))
        write(folder, make_record("dgmp", seed, mAP=0.603 + seed / 1000, **{"latency.peak_mem_mb": 41.0}))
    built = report.build(folder, metrics=["mAP", "latency.peak_mem_mb"], baseline="avg")
    assert built.comparison.set_index("metric").loc["mAP", "p_perm_holm"] < 0.05
    panels, omitted = plots.mean_panels(built)
    assert [metric for metric, _, _ in panels] == ["mAP"]  # kept although its means are within 1% of each other
    assert omitted == ["peak memory (MB) on synthwriters / smallcnn"]
    part = panels[0][2]
    below, above = plots.mean_intervals(part, "mAP")
    half = scipy_stats.t.ppf(0.975, 7) * part["mAP.std"].to_numpy() / math.sqrt(8)
    assert below == pytest.approx(half) and above == pytest.approx(half)
    written = plots.plot_means(built, tmp_path / "out")
    assert [p.name for p in written] == ["means.png", "means.pdf"]
    import matplotlib.pyplot as plt

    fig = plt.figure()
    ax = fig.add_subplot()
    ax.errorbar([0], [0.6], yerr=[[0.01], [0.01]])  # what plot_means draws: markers and error lines, no bars
    assert not ax.patches and any(isinstance(c, LineCollection) for c in ax.collections)
    plt.close(fig)


def test_a_single_measurement_shows_no_spread(tmp_path: Path) -> None:
    from poolbench.report import plots

    folder = tmp_path / "runs"
    for pooling, mem in (("avg", 41.0), ("dgmp", 60.0)):
        for seed in range(2):
            write(folder, make_record(pooling, seed, mAP=0.6 + seed / 100, **{"latency.peak_mem_mb": mem + seed}))
    ids = {p: sorted(r.name for r in folder.iterdir() if r.name.startswith(p)) for p in ("avg", "dgmp")}
    rows = [{"run_ids": ids[p], "pooling": p, "peak_mem_mb": m} for p, m in (("avg", 41.0), ("dgmp", 60.0))]
    (folder / "side_by_side.json").write_text(json.dumps({"schema": 1, "rows": rows}))
    built = report.build(folder, metrics=["latency.peak_mem_mb"])
    summary = built.summary.set_index("choice.pooling")
    assert summary["latency.peak_mem_mb.std"].isna().all()  # one measurement per configuration: no ± 0.00
    cells = report.display_summary(built).set_index("pooling")["latency.peak_mem_mb"]
    assert cells["dgmp"] == "60.00" and "±" not in cells["avg"]
    panels, _ = plots.mean_panels(built)
    below, above = plots.mean_intervals(panels[0][2], "latency.peak_mem_mb")
    assert not below.any() and not above.any()
