"""What a config needs to know about the pooling operators, without importing torch.

The built-in operators' descriptions (name, kind, formula, reference, parameters with their defaults
and annotated types, width, learning-rate multiplier) are generated from their registrations into
:mod:`poolbench.pooling.catalog_data` (``python -m poolbench.pooling.catalog`` rewrites it;
tests/test_registry.py fails, naming that command, when it is stale). Composing a config, planning a
sweep and listing the options read that file; the registry (torch) is consulted instead as soon as it
is loaded, which a plugin, a ``_target_`` operator or a value only the constructor can judge does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from poolbench.schema import CUSTOM  # the option that instantiates a `_target_` class

Kind = Literal["global", "local"]
# Constructor arguments every local operator takes; they are not listed as operator parameters.
LOCAL_GEOMETRY = ("kernel_size", "stride", "padding")
LOCAL_DEFAULTS = {"kernel_size": 2, "stride": None, "padding": 0}  # LocalPool's: stride None = kernel_size
# Keys of a pooling/local_pooling config node that are not constructor parameters of the operator
# (local pools take the geometry too, but from models.py's choice, not as an operator parameter).
NODE_KEYS = ("name", "lr_mult", "_target_", "_source_sha256", *LOCAL_GEOMETRY)  # plugins.SOURCE_KEY
GROUP_OF: dict[Kind, str] = {"global": "pooling", "local": "local_pooling"}
REGISTRY_MODULE = "poolbench.pooling.registry"
REGENERATE = "python -m poolbench.pooling.catalog"


@dataclass(frozen=True)
class OperatorInfo:
    """What is known about one operator without its class (shown by ``poolbench list``)."""

    name: str
    kind: Kind
    formula: str
    reference: str
    learnable: bool
    width: str = "C"
    params: dict[str, Any] = field(default_factory=dict)
    lr_mult: float = 1
    # Each parameter's annotated type (``typing.Any`` when the constructor does not say).
    types: dict[str, Any] = field(default_factory=dict)

    def config_node(self) -> dict[str, Any]:
        """The operator's config group node (``pooling=<name>`` / ``local_pooling=<name>``): its name, the
        learning-rate multiplier of its own parameters and its constructor's parameters with their
        defaults. Local pools also take ``kernel_size``/``stride`` (null: inherit the replaced max-pool's)."""
        geometry = {"kernel_size": None, "stride": None} if self.kind == "local" else {}
        return {"name": self.name, **geometry, "lr_mult": self.lr_mult, **self.params}


def is_target(node: Mapping[str, Any]) -> bool:
    """Whether a node names its operator by ``_target_`` (``name`` is ``custom`` or absent)."""
    return node.get("name", CUSTOM) == CUSTOM


def operator_name(node: Mapping[str, Any]) -> str:
    """How runs, records and reports name the operator of a node: its registered name, or for a
    ``_target_`` node the class name (``mypkg.pools.SoftmaxPool`` → ``SoftmaxPool``)."""
    if is_target(node):
        return str(node.get("_target_") or CUSTOM).rsplit(".", 1)[-1]
    return str(node["name"])


label = operator_name  # its older, documented name (plugins may call it)


# ------------------------------------------------------------------------------ the shipped description

# Names the type texts of catalog_data are evaluated with (besides the builtins).
_TYPE_NAMES: dict[str, Any] = {"Any": Any, "Literal": Literal, "Sequence": Sequence, "NoneType": type(None)}


def _type_text(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else repr(annotation)
    text = text.replace("collections.abc.", "").replace("typing.", "")
    if eval(text, dict(_TYPE_NAMES)) != annotation:  # noqa: S307 - our own generated text, checked here
        raise ValueError(f"cannot describe the type {annotation!r} torch-free; extend catalog._TYPE_NAMES")
    return text


def _builtin() -> dict[Kind, dict[str, OperatorInfo]]:
    from poolbench.pooling.catalog_data import BUILTIN

    out: dict[Kind, dict[str, OperatorInfo]] = {"global": {}, "local": {}}
    for entry in BUILTIN:
        types = {k: eval(v, dict(_TYPE_NAMES)) for k, v in entry["types"].items()}  # noqa: S307 - shipped file
        info = OperatorInfo(**{**entry, "types": types})
        out[info.kind][info.name] = info
    return out


_BUILTIN: dict[Kind, dict[str, OperatorInfo]] | None = None


def builtin(kind: Kind) -> dict[str, OperatorInfo]:
    """The shipped descriptions of the built-in operators of ``kind``, by name."""
    global _BUILTIN
    if _BUILTIN is None:
        _BUILTIN = _builtin()
    return _BUILTIN[kind]


def live() -> bool:
    """Whether the registry is loaded: then it, not the shipped file, says which operators exist (a
    plugin's, or one a test unregistered)."""
    return REGISTRY_MODULE in sys.modules


def infos(kind: Kind) -> list[OperatorInfo]:
    """Every operator of ``kind`` a config may choose: the registry's when loaded, else the built-ins'.
    The process's plugins (entry points, POOLBENCH_PLUGINS) are imported first, as the registry does."""
    from poolbench import plugins

    plugins.load_process_plugins()
    if live():
        from poolbench.pooling import registry

        return list(registry.specs(kind))
    return list(builtin(kind).values())


def valid_as_declared(node: Mapping[str, Any], kind: Kind) -> bool:
    """Whether a resolved pooling node is a built-in operator exactly as declared (its parameters at
    their defaults, no geometry, no class path), which constructs by construction (tests/test_registry.py
    builds each one): such a node needs no torch to be validated. Anything else is built as before."""
    if live() or is_target(node) or "_target_" in node:
        return False
    info = builtin(kind).get(str(node.get("name")))
    if info is None:
        return False
    params = {k: v for k, v in node.items() if k not in NODE_KEYS}
    if any(node.get(k) is not None for k in LOCAL_GEOMETRY) or set(params) != set(info.params):
        return False
    # As JSON: a tuple default reads back as a list, while 3 and 3.0 or 1 and true stay different.
    return all(json.dumps(v) == json.dumps(info.params[k]) for k, v in params.items())


# ------------------------------------------------------------------------------ generating catalog_data


def render() -> str:
    """catalog_data.py's text, from the built-in operators' registrations (imports torch)."""
    import pprint

    from poolbench.pooling import registry

    entries = []
    for kind in ("global", "local"):
        for spec in registry.specs(kind):  # type: ignore[arg-type]
            if not spec.cls.__module__.startswith("poolbench.pooling."):
                continue  # a plugin's operator is not shipped
            entry = {k: v for k, v in asdict(spec).items() if k != "cls"}
            entry["types"] = {k: _type_text(t) for k, t in spec.types.items()}
            entries.append(entry)
    body = pprint.pformat(entries, width=116, sort_dicts=False)
    return (
        '"""The built-in pooling operators as their registrations declare them.\n\n'
        f'Generated by `{REGENERATE}`; do not edit (tests/test_registry.py fails when it is stale)."""\n\n'
        f"BUILTIN = {body}\n"
    )


def path() -> Path:
    return Path(__file__).with_name("catalog_data.py")


if __name__ == "__main__":
    path().write_text(render(), encoding="utf-8")
    print(f"wrote {path()}")
