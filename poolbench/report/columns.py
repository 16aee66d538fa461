"""Record columns: their names, display labels, value tests, and the labels of operators and contexts.

Shared by every module of the report (loading, design, comparison, tables, figures, HTML)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from poolbench.errors import PoolbenchError, unknown_choice

POOLING_KEY = "choice.pooling"
SEED_KEY = "seed"
NOT_METRICS = ("cfg.", "choice.", "env.", "data.")


def column_label(column: str) -> str:
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


def is_number(value: Any) -> bool:
    """A JSON number that fits a float64 column (bools and 400-digit integers do not)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, float) or abs(value) < 2**63


def find_column(frame: pd.DataFrame, key: str, what: str) -> str:
    for candidate in (key, f"choice.{key}", f"cfg.{key}"):
        if candidate in frame.columns:
            return candidate
    options = [column_label(c) for c in frame.columns if not c.startswith(("env.", "data.", "train.", "latency."))]
    raise PoolbenchError(unknown_choice(what, key, sorted(set(options))))


def is_treatment(column: str) -> bool:
    return column == POOLING_KEY or column.startswith("cfg.pooling.")


def column_key(value: Any) -> Any:
    return "<unset>" if not present(value) else value


def is_numeric_column(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


def group_frames(frame: pd.DataFrame, keys: list[str]) -> Any:
    if not keys:
        return frame.groupby(np.zeros(len(frame), dtype=int))
    try:
        return frame.groupby(keys, dropna=False, sort=True)
    except TypeError:  # mixed types in a key column cannot be sorted
        return frame.groupby(keys, dropna=False, sort=False)


def treatment_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    """``gem`` or, when pooling parameters were swept too, ``gem (p=3)``."""
    params = [
        f"{column_label(k)[len('pooling.') :]}={row[k]}"
        for k in keys
        if k.startswith("cfg.pooling.") and present(row[k])
    ]
    name = str(row.get(POOLING_KEY, row.get("pooling", "?")))
    return f"{name} ({', '.join(params)})" if params else name


def _label_rows(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """The rows of ``frame`` as dicts of only ``columns`` (those present): what the labels read, without
    building a Series per row (``iterrows`` costs milliseconds a row on a wide frame)."""
    available = [c for c in dict.fromkeys(columns) if c in frame.columns]
    if not available:
        return [{} for _ in range(len(frame))]
    return frame[available].to_dict("records")


def treatment_labels(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """:func:`treatment_label` of every row of ``frame``, in order."""
    columns = [POOLING_KEY, "pooling", *(k for k in keys if k.startswith("cfg.pooling."))]
    return [treatment_label(row, keys) for row in _label_rows(frame, columns)]


def context_labels(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """:func:`context_label` of every row of ``frame``, in order."""
    return [context_label(row, keys) for row in _label_rows(frame, [k for k in keys if not is_treatment(k)])]


def present(value: Any) -> bool:
    return not (isinstance(value, float) and math.isnan(value)) and value is not None


def context_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    """``digits / resnet18``: choices by their value, other keys as ``key=value`` (``trainer.lr=0.01``)."""
    parts = [
        str(row[k]) if k.startswith("choice.") else f"{column_label(k)}={row[k]}"
        for k in keys
        if not is_treatment(k) and present(row[k])
    ]
    return " / ".join(parts)
