"""Run directories and their records: reading, listing, a lock so a run executes once, safe replacement.

Layout of ``<results_dir>/<run-id>/``::

    config.yaml      resolved config
    env.json         versions, device, git commit, command line
    metrics.jsonl    one line per epoch (written by the engine)
    checkpoint.pt    last epoch's checkpoint (written by the engine)
    tb/              TensorBoard events (trainer.logger=tensorboard)
    result.json      the flat run record; ``status`` is running | completed | failed | interrupted

Beside the run directories, hidden entries that readers of records skip::

    .<run-id>.lock         held while a process works on the run, deleted when it is done (outside the
                           run directory, so the directory can be created late and replaced under the lock)
    .staging/<run-id>/     a run trained with trainer.overwrite=true over a completed one; it replaces
                           the completed run only once it has completed itself
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from poolbench.errors import PoolbenchError
from poolbench.files import atomic_write_json, atomic_write_text  # noqa: F401  (the writers of records)

RECORD = "result.json"
STAGING = ".staging"
STATUSES = ("running", "completed", "failed", "interrupted")
MIN_FREE_BYTES = 200 * 2**20


class RunLockedError(PoolbenchError):
    """Another live process is working on this run."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


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
    """Every readable record under ``results_dir`` (recursively) and one line per unreadable one.

    A record's ``run_dir`` is where it was found (a results folder may have been moved or copied, and a
    record's own field is not to be trusted); hidden folders (staged overwrites) are not results.
    """
    found, problems = [], []
    results_dir = Path(results_dir)
    for path in sorted(results_dir.rglob(RECORD)):
        if any(part.startswith(".") for part in path.relative_to(results_dir).parts):
            continue
        try:
            record = read_record(path.parent)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        except RecursionError:
            problems.append(f"{path}: too deeply nested to be a run record")
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        if record is not None:
            record["run_dir"] = str(path.parent)
            found.append(record)
    return found, problems


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


def lock_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.lock"


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive ownership of a run across processes (the run directory itself need not exist yet).

    An ``flock`` rather than a pid file: the kernel releases it when the holder dies, even by
    ``kill -9``, so there is no stale lock to detect and no takeover race.
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")  # noqa: SIM115  (held open for the lock's lifetime)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunLockedError(f"run {run_dir.name} is being worked on by {holder}") from None
        # The previous holder deletes the file when done; if it did so after we opened it, we hold
        # the lock of a deleted file that nobody else will see: open the path again.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: whoever opens the path from now on gets a new file
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (without creating a lock file)."""
    lock = lock_path(run_dir)
    if not lock.is_file():
        return False
    with open(lock) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def staging_dir(run_dir: Path) -> Path:
    """Where a run that replaces the completed ``run_dir`` trains until it has completed."""
    return run_dir.parent / STAGING / run_dir.name


def _replaced_dir(run_dir: Path) -> Path:
    return run_dir.parent / STAGING / f"{run_dir.name}.replaced"


def replace_run_dir(staged: Path, run_dir: Path) -> None:
    """Put the completed run ``staged`` in place of ``run_dir``, then delete the old run.

    Two renames; a process killed between them is repaired by :func:`recover` (call it under the lock).
    """
    old = _replaced_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    os.rename(run_dir, old)
    os.rename(staged, run_dir)
    shutil.rmtree(old, ignore_errors=True)
    _remove_if_empty(staged.parent)


def recover(run_dir: Path) -> None:
    """Repair what a killed process left of a replacement: finish a swap that stopped between its two
    renames, delete an overwrite run that never completed (the completed run it was to replace stays)."""
    staged, old = staging_dir(run_dir), _replaced_dir(run_dir)
    if old.is_dir() and not run_dir.exists():
        os.rename(staged if staged.is_dir() else old, run_dir)  # a staged run is only swapped in once completed
    shutil.rmtree(old, ignore_errors=True)
    discard_staged(run_dir)


def discard_staged(run_dir: Path) -> None:
    """Delete an overwrite run of ``run_dir`` that did not complete (the completed run stays)."""
    staged = staging_dir(run_dir)
    shutil.rmtree(staged, ignore_errors=True)
    _remove_if_empty(staged.parent)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or another run is staged there
        folder.rmdir()
