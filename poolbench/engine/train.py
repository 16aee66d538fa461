"""The training loop: seeded, resumable, checkpointed every epoch, lean on the hot path.

Reproducibility: weights are initialised from the seed the caller set (:func:`seed_everything`
before ``build_model``); every epoch re-seeds python/numpy/torch and the batch sampler from
``(seed, epoch)``, so a run resumed from the checkpoint of epoch e draws exactly the batches and
random numbers an uninterrupted run draws in epoch e + 1.
"""

from __future__ import annotations

import functools
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from poolbench.data.base import DataBundle
from poolbench.engine.checkpoint import CHECKPOINT, TrainState, preserved_rng
from poolbench.engine.evaluate import evaluate
from poolbench.engine.policies import (
    LossFn,
    amp_dtype,
    autocast,
    build_optimizer,
    loss_function,
    loss_name,
    use_channels_last,
)
from poolbench.engine.samplers import PKBatchSampler, RandomBatchSampler
from poolbench.engine.settings import TrainerSettings
from poolbench.engine.tracking import EpochLog, learned_fields, require_logger
from poolbench.errors import PoolbenchError

# On CUDA the loss is read back every this many steps (a host sync each time); on CPU every step,
# where reading a scalar costs nothing.
CUDA_FINITE_CHECK_EVERY = 25

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class NonFiniteLossError(PoolbenchError):
    """The training loss became NaN or Inf; ``epoch`` and ``step`` count from 1."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"training loss became {value} at epoch {epoch}, step {step}; "
            "try a lower trainer.lr, trainer.grad_clip or trainer.amp=none"
        )
        self.epoch, self.step, self.value = epoch, step, value


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader derives it from its generator and the worker id
    random.seed(seed)
    np.random.seed(seed)


@contextmanager
def deterministic_mode(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels while training (warn-only: an op without one warns instead of failing
    the run); otherwise cuDNN autotuning on CUDA. Global flags are restored afterwards."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    try:
        if enabled:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[2], saved[3]


def _lr_factor(s: TrainerSettings, steps_per_epoch: int) -> Callable[[int], float]:
    """lr multiplier as a function of the optimiser step (the scheduler is stepped every step).

    cosine: 0.5·(1 + cos(π·step/total_steps)), smooth over all steps. exponential: per epoch,
    gamma^max(0, epoch − decay_start_epoch) (epochs from 0: constant up to decay_start_epoch).
    """
    total = s.epochs * steps_per_epoch
    if s.scheduler == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if s.scheduler == "exponential":
        return lambda step: s.gamma ** max(0, step // steps_per_epoch - s.decay_start_epoch)
    return lambda step: 1.0


def _check_finite(losses: torch.Tensor, start: int, stop: int, epoch: int) -> None:
    bad = ~torch.isfinite(losses[start:stop])
    if bool(bad.any()):
        index = start + int(bad.nonzero()[0])
        raise NonFiniteLossError(epoch + 1, index + 1, float(losses[index]))


def _steps_per_epoch(s: TrainerSettings, data: DataBundle, loss: str) -> int:
    if s.steps_per_epoch is not None:
        return s.steps_per_epoch
    batch = s.writers_per_batch * s.patches_per_writer if loss == "triplet" else s.batch_size
    return max(1, len(data.train) // batch)  # type: ignore[arg-type]


def _summary(history: list[dict[str, Any]], resumed_from: int) -> dict[str, Any]:
    seconds = sum(row["seconds"] for row in history)
    steps = sum(row["steps"] for row in history)
    return {
        "epochs_done": len(history),
        "train_loss": history[-1]["loss"] if history else math.nan,
        "train_steps": steps,
        "train_seconds": round(seconds, 3),
        "steps_per_s": round(steps / seconds, 3) if seconds > 0 else math.nan,
        "resumed_from_epoch": resumed_from,
    }


def _start(
    model: nn.Module,
    s: TrainerSettings,
    steps: int,
    *,
    device: torch.device,
    dtype: torch.dtype | None,
    pool_lr_mult: float,
    local_pool_lr_mult: float,
) -> TrainState:
    """Fresh optimiser, per-step lr schedule and grad scaler (fp16 only) for ``model``."""
    optimizer = build_optimizer(
        model,
        optimizer=s.optimizer,
        lr=s.lr,
        weight_decay=s.weight_decay,
        momentum=s.momentum,
        amsgrad=s.amsgrad,
        pool_lr_mult=pool_lr_mult,
        local_pool_lr_mult=local_pool_lr_mult,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(s, steps))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return TrainState(model, optimizer, scheduler, scaler)


class _Loader:
    """The training batches: a fixed number per epoch, drawn from generators re-seeded every epoch."""

    def __init__(self, s: TrainerSettings, data: DataBundle, loss: str, steps: int, device: torch.device) -> None:
        self.batch_generator, self.worker_generator = torch.Generator(), torch.Generator()
        sampler: PKBatchSampler | RandomBatchSampler
        if loss == "triplet":
            sampler = PKBatchSampler(
                data.train_labels, s.writers_per_batch, s.patches_per_writer, steps, self.batch_generator
            )
        else:
            sampler = RandomBatchSampler(len(data.train), s.batch_size, steps, self.batch_generator)  # type: ignore[arg-type]
        self.loader = DataLoader(
            data.train,
            batch_sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_seed_worker if s.num_workers > 0 else None,
            generator=self.worker_generator,
        )

    def epoch(self, seed: int) -> DataLoader:
        """The loader for the epoch with this seed (python, numpy and torch are seeded with it too)."""
        seed_everything(seed)
        self.batch_generator.manual_seed(seed)
        self.worker_generator.manual_seed(seed)
        return self.loader


def _train_epoch(
    state: TrainState,
    step_model: Callable[[torch.Tensor], torch.Tensor],
    batches: DataLoader,
    s: TrainerSettings,
    *,
    epoch: int,
    steps: int,
    loss_fn: LossFn,
    device: torch.device,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    on_step: Callable[[int], None] | None,
) -> tuple[torch.Tensor, list[float]]:
    """One epoch of optimiser steps; returns the per-step losses (on the device) and learning rates."""
    model, optimizer, scheduler, scaler = state.model, state.optimizer, state.scheduler, state.scaler
    check_every = 1 if device.type == "cpu" else CUDA_FINITE_CHECK_EVERY
    model.train()
    losses = torch.zeros(steps, device=device)
    lrs: list[float] = []
    checked = n = 0
    for n, (x, y) in enumerate(batches, start=1):  # noqa: B007  (n is the step count after the loop)
        x = x.to(device, non_blocking=True, memory_format=memory_format)
        y = y.to(device, non_blocking=True)
        lrs.append(optimizer.param_groups[0]["lr"])
        with autocast(device, dtype):
            out = step_model(x)
        step_loss = loss_fn(out.float(), y, s.margin)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(step_loss).backward()
        if s.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses[n - 1] = step_loss.detach()
        if n - checked >= check_every:
            _check_finite(losses, checked, n, epoch)
            checked = n
        if on_step:
            on_step(n)
    _check_finite(losses, checked, n, epoch)
    return losses[:n], lrs


# What trainer.eval_every says, once per run, when the dataset has no validation split.
TEST_CURVES_WARNING = (
    "warning: trainer.eval_every evaluates on the TEST split because {name} has no validation split "
    "(set dataset.val_share); nothing (epoch, learning rate, operator setting) may be selected from these curves"
)


def curve_split(data: DataBundle) -> tuple[str, str]:
    """The split ``trainer.eval_every`` watches and the prefix of its metrics.jsonl fields: the validation
    split (``val.<metric>``) when there is one, else the test split (``eval.<metric>``)."""
    return ("val", "val.") if data.val is not None else ("test", "eval.")


def _evaluate_during_training(model: nn.Module, data: DataBundle, s: TrainerSettings, device: torch.device,
                              progress: Progress | None) -> dict[str, float]:
    """``val.<metric>`` (or, without a validation split, ``eval.<metric>`` on the test split), leaving
    every random generator as it was: a run with ``trainer.eval_every`` trains exactly like one without."""
    split, prefix = curve_split(data)
    with preserved_rng():
        metrics = evaluate(model, data, device=device, batch_size=s.eval_batch_size, amp=s.amp, progress=progress,
                           split=split)
    return {f"{prefix}{k}": v for k, v in metrics.items()}


def fit(
    model: nn.Module,
    data: DataBundle,
    trainer_cfg: DictConfig | Mapping[str, Any],
    *,
    device: torch.device,
    seed: int,
    run_dir: Path,
    pool_lr_mult: float,
    local_pool_lr_mult: float = 1.0,
    resume: bool = False,
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a :class:`~poolbench.models.PoolNet`) in place on ``data.train``.

    Writes ``run_dir/checkpoint.pt`` after every epoch and appends one row per epoch to
    ``run_dir/metrics.jsonl`` (see :mod:`poolbench.engine.tracking`). ``resume`` is the caller's
    decision (:func:`~poolbench.engine.policies.should_resume`): continue after the last epoch of
    ``run_dir/checkpoint.pt``, else start from scratch (a stale checkpoint is removed).
    ``progress("train", steps_done, steps_total)`` is called after every step.
    Returns epochs_done, train_loss (mean of the last epoch), train_steps, train_seconds (the loops
    only, all epochs including those before a resume), steps_per_s, resumed_from_epoch and resume_count.
    Raises :class:`NonFiniteLossError` when the loss is NaN/Inf (the last checkpoint stays intact),
    :class:`~poolbench.engine.checkpoint.CheckpointError` when the checkpoint cannot be resumed from.
    """
    s = TrainerSettings.from_mapping(trainer_cfg)
    loss = loss_name(s.loss, data.task)
    loss_fn = loss_function(s.loss, data.task)
    steps = _steps_per_epoch(s, data, loss)
    require_logger(s.logger)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    for leftover in run_dir.glob(f".{CHECKPOINT}.*.tmp"):  # from a process killed while saving
        leftover.unlink(missing_ok=True)
    dtype = amp_dtype(s.amp, device)
    memory_format = torch.channels_last if use_channels_last(s.channels_last, device) else torch.contiguous_format

    with deterministic_mode(s.deterministic, device):
        model.to(device=device, memory_format=memory_format)
        state = _start(model, s, steps, device=device, dtype=dtype, pool_lr_mult=pool_lr_mult,
                       local_pool_lr_mult=local_pool_lr_mult)
        if resume:
            state.restore(checkpoint_path)
            if log:
                log(f"resuming from {checkpoint_path} after epoch {state.epoch}/{s.epochs}")
        else:
            checkpoint_path.unlink(missing_ok=True)
        start_epoch = state.epoch
        loader = _Loader(s, data, loss, steps, device)
        step_model = torch.compile(model) if s.compile else model
        total_steps = s.epochs * steps
        done = start_epoch * steps
        if progress:
            progress("train", min(done, total_steps), total_steps)
        epoch_log = EpochLog(run_dir, state.history, s.logger, resumed=resume)
        if s.eval_every and data.val is None and log and start_epoch < s.epochs:
            log(TEST_CURVES_WARNING.format(name=data.name))
        try:
            for epoch in range(start_epoch, s.epochs):
                batches = loader.epoch(epoch_seed(seed, epoch))
                on_step = functools.partial(_report, progress, done, total_steps) if progress else None
                started = time.perf_counter()
                losses, lrs = _train_epoch(
                    state, step_model, batches, s, epoch=epoch, steps=steps, loss_fn=loss_fn, device=device,
                    dtype=dtype, memory_format=memory_format, on_step=on_step,
                )
                row = _epoch_row(epoch, losses, lrs, time.perf_counter() - started)
                row.update(learned_fields(model))
                if s.eval_every and (epoch + 1) % s.eval_every == 0:
                    row.update(_evaluate_during_training(model, data, s, device, progress))
                state.history.append(row)
                state.epoch = epoch + 1
                state.save(checkpoint_path)
                epoch_log.epoch_done(row, done, losses.tolist() if epoch_log.per_step else (), lrs)
                done += row["steps"]
                if log:
                    log(_epoch_line(row, s.epochs))
        finally:
            epoch_log.close()
    return {**_summary(state.history, start_epoch), "resume_count": state.resume_count}


def _epoch_row(epoch: int, losses: torch.Tensor, lrs: list[float], seconds: float) -> dict[str, Any]:
    """The start of the epoch's metrics row: mean loss, lr at its start, time and steps."""
    n = len(losses)
    mean_loss = losses.mean().item() if n else math.nan
    return {"epoch": epoch + 1, "loss": mean_loss, "lr": lrs[0] if lrs else math.nan, "seconds": round(seconds, 4),
            "steps": n}


def _epoch_line(row: dict[str, Any], epochs: int) -> str:
    rate = row["steps"] / row["seconds"] if row["seconds"] > 0 else math.nan
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} lr {row['lr']:.3g} {row['seconds']:.1f} s "
            f"{rate:.1f} steps/s")


def _report(progress: Progress, done_before: int, total: int, step: int) -> None:
    progress("train", done_before + step, total)
