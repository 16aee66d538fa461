"""Typed config schemas: the one place where a config key, its type, its range and its default live.

Each swappable part declares a dataclass and registers it as an option of a config group::

    @dataclass
    class DigitsConfig:
        name: str = "digits"
        image_size: Annotated[int | None, Range(ge=1)] = 32   # null keeps 8x8
        test_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.25

    option("dataset", "digits", DigitsConfig)

:mod:`poolbench.config` stores every registered option in Hydra's ConfigStore (so ``dataset=digits``
composes it, and yaml presets can build on it) and checks a composed config against the schemas with
:func:`check` — types, ``Literal`` choices, :class:`Range` bounds, :class:`Required` values, unknown
and removed keys — each problem one line. Builders then read the validated values and never restate
a default or re-check a type.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from poolbench.errors import ConfigError, unknown_choice

# The option of a group that instantiates any class given as ``_target_`` (Hydra's convention); here, not in
# the torch-bound pooling registry, so torch-free readers of records (the report) can name it.
CUSTOM = "custom"


@dataclass(frozen=True)
class Range:
    """Numeric bounds of a key (``None`` = unbounded); NaN and infinities are always refused."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def describe(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        parts = [f"{op} {bound!r}" for op, bound in bounds if bound is not None]
        return " and ".join(parts)

    def holds(self, value: float) -> bool:
        return (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )


@dataclass(frozen=True)
class Required:
    """A key that must be set (its default ``None`` means "not set yet"); ``hint`` says what to give."""

    hint: str


# While a collect_missing block is open, Required keys left unset are collected here instead of refused.
_MISSING: list[list[tuple[str, str]]] = []


class collect_missing:  # noqa: N801 - used like a function: ``with collect_missing() as missing:``
    """Within the block, a :class:`Required` key left unset is not an error but appended to the list
    the block yields as ``(dotted key, hint)``: for showing a config whose required values are still to
    be given (``poolbench train --cfg dataset=retrieval_folder``). Every other check still applies."""

    def __enter__(self) -> list[tuple[str, str]]:
        _MISSING.append([])
        return _MISSING[-1]

    def __exit__(self, *exc: object) -> None:
        _MISSING.pop()


def collecting_missing() -> bool:
    """Whether a :class:`collect_missing` block is open (a check passing now may not pass outside it)."""
    return bool(_MISSING)


@dataclass(frozen=True)
class Option:
    """One registered option of a config group: its schema and the values that differ from the
    schema's defaults (an alias such as ``model=resnet18`` is the generic schema with other values)."""

    group: str
    name: str
    schema: type
    values: dict[str, Any]
    meta: dict[str, Any]

    def node(self) -> dict[str, Any]:
        """The option's config node: every schema field with its default, then the option's values."""
        return {**_defaults(self.schema), **self.values}


_OPTIONS: dict[str, dict[str, Option]] = {}


def option(group: str, name: str, schema: type, *, meta: Mapping[str, Any] | None = None, **values: Any) -> None:
    """Register ``group=name`` as the node of dataclass ``schema`` with ``values`` replacing defaults.

    ``meta`` holds facts about the option that are not config keys (e.g. a dataset's default
    augmentation recipe). Registering a name again replaces it (modules may be re-imported).
    """
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass")
    unknown = set(values) - {f.name for f in dataclasses.fields(schema)}
    if unknown:
        raise TypeError(f"{group}={name}: {sorted(unknown)} are not fields of {schema.__name__}")
    _OPTIONS.setdefault(group, {})[name] = Option(group, name, schema, dict(values), dict(meta or {}))


def options(group: str) -> dict[str, Option]:
    """The registered options of ``group`` by name (empty for a group without schemas)."""
    return dict(_OPTIONS.get(group, {}))


def groups() -> list[str]:
    return sorted(_OPTIONS)


def _defaults(schema: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise TypeError(f"{schema.__name__}.{f.name} needs a default: a schema is where defaults live")
        out[f.name] = _defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def defaults(schema: type) -> dict[str, Any]:
    """Every field of ``schema`` with its default (nested dataclasses as dicts)."""
    return _defaults(schema)


@functools.cache
def _layout(schema: type) -> tuple[dict[str, Any], tuple[str, ...], dict[str, Any]]:
    """A schema's resolved type hints, field names and defaults, worked out once per dataclass:
    ``get_type_hints`` evaluates every annotation string (``compile`` per field), and a sweep checks
    thousands of configs against the same few schemas. Read-only: callers never edit what it returns."""
    names = tuple(f.name for f in dataclasses.fields(schema))
    return get_type_hints(schema, include_extras=True), names, _defaults(schema)


def required_fields(schema: type) -> list[str]:
    """The fields of ``schema`` marked :class:`Required` (the values a user must give)."""
    hints = _layout(schema)[0]
    return [
        f.name for f in dataclasses.fields(schema) if any(isinstance(m, Required) for m in _unwrap(hints[f.name])[1])
    ]


# ------------------------------------------------------------------------------------------ checking


def check(node: Any, schema: type, prefix: str, *, label: str | None = None) -> None:
    """Check a resolved config node against ``schema``; ConfigError (one line) on the first problem.

    ``prefix`` is the node's dotted path (``"trainer"``; ``""`` for the root), ``label`` names the
    chosen option in messages (``"model=resnet18"``).
    """
    if not isinstance(node, Mapping):
        raise ConfigError(f"{prefix or 'the config'} must be a mapping of keys to values, got {node!r}")
    hints, fields, defaults_ = _layout(schema)
    dot = f"{prefix}." if prefix else ""
    for key in node:
        if key not in fields:
            where = f" for {label}" if label else ""
            raise ConfigError(f"unknown config key '{dot}{key}'{where}. Valid: {', '.join(fields)}")
    for key in fields:
        dotted = f"{dot}{key}"
        if key not in node:
            raise ConfigError(f"config key '{dotted}' is required and cannot be removed")
        check_value(node[key], hints[key], dotted, defaults_[key])
    # Rules between keys (patch_size <= page_size, ...): a schema's own ``check_values(node)``.
    cross = getattr(schema, "check_values", None)
    if callable(cross):
        cross(node)


def check_value(value: Any, annotation: Any, dotted: str, default: Any = None) -> None:
    """Check one value against its annotation (``Annotated`` metadata, ``Literal``, unions, lists,
    nested dataclasses)."""
    base, metadata = _unwrap(annotation)
    required = next((m for m in metadata if isinstance(m, Required)), None)
    if required is not None and isinstance(value, str) and not value.strip():
        raise ConfigError(f"{dotted} must not be empty ({required.hint})")
    if value is None:
        if required is not None:
            if not _MISSING:
                raise ConfigError(f"{dotted} is required: {required.hint}")
            _MISSING[-1].append((dotted, required.hint))
            return
        if _allows_none(base):
            return
        raise ConfigError(f"{dotted} must not be null (like the default {default!r})")
    if dataclasses.is_dataclass(base):
        check(value, base, dotted)
        return
    choices = _literal_choices(base)
    if choices is not None:
        if value not in choices:
            raise ConfigError(unknown_choice(dotted, value, [_show(c) for c in choices]))
        return
    if not _matches(value, base):
        kind = _type_name(base)
        shown = f" (like the default {default!r})" if default is not None else ""
        raise ConfigError(f"{dotted} must be of type {kind}{shown}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{dotted} must be a finite number, got {value!r}")
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    for bound in metadata:
        if isinstance(bound, Range) and numeric and not bound.holds(value):
            nullable = "null or " if _allows_none(base) else ""
            whole = "an integer " if _accepts(base, int) and not _accepts(base, float) else ""
            raise ConfigError(f"{dotted} must be {nullable}{whole}{bound.describe()}, got {value!r}")


def _unwrap(annotation: Any) -> tuple[Any, list[Any]]:
    if get_origin(annotation) is Annotated:
        base, *metadata = get_args(annotation)
        return base, metadata
    return annotation, []


def _members(annotation: Any) -> tuple[Any, ...]:
    if get_origin(annotation) in (Union, types.UnionType):
        return get_args(annotation)
    return (annotation,)


def _allows_none(annotation: Any) -> bool:
    return annotation is Any or any(m is type(None) for m in _members(annotation))


def _literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    choices: list[Any] = []
    for member in _members(annotation):
        if get_origin(member) is Literal:
            choices.extend(get_args(member))
        elif member is not type(None):
            return None
    return tuple(choices) if choices else None


def _accepts(annotation: Any, kind: type) -> bool:
    return any(m is kind for m in _members(annotation))


def _matches(value: Any, annotation: Any) -> bool:
    for member in _members(annotation):
        if member is Any:
            return True
        if member is type(None):
            continue
        if get_origin(member) is Literal:
            if value in get_args(member):
                return True
            continue
        origin = get_origin(member)
        if origin in (list, tuple, Sequence):
            (item,) = get_args(member)[:1] or (Any,)
            if isinstance(value, list | tuple) and all(_matches(v, item) for v in value):
                return True
            continue
        if member is bool:
            if isinstance(value, bool):
                return True
            continue
        if isinstance(value, bool):  # True is an int to Python, never to a config
            continue
        if member is float and isinstance(value, int | float):
            return True
        if isinstance(member, type) and isinstance(value, member):
            return True
    return False


def _type_name(annotation: Any) -> str:
    names = []
    for member in _members(annotation):
        if member is type(None):
            continue
        origin = get_origin(member)
        if origin in (list, tuple, Sequence):
            names.append("list")
        elif get_origin(member) is Literal:
            names.extend(_show(c) for c in get_args(member))
        else:
            names.append(getattr(member, "__name__", str(member)))
    return " or ".join(dict.fromkeys(names))


def _show(choice: Any) -> str:
    return str(choice).lower() if isinstance(choice, bool) else str(choice)
