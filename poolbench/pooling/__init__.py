"""The pooling-operator library: global pools (B, C, H, W) -> (B, F) and local (downsampling) pools.

Public API::

    register(name, kind=..., formula=..., reference=...)    # class decorator: add your operator
    GlobalPool, LocalPool                                   # base classes of the two contracts
    from_config(node, kind="global"|"local", **geometry)    # build from a config node (name or _target_)
    operator_name(node)                                     # how runs and reports name that operator (alias label)
    learned_scalars(module)                                 # its learnable scalars, in natural units
    create(name, **params)                                  # global pool module
    create_local(name, kernel_size=2, stride=None, **params) # local pool module
    names(), local_names()                                  # what is registered
    spec(name, kind), specs(kind)                           # formula, reference, params, width
"""

from poolbench.pooling import basic, gmp, local, structured  # noqa: F401  (registration side effects)
from poolbench.pooling.registry import (
    CUSTOM,
    GlobalPool,
    LocalPool,
    PoolSpec,
    create,
    create_local,
    from_config,
    label,
    learned_scalars,
    local_names,
    names,
    operator_name,
    register,
    spec,
    specs,
)

__all__ = [
    "CUSTOM",
    "GlobalPool",
    "LocalPool",
    "PoolSpec",
    "create",
    "create_local",
    "from_config",
    "label",
    "operator_name",
    "learned_scalars",
    "local_names",
    "names",
    "register",
    "spec",
    "specs",
]
