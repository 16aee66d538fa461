"""Plan many runs fast: compose and validate a sweep's or a tune's configs, the same ones
:func:`poolbench.config.compose` gives for each override set, at a fraction of its cost.

Hydra's compose (search path, defaults list, merges) is paid once per combination of group choices,
OmegaConf's resolution once per combination, and each run's value overrides are applied with Hydra's
own override code (:func:`apply_value_overrides`, the one private Hydra call, isolated and pinned by a
test). :mod:`poolbench.config` composes and validates one config; this module only reuses its steps.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from poolbench import plugins
from poolbench.config import (
    OPEN_GROUPS,
    compose,
    compose_raw,
    composition_message,
    conf_dir,
    is_group_override,
    parse_error_message,
    reject_foreign,
    run_id,
    struct_lifted,
    validate_config,
    validate_values,
)
from poolbench.errors import ConfigError
from poolbench.grammar import override_key


def compose_many(override_sets: Sequence[Sequence[str]]) -> list[DictConfig]:
    """Compose and validate many configs fast (a sweep's runs); the same configs as :func:`compose` on each."""
    return [copy.deepcopy(cfg) for cfg in iter_composed(override_sets)]


def iter_composed(override_sets: Sequence[Sequence[str]]) -> Iterator[DictConfig]:
    """Each override set's composed and validated config, valid only until the next one is yielded."""
    for cfg, _ in _iter_configs(override_sets, need_config=True):
        assert cfg is not None
        yield cfg


def iter_identified(override_sets: Sequence[Sequence[str]]) -> Iterator[tuple[dict[str, Any], str]]:
    """Each override set's validated config as resolved plain values (what ``OmegaConf.to_container(cfg,
    resolve=True)`` gives; valid only until the next one is yielded) and its :func:`run_id`: a sweep's plan."""
    for _, values in _iter_configs(override_sets, need_config=False):
        yield values, run_id(values)


def _iter_configs(
    override_sets: Sequence[Sequence[str]], *, need_config: bool
) -> Iterator[tuple[DictConfig | None, dict[str, Any]]]:
    """Compose many configs fast: ``(cfg, its resolved values)`` per override set (``cfg`` None when not
    ``need_config`` and the values could be had without it).

    Hydra's compose (search path, defaults list, merges) is paid once per distinct combination of the
    choices of groups other than the operators' (``dataset=digits model=resnet50``; each operator's node
    is put in place, see :func:`_swapped_operators`), and resolving is paid once per combination
    (see :class:`_Base`). Each run's value overrides (``trainer.lr=0.1``) are applied by Hydra's own
    override code, and the result validated exactly as ``compose`` validates; a group's content
    checked once (its schema, the model's architecture, the operator built) is not checked again for
    the next run that has the same content. Plain ``key=value`` overrides of existing values are
    applied in place and undone after the yield (copying a config costs more than composing the rest
    of a run's plan); anything else (``+key``, ``~key``, dict or list values) works on a copy; what
    Hydra would route elsewhere (``hydra.*``, package overrides) takes the full compose.
    """
    parser = OverridesParser.create()
    parsed: dict[str, Override] = {}  # the same override strings recur across a grid: parse each once
    bases: dict[tuple[str, ...], _Base] = {}  # group choices → their composed config
    checked: set[str] = set()  # group contents already validated in this plan (see validate_config)
    for overrides in override_sets:
        reject_foreign(list(overrides))
        groups = tuple(o for o in overrides if is_group_override(o))
        values = [o for o in overrides if not is_group_override(o)]
        for text in overrides:
            if text not in parsed:
                try:
                    parsed[text] = parser.parse_overrides(overrides=[text])[0]
                except OverrideParseException as exc:
                    raise ConfigError(parse_error_message(exc)) from None
        value_overrides = [parsed[text] for text in values]
        routed = ("hydra", "choices")
        elsewhere = any(o.package is not None or o.key_or_group.split(".")[0] in routed for o in value_overrides)
        slow = elsewhere or any(parsed[text].is_sweep_override() for text in overrides)
        if slow or plugins.requested(overrides) or plugins.from_env():  # plugins' hashes join the identity
            cfg = compose(list(overrides))  # its own path, or its error message (a sweep is one config)
            yield cfg, OmegaConf.to_container(cfg, resolve=True)  # type: ignore[misc]
            continue
        if groups not in bases:
            bases[groups] = _Base.of(_reference(groups))  # the reference is cached by config: never edited
            bases[groups].names_target = _defaults_name_target(bases[groups].reference)
        base = bases[groups]
        if base.names_target or _names_target(value_overrides):  # a `_target_`'s source hash joins the identity
            cfg = compose(list(overrides))
            yield cfg, OmegaConf.to_container(cfg, resolve=True)  # type: ignore[misc]
            continue
        try:
            resolved = None if need_config else base.values_with(value_overrides)
            if resolved is not None:
                yield None, validate_values(resolved, checked)
                continue
            undo = _undo_list(base.working, value_overrides)
            cfg = base.working if undo is not None else copy.deepcopy(base.reference)
            try:
                apply_value_overrides(value_overrides, cfg)
                yield cfg, validate_config(cfg, checked=checked)
            finally:
                for parent, leaf, raw in reversed(undo or []):
                    parent[leaf] = raw
        except HydraException as exc:
            raise ConfigError(composition_message(exc)) from None


# An interpolation that reads one absolute key (``${dataset.steps_per_epoch}``): resolvable by lookup.
_KEY_INTERPOLATION = re.compile(r"\$\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\}")


@dataclass
class _Base:
    """One combination of group choices, composed: the config (``reference``, never edited), a working
    copy that runs are edited on in place, and the working copy's resolved values.

    Resolving a whole config is most of the cost of planning a run. A run whose value overrides each
    set one existing plain value differs from its base only at those leaves and at the interpolations
    that read them, so its resolved values are the base's with those leaves replaced (each override's
    stored value found once, by Hydra applying it to the working copy and undoing it) and every
    ``${key}`` interpolation looked up again; nodes on the way are copied, the rest is shared.
    """

    reference: DictConfig
    working: DictConfig
    values: dict[str, Any]
    # (path, ${key} text) of every interpolation leaf; None when one cannot be looked up that way
    interpolations: list[tuple[str, str]] | None
    stored: dict[str, tuple[str, Any] | None] = field(default_factory=dict)  # override text → (path, value)
    names_target: bool = False  # the composed defaults name a `_target_` class (decided once, not per run)

    @classmethod
    def of(cls, reference: DictConfig) -> _Base:
        working = copy.deepcopy(reference)
        try:
            values = OmegaConf.to_container(working, resolve=True)
        except OmegaConfBaseException:
            return cls(reference, working, {}, None)  # reported, with its key, when a run resolves it
        found: list[tuple[str, str]] | None = []

        def walk(node: DictConfig, prefix: str) -> bool:
            for key in node:
                child = node._get_node(key)
                if OmegaConf.is_interpolation(node, str(key)):
                    text = str(child._value())  # type: ignore[union-attr]
                    if isinstance(child, DictConfig | ListConfig) or not _KEY_INTERPOLATION.fullmatch(text):
                        return False
                    found.append((f"{prefix}{key}", text))
                    continue
                nested_ok = walk(child, f"{prefix}{key}.") if isinstance(child, DictConfig) else True
                if not nested_ok or (isinstance(child, ListConfig) and not _plain_list(child)):
                    return False
            return True

        if not walk(working, ""):
            found = None
        return cls(reference, working, values, found)  # type: ignore[arg-type]

    def values_with(self, overrides: Sequence[Override]) -> dict[str, Any] | None:
        """The resolved values of the base with ``overrides`` applied; None when they need the config."""
        if self.interpolations is None:
            return None
        changes: dict[str, Any] = {}
        for override in overrides:
            if override.input_line not in self.stored:
                self.stored[override.input_line] = self._stored_value(override)
            entry = self.stored[override.input_line]
            if entry is None:
                return None
            changes[entry[0]] = entry[1]
        out = dict(self.values)
        for path, value in changes.items():
            _set_path(out, path, value)
        targets = {path for path, _ in self.interpolations}
        for path, text in self.interpolations:
            if path in changes:
                continue  # overridden by a plain value
            key = _KEY_INTERPOLATION.fullmatch(text).group(1)  # type: ignore[union-attr]
            if key in targets and key not in changes:
                return None  # an interpolation of an interpolation: leave it to OmegaConf
            value = _get_path(out, key)
            if value is _ABSENT or isinstance(value, dict | list):
                return None
            _set_path(out, path, value)
        return out

    def _stored_value(self, override: Override) -> tuple[str, Any] | None:
        """(path, value as the config stores it) for an override of one existing plain value; None otherwise."""
        value = override.value()
        if isinstance(value, str) and "${" in value:
            return None  # an interpolation: resolved by OmegaConf, on the config
        undo = _undo_list(self.working, [override])
        if not undo:
            return None
        parent, leaf, raw = undo[0]
        try:
            apply_value_overrides([override], self.working)
            return override.key_or_group, "???" if OmegaConf.is_missing(parent, leaf) else parent[leaf]
        finally:
            parent[leaf] = raw


_ABSENT = object()


def _get_path(values: Mapping[str, Any], path: str) -> Any:
    node: Any = values
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    return node


def _set_path(values: dict[str, Any], path: str, value: Any) -> None:
    """Set a leaf, copying the dicts on its way (they may be shared with the base's values)."""
    *parents, leaf = path.split(".")
    holder = values
    for part in parents:
        holder[part] = dict(holder[part])
        holder = holder[part]
    holder[leaf] = value


def _plain_list(node: ListConfig) -> bool:
    """A list of plain values: no interpolation, no nested container."""
    return not any(
        OmegaConf.is_interpolation(node, i) or isinstance(node._get_node(i), DictConfig | ListConfig)
        for i in range(len(node))
    )


def apply_value_overrides(overrides: Sequence[Override], cfg: DictConfig) -> None:
    """Apply parsed value overrides (``key=v``, ``+key=v``, ``++key=v``, ``~key``) to a composed config,
    with Hydra's own semantics and error messages (an unknown key, adding an existing one, ...).

    The one place poolbench calls a private Hydra API: Hydra has no public function for this step of
    its compose, and re-composing per run costs ~10x more (a 10,000-run plan in minutes). Its
    signature and behaviour are pinned by tests/test_config.py::test_hydra_override_adapter, which
    fails loudly when a Hydra upgrade changes them."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    ConfigLoaderImpl._apply_overrides_to_config(list(overrides), cfg)


def _names_target(overrides: Sequence[Override]) -> bool:
    """Whether a value override names a class by ``_target_``."""
    return any(o.key_or_group.endswith("._target_") for o in overrides)


def _defaults_name_target(reference: DictConfig) -> bool:
    """Whether a composed config's defaults name a class by ``_target_``."""
    return any(reference[g].get("_target_") not in (None, "???") for g in plugins.TARGET_GROUPS if g in reference)


def _undo_list(cfg: DictConfig, overrides: Sequence[Override]) -> list[tuple[Any, str, Any]] | None:
    """How to restore what ``overrides`` will change in place, or None when they need a copy of ``cfg``."""
    undo = []
    for override in overrides:
        if override.is_add() or override.is_delete() or override.is_force_add():
            return None
        if isinstance(override.value(), dict | list):
            return None
        parent_key, _, leaf = override.key_or_group.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, throw_on_missing=False) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf not in parent:
            return None
        node = parent._get_node(leaf)
        if isinstance(node, DictConfig | ListConfig) or node is None:
            return None
        undo.append((parent, leaf, node._value()))
    return undo


@functools.lru_cache(maxsize=256)
def _reference(group_overrides: tuple[str, ...]) -> DictConfig:
    """The composed defaults of these group choices, the base a sweep's value overrides are applied to.

    Cached because a sweep composes many configs that share their group choices; never edited.
    """
    swapped = _swapped_operators(group_overrides)
    return swapped if swapped is not None else compose_raw(list(group_overrides))


def _swapped_operators(group_overrides: tuple[str, ...]) -> DictConfig | None:
    """What composing ``group_overrides`` gives, made from the composition without their operator choices
    by putting the chosen operators' nodes in place (Hydra merges a generated node into an empty package,
    so the node is the result): an operator grid costs one Hydra compose, not one per operator. None
    (compose instead) for anything else: an experiment preset, an option Hydra would look up elsewhere."""
    # The operator groups' options are the registry's generated nodes: no defaults list, and no other config
    # file sets their keys unless an experiment preset does.
    swaps = {}
    for text in group_overrides:
        key, sep, value = text.partition("=")
        if key in OPEN_GROUPS and sep:
            if key in swaps:
                return None  # two choices of one group: Hydra's own message
            swaps[key] = value
    others = tuple(o for o in group_overrides if o.partition("=")[0] not in OPEN_GROUPS)
    if not swaps or any(override_key(o) == "experiment" for o in others):
        return None
    sibling = _reference(others)
    repo = ConfigStore.instance().repo
    entries = {group: repo.get(group, {}).get(f"{name}.yaml") for group, name in swaps.items()}
    if sibling.choices.get("experiment") is not None or any(e is None for e in entries.values()):
        return None
    if any((conf_dir() / group).is_dir() for group in swaps):  # a yaml option would shadow a generated one
        return None
    cfg = copy.deepcopy(sibling)
    with struct_lifted(cfg):
        for group, entry in entries.items():
            cfg[group] = copy.deepcopy(entry.node)
            cfg.choices[group] = swaps[group]
    return cfg
