"""The training loop: seeded, resumable, checkpointed every epoch, lean on the hot path.

Reproducibility: weights are initialised from the seed the caller set (:func:`seed_everything`
before ``build_model``); every epoch re-seeds python/numpy/torch and the batch sampler from
``(seed, epoch)``, so a run resumed from the checkpoint of epoch e draws exactly the batches and
random numbers an uninterrupted run draws in epoch e + 1.
"""

from __future__ import annotations

import functools
import json
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
from poolbench.engine.policies import (
    amp_dtype,
    autocast,
    build_optimizer,
    loss_function,
    loss_name,
    should_resume,
    use_channels_last,
)
from poolbench.engine.samplers import PKBatchSampler, RandomBatchSampler
from poolbench.engine.settings import TrainerSettings
from poolbench.errors import ConfigError, PoolbenchError
from poolbench.files import atomic_write, atomic_write_text

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
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


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))


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
    progress: Progress | None = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train ``model`` (a :class:`~poolbench.models.PoolNet`) in place on ``data.train``.

    Writes ``run_dir/checkpoint.pt`` after every epoch and appends one line per epoch to
    ``run_dir/metrics.jsonl``. With ``trainer.resume`` and an existing checkpoint, training continues
    after its last epoch. ``progress("train", steps_done, steps_total)`` is called after every step.
    Returns epochs_done, train_loss (mean of the last epoch), train_steps, train_seconds (the loops
    only, all epochs including those before a resume), steps_per_s and resumed_from_epoch.
    Raises :class:`NonFiniteLossError` when the loss is NaN/Inf; the last checkpoint stays intact.
    """
    s = TrainerSettings.from_mapping(trainer_cfg)
    loss = loss_name(s.loss, data.task)
    loss_fn = loss_function(s.loss, data.task)
    steps = _steps_per_epoch(s, data, loss)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path, metrics_path = run_dir / CHECKPOINT, run_dir / METRICS
    for leftover in run_dir.glob(f".{CHECKPOINT}.*.tmp"):  # from a process killed while saving
        leftover.unlink(missing_ok=True)
    dtype = amp_dtype(s.amp, device)
    memory_format = torch.channels_last if use_channels_last(s.channels_last, device) else torch.contiguous_format

    with deterministic_mode(s.deterministic, device):
        model.to(device=device, memory_format=memory_format)
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
        history: list[dict[str, Any]] = []
        start_epoch = 0
        if should_resume(s.resume, checkpoint_path):
            state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
            try:
                model.load_state_dict(state["model"])
            except RuntimeError as exc:
                raise ConfigError(f"{checkpoint_path} does not match this model: {exc}") from None
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"])
            start_epoch, history = state["epoch"], state["history"]
            if log:
                log(f"resuming from {checkpoint_path} after epoch {start_epoch}/{s.epochs}")
        # Rewritten from the checkpoint's history: a crash between checkpoint and append must not
        # leave a missing or duplicated line.
        atomic_write_text(metrics_path, "".join(json.dumps(row) + "\n" for row in history))

        batch_generator = torch.Generator()
        sampler: PKBatchSampler | RandomBatchSampler
        if loss == "triplet":
            sampler = PKBatchSampler(
                data.train_labels, s.writers_per_batch, s.patches_per_writer, steps, batch_generator
            )
        else:
            sampler = RandomBatchSampler(len(data.train), s.batch_size, steps, batch_generator)  # type: ignore[arg-type]
        worker_generator = torch.Generator()
        loader = DataLoader(
            data.train,
            batch_sampler=sampler,
            num_workers=s.num_workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_seed_worker if s.num_workers > 0 else None,
            generator=worker_generator,
        )
        step_model = torch.compile(model) if s.compile else model
        check_every = 1 if device.type == "cpu" else CUDA_FINITE_CHECK_EVERY
        total_steps = s.epochs * steps
        done = start_epoch * steps
        if progress:
            progress("train", min(done, total_steps), total_steps)

        for epoch in range(start_epoch, s.epochs):
            this_seed = epoch_seed(seed, epoch)
            seed_everything(this_seed)
            batch_generator.manual_seed(this_seed)
            worker_generator.manual_seed(this_seed)
            model.train()
            lr = optimizer.param_groups[0]["lr"]
            losses = torch.zeros(steps, device=device)
            checked = n = 0
            started = time.perf_counter()
            for n, (x, y) in enumerate(loader, start=1):  # noqa: B007  (n is the step count after the loop)
                x = x.to(device, non_blocking=True, memory_format=memory_format)
                y = y.to(device, non_blocking=True)
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
                if progress:
                    progress("train", done + n, total_steps)
            _check_finite(losses, checked, n, epoch)
            mean_loss = losses[:n].mean().item() if n else math.nan
            seconds = time.perf_counter() - started
            done += n
            row = {"epoch": epoch + 1, "loss": mean_loss, "lr": lr, "seconds": round(seconds, 4), "steps": n}
            history.append(row)
            checkpoint = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch + 1,
                "rng": _rng_state(),
                "history": history,
            }
            atomic_write(checkpoint_path, functools.partial(torch.save, checkpoint))
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if log:
                rate = n / seconds if seconds > 0 else math.nan
                log(f"epoch {epoch + 1}/{s.epochs} loss {mean_loss:.4f} lr {lr:.3g} {seconds:.1f} s {rate:.1f} steps/s")
    return _summary(history, start_epoch)
