"""Decisions that several parts of poolbench must take the same way, each made in exactly one function.

Training, evaluation, latency measurement and ``poolbench bench`` all call these, so a run and a
benchmark of the same configuration use the same device, precision, loss and optimiser groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poolbench.engine.losses import batch_hard_triplet_loss, cross_entropy_loss
from poolbench.errors import ConfigError, message_line
from poolbench.grammar import check_device

LossFn = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
LOSSES: dict[str, LossFn] = {"triplet": batch_hard_triplet_loss, "ce": cross_entropy_loss}
# The loss each task trains with when trainer.loss=auto (and the only one that fits it).
TASK_LOSS = {"retrieval": "triplet", "classification": "ce"}


def resolve_device(requested: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a device outside the grammar, or a CUDA device that is
    not there, is a ConfigError."""
    if check_device(requested) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:  # an index past what torch parses
        raise ConfigError(f"device={requested}: {message_line(exc)}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={requested} but CUDA is not available here; use device=cpu or device=auto")
    return device


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``trainer.amp``: auto → bf16 on CUDA, none elsewhere."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast to ``dtype`` on ``device``, or a disabled autocast for full precision."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def use_channels_last(setting: str | bool, device: torch.device) -> bool:
    """``trainer.channels_last``: auto → on for CUDA (where convolutions are faster in NHWC), off elsewhere."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def loss_name(requested: str, task: str) -> str:
    """``trainer.loss`` resolved for a task: auto → the task's loss; a loss that does not fit is an error."""
    wanted = TASK_LOSS[task]
    name = wanted if requested == "auto" else requested
    if name != wanted:
        raise ConfigError(f"trainer.loss={name} does not fit a {task} dataset; use trainer.loss=auto or {wanted}")
    return name


def loss_function(requested: str, task: str) -> LossFn:
    return LOSSES[loss_name(requested, task)]


def optimizer_groups(
    model: Any, *, lr: float, weight_decay: float, pool_lr_mult: float, local_pool_lr_mult: float
) -> list[dict[str, Any]]:
    """Parameter groups of a :class:`~poolbench.models.PoolNet`: backbone and head with weight decay;
    the global pool's and the local pools' own parameters each in a group of their own with
    ``lr × lr_mult`` and no weight decay (decay would pull GeM's p or DGMP's λ towards 0, which is no
    neutral value for them; cirtorch #61)."""
    groups: list[dict[str, Any]] = [{"params": model.backbone_parameters(), "weight_decay": weight_decay}]
    pools = ((model.global_pool_parameters(), pool_lr_mult), (model.local_pool_parameters(), local_pool_lr_mult))
    for params, mult in pools:
        if params:
            groups.append({"params": params, "lr": lr * mult, "weight_decay": 0.0})
    return groups


def lr_mults(pooling: Mapping[str, Any], local_pooling: Mapping[str, Any]) -> dict[str, float]:
    """The learning-rate multipliers of the global and local operators' own parameters, as
    :func:`build_optimizer` and ``fit`` take them (1 where a node has no ``lr_mult``, as the registry's)."""
    return {
        "pool_lr_mult": float(pooling.get("lr_mult", 1.0)),
        "local_pool_lr_mult": float(local_pooling.get("lr_mult", 1.0)),
    }


def build_optimizer(
    model: nn.Module,
    *,
    optimizer: str,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
    amsgrad: bool = False,
    pool_lr_mult: float = 1.0,
    local_pool_lr_mult: float = 1.0,
) -> torch.optim.Optimizer:
    """The trainer's optimiser (adam | adamw | sgd) over :func:`optimizer_groups`."""
    groups = optimizer_groups(
        model, lr=lr, weight_decay=weight_decay, pool_lr_mult=pool_lr_mult, local_pool_lr_mult=local_pool_lr_mult
    )
    if optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    adam = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=lr, weight_decay=weight_decay, amsgrad=amsgrad)


def should_resume(requested: bool, checkpoint: Path, *, overwrite: bool = False) -> bool:
    """Resume only when asked to and a checkpoint exists; otherwise the run starts from scratch.
    ``trainer.overwrite`` always starts from scratch (it is also the way out of an unusable checkpoint)."""
    return bool(requested) and not overwrite and checkpoint.is_file()
