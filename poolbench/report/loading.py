"""Loading: run records to one frame of completed runs (checked, de-duplicated, filtered), and the merge
of ``side_by_side.json`` latencies into it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from poolbench import records
from poolbench.errors import PoolbenchError
from poolbench.report.columns import (
    NOT_METRICS,
    POOLING_KEY,
    SEED_KEY,
    context_label,
    find_column,
    is_number,
    is_numeric_column,
    is_treatment,
    safe_text,
    treatment_label,
)
from poolbench.schema import CUSTOM

# A record without these cannot be placed in a table or paired; the types they must have.
IDENTITY_FIELDS: dict[str, type | tuple[type, ...]] = {"run_id": str, "status": str, SEED_KEY: int, POOLING_KEY: str}
SIDE_BY_SIDE = records.SIDE_BY_SIDE
# side_by_side.json row field -> report column, and the field holding its 95% interval.
SIDE_BY_SIDE_COLUMNS = {
    "infer_image_ms": ("latency.infer_image_ms", "infer_image_ms_ci"),
    "train_step_ms": ("latency.train_step_ms", "train_step_ms_ci"),
    "pool_fwd_ms": ("latency.pool_fwd_ms", None),
    "pool_fwdbwd_ms": ("latency.pool_fwdbwd_ms", None),
    "peak_mem_mb": ("latency.peak_mem_mb", None),
}
SIDE_BY_SIDE_METRICS = {column for column, _ in SIDE_BY_SIDE_COLUMNS.values()}
RAW_RUN_DIR = "_run_dir_path"
FROM_SIDE_BY_SIDE = "latency.from_side_by_side"  # per run: its latency columns come from side_by_side.json
PER_RUN_LATENCY = "per run (measured after each run's training, not interleaved)"


def _record_problem(record: dict[str, Any]) -> str | None:
    """Why a parsed record cannot be used, or None."""
    for name, kind in IDENTITY_FIELDS.items():
        value = record.get(name)
        if value is None:
            return f"missing {name}"
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name} is {_shown(value)}, not {'an int' if kind is int else 'text'}"
    for name, value in record.items():
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, list | dict) for v in value)):
            return f"{name} is nested (a run record is flat)"
    return None


def _shown(value: Any, limit: int = 40) -> str:
    text = safe_text(json.dumps(value, default=str) if not isinstance(value, str) else repr(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mistyped(records: list[dict[str, Any]]) -> dict[int, str]:
    """Records whose value of a numeric field is not a number (by index): they are skipped, not the field."""
    numeric: dict[str, int] = {}
    other: dict[str, int] = {}
    for record in records:
        for name, value in record.items():
            if name.startswith(NOT_METRICS) or value is None:
                continue
            counts = numeric if is_number(value) else other
            counts[name] = counts.get(name, 0) + 1
    expected_numbers = {name for name, count in numeric.items() if count >= other.get(name, 0)}
    problems: dict[int, str] = {}
    for i, record in enumerate(records):
        for name in sorted(expected_numbers & record.keys()):
            value = record[name]
            if value is not None and not is_number(value):
                problems[i] = f"{name} is {_shown(value)}, not a number"
                break
    return problems


def read_records(results_dir: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Every usable record under ``results_dir`` (recursively; any status) and one line per skipped file."""
    found, problems = records.iter_records(results_dir)
    usable, skipped = [], [safe_text(problem) for problem in problems]
    for record in found:
        folder = Path(record["run_dir"])
        problem = _record_problem(record)
        if problem:
            skipped.append(f"{safe_text(str(folder / records.RECORD))}: {problem}")
            continue
        for group in ("model", "pooling", "local_pooling"):  # a `_target_` part is compared under its class name
            if record.get(f"choice.{group}") == CUSTOM and record.get(group):
                record[f"choice.{group}"] = record[group]
        usable.append({**{k: safe_text(v) for k, v in record.items()}, RAW_RUN_DIR: folder})
    return usable, skipped


def load(results_dir: Path, where: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Completed runs under ``results_dir`` (filtered by ``key=value[,value...]``) and the skipped ones."""
    frame, skipped, _ = load_runs(results_dir, where)
    return frame, skipped


def load_runs(results_dir: Path, where: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str], dict[str, Path]]:
    """:func:`load`, plus each kept run's folder by run id (its name may not be valid UTF-8).

    The folders are kept beside the frame, never in ``frame.attrs``: pandas deep-copies ``attrs`` into
    every Series and frame derived from it, which made a report quadratic in the number of records.
    """
    results_dir = Path(results_dir)
    if results_dir.exists() and not results_dir.is_dir():
        raise PoolbenchError(f"results directory {safe_text(str(results_dir))} is a file, not a folder of runs")
    if not results_dir.is_dir():
        raise PoolbenchError(
            f"results directory {safe_text(str(results_dir))} does not exist"
            " (run `poolbench sweep` or `poolbench train` first)"
        )
    found, skipped = read_records(results_dir)
    if not found and not skipped:
        raise PoolbenchError(f"no run records (result.json) under {safe_text(str(results_dir))}")
    completed = []
    first_seen: dict[str, str] = {}
    for record in found:
        if record["run_id"] in first_seen:  # a copied run folder must not count twice
            skipped.append(f"{record['run_dir']}: same run_id as {first_seen[record['run_id']]}")
            continue
        first_seen[record["run_id"]] = record["run_dir"]
        if record["status"] == "completed":
            completed.append(record)
            continue
        error = f": {record['error']}" if record.get("error") else ""
        skipped.append(f"{record['run_id']} is {record.get('status_detail') or record['status']}{error}")
    mistyped = _mistyped(completed)
    skipped += [f"{completed[i]['run_id']}: {reason}" for i, reason in mistyped.items()]
    completed = [r for i, r in enumerate(completed) if i not in mistyped]
    if not completed:
        raise PoolbenchError(
            f"no completed runs under {safe_text(str(results_dir))} ({len(skipped)} unfinished or broken)"
        )
    frame = pd.DataFrame.from_records(completed)
    # The folders themselves (their names may not be valid UTF-8, unlike the printable run_dir column).
    run_dirs = dict(zip(frame["run_id"], frame.pop(RAW_RUN_DIR), strict=True))
    for column in frame.columns:
        if frame[column].dtype == object:  # lists cannot be grouped or compared
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list) else v)
    for condition in where:
        frame = _filter(frame, condition)
    if frame.empty:
        raise PoolbenchError(f"no completed run matches --where {' '.join(where)}")
    frame = frame.reset_index(drop=True)
    return frame, skipped, {run_id: run_dirs[run_id] for run_id in frame["run_id"]}


def _matches(value: Any, wanted: str) -> bool:
    if str(value).lower() == wanted.lower():
        return True
    try:
        return is_number(value) and math.isclose(value, float(wanted))
    except ValueError:
        return False


def _filter(frame: pd.DataFrame, condition: str) -> pd.DataFrame:
    key, sep, wanted = condition.partition("=")
    if not sep or not key:
        raise PoolbenchError(f"--where takes key=value (or key=v1,v2), got '{condition}'")
    column = find_column(frame, key.strip(), "--where key")
    values = [v.strip() for v in wanted.split(",")]
    keep = frame[column].map(lambda v: any(_matches(v, w) for w in values))
    return frame[keep.astype(bool)]


def read_side_by_side(
    results_dir: Path, frame: pd.DataFrame
) -> tuple[pd.DataFrame, dict[str, str], list[str], list[dict[str, Any]]]:
    """Runs with their latency columns replaced by ``side_by_side.json`` (when present), the source of
    each latency column, warnings, and the file's rows.

    Side-by-side figures are measured interleaved in one process, so they are comparable across
    operators; per-run figures were measured after each run and drift with the machine's load.
    The intervals go into ``<column>.ci_low`` / ``<column>.ci_high``.
    """
    path = Path(results_dir) / SIDE_BY_SIDE
    latency = [c for c in frame.columns if c.startswith("latency.") and is_numeric_column(frame[c])]
    per_run = {c: PER_RUN_LATENCY for c in latency}
    try:
        data = records.read_side_by_side(results_dir)
        if data is None:
            return frame, per_run, [], []
        rows = data["rows"]
    except (OSError, ValueError) as exc:
        return frame, per_run, [f"{safe_text(str(path))} ignored ({safe_text(str(exc))[:80]}); latency is per run"], []
    frame = frame.copy()
    frame[FROM_SIDE_BY_SIDE] = False
    by_id = {run_id: i for i, run_id in enumerate(frame["run_id"])}
    used: set[str] = set()
    for row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("run_ids"), list):
            continue
        index = [by_id[r] for r in row["run_ids"] if isinstance(r, str) and r in by_id]
        for source, (column, ci_field) in SIDE_BY_SIDE_COLUMNS.items():
            value = row.get(source)
            if not index or not is_number(value):
                continue
            frame.loc[index, column] = float(value)
            frame.loc[index, FROM_SIDE_BY_SIDE] = True
            used.add(column)
            interval = row.get(ci_field) if ci_field else None
            if isinstance(interval, list) and len(interval) == 2 and all(is_number(v) for v in interval):
                frame.loc[index, f"{column}.ci_low"], frame.loc[index, f"{column}.ci_high"] = map(float, interval)
    created = safe_text(str(data.get("created", "?")))
    covered, total = int(frame[FROM_SIDE_BY_SIDE].sum()), len(frame)
    source = f"{SIDE_BY_SIDE} (interleaved in one process, created {created})"
    if covered < total:
        source += f" for {covered} of {total} runs; the others {PER_RUN_LATENCY}"
    sources = {**per_run, **{c: source for c in used}}
    notes = []
    left_out = data.get("skipped") if isinstance(data.get("skipped"), list) else []
    if left_out:
        first = left_out[0].get("reason") if isinstance(left_out[0], dict) else left_out[0]
        notes.append(f"{SIDE_BY_SIDE} left out {len(left_out)} runs, e.g.: {safe_text(str(first))[:120]}")
    return frame, sources, notes, [{"baseline": data.get("baseline"), **r} for r in rows if isinstance(r, dict)]


def side_by_side_lines(rows: list[dict[str, Any]], frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """``[digits] gem vs avg: inference latency × 1.46 [1.40, 1.52] (side by side)`` per row with a ratio."""
    by_id = {run_id: i for i, run_id in enumerate(frame["run_id"])}
    lines = []
    for row in rows:
        ratio, interval, baseline = row.get("ratio_infer"), row.get("ratio_infer_ci"), row.get("baseline")
        index = [by_id[r] for r in row.get("run_ids") or [] if isinstance(r, str) and r in by_id]
        if not index or not is_number(ratio):
            continue
        run = frame.iloc[index[0]]
        if run.get(POOLING_KEY) == baseline:  # the baseline against itself
            continue
        context = context_label(run, [k for k in keys if not is_treatment(k)])
        ci = ""
        if isinstance(interval, list) and len(interval) == 2 and all(is_number(v) for v in interval):
            ci = f" [{interval[0]:.3g}, {interval[1]:.3g}]"
        against = f" vs {safe_text(str(baseline))}" if baseline else ""
        where = f"[{context}] " if context else ""
        lines.append(
            f"{where}{treatment_label(run, keys)}{against}: inference latency × {ratio:.3g}{ci} (side by side)"
        )
    return lines
