"""`poolbench report` on hand-made run records: grouping, exact aggregates, paired tests, exports, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from poolbench import records, report
from poolbench.errors import PoolbenchError

# mAP per pooling and seed; avg is the baseline.
MAP = {
    "avg": [0.610, 0.640, 0.605],
    "max": [0.600, 0.655, 0.590],
    "dgmp": [0.660, 0.680, 0.650],
}
LATENCY = {"avg": [1.00, 1.10, 1.05], "max": [1.02, 1.01, 1.07], "dgmp": [2.50, 2.40, 2.61]}


def make_record(pooling: str, seed: int, *, dataset: str = "synthwriters", **fields: Any) -> dict[str, Any]:
    run_id = f"{pooling}-smallcnn-{dataset}-s{seed}-{abs(hash(str(sorted(fields.items())))) % 10**6:06d}"
    return {
        "run_id": run_id,
        "status": "completed",
        "pooling": pooling,
        "model": "smallcnn",
        "dataset": dataset,
        "seed": seed,
        "experiment": None,
        "choice.dataset": dataset,
        "choice.model": "smallcnn",
        "choice.pooling": pooling,
        "choice.local_pooling": "none",
        "choice.trainer": "default",
        "cfg.seed": seed,
        "cfg.pooling.name": pooling,
        # each option's own definition at its default: varies with the pooling, but is not a key
        "cfg.pooling.lr_mult": 10.0 if pooling == "gem" else 1.0,
        **({"cfg.pooling.lam": 1000} if pooling == "dgmp" else {}),
        "cfg.trainer.epochs": 4,
        "cfg.results_dir": "results/runs",
        "cfg.sweep_name": "test",
        "cfg.grid.seed": "range(0,3)",
        "env.torch": "2.15.0",
        "env.device_name": "x86_64",
        "env.git_commit": "abc123",
        "wall_time_s": 60.0,
        **fields,
    }


def write(results: Path, record: dict[str, Any]) -> None:
    records.atomic_write_json(results / record["run_id"] / records.RECORD, record)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    folder = tmp_path / "runs"
    for pooling, values in MAP.items():
        for seed, value in enumerate(values):
            write(folder, make_record(pooling, seed, mAP=value, **{"latency.infer_image_ms": LATENCY[pooling][seed]}))
    return folder


def test_summary_is_mean_std_n_over_seeds(results: Path) -> None:
    built = report.build(results, baseline="avg")
    assert built.keys == ["choice.pooling"]  # seed, lr_mult/lam at default, results_dir, sweep_name, grid: not keys
    assert built.metrics == ["mAP", "latency.infer_image_ms"]
    summary = built.summary.set_index("choice.pooling")
    for pooling, values in MAP.items():
        assert summary.loc[pooling, "n"] == 3
        assert summary.loc[pooling, "mAP.mean"] == pytest.approx(np.mean(values), rel=1e-12)
        assert summary.loc[pooling, "mAP.std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
        assert summary.loc[pooling, "mAP.n"] == 3
        assert summary.loc[pooling, "latency.infer_image_ms.mean"] == pytest.approx(np.mean(LATENCY[pooling]))
    cell = report.display_summary(built).set_index("pooling").loc["dgmp", "mAP"]
    assert cell == f"{np.mean(MAP['dgmp']):.3f} ± {np.std(MAP['dgmp'], ddof=1):.3f}"


def test_paired_comparison_matches_scipy(results: Path) -> None:
    built = report.build(results, metrics=["mAP"], baseline="avg")
    row = built.comparison.set_index("pooling").loc["dgmp"]
    deltas = np.array(MAP["dgmp"]) - np.array(MAP["avg"])
    half_width = stats.t.ppf(0.975, 2) * np.std(deltas, ddof=1) / math.sqrt(3)
    assert row["n"] == 3
    assert row["mean_delta"] == pytest.approx(deltas.mean(), rel=1e-12)
    assert row["ci95"] == pytest.approx(half_width, rel=1e-12)
    assert row["p_ttest"] == pytest.approx(stats.ttest_rel(MAP["dgmp"], MAP["avg"]).pvalue, rel=1e-12)
    assert math.isnan(row["p_wilcoxon"])  # n = 3 cannot reach significance: not reported
    assert set(built.comparison["pooling"]) == {"dgmp", "max"}
    line = next(line for line in built.comparison_lines if line.startswith("dgmp"))
    p_value = stats.ttest_rel(MAP["dgmp"], MAP["avg"]).pvalue
    # Changed by issue 23: the primary p is the exact sign-flip test (2/2^3 at best with 3 pairs), every p
    # stands beside its Holm value, and 3 pairs end with a plain note that they cannot decide.
    assert row["p_perm"] == pytest.approx(0.25)  # every Δ positive: 2 of 8 sign patterns reach |mean|
    assert line.startswith(f"dgmp vs avg: ΔmAP = {deltas.mean():+.3g} ± {half_width:.3g} (95% t-interval), ")
    assert "sign-flip p = 0.25 (Holm " in line and f"t-test p = {p_value:.2g} (Holm " in line
    assert "better in 3/3 seeds, n = 3" in line and line.endswith("too few seeds to decide (n < 5)")


def test_pairs_only_matching_seeds_and_contexts_and_wilcoxon_from_six(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    base, treated = rng.normal(0.6, 0.02, 7), rng.normal(0.63, 0.02, 7)
    for seed in range(7):
        write(tmp_path, make_record("avg", seed, mAP=base[seed]))
        if seed != 3:  # seed 3 has no dgmp run: it must not be paired
            write(tmp_path, make_record("dgmp", seed, mAP=treated[seed]))
        # another dataset, with only the baseline: no pairs there
        write(tmp_path, make_record("avg", seed, dataset="digits", mAP=0.9))
    built = report.build(tmp_path, metrics=["mAP"], baseline="avg")
    assert built.keys == ["choice.dataset", "choice.pooling"]
    assert len(built.comparison) == 1
    row = built.comparison.iloc[0]
    seeds = [s for s in range(7) if s != 3]
    assert row["context"] == "synthwriters" and row["n"] == 6
    assert row["mean_delta"] == pytest.approx(np.mean(treated[seeds] - base[seeds]), rel=1e-12)
    assert row["p_ttest"] == pytest.approx(stats.ttest_rel(treated[seeds], base[seeds]).pvalue, rel=1e-12)
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(treated[seeds], base[seeds]).pvalue, rel=1e-12)
    assert built.comparison_lines[0].startswith("[synthwriters] dgmp vs avg: ΔmAP = ")


def test_swept_pooling_parameter_is_a_key_and_labels_the_operator(tmp_path: Path) -> None:
    for seed in range(2):
        write(tmp_path, make_record("avg", seed, mAP=0.5 + seed / 100))
        for p in (2.0, 4.0):
            write(tmp_path, make_record("gem", seed, mAP=0.6 + p / 100 + seed / 100, **{"cfg.pooling.p": p}))
    built = report.build(tmp_path, metrics=["mAP"], baseline="avg")
    assert built.keys == ["choice.pooling", "cfg.pooling.p"]
    assert sorted(built.comparison["pooling"]) == ["gem (p=2.0)", "gem (p=4.0)"]
    assert built.comparison.set_index("pooling").loc["gem (p=4.0)", "mean_delta"] == pytest.approx(0.14)


def test_broken_and_unfinished_records_are_skipped_and_listed(results: Path) -> None:
    (results / "truncated").mkdir()
    (results / "truncated" / records.RECORD).write_text('{"status": "completed", "mAP": 0.')
    write(results, {**make_record("gem", 0, mAP=0.1), "status": "failed", "error": "NonFiniteLossError: loss is nan"})
    write(results, {**make_record("gem", 1, mAP=0.1), "status": "running"})
    built = report.build(results)
    assert len(built.runs) == 9 and "gem" not in set(built.runs["pooling"])
    assert len(built.skipped) == 3
    assert any("truncated" in line and "corrupt" in line for line in built.skipped)
    assert any("is failed: NonFiniteLossError: loss is nan" in line for line in built.skipped)
    assert any("is running" in line for line in built.skipped)


def test_where_filters_and_bad_choices_are_one_line_errors(results: Path) -> None:
    built = report.build(results, where=["pooling=avg,dgmp", "trainer.epochs=4"])
    assert sorted(built.summary["choice.pooling"]) == ["avg", "dgmp"]
    with pytest.raises(PoolbenchError, match="no completed run matches"):
        report.build(results, where=["dataset=digits"])
    with pytest.raises(PoolbenchError, match="unknown --where key 'pooilng'. Did you mean 'pooling'"):
        report.build(results, where=["pooilng=avg"])
    assert report.build(results, metrics=["map"]).metrics == ["mAP"]  # case does not matter
    with pytest.raises(PoolbenchError, match="unknown metric 'mAp1'. Did you mean 'mAP'"):
        report.build(results, metrics=["mAp1"])
    with pytest.raises(PoolbenchError, match="unknown baseline pooling 'avgg'"):
        report.build(results, baseline="avgg")


def test_empty_or_missing_results_dir(tmp_path: Path) -> None:
    with pytest.raises(PoolbenchError, match="does not exist"):
        report.build(tmp_path / "nope")
    with pytest.raises(PoolbenchError, match="no run records"):
        report.build(tmp_path)
    write(tmp_path, {**make_record("avg", 0, mAP=0.5), "status": "interrupted"})
    with pytest.raises(PoolbenchError, match=r"no completed runs .* \(1 unfinished or broken\)"):
        report.build(tmp_path)


def test_environment_differences_are_warned(results: Path) -> None:
    write(results, make_record("avg", 5, mAP=0.6, **{"env.torch": "2.14.0"}))
    warnings = report.build(results).warnings
    assert warnings == ["compared runs differ in torch: 2.15.0 (9 runs), 2.14.0 (1 runs)"]


def test_every_export_format_is_written_and_parses_back(results: Path, tmp_path: Path) -> None:
    built = report.build(results, baseline="avg")
    out = tmp_path / "report"
    written = report.write_tables(built, out, ["csv", "md", "tex"])
    expected = [f"{table}.{ext}" for table in ("summary", "comparison") for ext in ("csv", "md", "tex")]
    assert sorted(p.name for p in written) == sorted([*expected, "runs.csv"])

    summary = pd.read_csv(out / "summary.csv", comment="#").set_index("pooling")  # provenance: '# ' lines
    assert summary.loc["dgmp", "mAP.mean"] == pytest.approx(np.mean(MAP["dgmp"]))
    assert summary.loc["dgmp", "mAP.std"] == pytest.approx(np.std(MAP["dgmp"], ddof=1))
    long_form = pd.read_csv(out / "runs.csv", comment="#")
    assert len(long_form) == 9 and {"run_id", "seed", "mAP", "cfg.trainer.epochs"} <= set(long_form.columns)
    comparison = pd.read_csv(out / "comparison.csv", comment="#")
    assert set(comparison["pooling"]) == {"dgmp", "max"}

    lines = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["pooling", "n", "mAP", "latency.infer_image_ms"]
    assert set(lines[1]) <= set("|-") and len(lines) == 2 + 3
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert rows["avg"][2] == f"{np.mean(MAP['avg']):.3f} ± {np.std(MAP['avg'], ddof=1):.3f}"

    tex = (out / "summary.tex").read_text()
    body = tex[tex.index(r"\midrule") + len(r"\midrule") : tex.index(r"\bottomrule")].strip().splitlines()
    assert tex.count(r"\begin{tabular}{llll}") == 1 and tex.count(r"\end{tabular}") == 1
    assert len(body) == 3 and all(line.count("&") == 3 and line.endswith(r"\\") for line in body)
    assert r"\pm" in body[0] and tex.count("$") % 2 == 0
    assert r"latency.infer\_image\_ms" in tex  # underscores escaped
    comparison_tex = (out / "comparison.tex").read_text()
    assert r"$\Delta$ mean $\pm$ 95\% CI" in comparison_tex


def test_parquet_only_when_pyarrow_is_there(results: Path, tmp_path: Path) -> None:
    has_pyarrow = "parquet" in report.available_formats()
    if not has_pyarrow:
        with pytest.raises(PoolbenchError, match="needs pyarrow"):
            report.parse_formats("csv,parquet")
        return
    report.write_tables(report.build(results), tmp_path, ["parquet"])
    assert len(pd.read_parquet(tmp_path / "runs.parquet")) == 9


def test_parse_formats() -> None:
    assert report.parse_formats("csv, MD,tex") == ["csv", "md", "tex"]
    with pytest.raises(PoolbenchError, match="unknown report format 'xlsx'"):
        report.parse_formats("xlsx")


def test_plots_are_written(results: Path, tmp_path: Path) -> None:
    for seed, value in enumerate(MAP["avg"]):  # a second context so both plots have several panels/groups
        write(results, make_record("avg", seed, dataset="digits", mAP=value + 0.2, **{"latency.infer_image_ms": 0.5}))
        write(results, make_record("dgmp", seed, dataset="digits", mAP=value + 0.25, **{"latency.infer_image_ms": 1.0}))
    written = report.write_plots(report.build(results), tmp_path)
    assert [p.name for p in written] == ["pareto.png", "pareto.pdf", "means.png", "means.pdf"]
    for path in written[::2]:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 300 and image.shape[1] > 500


def test_cli_prints_table_and_comparison_and_writes_files(
    run_cli: Callable[..., int],
    results: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    out = tmp_path / "out"
    code = run_cli(
        "report", str(results), "--baseline", "avg", "--metric", "mAP", "--out", str(out), "--format", "csv,md"
    )
    captured = capsys.readouterr()
    printed = captured.out
    assert code == 0, captured.err
    assert "9 completed runs" in printed and "grouped by pooling" in printed
    assert "dgmp vs avg: ΔmAP = +0.045" in printed
    assert sorted(p.name for p in out.iterdir() if p.name != report.output.OWNED) == [
        "comparison.csv", "comparison.md", "means.pdf", "means.png", "pareto.pdf", "pareto.png", "report.json",
        "runs.csv", "summary.csv", "summary.md",
    ]  # fmt: skip


def test_cli_missing_dir_is_one_red_line(
    run_cli: Callable[..., int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = run_cli("report", str(tmp_path / "missing"))
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.strip().startswith("error: results directory") and len(captured.err.strip().splitlines()) == 1


def test_a_target_operator_is_compared_under_its_class_name(tmp_path: Path) -> None:
    for seed, (base, mine) in enumerate(((0.60, 0.63), (0.62, 0.66), (0.61, 0.64))):
        write(tmp_path, make_record("avg", seed, mAP=base))
        custom = make_record("SoftmaxPool", seed, mAP=mine)
        custom.update(
            {"choice.pooling": "custom", "cfg.pooling.name": "custom", "cfg.pooling._target_": "m.SoftmaxPool"}
        )
        write(tmp_path, custom)
    built = report.build(tmp_path, metrics=["mAP"], baseline="SoftmaxPool")
    assert set(built.summary["choice.pooling"]) == {"avg", "SoftmaxPool"}
    assert any(line.startswith("avg vs SoftmaxPool") for line in built.comparison_lines)
