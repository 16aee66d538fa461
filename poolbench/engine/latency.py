"""Latency and memory of a trained model and of its pooling layer alone.

:func:`time_fn` is the one timer used here and by ``poolbench bench``: warm-up calls, then each
timed call measured alone between device synchronisations; median and interquartile range.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from poolbench.engine.losses import batch_hard_triplet_loss, cross_entropy_loss
from poolbench.engine.policies import amp_dtype
from poolbench.environment import cpu_model
from poolbench.errors import ConfigError


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    iqr_ms: float
    mean_ms: float
    n: int


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> TimingStats:
    """Call ``fn`` ``warmup`` times untimed, then time ``repeats`` calls one by one (synchronised on CUDA)."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = np.empty(repeats)
    for i in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times[i] = (time.perf_counter() - start) * 1e3
    q25, q50, q75 = np.percentile(times, [25, 50, 75])
    return TimingStats(median_ms=float(q50), iqr_ms=float(q75 - q25), mean_ms=float(times.mean()), n=repeats)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count the timings ran with."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def peak_memory_mb(
    fn: Callable[[], object], device: torch.device, exclude: Iterable[torch.Tensor] = ()
) -> float:
    """Memory one call of ``fn`` needs beyond what is allocated before it, in MiB.

    CUDA: max_memory_allocated − memory_allocated before the call (the allocator's exact peak).
    CPU, where torch keeps no allocator statistics (and the process RSS barely moves because freed
    blocks are reused): the activation memory, i.e. the unique storages autograd saves for backward
    during the call, without the tensors in ``exclude`` (pass the parameters: they exist anyway).
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values()) / 2**20


def _input_memory_format(model: nn.Module) -> torch.memory_format:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and not conv.weight.is_contiguous():
        return torch.channels_last  # the model was converted to channels_last; feed it the same
    return torch.contiguous_format


def _train_step_timing(
    model: nn.Module, x: torch.Tensor, train_loss: str, autocast: Callable[[], torch.autocast], timing: dict
) -> tuple[TimingStats, float]:
    """Forward, loss, backward and an Adam step on a copy of ``model``; (timing, peak_mem_mb)."""
    trainee = copy.deepcopy(model).train()
    optimizer = torch.optim.Adam(trainee.parameters(), lr=1e-5)
    batch = len(x)
    if train_loss == "triplet":  # groups of ~4 items per label, as in P×K batches
        loss_fn, labels = batch_hard_triplet_loss, torch.arange(batch, device=x.device) % max(2, batch // 4)
    else:
        with torch.no_grad():
            classes = trainee.eval()(x[:2]).shape[1]
        trainee.train()
        loss_fn, labels = cross_entropy_loss, torch.arange(batch, device=x.device) % classes

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = trainee(x)
        loss_fn(out.float(), labels, 0.1).backward()
        optimizer.step()

    stats = time_fn(train_step, **timing)
    return stats, peak_memory_mb(train_step, timing["device"], exclude=trainee.parameters())


def _pool_timing(
    pool: nn.Module, fmap: torch.Tensor, autocast: Callable[[], torch.autocast], timing: dict
) -> tuple[TimingStats, TimingStats]:
    """The global pool alone: inference forward, and training forward + backward."""
    pool = copy.deepcopy(pool).eval()
    with torch.no_grad(), autocast():
        forward = time_fn(lambda: pool(fmap), **timing)
    pool.train()
    fmap_leaf = fmap.detach().requires_grad_(True)
    with autocast():
        grad_out = torch.randn_like(pool(fmap_leaf).float())

    def forward_backward() -> None:
        fmap_leaf.grad = None
        pool.zero_grad(set_to_none=True)
        with autocast():
            out = pool(fmap_leaf)
        out.float().backward(grad_out)

    return forward, time_fn(forward_backward, **timing)


def measure_latency(
    model: nn.Module,
    *,
    input_shape: tuple[int, int, int],
    device: torch.device,
    batch_size: int,
    warmup: int,
    repeats: int,
    amp: str = "none",
    train_loss: str = "ce",
) -> dict[str, float | str]:
    """Time inference, one train step and the global pool alone on random inputs of ``input_shape``.

    Returns infer_batch_ms (+ _iqr), infer_image_ms, train_step_ms (+ _iqr: forward, ``train_loss``,
    backward and an Adam step on a copy of the model), pool_fwd_ms and pool_fwdbwd_ms (the global
    pool alone on the model's real (batch, C, h, w) feature map), peak_mem_mb (extra memory of one
    train step, see :func:`peak_memory_mb`) and device_name. All times are medians over ``repeats``
    after ``warmup`` calls. The model, its train/eval mode and the global RNG states are left as
    they were.
    """
    if train_loss not in ("ce", "triplet"):
        raise ConfigError(f"unknown train_loss '{train_loss}'. Valid choices: ce, triplet")
    if train_loss == "triplet" and batch_size < 3:
        raise ConfigError(f"the triplet train step needs a latency batch size >= 3, got {batch_size}")
    dtype = amp_dtype(amp, device)

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    timing = {"device": device, "warmup": warmup, "repeats": repeats}
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(batch_size, *input_shape, device=device).contiguous(memory_format=_input_memory_format(model))
        model.eval()
        try:
            with torch.inference_mode(), autocast():
                infer = time_fn(lambda: model(x), **timing)
            with torch.no_grad(), autocast():
                fmap = model.features(x).float()
        finally:
            model.train(was_training)
        train, peak_mem_mb = _train_step_timing(model, x, train_loss, autocast, timing)
        pool_fwd, pool_fwdbwd = _pool_timing(model.pool, fmap, autocast, timing)
    return {
        "infer_batch_ms": infer.median_ms,
        "infer_batch_ms_iqr": infer.iqr_ms,
        "infer_image_ms": infer.median_ms / batch_size,
        "train_step_ms": train.median_ms,
        "train_step_ms_iqr": train.iqr_ms,
        "pool_fwd_ms": pool_fwd.median_ms,
        "pool_fwdbwd_ms": pool_fwdbwd.median_ms,
        "peak_mem_mb": peak_mem_mb,
        "device_name": device_name(device),
    }
