"""The benchmark harness (not its timings): table columns, baselines, skipped passes, files, errors."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from poolbench import bench, records, side_by_side
from poolbench.engine.memory import peak_memory_mb
from poolbench.errors import ConfigError

DOCUMENTED_COLUMNS = (
    "section",
    "name",
    "model",
    "shape",
    "dtype",
    "device",
    "threads",
    "pass",
    "median_ms",
    "iqr_ms",
    "samples",
    "images_per_s",
    "ratio_to_avg",
    "ratio_to_avg_ci",
    "ratio_to_reference",
    "peak_mem_mb",
    "bandwidth_gb_s",
    "copy_bandwidth_gb_s",
    "flops",
    "params",
    "note",
)
SHAPE = (2, 8, 4, 4)


class ArgmaxPool(nn.Module):
    """Index of each channel's maximum: a pool without a gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).argmax(-1).to(x.dtype)


@pytest.fixture
def settings() -> bench.BenchSettings:
    return bench.BenchSettings.make(device="cpu", threads=torch.get_num_threads(), quick=True, repeats=3)


def _find(rows: list[bench.BenchRow], section: str, name: str, pass_: str) -> bench.BenchRow:
    (row,) = [r for r in rows if (r.section, r.name, r.pass_) == (section, name, pass_)]
    return row


def test_rows_have_the_documented_columns_and_avg_is_its_own_baseline(settings: bench.BenchSettings) -> None:
    rows = bench.bench_operators([("global", "max"), ("local", "max")], [SHAPE], settings)
    assert bench.COLUMNS == DOCUMENTED_COLUMNS
    assert all(tuple(bench.row_dict(r)) == DOCUMENTED_COLUMNS for r in rows)
    for section in ("global", "local"):
        for pass_ in ("forward", "forward+backward"):
            avg = _find(rows, section, "avg", pass_)
            assert avg.ratio_to_avg == 1.0 and avg.ratio_to_avg_ci == (1.0, 1.0)
            assert "ratio baseline" in avg.note  # added although only max was asked for
            other = _find(rows, section, "max", pass_)
            low, high = other.ratio_to_avg_ci  # the median of per-round ratios, with its interval
            assert low <= other.ratio_to_avg <= high
            assert other.samples >= bench.MIN_SAMPLES and other.peak_mem_mb is not None
            assert other.images_per_s == pytest.approx(SHAPE[0] / other.median_ms * 1e3)


def test_bandwidth_only_for_memory_bound_forward(settings: bench.BenchSettings) -> None:
    rows = bench.bench_operators([("global", "avg"), ("global", "lse")], [SHAPE], settings)
    copy = _find(rows, "baseline", "copy", "forward")
    avg = _find(rows, "global", "avg", "forward")
    assert copy.bandwidth_gb_s is not None and copy.bandwidth_gb_s > 0
    assert avg.copy_bandwidth_gb_s == copy.bandwidth_gb_s
    moved_bytes = (2 * 8 * 4 * 4 + 2 * 8) * 4
    assert avg.bandwidth_gb_s == pytest.approx(moved_bytes / avg.median_ms / 1e6)
    assert _find(rows, "global", "lse", "forward").bandwidth_gb_s is None
    assert _find(rows, "global", "avg", "forward+backward").bandwidth_gb_s is None


def test_backward_is_skipped_for_a_non_differentiable_operator(settings: bench.BenchSettings) -> None:
    rows = bench.bench_operators([("global", "argmax", ArgmaxPool())], [SHAPE], settings)
    forward = _find(rows, "global", "argmax", "forward")
    backward = _find(rows, "global", "argmax", "forward+backward")
    assert forward.median_ms is not None
    assert backward.median_ms is None and backward.samples == 0
    assert backward.note == bench.NOT_DIFFERENTIABLE


def test_cpu_peak_memory_counts_the_tensors_a_call_creates() -> None:
    def chain() -> torch.Tensor:
        a = torch.ones(65536)  # 256 KiB
        b = a + 1  # a and b alive: 512 KiB
        del a
        return b.view(256, 256) * 2  # the view shares b's storage: b and the result, 512 KiB

    assert peak_memory_mb(chain, torch.device("cpu")) == 0.5


def test_results_files_are_written_and_parseable(settings: bench.BenchSettings, tmp_path: Path) -> None:
    rows = bench.bench_operators([("global", "avg")], [SHAPE], settings, backward=False)
    csv_path, json_path = bench.write_results(rows, bench.environment(settings), tmp_path)
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert tuple(table[0]) == DOCUMENTED_COLUMNS and len(table) == len(rows)
    record = json.loads(json_path.read_text())
    assert record["columns"] == list(DOCUMENTED_COLUMNS) and len(record["rows"]) == len(rows)
    env = record["environment"]
    assert env["num_threads"] == settings.threads and env["device"] == "cpu" and env["dtype"] == "fp32"
    assert {"torch", "python", "hostname", "platform"} <= set(env)
    again = bench.write_results(rows, env, tmp_path)  # same second: a new file, not an overwrite
    assert again[1] != json_path


@pytest.mark.parametrize(("text", "expected"), [("32,2048,7,7", (32, 2048, 7, 7)), ("2x3x4x5", (2, 3, 4, 5))])
def test_parse_shape(text: str, expected: tuple[int, ...]) -> None:
    assert bench.parse_shape(text) == expected


@pytest.mark.parametrize("text", ["32,2048,7", "a,b,c,d", "32,0,7,7", ""])
def test_bad_shape_is_one_line(text: str) -> None:
    with pytest.raises(ConfigError, match="expected B,C,H,W") as info:
        bench.parse_shape(text)
    assert "\n" not in str(info.value)


def test_unknown_operator_lists_the_valid_choices() -> None:
    with pytest.raises(ConfigError) as info:
        bench.select_operators(["avg", "dgnp"], ["global"])
    message = str(info.value)
    assert "\n" not in message and "'dgnp'" in message and "Did you mean 'dgmp'" in message
    assert "Valid choices:" in message and "netvlad" in message
    with pytest.raises(ConfigError, match="unknown local pooling 'dgmp'"):
        bench.select_operators(["dgmp"], ["local"])  # a global-only operator under --local


def test_select_operators_applies_names_to_every_kind_that_has_them() -> None:
    assert bench.select_operators(["avg", "dgmp"], ["global", "local"]) == [
        ("global", "avg"),
        ("global", "dgmp"),
        ("local", "avg"),
    ]


def test_cli_quick_run_writes_results(tmp_path: Path) -> None:
    from poolbench.cli import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["bench", "--quick", "--ops", "avg,max", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 30
    assert "input 16x256x7x7" in result.output and "input 8x128x24x24" in result.output
    (json_path,) = tmp_path.glob("*.json")
    assert len(list(tmp_path.glob("*.csv"))) == 1
    timed = {(r["section"], r["name"], r["pass"]) for r in json.loads(json_path.read_text())["rows"] if r["median_ms"]}
    for kind in ("global", "local"):
        for pass_ in ("forward", "forward+backward"):
            assert {(kind, "avg", pass_), (kind, "max", pass_)} <= timed


def test_cli_bad_option_values_are_config_errors() -> None:
    from poolbench.cli import app

    for args in (["--ops", "nope"], ["--shape", "1,2,3"], ["--dtype", "fp8"], ["--local", "--global"]):
        result = CliRunner().invoke(app, ["bench", "--no-save", *args])
        assert isinstance(result.exception, ConfigError), args
        assert "\n" not in str(result.exception)


def test_vs_reference_column_times_the_reference_formulation(
    settings: bench.BenchSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[tuple[str, str, nn.Module]] = []

    def reference_for(kind: str, name: str, module: nn.Module):  # noqa: ANN202
        asked.append((kind, name, module))
        return (lambda x: x.mean((2, 3))) if (kind, name) == ("global", "avg") else None

    monkeypatch.setattr(bench, "reference_for", reference_for)
    rows = bench.bench_operators([("global", "avg"), ("global", "max")], [SHAPE], settings)
    assert {(kind, name) for kind, name, _ in asked} == {("global", "avg"), ("global", "max")}
    assert all(isinstance(module, nn.Module) for _, _, module in asked)
    for pass_ in ("forward", "forward+backward"):
        avg = _find(rows, "global", "avg", pass_)
        assert avg.ratio_to_reference is not None and avg.ratio_to_reference > 0
        other = _find(rows, "global", "max", pass_)
        assert other.ratio_to_reference is None and "no reference formulation" in other.note
    assert not [r for r in rows if r.section == "reference"]  # references are columns, not rows


def test_operator_rows_carry_forward_flops_and_parameters(settings: bench.BenchSettings) -> None:
    rows = bench.bench_operators([("global", "gem"), ("global", "avg")], [SHAPE], settings)
    avg, gem = _find(rows, "global", "avg", "forward"), _find(rows, "global", "gem", "forward")
    assert avg.params == 0 and gem.params == 1
    assert avg.flops == 2 * 8 * 4 * 4  # one per input element of the mean (a reduction)
    assert gem.flops > avg.flops
    assert _find(rows, "global", "gem", "forward+backward").flops is None  # counted for the forward only


def test_build_case_keeps_global_and_local_pool_lr_mults_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    local_node = bench.local_pooling_config("mixed")
    monkeypatch.setattr(bench, "local_pooling_config", lambda name: {**local_node, "lr_mult": 0.5})
    case = bench.build_case(
        "smallcnn", "gem", local_pooling="mixed", in_channels=1, input_size=16, model_overrides={"width": 4, "depth": 2}
    )
    groups = case.optimizer.param_groups
    base_lr = groups[0]["lr"]
    by_params = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert {by_params[id(p)] for p in case.net.global_pool_parameters()} == {10 * base_lr}  # gem's lr_mult
    assert {by_params[id(p)] for p in case.net.local_pool_parameters()} == {0.5 * base_lr}


def test_results_stay_inside_the_out_folder(
    settings: bench.BenchSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.socket, "gethostname", lambda: "../../escaped/host")
    rows = bench.bench_operators([("global", "avg")], [SHAPE], settings, backward=False)
    out = tmp_path / "a" / "out"
    paths = bench.write_results(rows, {}, out)
    assert all(p.parent == out for p in paths) and sorted(out.iterdir()) == sorted(paths)
    assert not (tmp_path / "escaped").exists()


def test_cli_out_that_is_a_file_is_one_line_and_times_nothing(
    tmp_path: Path, run_cli, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "file"
    target.write_text("keep")
    monkeypatch.setattr(bench, "bench_operators", lambda *a, **k: pytest.fail("timed despite a bad --out"))
    assert run_cli("bench", "--quick", "--ops", "avg", "--out", str(target / "sub")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is a file" in err and len(err.strip().splitlines()) == 1
    assert target.read_text() == "keep"


def test_cli_escapes_markup_in_names_and_notes() -> None:
    from rich.console import Console

    from poolbench.cli.bench import results_tables, side_by_side_table

    row = bench.row_dict(bench.BenchRow("global", "[bold]op", "-", "1x1x1x1", "fp32", "cpu", 1, "forward"))
    row["note"] = "RuntimeError: [/x] broke"
    console = Console(record=True, width=400)
    for table in results_tables([row], "cpu [red]"):
        console.print(table)
    document = {
        "baseline": "[i]avg",
        "rows": [
            {
                "run_ids": ["r"],
                "model": "[/x]",
                "pooling": "[bold]p",
                "local_pooling": "none",
                "input": "1x1x1x1",
                "infer_image_ms": 1.0,
                "infer_image_ms_ci": [0.5, 1.5],
                "ratio_infer": None,
                "ratio_infer_ci": None,
                "train_step_ms": 2.0,
                "train_step_ms_ci": [1.0, 3.0],
                "pool_fwd_ms": 0.1,
                "pool_fwdbwd_ms": None,
                "peak_mem_mb": 1.0,
                "flops_per_image": 10**9,
            }
        ],
    }
    console.print(side_by_side_table(document))
    text = console.export_text()
    for literal in ("[bold]op", "[/x] broke", "cpu [red]", "[/x]", "[bold]p", "[i]avg"):
        assert literal in text


# ------------------------------------------------------------------------------------ side by side

TINY_RUN = [
    "dataset=digits",
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "trainer.latency.enabled=false",
    "trainer.latency.batch_size=8",
    "model.width=4",
    "model.depth=2",
]
SIDE_BY_SIDE_KEYS = {
    "run_ids",
    "pooling",
    "model",
    "infer_image_ms",
    "infer_image_ms_ci",
    "train_step_ms",
    "train_step_ms_ci",
    "pool_fwd_ms",
    "pool_fwdbwd_ms",
    "peak_mem_mb",
    "ratio_infer",
    "ratio_infer_ci",
    "flops_per_image",
}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory, trained_runs: Callable[..., Path]) -> dict[str, dict]:
    """Three finished runs: avg with seeds 0 and 1 (one configuration), dgmp with seed 0 (trained once per session)."""
    results = tmp_path_factory.mktemp("runs")
    found = {}
    for pooling, seed in (("avg", 0), ("avg", 1), ("dgmp", 0)):
        run_dir = trained_runs([*TINY_RUN, f"pooling={pooling}", f"seed={seed}"], results)
        found[f"{pooling}{seed}"] = records.read_record(run_dir)
    return {"dir": results, **found}


def _side_by_side(tiny_runs: dict, **kwargs) -> dict:  # noqa: ANN003
    path = side_by_side.side_by_side(tiny_runs["dir"], rounds=3, warmup=1, **kwargs)
    assert path == tiny_runs["dir"] / side_by_side.SIDE_BY_SIDE
    return json.loads(path.read_text())


def test_side_by_side_times_each_configuration_once_against_the_baseline(tiny_runs: dict) -> None:
    document = _side_by_side(tiny_runs, baseline="avg")
    assert document["schema"] == 1 and document["baseline"] == "avg" and document["skipped"] == []
    assert {"created", "env", "rows"} <= set(document) and "timing_warnings" in document["env"]
    rows = {row["pooling"]: row for row in document["rows"]}
    assert set(rows) == {"avg", "dgmp"}
    assert sorted(rows["avg"]["run_ids"]) == sorted([tiny_runs["avg0"]["run_id"], tiny_runs["avg1"]["run_id"]])
    assert rows["dgmp"]["run_ids"] == [tiny_runs["dgmp0"]["run_id"]]
    for row in rows.values():
        assert set(row) >= SIDE_BY_SIDE_KEYS and row["model"] == "smallcnn" and row["rounds"] == 3
        assert row["input"] == "8x1x32x32" and row["batch_size"] == 8
        for key in ("infer_image_ms", "train_step_ms"):
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high
        assert row["pool_fwd_ms"] > 0 and row["pool_fwdbwd_ms"] > 0 and row["peak_mem_mb"] > 0
        assert row["flops_per_image"] > row["pool_flops"] > 0
    assert rows["avg"]["ratio_infer"] == 1.0 and rows["avg"]["ratio_infer_ci"] == [1.0, 1.0]  # paired with itself
    low, high = rows["dgmp"]["ratio_infer_ci"]
    assert low <= rows["dgmp"]["ratio_infer"] <= high
    assert rows["dgmp"]["params"] == rows["avg"]["params"] + 1  # DGMP's log λ


def test_side_by_side_without_baseline_and_for_chosen_runs(tiny_runs: dict) -> None:
    document = _side_by_side(tiny_runs, run_ids=[tiny_runs["dgmp0"]["run_id"]])
    (row,) = document["rows"]
    assert row["pooling"] == "dgmp" and row["ratio_infer"] is None and row["ratio_infer_ci"] is None


def test_side_by_side_bad_choices_are_config_errors(tiny_runs: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown baseline pooling 'gem'.*Valid choices: avg, dgmp"):
        side_by_side.side_by_side(tiny_runs["dir"], baseline="gem")
    with pytest.raises(ConfigError, match="unknown completed run 'nope'"):
        side_by_side.side_by_side(tiny_runs["dir"], run_ids=["nope"])
    with pytest.raises(ConfigError, match="no completed run"):
        side_by_side.side_by_side(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        side_by_side.side_by_side(tmp_path / "missing")
    assert not (tmp_path / side_by_side.SIDE_BY_SIDE).exists()


def test_side_by_side_rebuilds_learned_parameters_from_the_checkpoint(tiny_runs: dict, tmp_path: Path) -> None:
    import math
    import shutil

    run_dir = tmp_path / "copy" / tiny_runs["dgmp0"]["run_id"]
    shutil.copytree(Path(tiny_runs["dgmp0"]["run_dir"]), run_dir)
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    checkpoint["model"]["pool.log_lam"] = torch.tensor(math.log(123.0))
    torch.save(checkpoint, run_dir / "checkpoint.pt")
    net = records.load_run(run_dir, model=True).model
    assert float(net.pool.lam.detach()) == pytest.approx(123.0)


def test_side_by_side_reads_runs_where_they_are_found_not_where_records_point(tiny_runs: dict, tmp_path: Path) -> None:
    import shutil

    results = tmp_path / "results"
    for key in ("avg0", "dgmp0"):
        shutil.copytree(Path(tiny_runs[key]["run_dir"]), results / tiny_runs[key]["run_id"])
    hostile = results / tiny_runs["dgmp0"]["run_id"] / "result.json"
    hostile.write_text(json.dumps({**json.loads(hostile.read_text()), "run_dir": "/nonexistent/../etc"}))
    (results / tiny_runs["avg0"]["run_id"] / "checkpoint.pt").unlink()
    document = json.loads(side_by_side.side_by_side(results, rounds=2, warmup=1).read_text())
    assert [row["pooling"] for row in document["rows"]] == ["dgmp"]
    (skipped,) = document["skipped"]
    assert skipped["run_id"] == tiny_runs["avg0"]["run_id"] and "checkpoint.pt" in skipped["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_cli_runs_mode_writes_and_shows_side_by_side(
    tiny_runs: dict, run_cli, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli("bench", "--runs", str(tiny_runs["dir"]), "--baseline", "avg", "--repeats", "2") == 0
    out = capsys.readouterr().out
    assert "side by side" in out and "dgmp" in out and "wrote" in out
    assert run_cli("bench", "--runs", str(tiny_runs["dir"]), "--baseline", "nope") == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Valid choices: avg, dgmp" in err


def test_ratio_to_avg_has_an_interval_from_interleaved_rounds_and_copy_is_explained(
    settings: bench.BenchSettings,
) -> None:
    rows = bench.bench_operators([("global", "gem")], [SHAPE], settings, backward=False)
    gem = next(r for r in rows if r.name == "gem")
    low, high = gem.ratio_to_avg_ci
    assert low <= gem.ratio_to_avg <= high
    assert next(r for r in rows if r.name == "copy").note == bench.COPY_NOTE
