"""Time the lightweight commands end to end, as a user types them, and count what each one imports.

Each command runs in a fresh process (``python -m poolbench ...``) ``--repeats`` times; the table gives
the median wall time, the process's CPU seconds, how many modules it imported and whether torch,
torchvision or timm were among them. Targets (issue 22), on a quiet machine: ``--help``,
``train --cfg``, ``sweep --dry-run``, ``list groups`` and ``report`` (tables) <= 2 s including process
start, ``list`` <= 3 s. tests/test_import_boundaries.py keeps the import side from regressing.

    python scripts/bench_cli_start.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from poolbench import records

PROBE = """
import json, sys
sys.argv = ["poolbench", *json.loads(sys.argv[1])]
from poolbench.cli import main
try:
    main()
except SystemExit:
    pass
print("@@" + json.dumps(sorted(sys.modules)), file=sys.stderr)
"""

COMMANDS = [
    ["--version"],
    ["--help"],
    ["train", "--cfg"],
    ["train", "--cfg", "pooling=dgmp", "model=resnet18"],
    ["sweep", "--dry-run", "pooling=avg,max,gem", "seed=range(0,10)"],
    ["list", "groups"],
    ["list"],
    ["report", "{results}", "--baseline", "avg", "--no-plots", "--out", "{out}"],
]


def _records(folder: Path) -> None:
    for pooling in ("avg", "max"):
        for seed in range(5):
            run_id = f"{pooling}-smallcnn-synthwriters-s{seed}-{seed:012d}"
            record = {
                "run_id": run_id, "status": "completed", "pooling": pooling, "model": "smallcnn",
                "dataset": "synthwriters", "seed": seed, "choice.pooling": pooling, "choice.dataset": "synthwriters",
                "choice.model": "smallcnn", "choice.local_pooling": "none", "mAP": 0.6 + 0.01 * seed,
            }  # fmt: skip
            records.atomic_write_json(folder / run_id / records.RECORD, record)


def measure(argv: list[str], repeats: int, cwd: Path) -> dict[str, object]:
    walls, cpus, modules = [], [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, cwd=cwd, timeout=600
        )
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        modules = json.loads(done.stderr.rsplit("@@", 1)[1]) if "@@" in done.stderr else []
    heavy = sorted({m.split(".")[0] for m in modules} & {"torch", "torchvision", "timm", "pandas", "matplotlib"})
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "modules": len(modules), "heavy": heavy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cli-start-"))
    _records(root / "runs")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("| command | wall (s, median) | CPU (s) | modules | heavy imports |")
    print("| --- | ---: | ---: | ---: | --- |")
    for argv in COMMANDS:
        argv = [a.format(results=root / "runs", out=root / "report") for a in argv]
        row = measure(argv, args.repeats, root)
        shown = " ".join(a if "/" not in a else Path(a).name for a in argv)
        print(
            f"| `poolbench {shown}` | {row['wall']:.2f} | {row['cpu']:.2f} | {row['modules']} | "
            f"{', '.join(row['heavy']) or '–'} |",  # type: ignore[arg-type]
            flush=True,
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
