"""The pooling-operator library: global pools (B, C, H, W) -> (B, F) and local (downsampling) pools.

Public API::

    register(name, kind=..., formula=..., reference=...)    # class decorator: add your operator
    GlobalPool, LocalPool                                   # base classes of the two contracts
    from_config(node, kind="global"|"local", **geometry)    # build from a config node (name or _target_)
    operator_name(node)                                     # how runs and reports name that operator (alias: label)
    learned_scalars(module)                                 # its learnable scalars, in natural units
    create(name, **params)                                  # global pool module
    create_local(name, kernel_size=2, stride=None, **params) # local pool module
    names(), local_names()                                  # what is registered
    spec(name, kind), specs(kind)                           # formula, reference, params, width
"""

from __future__ import annotations

import importlib
from typing import Any

# CUSTOM and operator_name (alias label) are torch-free (poolbench.pooling.catalog, what composing a config needs); the
# other names are the registry's and load torch and the built-in operators on first use.
_CATALOG_NAMES = frozenset({"CUSTOM", "label", "operator_name"})
_REGISTRY_NAMES = frozenset({
    "GlobalPool", "LocalPool", "PoolSpec", "create", "create_local", "from_config", "learned_scalars",
    "local_names", "names", "register", "spec", "specs",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _CATALOG_NAMES:
        return getattr(importlib.import_module("poolbench.pooling.catalog"), name)
    if name in _REGISTRY_NAMES:
        return getattr(importlib.import_module("poolbench.pooling.registry"), name)
    try:  # a submodule reached as an attribute (``pooling.registry``) before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


__all__ = [
    "CUSTOM",
    "GlobalPool",
    "LocalPool",
    "PoolSpec",
    "create",
    "create_local",
    "from_config",
    "label",
    "learned_scalars",
    "local_names",
    "names",
    "operator_name",
    "register",
    "spec",
    "specs",
]
