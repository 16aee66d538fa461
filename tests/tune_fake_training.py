"""A stand-in for training in the `poolbench tune` tests: each run writes a record whose validation
score is a known function of the pooling operator and the learning rate (avg peaks at lr 1e-2, max at
1e-3), so the studies' behaviour can be checked exactly and fast.

In-process tests patch :func:`install` with monkeypatch; subprocesses (kill -9, concurrent workers)
load this file as a plugin (``POOLBENCH_PLUGINS=<this file>``) with ``POOLBENCH_FAKE_TRAIN=1``, which
patches every process that composes a config (the plugin is imported before any composition).
``POOLBENCH_FAKE_SLEEP`` seconds are spent inside each run (while its lock is held).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

from poolbench import records
from poolbench import run as run_module

OPTIMUM = {"avg": -2.0, "max": -3.0}
CALLS = "calls.log"


def score(pooling: str, lr: float) -> float:
    return round(1.0 - 0.05 * (math.log10(lr) - OPTIMUM.get(pooling, -2.5)) ** 2, 6)


def fake_train(
    cfg: Any, work_dir: Path, built: Any, resuming: bool, progress: Any, log: Any, *, run_dir: Path
) -> dict[str, Any]:
    work_dir.mkdir(parents=True, exist_ok=True)
    with open(work_dir / CALLS, "a") as handle:
        handle.write(f"{os.getpid()} resuming={resuming}\n")
    record: dict[str, Any] = {
        **run_module._identity_fields(cfg),
        "status": "running",
        "task": str(cfg.dataset.task),
        "run_dir": str(run_dir),
        "env.device": "cpu",
        "env.torch": "fake",
    }
    records.atomic_write_json(work_dir / records.RECORD, record)
    time.sleep(float(os.environ.get("POOLBENCH_FAKE_SLEEP", "0")))
    value = score(str(cfg.pooling.name), float(cfg.trainer.lr))
    if float(cfg.trainer.lr) > 0.5:  # a diverging learning rate: the run fails, as a NaN loss would
        record.update(status="failed", error="training loss became nan at epoch 1", failed_epoch=1)
        records.atomic_write_json(work_dir / records.RECORD, record)
        raise RuntimeError("training loss became nan at epoch 1")
    noise = ((int(cfg.seed) * 7919) % 13) / 1000.0
    record.update(status="completed", wall_time_s=0.01, **{"val.acc@1": value, "acc@1": value - 0.02 + noise})
    records.atomic_write_json(work_dir / records.RECORD, record)
    return record


def install(setattr_: Any = setattr) -> None:
    setattr_(run_module, "_train", fake_train)
    setattr_(run_module, "_build", lambda cfg, progress: None)


def calls(run_dir: Path) -> list[str]:
    path = run_dir / CALLS
    return path.read_text().splitlines() if path.is_file() else []


if os.environ.get("POOLBENCH_FAKE_TRAIN") == "1":
    install()
