"""The documented Python API: compose, train, sweep and the report as DataFrames, the same as the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd

import poolbench

TINY = ["dataset=digits", "trainer.epochs=1", "trainer.steps_per_epoch=2", "trainer.latency.enabled=false"]


def test_import_is_light() -> None:
    code = "import sys, poolbench; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert {"compose", "train", "run_sweep", "results", "execute"} <= set(poolbench.__all__)


def test_compose_train_sweep_and_results_match_the_cli(tmp_path: Path, run_cli: Callable[..., int], capsys) -> None:
    results = tmp_path / "runs"
    cfg = poolbench.compose([*TINY, "pooling=gem", f"results_dir={results}"])
    assert cfg.pooling.name == "gem"
    record = poolbench.train([*TINY, "pooling=avg", f"results_dir={results}"])
    assert record["status"] == "completed"

    planned = poolbench.run_sweep([*TINY, "pooling=avg,gem", "seed=0,1", f"results_dir={results}"], dry_run=True)
    assert sorted(r["status"] for r in planned) == ["completed", "new", "new", "new"]  # avg seed 0 exists
    ran = poolbench.run_sweep([*TINY, "pooling=avg,gem", "seed=0,1", f"results_dir={results}"])
    assert {r["status"] for r in ran} == {"completed"} and len(ran) == 4

    result = poolbench.results(results, baseline="avg")
    assert isinstance(result.runs, pd.DataFrame) and len(result.runs) == 4
    assert result.keys == ["choice.pooling"]
    assert set(result.summary["choice.pooling"]) == {"avg", "gem"}
    assert not result.comparison.empty  # gem vs avg, paired over the two seeds
    # the CLI's report of the same folder: the same summary figures
    out = tmp_path / "report"
    assert run_cli("report", str(results), "--baseline", "avg", "--no-plots", "--format", "csv", "--out", str(out)) == 0
    cli = pd.read_csv(out / "summary.csv", comment="#")
    api = result.summary
    for column in [c for c in cli.columns if c.endswith(".mean")]:
        assert cli[column].round(9).tolist() == api[column].round(9).tolist()
