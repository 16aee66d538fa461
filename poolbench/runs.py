"""Run directories: atomic record files, environment capture, and a lock so a run executes once.

Layout of ``<results_dir>/<run-id>/``::

    config.yaml      resolved config
    env.json         versions, device, git commit, command line
    metrics.jsonl    one line per epoch (written by the engine)
    checkpoint.pt    last epoch's checkpoint (written by the engine)
    result.json      the flat run record; ``status`` is running | completed | failed | interrupted
    .lock            held while a process works on the run
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from poolbench.errors import PoolbenchError

RECORD = "result.json"
LOCK = ".lock"
STATUSES = ("running", "completed", "failed", "interrupted")
MIN_FREE_BYTES = 200 * 2**20


class RunLockedError(PoolbenchError):
    """Another live process is working on this run."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` through ``write(handle)`` so readers see the old file or the new one, never a half.

    Temp file in the same folder, fsync, ``os.replace``; the temp file is removed if anything fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """The run's record, or None when it has none; ValueError when it is corrupt."""
    path = run_dir / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: corrupt record ({exc})") from None
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise ValueError(f"{path}: not a poolbench run record")
    return record


def iter_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record under ``results_dir`` (recursively) and one line per unreadable one."""
    records, problems = [], []
    for path in sorted(Path(results_dir).rglob(RECORD)):
        try:
            record = read_record(path.parent)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if record is not None:
            record.setdefault("run_dir", str(path.parent))
            records.append(record)
    return records, problems


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout poolbench runs from (with ``+dirty``), or None outside git."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def capture_env(device: str) -> dict[str, Any]:
    """Versions, device, threads, git commit and command line: what makes two runs comparable."""
    import torch
    import torchvision

    import poolbench

    env: dict[str, Any] = {
        "poolbench": poolbench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "device": device,
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    return env


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() is empty on most Linux systems)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"


def check_writable(results_dir: Path) -> None:
    """Fail before training, not after, when results cannot be stored."""
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=results_dir, prefix=".probe-"):
            pass
    except OSError as exc:
        reason = "read-only" if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM) else exc.strerror
        raise PoolbenchError(f"results directory {results_dir} is not writable ({reason})") from None
    free = shutil.disk_usage(results_dir).free
    if free < MIN_FREE_BYTES:
        raise PoolbenchError(
            f"results directory {results_dir} has only {free / 2**20:.0f} MiB free "
            f"(need at least {MIN_FREE_BYTES / 2**20:.0f} MiB)"
        )


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive ownership of a run directory across processes.

    An ``flock`` rather than a pid file: the kernel releases it when the holder dies, even by
    ``kill -9``, so there is no stale lock to detect and no takeover race.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = open(run_dir / LOCK, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunLockedError(f"run {run_dir.name} is being worked on by {holder}") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (without creating a lock file)."""
    lock = run_dir / LOCK
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
