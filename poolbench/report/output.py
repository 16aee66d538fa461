"""Write a report's files so that ``--out`` holds exactly this report's files, or nothing changes.

Everything is written into a fresh folder beside ``--out`` and swapped in at the end; a folder that
holds files of something else than a poolbench report is never replaced. ``report.json`` in the
folder states what produced it and lists its files.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from poolbench.errors import PoolbenchError
from poolbench.report.core import Report, safe_text

MANIFEST = "report.json"


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
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise PoolbenchError(
            f"--out {shown} holds files that are not a poolbench report; choose an empty or new folder"
        )


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
