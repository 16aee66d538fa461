"""The trainer's settings: the one schema of the ``trainer`` config group (``trainer=default``).

Every default, type and range of a ``trainer.*`` key is declared here and nowhere else; the engine
reads the validated values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

from poolbench.schema import Range, check, defaults, option

PositiveInt = Annotated[int, Range(ge=1)]


@dataclass
class LatencySettings:
    """Timing of the trained model in every run (``trainer.latency.*``)."""

    enabled: bool = True
    batch_size: PositiveInt = 32
    warmup: Annotated[int, Range(ge=0)] = 3
    repeats: PositiveInt = 10


@dataclass
class TrainerSettings:
    """Training, evaluation and latency settings (``trainer.*``)."""

    epochs: PositiveInt = 4
    # Optimiser steps per epoch; null = one pass over the training set. `trainer=default` takes the
    # dataset's own epoch (below): one pass for classification sets, a fixed number of P x K batches for
    # retrieval sets whose training crops are drawn at random.
    steps_per_epoch: Annotated[int | None, Range(ge=1)] = None
    # auto = triplet for retrieval datasets, ce (cross-entropy) for classification ones.
    loss: Literal["auto", "ce", "triplet"] = "auto"
    margin: Annotated[float, Range(ge=0)] = 0.1
    # Classification batch size; retrieval batches are writers_per_batch x patches_per_writer (P x K).
    batch_size: PositiveInt = 64
    writers_per_batch: Annotated[int, Range(ge=2)] = 16
    patches_per_writer: Annotated[int, Range(ge=2)] = 4
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: Annotated[float, Range(gt=0)] = 1.0e-3
    weight_decay: Annotated[float, Range(ge=0)] = 1.0e-5
    momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9  # sgd only
    amsgrad: bool = False
    scheduler: Literal["cosine", "exponential", "none"] = "cosine"
    decay_start_epoch: Annotated[int, Range(ge=0)] = 0  # exponential: constant lr before this epoch
    gamma: Annotated[float, Range(gt=0, le=1)] = 0.9  # exponential: per-epoch factor
    grad_clip: Annotated[float | None, Range(gt=0)] = None  # max gradient norm, null = off
    # Pooling parameters (GeM p, LSE r, DGMP lambda, ...) form their own optimiser group with
    # lr x pooling.lr_mult and no weight decay.
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA, off on CPU
    channels_last: Literal["auto", True, False] = "auto"  # auto: on for CUDA
    compile: bool = False  # torch.compile the model (CUDA recommended)
    deterministic: bool = False  # torch.use_deterministic_algorithms + fixed seeds everywhere
    num_threads: Annotated[int | None, Range(ge=1)] = None  # torch CPU threads; null = torch's default
    num_workers: Annotated[int, Range(ge=0)] = 0  # DataLoader workers
    eval_batch_size: PositiveInt = 128
    # Evaluate every this many epochs and record val.<metric> (the validation split, dataset.val_share) or,
    # without one, eval.<metric> (the test split, with a warning) in metrics.jsonl; null = only after
    # training. Never changes the training itself.
    eval_every: Annotated[int | None, Range(ge=1)] = None
    # tensorboard: per-step loss/lr and per-epoch scalars under <run_dir>/tb/ (pip install poolbench[tb]).
    logger: Literal["none", "tensorboard"] = "none"
    resume: bool = False  # continue an unfinished run of the same config from its last checkpoint
    overwrite: bool = False  # train again even when the same config already completed
    latency: LatencySettings = field(default_factory=LatencySettings)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> TrainerSettings:
        """Settings from a (possibly partial) ``trainer`` mapping: missing keys take their defaults,
        every value is checked against this schema."""
        plain = OmegaConf.to_container(values, resolve=True) if isinstance(values, DictConfig) else dict(values)
        merged = {**defaults(cls), **plain}
        merged["latency"] = {**defaults(LatencySettings), **dict(merged.get("latency") or {})}
        check(merged, cls, "trainer")
        return cls(**{**merged, "latency": LatencySettings(**merged["latency"])})


option("trainer", "default", TrainerSettings, steps_per_epoch="${dataset.steps_per_epoch}")
