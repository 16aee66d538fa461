"""The one timing stack: used by every run's latency, ``poolbench bench`` and the
side-by-side pass (:func:`poolbench.side_by_side.side_by_side`); :func:`timed_fns` builds the timed
functions of a model for both.

Timing. Every sample is one call of a closure timed by ``timeit.Timer`` with torch.utils.benchmark's
clock (``torch.utils.benchmark.utils.timer.timer``), which synchronises the accelerator before each
reading; ``timeit`` turns garbage collection off while it runs. ``torch.utils.benchmark.Timer``
itself is not used: its ``timeit(n)`` first makes max(n // 100, 2) untimed calls for every sample
(three calls per one-call sample, a tripled cost for train steps).
:func:`interleaved_samples` takes the samples in rounds: each
round times every compared function once, in a shuffled order, so a load spike from other processes
hits them alike and per-round ratios cancel most of it. ``blocked_autorange`` is not used: it
decides its own block count and runs one function for its whole ``min_run_time`` before the next,
which is exactly the non-interleaved measurement that made per-run latency depend on when a run
finished.

Statistics. :func:`median_iqr` summarises samples; :func:`interval` gives a 95% percentile-bootstrap
interval of their median, used for times and for per-round ratios alike.

Peak memory is :mod:`poolbench.engine.memory`'s, forward flops :mod:`poolbench.engine.flops`'s.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from poolbench.engine.memory import peak_memory_mb
from poolbench.engine.policies import LOSSES, amp_dtype, autocast, build_optimizer
from poolbench.environment import device_name, usable_cores
from poolbench.errors import ConfigError, first_line

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
# A CPU copy running below this fraction of the single-thread copy's bandwidth means the threads
# are fighting over cores (oversubscription or other processes): timings taken now are unreliable.
COPY_BANDWIDTH_FLOOR = 0.5
COPY_PROBE_BYTES = 16 * 2**20
TRIPLET_MARGIN = 0.1  # conf/trainer/default.yaml's margin
Samples = dict[Any, list[float]]


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    iqr_ms: float
    mean_ms: float
    n: int


# ------------------------------------------------------------------------------------------ timing


def _timer(fn: Callable[[], object]) -> timeit.Timer:
    from torch.utils.benchmark.utils.timer import timer as synchronizing_clock

    return timeit.Timer(fn, timer=synchronizing_clock)


def interleaved_samples(
    fns: dict[Any, Callable[[], object]],
    *,
    warmup: int,
    rounds: int,
    budget_s: float = math.inf,
    min_samples: int = 3,
    seed: int = 0,
) -> tuple[Samples, dict[Any, str]]:
    """Per-call times (ms) of each function over ``rounds`` rounds, and the error of each one that failed.

    ``warmup`` untimed calls each first (a function that raises there is reported, not timed). Each
    round times every function once in a freshly shuffled order. A function that has
    ``min_samples`` samples and has used ``budget_s`` seconds is not sampled again.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    timers = {key: _timer(fn) for key, fn in fns.items()}
    samples: Samples = {key: [] for key in fns}
    errors: dict[Any, str] = {}
    for key, fn in fns.items():
        try:
            for _ in range(max(warmup, 1)):  # one untimed call at least: lazy setup, error check
                fn()
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            errors[key] = first_line(exc)
    spent = dict.fromkeys(fns, 0.0)
    order = [key for key in fns if key not in errors]
    shuffler = random.Random(seed)
    for _ in range(rounds):
        shuffler.shuffle(order)
        for key in order:
            if len(samples[key]) >= min_samples and spent[key] > budget_s:
                continue
            seconds = timers[key].timeit(1)
            samples[key].append(seconds * 1e3)
            spent[key] += seconds
    return samples, errors


def time_fn(fn: Callable[[], object], *, device: torch.device, warmup: int, repeats: int) -> TimingStats:
    """``warmup`` untimed calls, then ``repeats`` timed calls of ``fn`` alone (see :func:`interleaved_samples`)."""
    del device  # torch's timer synchronises whichever accelerator is in use
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    timer = _timer(fn)
    times = [timer.timeit(1) * 1e3 for _ in range(repeats)]
    median, iqr = median_iqr(times)
    return TimingStats(median_ms=median, iqr_ms=iqr, mean_ms=float(np.mean(times)), n=repeats)


# -------------------------------------------------------------------------------------- statistics


def median_iqr(values: Sequence[float]) -> tuple[float, float]:
    """Median and interquartile range (linear interpolation between order statistics)."""
    q25, q50, q75 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q50), float(q75 - q25)


def interval(values: Sequence[float]) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the median of ``values`` (seeded: the same data, the same interval).

    One value gives a zero-width interval at that value; identical values likewise.
    """
    data = np.asarray(values, dtype=float)
    if len(data) < 2 or np.all(data == data[0]):
        return float(data[0]), float(data[0])
    resamples = np.random.default_rng(0).choice(data, size=(BOOTSTRAP_RESAMPLES, len(data)))
    low, high = np.percentile(np.median(resamples, axis=1), [50 * (1 - CONFIDENCE), 50 * (1 + CONFIDENCE)])
    return float(low), float(high)


def paired_ratios(samples: Sequence[float], baseline: Sequence[float]) -> tuple[float, tuple[float, float]]:
    """Median of sample_i / baseline_i over pairs taken in the same round, and its 95% interval."""
    ratios = [a / b for a, b in zip(samples, baseline, strict=False) if b > 0]
    if not ratios:
        raise ValueError("no paired samples")
    return median_iqr(ratios)[0], interval(ratios)


# ---------------------------------------------------------------------------------------- warnings


def copy_bandwidth_gb_s(threads: int, nbytes: int = COPY_PROBE_BYTES, repeats: int = 5) -> float:
    """(read + write) bytes / median time of a CPU tensor copy with ``threads`` torch threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        src = torch.ones(nbytes // 4)
        dst = torch.empty_like(src)
        ms = time_fn(lambda: dst.copy_(src), device=torch.device("cpu"), warmup=1, repeats=repeats).median_ms
    finally:
        torch.set_num_threads(previous)
    return 2 * nbytes / ms / 1e6


def timing_warnings(device: torch.device) -> list[str]:
    """Why timings taken now on ``device`` would be unreliable (empty list: no reason found).

    Checked: a 1-minute load average above the usable cores (runnable processes are queueing), torch
    threads above the usable cores, and (CPU) a copy with torch's threads running at less than
    COPY_BANDWIDTH_FLOOR of the single-thread copy's bandwidth. The host side of CUDA timings queues
    too, so the load check applies to every device.
    """
    cores, threads = usable_cores(), torch.get_num_threads()
    reasons = []
    with contextlib.suppress(AttributeError, OSError):
        load = os.getloadavg()[0]
        if load > cores:
            reasons.append(f"load average {load:.1f} > {cores} usable cores")
    if device.type == "cpu" and threads > cores:
        reasons.append(f"{threads} torch threads > {cores} usable cores")
    if device.type == "cpu" and threads > 1:
        single, multi = copy_bandwidth_gb_s(1), copy_bandwidth_gb_s(threads)
        if multi < COPY_BANDWIDTH_FLOOR * single:
            reasons.append(f"copy bandwidth {multi:.2g} GB/s with {threads} threads vs {single:.2g} GB/s with 1")
    return reasons


# ------------------------------------------------------------------------------------- run latency


def _input_memory_format(model: nn.Module) -> torch.memory_format:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is not None and not conv.weight.is_contiguous():
        return torch.channels_last  # the model was converted to channels_last; feed it the same
    return torch.contiguous_format


def train_step_fn(
    model: nn.Module,
    x: torch.Tensor,
    labels: torch.Tensor,
    loss: str,
    optimizer: torch.optim.Optimizer,
    amp: torch.dtype | None,
    margin: float = TRIPLET_MARGIN,
) -> Callable[[], torch.Tensor]:
    """One training step of ``model`` on (x, labels): zero grads, forward under autocast, loss, backward, step."""
    loss_fn = LOSSES[loss]

    def train_step() -> torch.Tensor:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, amp):
            out = model(x)
        value = loss_fn(out.float(), labels, margin)
        value.backward()
        optimizer.step()
        return value

    return train_step


def step_labels(model: nn.Module, x: torch.Tensor, loss: str) -> torch.Tensor:
    """Labels of a timing batch: P×K groups of ~4 per label (triplet), or cycling through the classes."""
    batch = len(x)
    if loss == "triplet":
        return torch.arange(batch, device=x.device) % max(2, batch // 4)
    was_training = model.training
    with torch.no_grad():
        classes = model.eval()(x[:2]).shape[1]
    model.train(was_training)
    return torch.arange(batch, device=x.device) % classes


def pool_fns(pool: nn.Module, fmap: torch.Tensor, amp: Any) -> tuple[Callable[[], object], Callable[[], object] | None]:
    """(inference forward, training forward + backward or None when the output has no gradient) of a pool."""
    leaf = fmap.detach().requires_grad_(True)

    def forward() -> torch.Tensor:
        pool.eval()
        with torch.no_grad(), autocast(fmap.device, amp):
            return pool(fmap)

    pool.train()
    with autocast(fmap.device, amp):
        probe = pool(leaf)
    if not probe.requires_grad:
        return forward, None
    grad_out = torch.randn_like(probe.float())

    def forward_backward() -> None:
        pool.train()
        leaf.grad = None
        pool.zero_grad(set_to_none=True)
        with autocast(fmap.device, amp):
            out = pool(leaf)
        out.float().backward(grad_out)

    return forward, forward_backward


def timed_fns(
    model: nn.Module,
    x: torch.Tensor,
    *,
    amp: torch.dtype | None,
    loss: str,
    optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    margin: float = TRIPLET_MARGIN,
) -> dict[str, Callable[[], object]]:
    """The timed functions of a model on the batch ``x``, the same for a run's latency and side by side:
    ``infer`` (eval mode, inference mode, autocast to ``amp``), ``train`` (one step of ``loss`` with
    ``optimizer(copy)`` on a copy of the model), ``pool_fwd`` and, when the pool's output has a
    gradient, ``pool_fwdbwd`` (a copy of the global pool alone on the model's feature map of ``x``).

    Leaves ``model`` in eval mode; the caller restores its mode.
    """
    model.eval()

    def infer() -> torch.Tensor:
        with torch.inference_mode(), autocast(x.device, amp):
            return model(x)

    with torch.no_grad(), autocast(x.device, amp):
        fmap = model.features(x).float()
    trainee = copy.deepcopy(model).train()
    train = train_step_fn(trainee, x, step_labels(trainee, x, loss), loss, optimizer(trainee), amp, margin)
    fns: dict[str, Callable[[], object]] = {"infer": infer, "train": train}
    pool_forward, pool_backward = pool_fns(copy.deepcopy(model.pool), fmap, amp)
    fns["pool_fwd"] = pool_forward
    if pool_backward is not None:
        fns["pool_fwdbwd"] = pool_backward
    return fns


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
    pool alone on the model's real (batch, C, h, w) feature map), peak_mem_mb (of one train step, see
    :func:`peak_memory_mb`), device_name and timing_warning ("" or why the machine made these timings
    unreliable). The four functions are timed interleaved, ``repeats`` rounds after ``warmup`` calls
    each; times are medians. The model, its train/eval mode and the global RNG states are left as they were.
    """
    if train_loss not in LOSSES:
        raise ConfigError(f"unknown train_loss '{train_loss}'. Valid choices: {', '.join(LOSSES)}")
    if train_loss == "triplet" and batch_size < 3:
        raise ConfigError(f"the triplet train step needs a latency batch size >= 3, got {batch_size}")
    dtype = amp_dtype(amp, device)
    warning = "; ".join(timing_warnings(device))
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(batch_size, *input_shape, device=device).contiguous(memory_format=_input_memory_format(model))
        try:
            fns = timed_fns(
                model,
                x,
                amp=dtype,
                loss=train_loss,
                optimizer=lambda trainee: build_optimizer(trainee, optimizer="adam", lr=1e-5, weight_decay=0.0),
            )
            samples, errors = interleaved_samples(fns, warmup=warmup, rounds=repeats)
            if errors:
                raise RuntimeError(f"latency measurement failed: {'; '.join(errors.values())}")
            peak_mem_mb = peak_memory_mb(fns["train"], device)
        finally:
            model.train(was_training)
    (infer_ms, infer_iqr), (train_ms, train_iqr) = median_iqr(samples["infer"]), median_iqr(samples["train"])
    return {
        "infer_batch_ms": infer_ms,
        "infer_batch_ms_iqr": infer_iqr,
        "infer_image_ms": infer_ms / batch_size,
        "train_step_ms": train_ms,
        "train_step_ms_iqr": train_iqr,
        "pool_fwd_ms": median_iqr(samples["pool_fwd"])[0],
        "pool_fwdbwd_ms": median_iqr(samples["pool_fwdbwd"])[0] if "pool_fwdbwd" in samples else math.nan,
        "peak_mem_mb": peak_mem_mb,
        "device_name": device_name(device),
        "timing_warning": warning,
    }
