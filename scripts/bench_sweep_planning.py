"""Time sweep planning at growing grid sizes: a `--dry-run`, and a resumed sweep up to its first new run.

The grid is pooling (5) x lr (4) x seeds on digits. "Resumed": half of the runs already have a
completed record (written here, not trained), the sweep is started for real (`--jobs 1`) and stopped
as soon as the first run it has to do writes its record. Each size runs the CLI in a fresh process,
as a user would. A `--dry-run` beyond 50 runs prints a summary (the user's default); CPU seconds (of the
child process) are given beside the wall time, since the wall time on a shared machine says as much
about the other processes as about the planner. Targets (issue 22): 1,000 runs <= 3 s and 10,000 runs
<= 20 s wall on a quiet machine.

    python scripts/bench_sweep_planning.py [--sizes 100,1000,10000] [--out /tmp/planning]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from poolbench import sweep


def grid(size: int, results: Path) -> list[str]:
    seeds = max(1, size // 20)
    return [
        "dataset=digits",
        "pooling=avg,max,gem,lse,dgmp",
        "trainer.lr=0.1,0.03,0.01,0.003",
        f"seed=range(0,{seeds})",
        "trainer.epochs=1",
        "trainer.latency.enabled=false",
        f"results_dir={results}",
    ]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "poolbench", "sweep", *args]


def measure(size: int, root: Path) -> dict[str, float]:
    results = root / f"runs-{size}"
    overrides = grid(size, results)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    load = os.getloadavg()[0]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cli(*overrides, "--dry-run"), check=True, stdout=subprocess.DEVNULL, env=env)
    dry_run = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    dry_run_cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)

    planned = sweep.plan(overrides)
    half = len(planned) // 2
    for run in planned[:half]:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        record = {"run_id": run.run_id, "status": "completed", "wall_time_s": 3.0}
        (run.run_dir / "result.json").write_text(json.dumps(record))
    first_new = planned[half].run_dir / "result.json"
    start = time.perf_counter()
    proc = subprocess.Popen(cli(*overrides), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    while not first_new.is_file():
        if proc.poll() is not None:
            raise RuntimeError(f"the sweep ended (exit {proc.returncode}) before its first new run started")
        time.sleep(0.05)
    first_run = time.perf_counter() - start
    proc.terminate()
    proc.wait(timeout=120)
    return {
        "runs": len(planned), "dry_run_s": dry_run, "dry_run_cpu_s": dry_run_cpu, "resumed_first_run_s": first_run,
        "load": load,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="planning-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()}")
    print("| runs | --dry-run (s) | --dry-run CPU (s) | resumed, to first new run (s) | load before |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for size in map(int, args.sizes.split(",")):
        row = measure(size, root)
        print(
            f"| {row['runs']:,} | {row['dry_run_s']:.1f} | {row['dry_run_cpu_s']:.1f} | "
            f"{row['resumed_first_run_s']:.1f} | {row['load']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
