"""What a run record keeps about its parts, so that reading results never needs their code.

A report must group, label and rerun runs whose operators or backbones came from plugins or
``_target_`` classes without importing them (a results folder may come from someone else, and a
plugin may be gone). So every record carries, computed while the run's code is loaded:

- ``part.<group>.label``, ``part.<group>.formula`` (registered operators), ``part.<group>.source``
  (the plugin file, package or module that defines it) for ``model``, ``pooling`` and ``local_pooling``;
- ``part.<group>.defaults``: JSON text of the chosen option's node, every key at its default (what
  ``<group>=<option>`` composes to), which the report compares recorded values with;
- ``rerun``: JSON text of the overrides that compose this run again (``seed`` left out): the group
  choices, ``plugins=[...]`` with the specs as recorded, and every identity key that differs from
  what those choices compose to. ``poolbench sweep <rerun> seed=<s>`` gives the same run id.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

from omegaconf import DictConfig

from poolbench import plugins
from poolbench.errors import ConfigError

PART_GROUPS = ("model", "pooling", "local_pooling")
RERUN = "rerun"
# Keys a rerun must not set: derived while composing (hashes), or the seed (the command lists seeds).
_DERIVED = (plugins.HASH_KEY, plugins.CONFIG_KEY)
_PLAIN = re.compile(r"[A-Za-z_/.][\w./@:+-]*")
_RESERVED = {"true", "false", "null", "nan", "inf", "-inf"}


def _option_node(cfg: DictConfig, group: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(the chosen option's node at its defaults, facts for the record) of one part of ``cfg``."""
    from poolbench import pooling, schema
    from poolbench.models import backbone_name, custom

    node = cfg[group]
    facts: dict[str, str] = {}
    if group == "model":
        option = schema.options("model").get(str(node.get("name")))
        defaults = dict(option.node()) if option is not None else {}
        facts["label"] = backbone_name(node)
        factory = option.meta.get("factory") if option is not None else None
        if option is not None and option.meta.get("library") == custom.LIBRARY and factory is None:
            factory, _ = custom.factory_of(node, option.meta)
            defaults["_target_"] = node.get("_target_")
            defaults.update({p: d for p, _, d in custom._parameters(factory)})
        if factory is not None:
            facts["source"] = plugins.display_name(factory.__module__, whole=True)
    else:
        kind = "global" if group == "pooling" else "local"
        facts["label"] = pooling.operator_name(node)
        if node.get("name") == "none":
            return {"name": "none"}, facts
        if node.get("name", pooling.CUSTOM) == pooling.CUSTOM:
            cls = pooling.registry.target_class(node.get("_target_"), group)
            params, _ = pooling.registry._signature(cls, kind)
            geometry = {"kernel_size": None, "stride": None} if kind == "local" else {}
            defaults = {"name": pooling.CUSTOM, "_target_": node.get("_target_"), **geometry, "lr_mult": 1, **params}
            facts["source"] = plugins.display_name(cls.__module__, whole=True)
        else:
            spec = pooling.spec(str(node["name"]), kind)
            defaults = spec.config_node()
            facts["formula"] = spec.formula
            if not spec.cls.__module__.startswith("poolbench."):
                facts["source"] = plugins.display_name(spec.cls.__module__)
    if node.get(plugins.SOURCE_KEY) is not None:  # the class as run: its fingerprint is part of the option
        defaults[plugins.SOURCE_KEY] = node[plugins.SOURCE_KEY]
    return defaults, facts


def record_fields(cfg: DictConfig) -> dict[str, Any]:
    """The ``part.*`` and ``rerun`` fields of a run record (see the module docstring)."""
    fields: dict[str, Any] = {}
    # Bookkeeping must never fail a run: a part that cannot be described leaves its fields out, and
    # the report falls back to composing that option with the poolbench at hand.
    for group in PART_GROUPS:
        try:
            defaults, facts = _option_node(cfg, group)
        except (ConfigError, KeyError, TypeError, ValueError, AttributeError):
            continue
        fields.update({f"part.{group}.{k}": v for k, v in facts.items()})
        fields[f"part.{group}.defaults"] = json.dumps(defaults, sort_keys=True, default=str)
    with contextlib.suppress(ConfigError, KeyError, TypeError, ValueError, AttributeError):
        fields[RERUN] = json.dumps(rerun_overrides(cfg))
    return fields


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def rerun_overrides(cfg: DictConfig) -> list[str]:
    """The overrides that compose ``cfg`` again (with its seed given separately)."""
    from poolbench.config import GROUPS, NON_IDENTITY_KEYS, compose, flatten
    from poolbench.planner import _reference

    choices = [f"{g}={cfg.choices[g]}" for g in GROUPS if g != "experiment" and isinstance(cfg.choices.get(g), str)]
    specs = [str(s) for s in cfg.get(plugins.CONFIG_KEY) or []]
    given = [f"{plugins.CONFIG_KEY}={format_value(specs)}"] if specs else []
    # Group choices alone compose once per process (cached); with plugins, their specs join them.
    base = flatten(compose([*choices, *given], validate=False) if given else _reference(tuple(choices)))
    ran = flatten(cfg)
    overrides = [*choices, *given]

    def wanted(key: str) -> bool:
        skip = (*NON_IDENTITY_KEYS, "choices.", *_DERIVED)
        return key != "seed" and not key.startswith(skip) and not key.endswith(f".{plugins.SOURCE_KEY}")

    for key, value in ran.items():
        if not wanted(key):
            continue
        if key not in base:
            overrides.append(f"+{key}={format_value(value)}")
        elif base[key] != value:
            overrides.append(f"{key}={format_value(value)}")
    # deleted by the run's overrides (~key): rare, but then it must be deleted again
    overrides += [f"~{key}" for key in base if wanted(key) and key not in ran]
    return overrides
