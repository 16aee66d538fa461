"""The results-folder contract: every file name of a run folder, the record and ``side_by_side.json``
schemas, the safe readers, :func:`load_run`, the lock so a run executes once, and safe replacement.

Nothing else names a file of a run folder: import the constants below. A results folder may come from
someone else, so every file read from it goes through :func:`open_regular` (regular files only, no
symlinks, a size cap per kind, never blocking on a FIFO) and every write refuses planted symlinks.

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
import io
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from poolbench.errors import PoolbenchError, message_line
from poolbench.files import atomic_write_json, atomic_write_text  # noqa: F401  (the writers of records)

first_line = message_line  # the name poolbench.report reads it by

# ----------------------------------------------------------------------------- the run folder's files
# The one list of what a run folder holds; every module that reads or writes one imports the names.
RECORD = "result.json"  # the flat run record
CONFIG = "config.yaml"  # the resolved config
ENV = "env.json"  # versions, device, git commit, command line
METRICS = "metrics.jsonl"  # one row per epoch (written by the engine)
CHECKPOINT = "checkpoint.pt"  # last epoch's checkpoint (written by the engine)
TENSORBOARD = "tb"  # TensorBoard events (trainer.logger=tensorboard)
# Beside the run folders, in results_dir.
SIDE_BY_SIDE = "side_by_side.json"  # interleaved latency of the completed runs (poolbench bench --runs)
STAGING = ".staging"  # overwrite runs train in .staging/<run-id>/ until they completed
LOCK_SUFFIX = ".lock"  # .<run-id>.lock: the run's flock

# A record carries no version field: every record so far is schema 1 (a field added later is optional).
RECORD_SCHEMA = 1
STATUSES = ("running", "completed", "failed", "interrupted")
# Fields every record has, whatever its status, and their types.
RECORD_IDENTITY = {"run_id": str, "status": str, "seed": int, "pooling": str, "model": str, "dataset": str}

# side_by_side.json: {"schema", "created", "env", "baseline", "rows": [row...], "skipped": [{run_id, reason}]}
SIDE_BY_SIDE_SCHEMA = 1
SIDE_BY_SIDE_ROW_FIELDS = (
    "run_ids", "pooling", "local_pooling", "model", "input", "batch_size", "amp", "device",
    "infer_image_ms", "infer_image_ms_ci", "train_step_ms", "train_step_ms_ci", "pool_fwd_ms", "pool_fwdbwd_ms",
    "peak_mem_mb", "ratio_infer", "ratio_infer_ci", "flops_per_image", "pool_flops", "params", "rounds",
)

# Size caps of what is read back from a results folder (a shared folder is untrusted input: a file of
# several GB, /dev/zero or a FIFO must neither exhaust memory nor hang a reader).
SIZE_CAPS = {
    RECORD: 16 * 2**20,
    CONFIG: 4 * 2**20,
    ENV: 2**20,
    METRICS: 64 * 2**20,
    SIDE_BY_SIDE: 64 * 2**20,
    CHECKPOINT: 16 * 2**30,
}
YAML_MAX_NODES = 200_000  # nodes of config.yaml with its aliases expanded (a resolved config has a few hundred)
MIN_FREE_BYTES = 200 * 2**20


class RunLockedError(PoolbenchError):
    """Another live process is working on this run."""


class UnsafeFileError(PoolbenchError, ValueError):
    """A file of a results folder that is not read: not a regular file, a symlink, too large, outside."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------- safe readers
# A results folder may come from someone else (a shared folder, a download): it is untrusted input.
# Every file read from it goes through open_regular, the one place that enforces the policy.


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symlink")):
        if test(mode):
            return name
    return "not a regular file"


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (its symlinks resolved) lies under ``root`` (resolved)."""
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def open_regular(path: Path, kind: str | None = None, *, root: Path | None = None) -> BinaryIO:
    """``path`` opened for reading, only if it is a regular file, not a symlink, under its size cap and,
    with ``root``, inside ``root``; :class:`UnsafeFileError` otherwise.

    ``O_NONBLOCK`` so that opening a FIFO returns at once (and is then refused) instead of waiting for a
    writer; ``O_NOFOLLOW`` so that a symlink to ``/dev/zero`` or to a file elsewhere is never read.
    ``kind`` is the run-folder file name whose cap applies (default: ``path``'s own name).
    """
    path = Path(path)
    limit = SIZE_CAPS.get(kind or path.name, SIZE_CAPS[RECORD])
    if root is not None and not _inside(path.parent, root):
        raise UnsafeFileError(f"{path}: lies outside {root} through a symlinked folder; not read")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path}: is a symlink; not read") from None
        with contextlib.suppress(OSError):  # a socket or a device without a driver cannot even be opened
            mode = os.lstat(path).st_mode
            if not stat.S_ISREG(mode):
                raise UnsafeFileError(f"{path}: is {_kind(mode)}, not a regular file; not read") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: is {_kind(info.st_mode)}, not a regular file; not read")
        if info.st_size > limit:
            raise UnsafeFileError(f"{path}: {info.st_size} bytes, over the {limit} bytes a {path.name} may have")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, kind: str | None = None, *, root: Path | None = None) -> bytes:
    """The whole file, read through :func:`open_regular` (and never more than its cap, even if it grows)."""
    limit = SIZE_CAPS.get(kind or Path(path).name, SIZE_CAPS[RECORD])
    with open_regular(path, kind, root=root) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFileError(f"{path}: grew over the {limit} bytes a {Path(path).name} may have")
    return data


def read_text(path: Path, kind: str | None = None, *, root: Path | None = None) -> str:
    try:
        return read_bytes(path, kind, root=root).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason})") from None


def read_json(path: Path, kind: str | None = None, *, root: Path | None = None) -> Any:
    """Parsed JSON of a results-folder file; ValueError (corrupt, unsafe), OSError (unreadable)."""
    text = read_text(path, kind, root=root)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: corrupt JSON ({exc})") from None
    except RecursionError:
        raise ValueError(f"{path}: too deeply nested") from None


def read_metrics(run_dir: Path, *, root: Path | None = None) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` ([] when it has none); malformed lines are skipped."""
    path = Path(run_dir) / METRICS
    if not os.path.lexists(path):
        return []
    rows = []
    for line in read_text(path, root=root).splitlines():
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_env(run_dir: Path, *, root: Path | None = None) -> dict[str, Any] | None:
    """A run's ``env.json`` (None when it has none); ValueError when corrupt or unsafe."""
    path = Path(run_dir) / ENV
    if not os.path.lexists(path):
        return None
    env = read_json(path, root=root)
    if not isinstance(env, dict):
        raise ValueError(f"{path}: not a JSON object")
    return env


def _yaml_nodes(node: Any, sizes: dict[int, int], depth: int = 0) -> int:
    """Number of nodes of a composed YAML graph with every alias expanded (each node counted once: linear)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if depth > 200:
        raise ValueError("nested more than 200 levels deep")
    sizes[id(node)] = 1  # an alias cycle counts once instead of recursing forever
    total = 1
    if isinstance(node.value, list):
        for item in node.value:
            children = item if isinstance(item, tuple) else (item,)
            total += sum(_yaml_nodes(child, sizes, depth + 1) for child in children)
            if total > YAML_MAX_NODES:
                break
    sizes[id(node)] = total
    return total


def read_config(run_dir: Path, *, root: Path | None = None) -> Any:
    """A run's ``config.yaml`` as a DictConfig; ValueError when unsafe, corrupt or an alias bomb.

    YAML aliases are expanded by OmegaConf: nine levels of nine aliases are 9**9 nodes. The document's
    node graph is composed first (linear in its size) and its expanded size bounded before OmegaConf
    sees it; poolbench itself never writes aliases.
    """
    import yaml
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(run_dir) / CONFIG
    text = read_text(path, root=root)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and _yaml_nodes(node, {}) > YAML_MAX_NODES:
            raise ValueError(f"more than {YAML_MAX_NODES} nodes once its aliases are expanded (an alias bomb?)")
        cfg = OmegaConf.load(io.StringIO(text))
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError) as exc:
        raise ValueError(f"{path}: not a readable config ({message_line(exc)})") from None
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: not a mapping")
    return cfg


def load_checkpoint(run_dir: Path, *, root: Path | None = None) -> dict[str, Any]:
    """A run's ``checkpoint.pt`` (tensors and plain data only: ``weights_only``, so a pickle from someone
    else runs no code); ValueError naming why it cannot be used."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    try:
        with open_regular(path, root=root) as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
    except (OSError, UnsafeFileError):
        raise
    except Exception as exc:  # UnpicklingError, RuntimeError, EOFError, ...: whatever the bytes make torch raise
        raise ValueError(f"{path}: not a usable checkpoint ({type(exc).__name__}: {message_line(exc)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path}: not a poolbench checkpoint (no model state)")
    return state


def read_side_by_side(results_dir: Path) -> dict[str, Any] | None:
    """``<results_dir>/side_by_side.json`` (None when absent); ValueError when unsafe or not this schema."""
    path = Path(results_dir) / SIDE_BY_SIDE
    if not os.path.lexists(path):
        return None
    data = read_json(path)
    if not isinstance(data, dict) or data.get("schema") != SIDE_BY_SIDE_SCHEMA\
            or not isinstance(data.get("rows"), list):
        raise ValueError(f"{path}: not schema {SIDE_BY_SIDE_SCHEMA} with a list of rows")
    return data


def read_record(run_dir: Path, *, root: Path | None = None) -> dict[str, Any] | None:
    """The run's record, or None when it has none; ValueError when it is corrupt or unsafe."""
    path = Path(run_dir) / RECORD
    if not os.path.lexists(path):
        return None
    record = read_json(path, root=root)
    if not isinstance(record, dict) or record.get("status") not in STATUSES:
        raise ValueError(f"{path}: not a poolbench run record")
    return record


def _record_paths(results_dir: Path, problems: list[str]) -> list[Path]:
    """Every ``result.json`` under ``results_dir``: symlinked folders not followed, hidden folders (staged
    overwrites) skipped, and a folder that cannot be listed reported instead of silently left out."""

    def unreadable(exc: OSError) -> None:
        problems.append(f"{exc.filename}: cannot read the folder ({exc.strerror or exc}); its runs are skipped")

    found = []
    for folder, subfolders, names in os.walk(results_dir, onerror=unreadable):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in [d for d in subfolders if os.path.islink(os.path.join(folder, d))]:
            problems.append(f"{os.path.join(folder, name)}: a symlink to a folder; not followed, its runs are skipped")
        if RECORD in names:
            found.append(Path(folder) / RECORD)
    return sorted(found)


def iter_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable record under ``results_dir`` (recursively) and one line per unreadable one.

    A record's ``run_dir`` is where it was found (a results folder may have been moved or copied, and a
    record's own field is not to be trusted); hidden folders (staged overwrites) are not results. A
    ``running`` record whose lock no live process holds gets ``status_detail``: its process died.
    """
    found: list[dict[str, Any]] = []
    problems: list[str] = []
    results_dir = Path(results_dir)
    for path in _record_paths(results_dir, problems):
        try:
            record = read_record(path.parent, root=results_dir)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        except OSError as exc:
            problems.append(f"{path}: cannot read ({exc.strerror or exc})")
            continue
        if record is not None:
            record["run_dir"] = str(path.parent)
            if record["status"] == "running" and not is_locked(path.parent):
                record["status_detail"] = STALE
            found.append(record)
    return found, problems


STALE = "running, but stale: no live process holds its lock (its process died); trainer.resume=true resumes it"


@dataclass
class LoadedRun:
    """What :func:`load_run` returns."""

    run_dir: Path
    config: Any  # DictConfig
    record: dict[str, Any]
    model: Any = None  # the rebuilt model with the checkpoint's weights (load_run(model=True))
    geometry: tuple[int, int, int] | None = None  # (in_channels, input_size, num_classes) of the rebuilt model


def load_run(run_dir: Path, *, model: bool = False, root: Path | None = None) -> LoadedRun:
    """Config and record of a run folder and, with ``model``, the model rebuilt with its checkpoint's
    weights on CPU. ValueError (unsafe, corrupt, not completed, cannot be rebuilt) or OSError, one line."""
    run_dir = Path(run_dir)
    record = read_record(run_dir, root=root)
    if record is None:
        raise ValueError(f"{run_dir}: no {RECORD}")
    cfg = read_config(run_dir, root=root)
    loaded = LoadedRun(run_dir, cfg, record)
    if model:
        loaded.model, loaded.geometry = rebuild_model(cfg, record, load_checkpoint(run_dir, root=root)["model"])
    return loaded


def _geometry(record: dict[str, Any], cfg: Any, state: dict[str, Any]) -> tuple[int, int, int]:
    """(in_channels, input_size, num_classes) of a run: its record's fields when it has them, else
    the checkpoint's first convolution and head, and the dataset config's input/image size."""
    in_channels = record.get("in_channels")
    if not isinstance(in_channels, int):
        conv = next((t for k, t in state.items() if k.startswith("features.") and t.dim() == 4), None)
        if conv is None:
            raise ValueError("cannot tell the input channels: no convolution in the checkpoint")
        in_channels = int(conv.shape[1])
    input_size = record.get("input_size")
    if not isinstance(input_size, int):
        dataset = cfg.get("dataset", {})
        input_size = dataset.get("input_size") or dataset.get("image_size")
        if not isinstance(input_size, int):
            raise ValueError("cannot tell the input size: the record has no input_size")
    num_classes = record.get("num_classes")
    if not isinstance(num_classes, int):
        head = state.get("head.weight")
        num_classes = int(head.shape[0]) if head is not None and record.get("task") == "classification" else 2
    return in_channels, input_size, num_classes


def rebuild_model(cfg: Any, record: dict[str, Any], state: dict[str, Any]) -> tuple[Any, tuple[int, int, int]]:
    """The model of a run's config and record with the weights ``state``, and its geometry
    (in_channels, input_size, num_classes); what :func:`load_run` rebuilds with."""
    import torch

    from poolbench import plugins
    from poolbench.models import build_model

    in_channels, input_size, num_classes = _geometry(record, cfg, state)
    task = str(record.get("task", ""))
    torch.manual_seed(0)
    with plugins.rebuilding():  # the folder's plugins and `_target_` code only if named by the user
        plugins.load_recorded(cfg)
        net = build_model(
            cfg.model,
            cfg.pooling,
            cfg.local_pooling,
            in_channels=in_channels,
            input_size=input_size,
            num_classes=num_classes,
            task=task,
        )
    net.load_state_dict(state)
    expected = (record.get("feature_map_h"), record.get("feature_map_w"))
    if tuple(net.feature_map_size) != expected:
        raise ValueError(f"rebuilt feature map {net.feature_map_size} differs from the record's {expected}")
    return net, (in_channels, input_size, num_classes)


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
    return run_dir.parent / f".{run_dir.name}{LOCK_SUFFIX}"


def _open_lock(path: Path, flags: int) -> int:
    """fd of a lock file that is a regular file and not a symlink (a planted ``.<run-id>.lock`` symlink to
    a file elsewhere must never be truncated or written); :class:`UnsafeFileError` otherwise."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"lock file {path} is a symlink (not poolbench's): remove it") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UnsafeFileError(f"lock file {path} is {_kind(info.st_mode)} (not poolbench's): remove it")
    return fd


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Exclusive ownership of a run across processes (the run directory itself need not exist yet).

    An ``flock`` rather than a pid file: the kernel releases it when the holder dies, even by
    ``kill -9``, so there is no stale lock to detect and no takeover race.
    """
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise RunLockedError(f"run {run_dir.name} is being worked on by {holder}") from None
        # The previous holder deletes the file when done; if it did so after we opened it, we hold
        # the lock of a deleted file that nobody else will see: open the path again.
        try:
            if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still locked: whoever opens the path from now on gets a new file
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (without creating a lock file; a lock file that is
    not a regular file is nobody's lock)."""
    try:
        fd = _open_lock(lock_path(run_dir), os.O_RDONLY)
    except (OSError, UnsafeFileError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we took
    return False


def _staging_root(run_dir: Path) -> Path | None:
    """``<results_dir>/.staging`` when it is absent or a real folder; None when it is a symlink or a file
    (planted: training into it or deleting through it would act outside ``results_dir``)."""
    root = run_dir.parent / STAGING
    return None if root.is_symlink() or (os.path.lexists(root) and not root.is_dir()) else root


def staging_dir(run_dir: Path) -> Path:
    """Where a run that replaces the completed ``run_dir`` trains until it has completed; refused
    (:class:`UnsafeFileError`) when ``.staging`` is a symlink or a file."""
    root = _staging_root(run_dir)
    if root is None:
        raise UnsafeFileError(
            f"{run_dir.parent / STAGING} is a symlink or a file (not poolbench's): refusing to train an overwrite "
            "there; remove it"
        )
    return root / run_dir.name


def has_staged(run_dir: Path) -> bool:
    """Whether a (safe) staging folder of ``run_dir`` exists: left by a killed overwrite run, unless one is live."""
    root = _staging_root(run_dir)
    return root is not None and os.path.lexists(root / run_dir.name)


def check_run_dir(run_dir: Path) -> None:
    """Refuse to write into a run folder that is a symlink (planted: the run would be written elsewhere)."""
    if run_dir.is_symlink() or (os.path.lexists(run_dir) and not run_dir.is_dir()):
        raise UnsafeFileError(f"run folder {run_dir} is a symlink or a file (not poolbench's): remove it")


def _remove(path: Path) -> None:
    """Delete a folder of ours; a symlink in its place is unlinked, never followed."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _replaced_dir(run_dir: Path) -> Path:
    return staging_dir(run_dir).with_name(f"{run_dir.name}.replaced")


def replace_run_dir(staged: Path, run_dir: Path) -> None:
    """Put the completed run ``staged`` in place of ``run_dir``, then delete the old run.

    Two renames; a process killed between them is repaired by :func:`recover` (call it under the lock).
    """
    old = _replaced_dir(run_dir)
    _remove(old)
    os.rename(run_dir, old)
    os.rename(staged, run_dir)
    _remove(old)
    _remove_if_empty(staged.parent)


def recover(run_dir: Path) -> None:
    """Repair what a killed process left of a replacement: finish a swap that stopped between its two
    renames, delete an overwrite run that never completed (the completed run it was to replace stays).
    A planted ``.staging`` symlink is left alone (never followed)."""
    if _staging_root(run_dir) is None:
        return
    staged, old = staging_dir(run_dir), _replaced_dir(run_dir)
    if old.is_dir() and not old.is_symlink() and not os.path.lexists(run_dir):
        os.rename(staged if staged.is_dir() and not staged.is_symlink() else old, run_dir)  # swapped once completed
    _remove(old)
    discard_staged(run_dir)


def discard_staged(run_dir: Path) -> None:
    """Delete an overwrite run of ``run_dir`` that did not complete (the completed run stays)."""
    if _staging_root(run_dir) is None:
        return
    staged = staging_dir(run_dir)
    _remove(staged)
    _remove_if_empty(staged.parent)


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # absent, or another run is staged there
        folder.rmdir()
