"""The pooling-operator library: global pools (B, C, H, W) -> (B, F) and local (downsampling) pools.

Public API::

    create(name, **params)                                  # global pool module
    create_local(name, kernel_size=2, stride=None, **params) # local pool module
    names(), local_names()                                  # what is registered
    spec(name, kind)                                        # formula, reference, params, width
"""

from poolbench.pooling import basic, gmp, local, structured  # noqa: F401  (registration side effects)
from poolbench.pooling.registry import (
    GlobalPool,
    LocalPool,
    PoolSpec,
    create,
    create_local,
    learned_scalars,
    local_names,
    names,
    spec,
    specs,
)

__all__ = [
    "GlobalPool",
    "LocalPool",
    "PoolSpec",
    "create",
    "create_local",
    "learned_scalars",
    "local_names",
    "names",
    "spec",
    "specs",
]
