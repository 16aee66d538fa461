"""`poolbench sweep --dry-run` on a large grid: a summary instead of every row, `--list` for all of them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from poolbench import sweep
from poolbench.cli.sweep import LIST_LIMIT


def test_large_dry_run_prints_a_summary_and_list_prints_every_run(
    run_cli: Callable[..., int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    grid = ["pooling=avg,max", f"seed=range(0,{LIST_LIMIT})", f"results_dir={tmp_path}"]
    planned = sweep.plan(grid)
    assert len(planned) == 2 * LIST_LIMIT
    assert run_cli("sweep", "--dry-run", *grid) == 0
    out = capsys.readouterr().out
    listed = [run.run_id for run in planned if run.run_id in out]
    assert listed == [run.run_id for run in planned[:LIST_LIMIT]]
    assert f"{LIST_LIMIT} more runs" in out
    assert f"status: {2 * LIST_LIMIT} new" in out and "pooling: avg, max" in out
    assert f"({LIST_LIMIT} values)" in out  # the seeds, summarised
    assert run_cli("sweep", "--dry-run", "--list", *grid) == 0
    out = capsys.readouterr().out
    assert all(run.run_id in out for run in planned) and "more runs" not in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


def test_small_dry_run_lists_every_run(
    run_cli: Callable[..., int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "250")
    grid = ["pooling=avg,gem", "seed=0,1", f"results_dir={tmp_path}"]
    assert run_cli("sweep", "--dry-run", *grid) == 0
    out = capsys.readouterr().out
    assert all(run.run_id in out for run in sweep.plan(grid)) and "more runs" not in out
