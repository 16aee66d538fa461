"""Run directories: atomic records, corrupt-record handling, the cross-process lock, writability."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poolbench import records
from poolbench.environment import capture_env
from poolbench.errors import PoolbenchError


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "result.json"
    records.atomic_write_json(target, {"status": "running"})

    def crash(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        records.atomic_write_json(target, {"status": "completed"})
    assert json.loads(target.read_text()) == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temp file left behind


def test_iter_records_skips_and_reports_corrupt(tmp_path: Path) -> None:
    good = tmp_path / "a"
    records.atomic_write_json(good / records.RECORD, {"status": "completed", "mAP": 0.5})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / records.RECORD).write_text('{"status": "compl')  # truncated
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / records.RECORD).write_text('{"hello": 1}')  # not a record
    found, problems = records.iter_records(tmp_path)
    assert [r["mAP"] for r in found] == [0.5]
    assert len(problems) == 2 and "corrupt" in problems[0] and "not a poolbench run record" in problems[1]


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from poolbench.records import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_lock_is_exclusive_and_released_when_holder_is_killed(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(records.RunLockedError, match=f"process {holder.pid}"), records.run_lock(tmp_path):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with records.run_lock(tmp_path):  # the kernel released the dead holder's lock
        pass


def test_lock_is_reentrant_after_release(tmp_path: Path) -> None:
    with records.run_lock(tmp_path):
        pass
    with records.run_lock(tmp_path):
        pass


def test_unwritable_results_dir_fails_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PoolbenchError, match="not writable"):
        records.check_writable(blocker / "results")

    class Usage:
        free = 1024

    monkeypatch.setattr(records.shutil, "disk_usage", lambda _: Usage)
    with pytest.raises(PoolbenchError, match="MiB free"):
        records.check_writable(tmp_path / "results")


def test_environment_capture_names_versions_and_device() -> None:
    env = capture_env("cpu")
    for key in ("python", "torch", "torchvision", "device", "device_name", "git_commit", "command", "num_threads"):
        assert key in env
    assert env["device"] == "cpu"
    assert records.now().endswith("+00:00")
