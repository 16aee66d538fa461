"""The benchmark harness (not its timings): table columns, baselines, skipped passes, files, errors."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from poolbench import bench
from poolbench.engine.latency import peak_memory_mb
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
            assert avg.ratio_to_avg == 1.0
            assert "ratio baseline" in avg.note  # added although only max was asked for
            other = _find(rows, section, "max", pass_)
            assert other.ratio_to_avg == pytest.approx(other.median_ms / avg.median_ms)
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
