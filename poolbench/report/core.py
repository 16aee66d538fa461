"""Aggregate run records into comparison tables and paired significance tests.

Library code: everything returns DataFrames or strings; ``poolbench report`` renders, and
:mod:`poolbench.report.output` writes the files.

Records are grouped by the config keys that vary between runs (seeds and the keys that do not change
what a run computes excluded). The pooling choice and its parameters are the *treatment*; every other
grouping key is the *context*, and runs pair up when their context and seed are equal. A varying key
is hidden only when it is part of the chosen option's own definition (see :func:`design`); a key that
differs *with* the treatment (the compared operators never ran with a common value) is confounded: it
is warned about everywhere, and the pairs it separates are compared only with ``allow_confounded``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poolbench import records
from poolbench.config import GROUPS, NON_IDENTITY_KEYS
from poolbench.errors import PoolbenchError, unknown_choice
from poolbench.report import protocol, stats
from poolbench.schema import CUSTOM

DEFAULT_METRICS = ("mAP", "top1", "acc@1", "acc@5", "latency.infer_image_ms", "latency.peak_mem_mb")
ENV_KEYS = ("env.torch", "env.device_name", "env.git_commit")
FORMATS = ("csv", "md", "tex", "parquet")
POOLING_KEY = "choice.pooling"
SEED_KEY = "seed"
# Choice columns considered first, in table order; pooling last so operators sit side by side.
CHOICE_ORDER = ("choice.dataset", "choice.model", "choice.trainer", "choice.local_pooling", POOLING_KEY)
NOT_METRICS = ("cfg.", "choice.", "env.", "data.")
BOOKKEEPING = ("seed", "feature_map_h", "feature_map_w", "failed_epoch", "pool_out_features", "num_params")
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
_SIDE_BY_SIDE_METRICS = {column for column, _ in SIDE_BY_SIDE_COLUMNS.values()}
RAW_RUN_DIR = "_run_dir_path"
FROM_SIDE_BY_SIDE = "latency.from_side_by_side"  # per run: its latency columns come from side_by_side.json
PER_RUN_LATENCY = "per run (measured after each run's training, not interleaved)"


@dataclass
class Design:
    """How the varying config keys of a set of runs are used (the result of :func:`design`)."""

    keys: list[str]  # grouping columns: context first, treatment (pooling and its parameters) last
    hidden: list[str] = field(default_factory=list)  # varying, but part of the chosen option's definition
    confounded: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # column -> treatment -> values

    @property
    def context(self) -> list[str]:
        return [k for k in self.keys if not _is_treatment(k)]

    @property
    def treatment(self) -> list[str]:
        return [k for k in self.keys if _is_treatment(k)]


@dataclass
class Report:
    """Everything ``poolbench report`` shows and writes."""

    runs: pd.DataFrame  # one row per completed run, every record field
    skipped: list[str]  # one line per broken or unfinished record
    keys: list[str]  # varying config columns the summary is grouped by
    metrics: list[str]
    summary: pd.DataFrame  # keys + <metric>.mean/.std/.n per group
    baseline: str | None = None
    comparison: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (context, operator, metric)
    warnings: list[str] = field(default_factory=list)
    design: Design | None = None
    allow_confounded: bool = False
    results_dir: Path | None = None
    filters: list[str] = field(default_factory=list)
    latency_source: dict[str, str] = field(default_factory=dict)  # latency column -> where its figures come from
    ranking: dict[str, Any] | None = None  # see rank_operators
    notes: list[str] = field(default_factory=list)  # informational lines (not warnings)
    side_by_side: list[str] = field(default_factory=list)  # latency ratios from side_by_side.json
    run_dirs: dict[str, Path] = field(default_factory=dict)  # run_id -> its folder (for metrics.jsonl, env.json)
    dropped: list[str] = field(default_factory=list)  # duplicates and unpaired runs: named, never silently lost
    contexts: list[str] = field(default_factory=list)  # the keys whose values are independent data sets (ranks)
    mre: float | None = None  # the user's minimally relevant effect (--mre), for the needed seeds

    @property
    def comparison_lines(self) -> list[str]:
        return [_comparison_line(row) for row in self.comparison.to_dict("records")]

    @property
    def family_size(self) -> int:
        """Number of comparisons the Holm adjustment of the primary (sign-flip) p-values runs over."""
        return int(self.comparison["p_perm"].notna().sum()) if not self.comparison.empty else 0

    @property
    def operators(self) -> list[str]:
        """Every treatment label of the report, sorted: the order colours are assigned in."""
        return sorted(set(treatment_labels(self.runs, self.keys)))

    def provenance(self) -> list[str]:
        """What produced this report (stated at the top of every exported file), warnings last."""
        lines = [
            f"poolbench report of {safe_text(str(self.results_dir))}: {len(self.runs)} completed runs",
            f"filters: {' '.join(f'--where {w}' for w in self.filters) or 'none'}",
            f"metrics: {', '.join(self.metrics)}",
            f"grouped by: {', '.join(label(k) for k in self.keys) or 'nothing (one configuration)'}",
        ]
        if self.baseline is not None:
            lines.append(
                f"baseline: {self.baseline}; {self.family_size} paired comparisons, every kind of p-value "
                "Holm-adjusted over all of them"
                + ("; confounded pairs compared (--allow-confounded)" if self.allow_confounded else "")
            )
        if self.dropped:
            lines.append(f"left out: {len(self.dropped)} duplicate or unpaired entries (listed in report.json)")
        lines += [f"latency source of {metric}: {source}" for metric, source in self.latency_source.items()]
        return lines + [f"WARNING: {w}" for w in self.warnings]


def label(column: str) -> str:
    """Display name of a record column: ``choice.pooling`` → ``pooling``, ``cfg.trainer.lr`` → ``trainer.lr``."""
    for prefix in ("choice.", "cfg."):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return column


def safe_text(value: Any) -> Any:
    """Strings made printable and encodable: undecodable path bytes and lone surrogates become ``\\x..``."""
    if not isinstance(value, str):
        return value
    try:  # a file name's undecodable bytes (os.fsdecode's surrogates) shown as the bytes they were
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # other lone surrogates (e.g. "\ud800" in a JSON record)
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


# --------------------------------------------------------------------------------------------- loading


def _is_number(value: Any) -> bool:
    """A JSON number that fits a float64 column (bools and 400-digit integers do not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, float) or abs(value) < 2**63


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
            counts = numeric if _is_number(value) else other
            counts[name] = counts.get(name, 0) + 1
    expected_numbers = {name for name, count in numeric.items() if count >= other.get(name, 0)}
    problems: dict[int, str] = {}
    for i, record in enumerate(records):
        for name in sorted(expected_numbers & record.keys()):
            value = record[name]
            if value is not None and not _is_number(value):
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


def _column(frame: pd.DataFrame, key: str, what: str) -> str:
    for candidate in (key, f"choice.{key}", f"cfg.{key}"):
        if candidate in frame.columns:
            return candidate
    options = [label(c) for c in frame.columns if not c.startswith(("env.", "data.", "train.", "latency."))]
    raise PoolbenchError(unknown_choice(what, key, sorted(set(options))))


def _matches(value: Any, wanted: str) -> bool:
    if str(value).lower() == wanted.lower():
        return True
    try:
        return _is_number(value) and math.isclose(value, float(wanted))
    except ValueError:
        return False


def _filter(frame: pd.DataFrame, condition: str) -> pd.DataFrame:
    key, sep, wanted = condition.partition("=")
    if not sep or not key:
        raise PoolbenchError(f"--where takes key=value (or key=v1,v2), got '{condition}'")
    column = _column(frame, key.strip(), "--where key")
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
    latency = [c for c in frame.columns if c.startswith("latency.") and _is_numeric_column(frame[c])]
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
            if not index or not _is_number(value):
                continue
            frame.loc[index, column] = float(value)
            frame.loc[index, FROM_SIDE_BY_SIDE] = True
            used.add(column)
            interval = row.get(ci_field) if ci_field else None
            if isinstance(interval, list) and len(interval) == 2 and all(_is_number(v) for v in interval):
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
        if not index or not _is_number(ratio):
            continue
        run = frame.iloc[index[0]]
        if run.get(POOLING_KEY) == baseline:  # the baseline against itself
            continue
        context = context_label(run, [k for k in keys if not _is_treatment(k)])
        ci = ""
        if isinstance(interval, list) and len(interval) == 2 and all(_is_number(v) for v in interval):
            ci = f" [{interval[0]:.3g}, {interval[1]:.3g}]"
        against = f" vs {safe_text(str(baseline))}" if baseline else ""
        where = f"[{context}] " if context else ""
        lines.append(
            f"{where}{treatment_label(run, keys)}{against}: inference latency × {ratio:.3g}{ci} (side by side)"
        )
    return lines


# ------------------------------------------------------------------------------------------ the design


def _is_identity_column(column: str) -> bool:
    if column == "choice.experiment":  # a preset's name; what it sets shows up in the cfg.* keys
        return False
    if column.startswith("cfg."):
        key = column[4:]
        return key != "seed" and not key.startswith(NON_IDENTITY_KEYS + ("grid",))
    return column.startswith("choice.")


def _is_treatment(column: str) -> bool:
    return column == POOLING_KEY or column.startswith("cfg.pooling.")


@functools.lru_cache(maxsize=64)
def _option_values(group: str, option: str, target: Any = None) -> dict[str, Any] | None:
    """The flattened config that choosing ``group=option`` gives (for a ``_target_`` operator, shown under
    its class name: ``group=custom group._target_=<target>``), or None when it cannot be composed
    (an option from a plugin or a renamed file: its definition is unknown)."""
    from poolbench.config import compose, flatten

    overrides = [f"{group}={CUSTOM}", f"{group}._target_={target}"] if _present(target) else [f"{group}={option}"]
    try:
        return flatten(compose(overrides, validate=False))
    except Exception:  # noqa: BLE001  (any failure means "definition unknown", which is handled)
        return None


def _defined_values(part: pd.DataFrame, group: str, option: Any, target: Any = None) -> dict[str, Any] | None:
    """What ``group=option`` defines, from the records themselves when they keep it (``part.<group>.defaults``,
    written while the run's code was loaded: plugins and ``_target_`` classes need not be importable
    now), else composed with this poolbench (:func:`_option_values`)."""
    column = f"part.{group}.defaults"
    recorded = part[column].dropna().unique() if column in part else []
    if len(recorded) == 1 and isinstance(recorded[0], str):
        try:
            node = json.loads(recorded[0])
        except ValueError:
            node = None
        if isinstance(node, dict):
            return {f"{group}.{key}": value for key, value in node.items()}
    return _option_values(group, str(option), target) if isinstance(option, str) else None


def _same_value(defined: Any, recorded: Any) -> bool:
    if not _present(recorded):
        return defined is None
    if isinstance(defined, list):
        defined = json.dumps(defined)
    if _is_number(defined) and _is_number(recorded):
        return math.isclose(defined, recorded, rel_tol=1e-9, abs_tol=1e-12)
    return defined == recorded


def _column_key(value: Any) -> Any:
    return "<unset>" if not _present(value) else value


def _implied_by_context(frame: pd.DataFrame, column: str) -> bool:
    """A key that a context choice sets for another group, at exactly the value that choice gives:
    ``augment=auto`` picks the dataset's recipe (``choice.augment`` follows ``choice.dataset``), and
    ``trainer.steps_per_epoch`` follows the dataset's own epoch unless set by hand."""
    if column == POOLING_KEY or not column.startswith(("choice.", "cfg.")):
        return False
    key = f"choices.{column[7:]}" if column.startswith("choice.") else column[4:]
    for owner in ("dataset", "model"):
        owner_column = f"choice.{owner}"
        if owner_column == column or owner_column not in frame.columns or key.startswith(f"{owner}."):
            continue
        if frame.groupby(owner_column, dropna=False)[column].nunique(dropna=False).max() > 1:
            continue
        implied = True
        for option, part in frame.groupby(owner_column, dropna=False):
            values = _option_values(owner, str(option)) if isinstance(option, str) else None
            if values is None or key not in values or not _same_value(values[key], part[column].iloc[0]):
                implied = False
                break
        if implied:
            return True
    return False


def design(frame: pd.DataFrame, baseline: str | None = None) -> Design:
    """Which varying config keys group the runs, which are hidden, and which are confounded.

    - Hidden: a ``cfg.<group>.<key>`` column that is constant within each ``choice.<group>`` and equal,
      for every option, to the value that option defines (e.g. ``pooling.lr_mult`` of ``pooling=dgmp``
      at dgmp's default). Nothing else is hidden: a value set by hand is always shown.
    - Treatment: the pooling choice and the pooling parameters that are not hidden.
    - Confounded: a context column on which two compared treatments (each operator against the
      baseline, or every pair without one) share no value — their difference cannot be credited to
      the operator. It stays a grouping column (so such pairs do not form) unless comparisons are
      asked for anyway.
    """
    candidates = [c for c in CHOICE_ORDER if c in frame.columns]
    candidates += [c for c in frame.columns if c.startswith("choice.") and c not in candidates]
    candidates += sorted(c for c in frame.columns if c.startswith("cfg."))
    varying = [c for c in candidates if _is_identity_column(c) and frame[c].nunique(dropna=False) > 1]
    hidden = [c for c in varying if _implied_by_context(frame, c)]
    for column in [c for c in varying if c not in hidden]:
        group = column[4:].partition(".")[0] if column.startswith("cfg.") else ""
        choice = f"choice.{group}"
        if group not in GROUPS or choice not in frame.columns:
            continue
        if frame.groupby(choice, dropna=False)[column].nunique(dropna=False).max() > 1:
            continue
        defined = True
        target_column = f"cfg.{group}._target_"
        for option, part in frame.groupby(choice, dropna=False):
            target = part[target_column].iloc[0] if target_column in part else None
            values = _defined_values(part, group, option, target)
            recorded = part[column].iloc[0]
            if values is None or not _same_value(values.get(column[4:]), recorded):
                defined = False
                break
        if defined:
            hidden.append(column)
    keys = [c for c in varying if c not in hidden]
    context = [c for c in keys if not _is_treatment(c)]
    treatment = [c for c in keys if _is_treatment(c)] or ([POOLING_KEY] if POOLING_KEY in frame.columns else [])
    confounded: dict[str, dict[str, list[str]]] = {}
    if treatment:
        labels = treatment_labels(frame, keys)
        base_labels = {lab for lab, op in zip(labels, frame[POOLING_KEY], strict=True) if op == baseline}
        for column in context:
            values: dict[str, set[Any]] = {}
            for lab, value in zip(labels, frame[column], strict=True):
                values.setdefault(lab, set()).add(_column_key(value))
            if base_labels:
                pairs = [(a, b) for a in base_labels for b in values if b not in base_labels]
            else:
                pairs = list(itertools.combinations(values, 2))
            if any(not values[a] & values[b] for a, b in pairs):
                confounded[column] = {lab: sorted(map(str, v)) for lab, v in sorted(values.items())}
    return Design(keys=context + [c for c in keys if _is_treatment(c)], hidden=hidden, confounded=confounded)


def one_run_per_seed(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """One run per (configuration, seed): the one place where duplicates are decided.

    Two completed records with the same grouping keys and seed (a copied folder whose run id was
    edited, a run repeated under another results folder) are the same measurement twice. The first
    by folder name is used, on the baseline and the treatment side alike; each other one is named.
    """
    columns = [*keys, SEED_KEY]
    if frame.empty or SEED_KEY not in frame.columns:
        return frame, []
    keyed = frame[columns].map(_column_key).astype(str)
    order = frame["run_dir"].astype(str) if "run_dir" in frame.columns else frame["run_id"].astype(str)
    frame = frame.loc[order.sort_values(kind="stable").index]
    keyed = keyed.loc[frame.index]
    duplicated = keyed.duplicated(keep="first")
    lines = []
    if duplicated.any():
        kept_rows = keyed[~duplicated].itertuples(index=False)
        first = {tuple(k): i for i, k in zip(frame.index[~duplicated], kept_rows, strict=True)}
        for index in frame.index[duplicated]:
            kept = frame.loc[first[tuple(keyed.loc[index])]]
            row = frame.loc[index]
            where = context_label(row, keys)
            what = f"{treatment_label(row, keys)}{f' on {where}' if where else ''} seed {row[SEED_KEY]}"
            lines.append(
                f"duplicate: {what} is in {kept.get('run_dir', kept['run_id'])} and "
                f"{row.get('run_dir', row['run_id'])}; only the first is used"
            )
    return frame[~duplicated].sort_index(), lines


def group_keys(frame: pd.DataFrame) -> list[str]:
    """The grouping columns of :func:`design`."""
    return design(frame).keys


def confounding_warnings(found: Design, *, allow: bool) -> list[str]:
    lines = []
    for column, per_treatment in found.confounded.items():
        spread = "; ".join(f"{t}: {', '.join(v)}" for t, v in per_treatment.items())
        consequence = (
            "compared anyway (--allow-confounded): differences mix the operator with this key"
            if allow
            else "operators that never share a value are not compared (--allow-confounded compares them anyway)"
        )
        lines.append(f"CONFOUNDED: {label(column)} differs with the operator ({spread}); {consequence}")
    return lines


# ---------------------------------------------------------------------------------------- aggregation


def _is_numeric_column(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric record fields that can be aggregated."""
    return [
        c
        for c in frame.columns
        if not c.startswith(NOT_METRICS)
        and c not in BOOKKEEPING
        and not c.endswith((".ci_low", ".ci_high"))
        and _is_numeric_column(frame[c])
    ]


def choose_metrics(frame: pd.DataFrame, requested: Sequence[str] = ()) -> list[str]:
    available = metric_columns(frame)
    by_lower = {m.lower(): m for m in available}
    resolved = []
    for metric in requested:
        if metric not in available and metric.lower() not in by_lower:
            raise PoolbenchError(unknown_choice("metric", metric, available))
        resolved.append(metric if metric in available else by_lower[metric.lower()])
    if resolved:
        return list(dict.fromkeys(resolved))
    chosen = [m for m in DEFAULT_METRICS if m in available and frame[m].notna().any()]
    if not chosen:
        raise PoolbenchError(
            f"none of the default metrics is recorded; choose with --metric from: {', '.join(available)}"
        )
    return chosen


def _groups(frame: pd.DataFrame, keys: list[str]) -> Any:
    if not keys:
        return frame.groupby(np.zeros(len(frame), dtype=int))
    try:
        return frame.groupby(keys, dropna=False, sort=True)
    except TypeError:  # mixed types in a key column cannot be sorted
        return frame.groupby(keys, dropna=False, sort=False)


def summarize(frame: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """One row per group: key values, ``n`` runs, and ``<metric>.mean/.std/.n`` (std with ddof=1).

    A metric with a side-by-side interval (``<metric>.ci_low/.ci_high``) also gets those columns.
    """
    rows = []
    for values, group in _groups(frame, list(keys)):
        row: dict[str, Any] = dict(zip(keys, values if keys else (), strict=True))
        row["n"] = len(group)
        for metric in metrics:
            column = group[metric].astype(float)
            row[f"{metric}.mean"] = column.mean()
            # a side-by-side figure is one measurement per configuration copied to its runs: no spread
            single = metric in _SIDE_BY_SIDE_METRICS and bool(group.get(FROM_SIDE_BY_SIDE, pd.Series([False])).all())
            row[f"{metric}.std"] = math.nan if single else column.std(ddof=1)
            row[f"{metric}.n"] = int(column.count())
            for bound in ("ci_low", "ci_high"):
                if f"{metric}.{bound}" in group.columns:
                    row[f"{metric}.{bound}"] = group[f"{metric}.{bound}"].astype(float).mean()
        rows.append(row)
    return pd.DataFrame(rows)


def treatment_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    """``gem`` or, when pooling parameters were swept too, ``gem (p=3)``."""
    params = [
        f"{label(k)[len('pooling.') :]}={row[k]}" for k in keys if k.startswith("cfg.pooling.") and _present(row[k])
    ]
    name = str(row.get(POOLING_KEY, row.get("pooling", "?")))
    return f"{name} ({', '.join(params)})" if params else name


def _label_rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``frame`` as dicts of only ``columns`` (those present): what the labels read, without
    building a Series per row (``iterrows`` costs milliseconds a row on a wide frame)."""
    present = [c for c in dict.fromkeys(columns) if c in frame.columns]
    if not present:
        return [{} for _ in range(len(frame))]
    return frame[present].to_dict("records")


def treatment_labels(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """:func:`treatment_label` of every row of ``frame``, in order."""
    columns = [POOLING_KEY, "pooling", *(k for k in keys if k.startswith("cfg.pooling."))]
    return [treatment_label(row, keys) for row in _label_rows(frame, columns)]


def context_labels(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """:func:`context_label` of every row of ``frame``, in order."""
    return [context_label(row, keys) for row in _label_rows(frame, [k for k in keys if not _is_treatment(k)])]


def _present(value: Any) -> bool:
    return not (isinstance(value, float) and math.isnan(value)) and value is not None


def context_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    """``digits / resnet18``: choices by their value, other keys as ``key=value`` (``trainer.lr=0.01``)."""
    parts = [
        str(row[k]) if k.startswith("choice.") else f"{label(k)}={row[k]}"
        for k in keys
        if not _is_treatment(k) and _present(row[k])
    ]
    return " / ".join(parts)


def compare(
    frame: pd.DataFrame,
    metrics: Sequence[str],
    keys: Sequence[str],
    baseline: str,
    *,
    confounded: Sequence[str] = (),
    side_by_side: Sequence[str] = (),
    dropped: list[str] | None = None,
) -> pd.DataFrame:
    """Paired differences (operator − baseline) over seeds shared within each context.

    ``confounded`` context columns are left out of the pairing (used with ``allow_confounded``); the
    rows that pair across them name them in ``confounded_by``. Columns: context, pooling, baseline,
    metric, the statistics of :func:`poolbench.report.stats.paired`, ``p_ttest_holm`` /
    ``<p>_holm`` for every p-value of ``stats.P_VALUES`` (Holm over every row), per_seed, mean,
    baseline_mean, confounded_by. Runs left out of the pairing (a seed without a partner, an operator
    without a baseline run in its context) are named in ``dropped``.
    Metrics in ``side_by_side`` are not tested for pairs measured side by side (one value per
    configuration, no spread over seeds); their ratios are in :func:`side_by_side_lines`.
    """
    if POOLING_KEY not in frame.columns:
        raise PoolbenchError("records carry no pooling choice (choice.pooling); cannot compare operators")
    operators = sorted(frame[POOLING_KEY].dropna().astype(str).unique())
    if baseline not in operators:
        raise PoolbenchError(unknown_choice("baseline pooling", baseline, operators))
    treatment_keys = [k for k in keys if _is_treatment(k)]
    context_keys = [k for k in keys if not _is_treatment(k) and k not in confounded]
    rows: list[dict[str, Any]] = []
    dropped = [] if dropped is None else dropped
    for _, context in _groups(frame, context_keys):
        base = context[context[POOLING_KEY] == baseline]
        if base.empty:
            where = context_label(context.iloc[0], context_keys)
            for _, treated in _groups(context, treatment_keys or [POOLING_KEY]):
                dropped.append(
                    f"unpaired: {treatment_label(treated.iloc[0], keys)}{f' on {where}' if where else ''}"
                    f" has no '{baseline}' run to pair with ({len(treated)} runs, seeds "
                    f"{_seed_list(treated[SEED_KEY])}): not compared"
                )
            continue
        if base[SEED_KEY].duplicated().any():
            raise PoolbenchError(
                f"baseline '{baseline}' has several variants per seed"
                f" in {context_label(base.iloc[0], keys) or 'the runs'}; "
                "narrow it down with --where pooling.<param>=<value>"
            )
        others = context[context[POOLING_KEY] != baseline]
        for _, treated in _groups(others, treatment_keys or [POOLING_KEY]):
            first = treated.iloc[0]
            _name_unpaired(dropped, first, keys, context_keys, baseline, treated[SEED_KEY], base[SEED_KEY])
            mixed = [label(c) for c in confounded if set(treated[c].map(_column_key)) != set(base[c].map(_column_key))]
            for metric in metrics:
                if metric in side_by_side and (treated[FROM_SIDE_BY_SIDE].any() or base[FROM_SIDE_BY_SIDE].any()):
                    continue  # one interleaved measurement per configuration: no spread over seeds to test
                pairs = treated[[SEED_KEY, metric]].merge(base[[SEED_KEY, metric]], on=SEED_KEY, suffixes=("", ".base"))
                pairs = pairs.dropna().sort_values(SEED_KEY)
                if pairs.empty:
                    continue
                values, base_values = pairs[metric].to_numpy(float), pairs[f"{metric}.base"].to_numpy(float)
                deltas = values - base_values
                rows.append(
                    {
                        "context": context_label(first, context_keys),
                        "pooling": treatment_label(first, keys),
                        "baseline": baseline,
                        "metric": metric,
                        "higher_is_better": stats.higher_is_better(metric),
                        **stats.paired(values, base_values, higher_better=stats.higher_is_better(metric)),
                        "per_seed": " ".join(f"{s}:{d:+.4g}" for s, d in zip(pairs[SEED_KEY], deltas, strict=True)),
                        "mean": float(values.mean()),
                        "baseline_mean": float(base_values.mean()),
                        "confounded_by": ", ".join(mixed),
                    }
                )
    order = {m: i for i, m in enumerate(metrics)}
    result = pd.DataFrame(rows)
    if result.empty:
        return result
    for name in stats.P_VALUES:
        result[f"{name}_holm"] = stats.holm(result[name])
    return result.sort_values(
        ["metric", "context", "pooling"], key=lambda c: c.map(order) if c.name == "metric" else c
    ).reset_index(drop=True)


def _seed_list(seeds: Any) -> str:
    return ", ".join(str(s) for s in sorted(set(seeds)))


def _name_unpaired(
    dropped: list[str],
    first: pd.Series,
    keys: Sequence[str],
    context_keys: Sequence[str],
    baseline: str,
    treated: pd.Series,
    base: pd.Series,
) -> None:
    """One line per side whose seeds have no partner on the other side."""
    where = context_label(first, context_keys)
    name = f"{treatment_label(first, keys)} vs {baseline}{f' on {where}' if where else ''}"
    for side, own, other in ((treatment_label(first, keys), treated, base), (baseline, base, treated)):
        lonely = set(own) - set(other)
        if lonely:
            dropped.append(f"unpaired: {name}: seeds {_seed_list(lonely)} of {side} have no partner, left out")


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def _p_clause(p: float) -> str:
    text = _fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def _p_with_holm(row: dict[str, Any], name: str, title: str) -> str:
    """``sign-flip p = 0.25 (Holm 0.5)``; empty where that test was not run."""
    p = row.get(name, math.nan)
    if not _present(p) or math.isnan(p):
        return ""
    return f", {title} p {_p_clause(p)} (Holm {_fmt_p(row[f'{name}_holm'])})"


def too_few(row: dict[str, Any]) -> bool:
    return int(row["n"]) < stats.DECIDE_MIN_N


TOO_FEW = f"too few seeds to decide (n < {stats.DECIDE_MIN_N})"


def _comparison_line(row: dict[str, Any]) -> str:
    """``[ctx] dgmp vs avg: ΔmAP = +0.041 ± 0.012 (95% t-interval), sign-flip p = 0.03 (Holm 0.06), ...``.

    Every p-value stands beside its Holm-adjusted value; below ``stats.DECIDE_MIN_N`` pairs the line
    ends with a plain note that the comparison cannot decide.
    """
    from poolbench.report.power import power_clause

    where = f"[{row['context']}] " if row["context"] else ""
    if row.get("all_equal"):
        interval = " (every seed's Δ is the same: no spread, no interval)"
    elif math.isnan(row["ci95"]):
        interval = " (no interval from one pair)"
    else:
        interval = f" ± {row['ci95']:.3g} (95% t-interval)"
    tests = (
        _p_with_holm(row, "p_perm", "sign-flip")
        + _p_with_holm(row, "p_ttest", "t-test")
        + _p_with_holm(row, "p_wilcoxon", "Wilcoxon")
    )
    effect = "" if math.isnan(row["effect_dz"]) else f", d_z = {row['effect_dz']:+.2g}"
    better = round(row["p_improve"] * row["n"])
    power = power_clause(row)
    confounded = f" — CONFOUNDED with {row['confounded_by']}" if row.get("confounded_by") else ""
    note = f" — {TOO_FEW}" if too_few(row) else ""
    return (
        f"{where}{row['pooling']} vs {row['baseline']}: Δ{row['metric']} = {row['mean_delta']:+.3g}{interval}"
        f"{tests}{effect}, better in {better}/{row['n']} seeds, n = {row['n']}"
        f"{f'; {power}' if power else ''}{confounded}{note}"
    )


def environment_warnings(frame: pd.DataFrame) -> list[str]:
    """One line per environment field (torch version, device, git commit) on which the runs differ."""
    lines = []
    for column in ENV_KEYS:
        if column not in frame.columns:
            continue
        counts = frame[column].fillna("unknown").astype(str).value_counts()
        if len(counts) > 1:
            spread = ", ".join(f"{value} ({count} runs)" for value, count in counts.items())
            lines.append(f"compared runs differ in {column[4:]}: {spread}")
    return lines


def quality_metrics(metrics: Sequence[str]) -> list[str]:
    """The metrics that measure what the model learnt (not its cost)."""
    return [m for m in metrics if stats.higher_is_better(m) and not m.startswith("learned.")]


DEFAULT_CONTEXTS = ("choice.dataset", "choice.model")


def context_columns(frame: pd.DataFrame, requested: Sequence[str] = ()) -> list[str]:
    """The columns whose values are independent data sets for the rank tests: ``--contexts`` keys, or
    the (dataset, backbone) pair by default. An unknown key names the recorded ones."""
    if requested:
        return list(dict.fromkeys(_column(frame, key.strip(), "--contexts key") for key in requested if key.strip()))
    return [c for c in DEFAULT_CONTEXTS if c in frame.columns]


def rank_operators(report: Report) -> dict[str, Any] | None:
    """Average ranks, Friedman and Nemenyi over the contexts (independent data sets) of a report.

    A context is a distinct value of ``report.contexts`` (dataset and backbone by default). Every other
    varying key (an image size, a learning rate) is not a data set: an operator's score in a context is
    its mean over those keys' values (an operator must have all of them). Each context is scored by its
    first quality metric that it recorded (mAP for a retrieval set, acc@1 for a classification one):
    ranks make different metrics comparable. Only operators present in every ranked context take part
    (a complete block design). None with fewer than 2 contexts or 2 operators.
    """
    quality = quality_metrics(report.metrics)
    context_keys = [k for k in report.contexts if k in report.summary.columns and not _is_treatment(k)]
    within = [k for k in report.keys if not _is_treatment(k) and k not in context_keys]
    if not quality or not context_keys:
        return None
    scores: dict[str, dict[str, list[float]]] = {}
    groups: dict[str, set[str]] = {}
    metric_of: dict[str, str] = {}
    for _, row in report.summary.iterrows():
        context = context_label(row, context_keys)
        metric = metric_of.get(context) or next((m for m in quality if _present(row[f"{m}.mean"])), None)
        if metric is None or not _present(row[f"{metric}.mean"]):
            continue
        metric_of[context] = metric
        groups.setdefault(context, set()).add(context_label(row, within))
        per_op = scores.setdefault(context, {}).setdefault(treatment_label(row, report.keys), [])
        per_op.append(float(row[f"{metric}.mean"]))
    # an operator's score in a context: its mean over every within-context group, or none if it misses one
    table = pd.DataFrame(
        {c: {op: float(np.mean(v)) for op, v in ops.items() if len(v) == len(groups[c])} for c, ops in scores.items()}
    ).T
    if table.empty:
        return None
    complete = table[table.notna().sum(axis=1) >= 2].dropna(axis=1)  # contexts with a choice, then full columns
    if complete.shape[0] < 2 or complete.shape[1] < 2:
        return None
    result = stats.rank_analysis(complete[sorted(complete.columns)])
    result.update(
        scores=complete[sorted(complete.columns)],
        metric_of={c: metric_of[c] for c in complete.index},
        left_out=sorted(set(table.columns) - set(complete.columns)),
        contexts=[label(k) for k in context_keys],
        within=[label(k) for k in within],
        cd_diagram=complete.shape[0] >= stats.CD_MIN_CONTEXTS and result["nemenyi"] is not None,
    )
    return result


def ranking_lines(ranking: dict[str, Any]) -> list[str]:
    metrics = ", ".join(f"{m} ({c})" for c, m in ranking["metric_of"].items())
    ranks = ", ".join(f"{op} {r:.2f}" for op, r in ranking["average_ranks"].items())
    contexts = len(ranking["scores"])
    what = " × ".join(ranking.get("contexts", [])) or "context"
    lines = [f"average rank over {contexts} contexts ({what}) by {metrics} (1 = best): {ranks}"]
    if ranking.get("within"):
        lines.append(
            f"within a context, {', '.join(ranking['within'])} are not data sets: each operator's score is its "
            "mean over their values"
        )
    if not math.isnan(ranking["friedman_p"]):
        lines.append(
            f"Friedman test: χ² = {ranking['friedman_stat']:.3g}, p {_p_clause(ranking['friedman_p'])}"
            + (" (Nemenyi post-hoc in cd_diagram.png)" if ranking.get("cd_diagram") else "")
        )
    if not ranking.get("cd_diagram") and ranking["nemenyi"] is not None:
        lines.append(
            f"no critical-difference diagram: {contexts} contexts, fewer than {stats.CD_MIN_CONTEXTS} "
            "(the Nemenyi procedure assumes many independent data sets; autorank refuses fewer than 5)"
        )
    if ranking["left_out"]:
        lines.append(f"not ranked (missing in some context): {', '.join(ranking['left_out'])}")
    return lines


def build(
    results_dir: Path,
    *,
    metrics: Sequence[str] = (),
    baseline: str | None = None,
    where: Sequence[str] = (),
    allow_confounded: bool = False,
    contexts: Sequence[str] = (),
    mre: float | None = None,
) -> Report:
    from poolbench.report.power import power_columns

    if mre is not None and not (math.isfinite(mre) and mre > 0):
        raise PoolbenchError(f"--mre takes a positive effect size in the metric's unit, got {mre}")
    frame, skipped, run_dirs = load_runs(results_dir, where)
    frame, tuning = protocol.prepare(frame, run_dirs)  # runs of poolbench tune (report/protocol.py)
    frame, latency_source, sbs_warnings, sbs_rows = read_side_by_side(results_dir, frame)
    rank_contexts = context_columns(frame, contexts)
    found = design(frame, baseline)
    frame, dropped = one_run_per_seed(frame, found.keys)
    chosen = choose_metrics(frame, metrics)
    report = Report(
        runs=frame,
        skipped=skipped,
        keys=found.keys,
        metrics=chosen,
        summary=summarize(frame, chosen, found.keys),
        baseline=baseline,
        warnings=confounding_warnings(found, allow=allow_confounded) + environment_warnings(frame) + sbs_warnings,
        design=found,
        allow_confounded=allow_confounded,
        results_dir=Path(results_dir),
        filters=list(where),
        latency_source={m: s for m, s in latency_source.items() if m in chosen or m == "latency.infer_image_ms"},
        run_dirs=run_dirs,
        dropped=dropped,
        contexts=rank_contexts,
        mre=mre,
    )
    if baseline is not None:
        side_by_side = [m for m, s in latency_source.items() if s != PER_RUN_LATENCY]
        comparison = compare(
            frame,
            chosen,
            found.keys,
            baseline,
            confounded=list(found.confounded) if allow_confounded else [],
            side_by_side=side_by_side,
            dropped=report.dropped,
        )
        report.comparison = comparison
        if not comparison.empty:
            report.comparison = power_columns(comparison, report.family_size, mre)
        report.notes += [
            f"{m}: where it comes from {SIDE_BY_SIDE}, one interleaved measurement per configuration, shown with "
            "its interval and not tested over seeds"
            for m in side_by_side
            if m in chosen
        ]
    report.ranking = rank_operators(report)
    report.side_by_side = side_by_side_lines(sbs_rows, frame, found.keys)
    protocol.attach(report, tuning)
    return report
