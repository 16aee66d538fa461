"""Time `poolbench report` on N fabricated records: tables only (`--no-plots`) and with figures.

The records are written as `poolbench train` writes them (`records.atomic_write_json`, one folder per
run, the fields of a real record, and its per-epoch metrics.jsonl that the curves figure reads): 2
operators (avg, gem) x N/2 seeds on one dataset, with a quality metric, a latency and a learned
parameter. Each measurement runs the CLI in a fresh process, as a user would (`poolbench report DIR
--baseline avg [--no-plots]`); its CPU time and peak RSS are read from `resource.getrusage(RUSAGE_CHILDREN)`
in a wrapper process of its own, so one size's peak does not carry over to the next. The 1-minute load
average is printed beside each figure: on a shared machine the wall time says as much about the other
processes as about the report, the CPU time much less. Targets (issue 22): 10,000 records <= 15 s and
<= 1.5 GB without figures, <= 30 s with them, on a quiet machine.

    python scripts/bench_report_scale.py [--sizes 1000,10000] [--out /tmp/report-scale] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from poolbench import records

OPERATORS = ("avg", "gem")


def record(pooling: str, seed: int, rng: np.random.Generator) -> dict[str, Any]:
    """One completed retrieval run, with the fields a trained run records."""
    base = {"avg": 0.62, "gem": 0.64}[pooling]
    defaults = {
        "name": pooling,
        "lr_mult": 10.0 if pooling == "gem" else 1.0,
        **({"p": 3.0} if pooling == "gem" else {}),
    }
    run_id = f"{pooling}-resnet18-synthwriters-s{seed}-{seed * 7919 % 10**6:06d}"
    return {
        "run_id": run_id,
        "status": "completed",
        "pooling": pooling,
        "model": "resnet18",
        "dataset": "synthwriters",
        "seed": seed,
        "experiment": None,
        "choice.dataset": "synthwriters",
        "choice.model": "resnet18",
        "choice.pooling": pooling,
        "choice.local_pooling": "none",
        "choice.trainer": "default",
        "choice.augment": "auto",
        "cfg.seed": seed,
        "cfg.pooling.name": pooling,
        "cfg.pooling.lr_mult": 10.0 if pooling == "gem" else 1.0,
        **({"cfg.pooling.p": 3.0} if pooling == "gem" else {}),
        "cfg.trainer.epochs": 4,
        "cfg.trainer.lr": 0.01,
        "cfg.results_dir": "results/runs",
        "cfg.sweep_name": "scale",
        "cfg.grid.seed": "range(0,N)",
        # what a run records about its parts (poolbench.provenance), so the report composes no option
        "part.pooling.label": pooling,
        "part.pooling.defaults": json.dumps(defaults, sort_keys=True),
        "env.torch": "2.5.1",
        "env.device_name": "x86_64",
        "env.git_commit": "abc123",
        "wall_time_s": float(60 + rng.normal(0, 2)),
        "mAP": float(base + rng.normal(0, 0.01)),
        "top1": float(base + 0.1 + rng.normal(0, 0.01)),
        "latency.infer_image_ms": float(1.5 + (0.2 if pooling == "gem" else 0.0) + rng.normal(0, 0.05)),
        "latency.peak_mem_mb": float(300 + rng.normal(0, 1)),
        "num_params": 11_200_000,
        "feature_map_h": 7,
        "feature_map_w": 7,
        **({"learned.p": float(3 + rng.normal(0, 0.1))} if pooling == "gem" else {}),
    }


def curve(pooling: str, data: dict[str, Any], rng: np.random.Generator) -> str:
    """The run's metrics.jsonl as the engine writes it (poolbench.engine.tracking): one row per epoch, the
    learned parameter of a learnable pool, and the held-out metric on the last epoch."""
    epochs = int(data["cfg.trainer.epochs"])
    rows = []
    for epoch in range(1, epochs + 1):
        row: dict[str, Any] = {"epoch": epoch, "loss": float(2.3 / epoch + rng.normal(0, 0.02))}
        row |= {"lr": 0.01, "seconds": float(15 + rng.normal(0, 0.5)), "steps": 120}
        if pooling == "gem":
            row["learned.p"] = float(3 + 0.05 * epoch + rng.normal(0, 0.02))
        if epoch == epochs:
            row["eval.mAP"] = data["mAP"]
        rows.append(json.dumps(row))
    return "\n".join(rows) + "\n"


def fabricate(size: int, folder: Path) -> Path:
    """``size`` run folders under ``folder/runs`` (reused when already there: a rerun times the same records)."""
    runs = folder / "runs"
    if (folder / "complete").exists():
        return runs
    rng, curves = np.random.default_rng(size), np.random.default_rng(size + 1)
    for seed in range(size // len(OPERATORS)):
        for pooling in OPERATORS:
            data = record(pooling, seed, rng)
            records.atomic_write_json(runs / data["run_id"] / records.RECORD, data)
            (runs / data["run_id"] / records.METRICS).write_text(curve(pooling, data, curves))
    (folder / "complete").touch()
    return runs


def one(runs: Path, plots: bool) -> dict[str, float]:
    """Run the report once (as this process's only child): wall seconds, child CPU seconds, peak RSS."""
    argv = [sys.executable, "-m", "poolbench", "report", str(runs), "--baseline", "avg"]
    argv += ["--out", str(runs.parent / ("report-plots" if plots else "report"))]
    argv += [] if plots else ["--no-plots"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    # ru_maxrss is in KiB on Linux, bytes on macOS
    peak = usage.ru_maxrss / (2**20 if platform.system() == "Darwin" else 2**10)
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mb": peak}


def measure(runs: Path, plots: bool) -> dict[str, float]:
    load = os.getloadavg()[0]
    wrapper = [sys.executable, __file__, "--one", str(runs)] + (["--plots"] if plots else [])
    done = subprocess.run(wrapper, check=True, capture_output=True, text=True)
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "load1": load}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated record counts")
    parser.add_argument("--out", type=Path, default=None, help="where to fabricate (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fabricated records")
    parser.add_argument("--no-figures", action="store_true", help="time tables only")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: one timed run
    parser.add_argument("--plots", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.plots)))
        return
    root = Path(args.out or tempfile.mkdtemp(prefix="report-scale-"))
    print(f"{'records':>8} {'figures':>8} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} {'load1':>6}")
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            runs = fabricate(size, root / f"n{size}")
            for plots in (False,) if args.no_figures else (False, True):
                row = measure(runs, plots)
                print(
                    f"{size:>8} {'yes' if plots else 'no':>8} {row['wall_s']:>8.1f} {row['cpu_s']:>8.1f}"
                    f" {row['peak_mb']:>8.0f} {row['load1']:>6.2f}",
                    flush=True,
                )
    finally:
        if not args.keep and args.out is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
