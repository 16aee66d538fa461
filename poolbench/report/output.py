"""Write a report's files so that ``--out`` holds exactly this report's files, or nothing changes.

Everything is written into a fresh folder beside ``--out`` and swapped in at the end. ``report.json``
in the folder states what produced it; ``.poolbench-manifest.json`` lists every file poolbench wrote
there with its sha256, and decides alone what a later report may replace: a folder holding anything
else (a file of the user's, a file changed since, a folder without a manifest) is refused, never replaced.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from poolbench import files, records
from poolbench import text as esc
from poolbench.errors import PoolbenchError
from poolbench.report.columns import safe_text
from poolbench.report.core import Report

MANIFEST = "report.json"  # what produced the report (kept for readers of older reports)
OWNED = ".poolbench-manifest.json"  # {"files": {name: sha256}}: what poolbench wrote, so may replace


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_destination(out_dir: Path) -> None:
    """Refuse, before any work, an ``--out`` that is a file, lies under a file, or holds other files."""
    shown = safe_text(str(out_dir))
    blocking = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise PoolbenchError(f"cannot write the report to {shown}: {safe_text(str(blocking))} is a file")
    if out_dir.exists() and not out_dir.is_dir():
        raise PoolbenchError(f"--out {shown} is a file, not a folder; choose a folder for the report")
    if out_dir.is_symlink():
        raise PoolbenchError(f"--out {shown} is a symlink; choose a folder for the report")
    if out_dir.is_dir():
        foreign = _not_ours(out_dir)
        if foreign:
            raise PoolbenchError(
                f"--out {shown} holds {foreign}, which poolbench did not write (it is not in the folder's "
                f"{OWNED}); nothing was changed: choose an empty or new folder, or move it away"
            )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with records.open_regular(path, OWNED) as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _not_ours(out_dir: Path) -> str | None:
    """The first entry of ``out_dir`` that its manifest does not list as written by poolbench (or that was
    changed since), shown; None when every entry is poolbench's own."""
    try:
        names = sorted(os.listdir(out_dir))
    except OSError as exc:
        return f"entries that cannot be listed ({exc.strerror or exc})"
    if not names:
        return None
    try:
        owned = records.read_json(out_dir / OWNED, OWNED).get("files")
    except (OSError, ValueError, AttributeError):
        owned = None
    if not isinstance(owned, dict):
        if names == [OWNED]:
            return None
        shown = ", ".join(f"'{esc.plain(n)}'" for n in names[:3]) + (f" and {len(names) - 3} more" if names[3:] else "")
        return f"{shown} but no {OWNED}"
    for name in names:
        if name == OWNED:
            continue
        if name not in owned:
            return f"'{esc.plain(name)}'"
        try:
            same = _sha256(out_dir / name) == owned[name]
        except (OSError, ValueError):
            same = False
        if not same:
            return f"'{esc.plain(name)}' (changed since poolbench wrote it, or not a regular file)"
    return None


def write_report(report: Report, out_dir: Path, writers: Sequence[Callable[[Report, Path], list[Path]]]) -> list[Path]:
    """Run every ``writer(report, folder)`` into a temporary folder, add the manifest, swap it in."""
    out_dir = Path(out_dir)
    check_destination(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.new-"))
    except OSError as exc:
        raise PoolbenchError(
            f"cannot write the report to {safe_text(str(out_dir))} ({exc.strerror or exc}); choose a folder with --out"
        ) from None
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a report is shared like any folder
        written = [path for writer in writers for path in writer(report, staging)]
        manifest = {
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "results_dir": safe_text(str(report.results_dir)),
            "filters": report.filters,
            "metrics": report.metrics,
            "baseline": report.baseline,
            "allow_confounded": report.allow_confounded,
            "grouped_by": report.keys,
            "warnings": report.warnings,
            "latency_source": report.latency_source,
            "skipped": report.skipped,
            "left_out": report.dropped,
            "files": [p.name for p in written],
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        owned = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.name != OWNED}
        files.atomic_write_json(staging / OWNED, {"written_by": "poolbench report", "files": owned})
        check_destination(out_dir)  # again: a file may have appeared while the report was computed
        _swap(staging, out_dir)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise PoolbenchError(
            f"cannot write the report to {safe_text(str(out_dir))} ({exc.strerror or exc}); nothing was changed"
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / p.name for p in written]


def _swap(staging: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``staging``: two renames, the old report deleted only afterwards."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rename(out_dir, old / "report")
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:
            os.rename(old / "report", out_dir)  # put the previous report back
        raise
    finally:
        if old is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(old)
