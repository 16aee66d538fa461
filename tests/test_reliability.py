"""Faults of the real CLI in subprocesses: kill -9 and resume, Ctrl-C, NaN loss, unusable inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.reliability

# Deterministic and slow enough per epoch (~0.5 s) to be interrupted mid-run by a polling test.
RESUMABLE = [
    "dataset=digits",
    "trainer.epochs=4",
    "trainer.steps_per_epoch=40",
    "trainer.deterministic=true",
    "trainer.num_threads=1",
    "trainer.latency.enabled=false",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "poolbench", "train", "--quiet", *args]


def poolbench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command(*args), capture_output=True, text=True, env=ENV, timeout=600)


def only_run_dir(results: Path) -> Path:
    (run_dir,) = [p for p in results.iterdir() if p.is_dir()]
    return run_dir


def record_of(results: Path) -> dict:
    return json.loads((only_run_dir(results) / "result.json").read_text())


def start_and_wait_for_epochs(
    results: Path, epochs: int, *extra: str, metrics: str = "*/metrics.jsonl"
) -> subprocess.Popen[str]:
    """Start a training run and return once ``epochs`` epochs are checkpointed (it is then mid-run)."""
    process = subprocess.Popen(
        command(*RESUMABLE, f"results_dir={results}", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = list(results.glob(metrics))
        if found and len(found[0].read_text().splitlines()) >= epochs:
            return process
        if process.poll() is not None:
            raise AssertionError(f"run ended before epoch {epochs}: {process.communicate()}")
        time.sleep(0.02)
    process.kill()
    raise AssertionError("timed out waiting for the run's epochs")


FINAL = ("acc@1", "acc@5", "train.train_loss", "train.epochs_done")


@pytest.mark.slow
def test_kill_9_twice_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    reference = poolbench(*RESUMABLE, f"results_dir={tmp_path / 'reference'}")
    assert reference.returncode == 0, reference.stderr
    expected = record_of(tmp_path / "reference")

    results = tmp_path / "killed"
    for cycle, epochs in enumerate((1, 2)):
        resume = ["trainer.resume=true"] if cycle else []
        process = start_and_wait_for_epochs(results, epochs, *resume)
        process.send_signal(signal.SIGKILL)
        process.communicate()
        record = record_of(results)
        assert record["status"] == "running"  # killed mid-run: the record says so, and is whole JSON
        assert not list(only_run_dir(results).glob(".*.tmp"))  # no half-written file survives
    resumed = poolbench(*RESUMABLE, f"results_dir={results}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    final = record_of(results)
    assert final["status"] == "completed" and final["resumed"] is True and final["resume_count"] == 2
    assert {k: final[k] for k in FINAL} == {k: expected[k] for k in FINAL}
    epochs = [json.loads(line)["epoch"] for line in (only_run_dir(results) / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]


@pytest.mark.slow
def test_ctrl_c_marks_the_run_interrupted_keeps_its_checkpoint_and_exits_cleanly(tmp_path: Path) -> None:
    process = start_and_wait_for_epochs(tmp_path, 1)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stdout + stderr
    assert "interrupted" in stderr
    record = record_of(tmp_path)
    assert record["status"] == "interrupted" and "Ctrl-C" in record["error"]
    checkpoint = torch.load(only_run_dir(tmp_path) / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] >= 1

    resumed = poolbench(*RESUMABLE, f"results_dir={tmp_path}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    assert record_of(tmp_path)["status"] == "completed"


@pytest.mark.slow
def test_sigterm_is_handled_like_ctrl_c(tmp_path: Path) -> None:
    process = start_and_wait_for_epochs(tmp_path, 1)
    process.send_signal(signal.SIGTERM)  # what SLURM sends before it kills a job
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143  # 128 + SIGTERM, like `poolbench sweep`
    assert "Traceback" not in stdout + stderr
    assert len(stderr.strip().splitlines()) == 1 and "stopped (SIGTERM)" in stderr
    record = record_of(tmp_path)
    assert record["status"] == "interrupted" and "SIGTERM" in record["error"]
    assert torch.load(only_run_dir(tmp_path) / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"] >= 1

    resumed = poolbench(*RESUMABLE, f"results_dir={tmp_path}", "trainer.resume=true")
    assert resumed.returncode == 0, resumed.stderr
    final = record_of(tmp_path)
    assert final["status"] == "completed" and final["resumed"] is True and final["resume_count"] == 1


@pytest.mark.slow
def test_a_killed_overwrite_run_leaves_the_completed_run_intact(tmp_path: Path) -> None:
    completed = poolbench(*RESUMABLE, f"results_dir={tmp_path}")
    assert completed.returncode == 0, completed.stderr
    run_dir = only_run_dir(tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    process = start_and_wait_for_epochs(tmp_path, 1, "trainer.overwrite=true", metrics=".staging/*/metrics.jsonl")
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before
    reused = poolbench(*RESUMABLE, f"results_dir={tmp_path}")
    assert reused.returncode == 0 and record_of(tmp_path)["status"] == "completed"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_nan_loss_stops_the_run_and_records_epoch_and_reason(tmp_path: Path) -> None:
    result = poolbench(
        "dataset=digits",
        "trainer.optimizer=sgd",
        "trainer.lr=1e12",
        "trainer.epochs=2",
        "trainer.steps_per_epoch=10",
        f"results_dir={tmp_path}",
    )
    assert result.returncode == 2
    assert "training loss became" in result.stderr and "Traceback" not in result.stderr
    record = record_of(tmp_path)
    assert record["status"] == "failed" and record["failed_epoch"] == 1 and "nan" in record["error"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # The same build-time errors in-process, fast: tests/engine/test_run.py; the real binary's exit 2 for a
        # build-time error stays in the fast tier with the third case.
        pytest.param(["dataset=icdar17", "dataset.root=/nonexistent/icdar17"], "/nonexistent/icdar17",
                     marks=pytest.mark.slow),
        pytest.param(["dataset=digits", "model=resnet18", "pooling=spp"], "spp", marks=pytest.mark.slow),
        (["model=resnet18", "model.pretrained=true"], "pretrained"),
    ],
)
def test_unusable_data_or_model_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], expected: str) -> None:
    result = poolbench(*args, f"results_dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr.lower()
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # found while building: no run directory, no lock


def test_unwritable_results_directory_fails_before_anything_starts(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = poolbench("dataset=digits", f"results_dir={blocker / 'runs'}")
    assert result.returncode == 2
    assert "not writable" in result.stderr and len(result.stderr.strip().splitlines()) == 1
