"""Training, evaluation and latency measurement of a :class:`~poolbench.models.PoolNet`."""

from poolbench.engine.checkpoint import CheckpointError
from poolbench.engine.evaluate import evaluate
from poolbench.engine.latency import TimingStats, device_name, measure_cost, measure_latency, peak_memory_mb, time_fn
from poolbench.engine.train import NonFiniteLossError, TrainerSettings, fit, seed_everything

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
