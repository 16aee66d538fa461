"""The design of a set of runs: which varying keys group them, one run per seed, and the rank contexts.

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
from typing import Any

import pandas as pd

from poolbench.config import GROUPS, NON_IDENTITY_KEYS
from poolbench.report.columns import (
    POOLING_KEY,
    SEED_KEY,
    column_key,
    column_label,
    context_label,
    find_column,
    is_number,
    is_treatment,
    present,
    treatment_label,
    treatment_labels,
)
from poolbench.schema import CUSTOM

# Choice columns considered first, in table order; pooling last so operators sit side by side.
CHOICE_ORDER = ("choice.dataset", "choice.model", "choice.trainer", "choice.local_pooling", POOLING_KEY)


@dataclass
class Design:
    """How the varying config keys of a set of runs are used (the result of :func:`design`)."""

    keys: list[str]  # grouping columns: context first, treatment (pooling and its parameters) last
    hidden: list[str] = field(default_factory=list)  # varying, but part of the chosen option's definition
    confounded: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # column -> treatment -> values

    @property
    def context(self) -> list[str]:
        return [k for k in self.keys if not is_treatment(k)]

    @property
    def treatment(self) -> list[str]:
        return [k for k in self.keys if is_treatment(k)]


def _is_identity_column(column: str) -> bool:
    if column == "choice.experiment":  # a preset's name; what it sets shows up in the cfg.* keys
        return False
    if column.startswith("cfg."):
        key = column[4:]
        return key != "seed" and not key.startswith(NON_IDENTITY_KEYS)
    return column.startswith("choice.")


@functools.lru_cache(maxsize=64)
def option_values(group: str, option: str, target: Any = None) -> dict[str, Any] | None:
    """The flattened config that choosing ``group=option`` gives (for a ``_target_`` operator, shown under
    its class name: ``group=custom group._target_=<target>``), or None when it cannot be composed
    (an option from a plugin or a renamed file: its definition is unknown)."""
    from poolbench.config import compose, flatten

    overrides = [f"{group}={CUSTOM}", f"{group}._target_={target}"] if present(target) else [f"{group}={option}"]
    try:
        return flatten(compose(overrides, validate=False))
    except Exception:  # noqa: BLE001  (any failure means "definition unknown", which is handled)
        return None


def _defined_values(part: pd.DataFrame, group: str, option: Any, target: Any = None) -> dict[str, Any] | None:
    """What ``group=option`` defines, from the records themselves when they keep it (``part.<group>.defaults``,
    written while the run's code was loaded: plugins and ``_target_`` classes need not be importable
    now), else composed with this poolbench (:func:`option_values`)."""
    column = f"part.{group}.defaults"
    recorded = part[column].dropna().unique() if column in part else []
    if len(recorded) == 1 and isinstance(recorded[0], str):
        try:
            node = json.loads(recorded[0])
        except ValueError:
            node = None
        if isinstance(node, dict):
            return {f"{group}.{key}": value for key, value in node.items()}
    return option_values(group, str(option), target) if isinstance(option, str) else None


def _same_value(defined: Any, recorded: Any) -> bool:
    if not present(recorded):
        return defined is None
    if isinstance(defined, list):
        defined = json.dumps(defined)
    if is_number(defined) and is_number(recorded):
        return math.isclose(defined, recorded, rel_tol=1e-9, abs_tol=1e-12)
    return defined == recorded


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
            values = option_values(owner, str(option)) if isinstance(option, str) else None
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
    context = [c for c in keys if not is_treatment(c)]
    treatment = [c for c in keys if is_treatment(c)] or ([POOLING_KEY] if POOLING_KEY in frame.columns else [])
    confounded: dict[str, dict[str, list[str]]] = {}
    if treatment:
        labels = treatment_labels(frame, keys)
        base_labels = {lab for lab, op in zip(labels, frame[POOLING_KEY], strict=True) if op == baseline}
        for column in context:
            values: dict[str, set[Any]] = {}
            for lab, value in zip(labels, frame[column], strict=True):
                values.setdefault(lab, set()).add(column_key(value))
            if base_labels:
                pairs = [(a, b) for a in base_labels for b in values if b not in base_labels]
            else:
                pairs = list(itertools.combinations(values, 2))
            if any(not values[a] & values[b] for a, b in pairs):
                confounded[column] = {lab: sorted(map(str, v)) for lab, v in sorted(values.items())}
    return Design(keys=context + [c for c in keys if is_treatment(c)], hidden=hidden, confounded=confounded)


def one_run_per_seed(frame: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """One run per (configuration, seed): the one place where duplicates are decided.

    Two completed records with the same grouping keys and seed (a copied folder whose run id was
    edited, a run repeated under another results folder) are the same measurement twice. The first
    by folder name is used, on the baseline and the treatment side alike; each other one is named.
    """
    columns = [*keys, SEED_KEY]
    if frame.empty or SEED_KEY not in frame.columns:
        return frame, []
    keyed = frame[columns].map(column_key).astype(str)
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
        lines.append(f"CONFOUNDED: {column_label(column)} differs with the operator ({spread}); {consequence}")
    return lines


DEFAULT_CONTEXTS = ("choice.dataset", "choice.model")


def context_columns(frame: pd.DataFrame, requested: Sequence[str] = ()) -> list[str]:
    """The columns whose values are independent data sets for the rank tests: ``--contexts`` keys, or
    the (dataset, backbone) pair by default. An unknown key names the recorded ones."""
    if requested:
        return list(
            dict.fromkeys(find_column(frame, key.strip(), "--contexts key") for key in requested if key.strip())
        )
    return [c for c in DEFAULT_CONTEXTS if c in frame.columns]
