"""Training, evaluation and latency measurement of a :class:`~poolbench.models.PoolNet`.

The names below are loaded on first use (PEP 562): importing ``poolbench.engine.settings`` (the trainer's
config schema, needed to compose any config) must not pull in the training and evaluation code.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from poolbench.engine.checkpoint import CheckpointError
    from poolbench.engine.evaluate import evaluate
    from poolbench.engine.flops import measure_cost
    from poolbench.engine.latency import (
        TimingStats,
        device_name,
        measure_latency,
        time_fn,
    )
    from poolbench.engine.memory import peak_memory_mb
    from poolbench.engine.train import NonFiniteLossError, TrainerSettings, fit, seed_everything

# name -> the submodule that defines it
_HOMES = {
    "CheckpointError": "checkpoint",
    "evaluate": "evaluate",
    "TimingStats": "latency",
    "device_name": "latency",
    "measure_cost": "flops",
    "measure_latency": "latency",
    "peak_memory_mb": "memory",
    "time_fn": "latency",
    "NonFiniteLossError": "train",
    "TrainerSettings": "train",
    "fit": "train",
    "seed_everything": "train",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'poolbench.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"poolbench.engine.{home}"), name)


class _Engine(types.ModuleType):
    """Importing a submodule binds its name on the package: ``poolbench.engine.evaluate`` would become
    the module ``evaluate.py`` instead of the function it defines. Keep the function there."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _HOMES.get(name) == name and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Engine


__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "TimingStats",
    "TrainerSettings",
    "device_name",
    "evaluate",
    "fit",
    "measure_cost",
    "measure_latency",
    "peak_memory_mb",
    "seed_everything",
    "time_fn",
]
