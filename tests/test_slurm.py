"""`poolbench sweep --executor slurm` against a real SLURM cluster (`scripts/slurm_local.sh start`).

Skipped, with the reason, when no cluster answers. Every run is a few seconds of digits on CPU; the
test watches the queue with ``squeue`` while the sweep (a subprocess, as a user would run it) works.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from poolbench import records


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH (start a local cluster with scripts/slurm_local.sh start)"
    try:
        answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer: {exc}"
    if answer.returncode != 0 or not answer.stdout.strip():
        lines = answer.stderr.strip().splitlines() or ["no nodes"]
        return f"sinfo does not answer: {lines[-1]}"
    return None


PROBLEM = _cluster_problem()
# One cluster with one node: its tests run one after another on one pytest-xdist worker.
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.xdist_group("slurm"),
    pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM)),
]

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
BASE = ["dataset=digits", "trainer.latency.enabled=false", "trainer.deterministic=true", "device=cpu"]
SLURM = ["--executor", "slurm", "--cpus-per-task", "1", "--mem-gb", "1"]
# What a run computes: must be identical whether or not it was interrupted and resumed.
RESULT_KEYS = ("acc@", "mAP", "top", "learned.", "train.train_loss", "train.epochs_done")


def _sweep(*args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "poolbench", "sweep", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)


def _tasks(name: str) -> dict[str, str]:
    """Every task of the jobs named ``name`` that SLURM still knows: task id → state."""
    listing = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", "--name", name, "--format=%i|%T"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return dict(line.split("|", 1) for line in listing.splitlines() if "|" in line)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before the condition held:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{proc.communicate()[0]}")
        time.sleep(0.3)


def _finish(proc: subprocess.Popen[str], timeout_s: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"the sweep did not finish in {timeout_s} s:\n{out}") from None
    return proc.returncode, out


def _epochs_done(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _result(run_dir: Path) -> tuple[dict[str, Any], list[float]]:
    record = records.read_record(run_dir)
    assert record is not None and record["status"] == "completed", record
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in record.items() if k.startswith(RESULT_KEYS)}, [row["loss"] for row in rows]


def test_one_job_array_throttled_to_jobs_and_completed_runs_not_submitted(tmp_path: Path) -> None:
    name = f"throttle-{uuid.uuid4().hex[:8]}"
    grid = ["pooling=avg,max,gem,lse", "trainer.epochs=1", *BASE, f"results_dir={tmp_path}"]
    proc = _sweep(*grid, *SLURM, "--jobs", "1", "--name", name)
    snapshots = []
    while proc.poll() is None:
        snapshots.append(_tasks(name))
        time.sleep(0.2)
    code, out = _finish(proc)
    assert code == 0, out
    assert "4 completed" in out
    task_ids = {task for snapshot in snapshots for task in snapshot}
    assert len({task.split("_")[0] for task in task_ids}) == 1, task_ids  # one job array
    assert len(task_ids) == 4, task_ids
    running = [sum(state == "RUNNING" for state in snapshot.values()) for snapshot in snapshots]
    assert max(running) == 1, running  # --jobs 1: the %1 throttle, never 2 on the 2-CPU node
    assert "Bypassing sacct" not in out and "sacct" not in out  # submitit's warnings stay in the log file
    assert (tmp_path / ".submitit" / "sweep.log").is_file()

    # The same grid plus one run: only the new run is submitted.
    again = _sweep("pooling=avg,max,gem,lse,mixed", *grid[1:], *SLURM, "--jobs", "1", "--name", name)
    code, out = _finish(again)
    assert code == 0, out
    assert "1 completed, 4 skipped" in out
    assert len(_tasks(name)) == len(task_ids) + 1


@pytest.mark.parametrize("interruption", ["scontrol requeue", "SIGTERM"])
def test_interrupted_task_is_requeued_and_ends_with_the_metrics_of_an_uninterrupted_run(
    interruption: str, tmp_path: Path, run_cli: Callable[..., int]
) -> None:
    config = ["pooling=gem", "trainer.epochs=5", *BASE]
    assert run_cli("train", *config, f"results_dir={tmp_path / 'reference'}") == 0
    (reference_dir,) = (tmp_path / "reference").iterdir()

    name = f"requeue-{uuid.uuid4().hex[:8]}"
    proc = _sweep(*config, f"results_dir={tmp_path / 'sweep'}", *SLURM, "--jobs", "1", "--name", name)
    run_dir = tmp_path / "sweep" / reference_dir.name  # same config, same run id
    _wait_for(lambda: _epochs_done(run_dir) >= 2, proc)
    (task,) = _tasks(name)
    if interruption == "SIGTERM":  # what SLURM sends a job's processes before it kills them
        subprocess.run(["scancel", "--signal=TERM", task], check=True, timeout=60)
    else:
        subprocess.run(["scontrol", "requeue", task], check=True, timeout=60)
    code, out = _finish(proc)
    assert code == 0, out

    record = records.read_record(run_dir)
    assert record is not None and record["resumed"] is True and record["train.resumed_from_epoch"] >= 2
    assert record["resume_count"] >= 1
    assert _result(run_dir) == _result(reference_dir)


def test_scancel_of_the_sweep_then_same_command_skips_completed_and_resumes_the_rest(tmp_path: Path) -> None:
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    command = ["pooling=avg,max,gem", "trainer.epochs=4", *BASE, f"results_dir={tmp_path}", *SLURM, "--jobs", "1"]
    proc = _sweep(*command, "--name", name)

    def one_done_one_checkpointed() -> bool:
        found = {d.name: records.read_record(d) for d in tmp_path.iterdir() if (d / records.RECORD).is_file()}
        done = [k for k, r in found.items() if r and r["status"] == "completed"]
        partial = [d for d in tmp_path.iterdir() if d.name not in done and _epochs_done(d) >= 1]
        return len(done) == 1 and len(partial) == 1

    _wait_for(one_done_one_checkpointed, proc)
    array = next(iter(_tasks(name))).split("_")[0]
    subprocess.run(["scancel", array], check=True, timeout=60)
    code, out = _finish(proc)
    assert code == 1, out  # the cancelled tasks failed; each line names its log file
    assert "log: " in out

    before = {d.name: records.read_record(d) for d in tmp_path.iterdir() if (d / records.RECORD).is_file()}
    completed = next(k for k, r in before.items() if r and r["status"] == "completed")
    partial = next(k for k, r in before.items() if r and r["status"] != "completed")
    code, out = _finish(_sweep(*command, "--name", name))
    assert code == 0, out
    assert "2 completed, 1 skipped" in out
    after = {d.name: records.read_record(d) for d in tmp_path.iterdir() if (d / records.RECORD).is_file()}
    assert after[completed] == before[completed]  # not run again
    assert after[partial]["status"] == "completed" and after[partial]["resumed"] is True  # type: ignore[index]
    fresh = set(after) - {completed, partial}
    assert len(fresh) == 1 and after[fresh.pop()]["resumed"] is False  # type: ignore[index]
