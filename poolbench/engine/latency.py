"""The one timing, memory and cost stack: used by every run's latency, ``poolbench bench`` and the
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

Peak memory (:func:`peak_memory_mb`), one definition everywhere: the most bytes that one call of a
function has allocated at any moment beyond what existed before the call. CUDA: the caching
allocator's ``max_memory_allocated`` above ``memory_allocated`` before the call. CPU, where torch
keeps no allocator statistics: the peak of live bytes of tensor storages created during the call,
tracked per ATen op by a ``__torch_dispatch__`` mode until each storage is freed (an op's internal
scratch buffers that never become tensors are not seen).

Cost (:func:`count_flops`, :func:`measure_cost`): PyTorch's ``FlopCounterMode`` (matmul, conv,
attention) plus the analytic counts of :class:`_UncountedFlops` for what it does not see.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import timeit
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from poolbench.engine.policies import LOSSES, amp_dtype, autocast, build_optimizer
from poolbench.environment import cpu_model
from poolbench.errors import ConfigError

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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


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


def usable_cores() -> int:
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


# ------------------------------------------------------------------------------------------ memory


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created inside the ``with`` block and still alive."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # the default imports torch._dynamo (seconds) for nothing here
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors referring to it]

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        input_ptrs = None
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._storages.get(ptr)
            if entry is None:
                if input_ptrs is None:  # views and in-place results share an input's storage: not new
                    input_ptrs = {
                        a.untyped_storage().data_ptr()
                        for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor)
                    }
                if ptr in input_ptrs:
                    continue
                entry = self._storages[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) one call of ``fn`` allocates beyond what was allocated before it (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak / 2**20


# -------------------------------------------------------------------------------------------- cost


def _matrix_dims(tensor: torch.Tensor) -> tuple[int, int]:
    """(batch count, n) of a batch of n×n matrices."""
    return math.prod(tensor.shape[:-2]), int(tensor.shape[-1])


def _rhs_columns(rhs: torch.Tensor) -> int:
    return math.prod(rhs.shape[:-2]) * int(rhs.shape[-1])


def _cholesky_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * n**3 // 3


def _cholesky_solve_flops(args: tuple) -> int:
    return 2 * int(args[1].shape[-1]) ** 2 * _rhs_columns(args[0])


def _triangular_solve_flops(args: tuple) -> int:
    return int(args[0].shape[-1]) ** 2 * _rhs_columns(args[1])


def _eigh_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * 9 * n**3


def _lu_factor_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * 2 * n**3 // 3


def _lu_solve_flops(args: tuple) -> int:
    return 2 * int(args[0].shape[-1]) ** 2 * _rhs_columns(args[2])


def _row_length(values: torch.Tensor, dim: int) -> int:
    return int(values.shape[dim]) if values.dim() else 1


def _sort_flops(args: tuple, out: Any) -> int:
    """n·⌈log2 n⌉ comparisons per sorted row of n elements (comparison sort)."""
    n = _row_length(args[0], args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
    return args[0].numel() * math.ceil(math.log2(n)) if n > 1 else 0


def _topk_flops(args: tuple, out: Any) -> int:
    """n·max(1, ⌈log2 k⌉) comparisons per row of n elements: a heap of the k largest, every element compared."""
    return args[0].numel() * max(1, math.ceil(math.log2(max(int(args[1]), 1))))


def _window_pool_flops(args: tuple, out: Any) -> int:
    kernel = args[1] if len(args) > 1 else 1
    area = math.prod(kernel) if isinstance(kernel, (list, tuple)) else int(kernel) ** 2
    return tree_leaves(out)[0].numel() * area


_ATEN = torch.ops.aten
# Dense linear algebra FlopCounterMode has no formula for; standard counts (Golub & Van Loan,
# Matrix Computations, 4th ed.), one multiply or add = one flop, n×n matrices, k right-hand sides.
_LINALG_FLOPS: dict[Any, Callable[[tuple], int]] = {
    _ATEN.linalg_cholesky_ex: _cholesky_flops,  # n³/3
    _ATEN.cholesky_solve: _cholesky_solve_flops,  # two triangular solves: 2n²k
    _ATEN.linalg_solve_triangular: _triangular_solve_flops,  # n²k
    _ATEN.triangular_solve: _triangular_solve_flops,
    _ATEN._linalg_eigh: _eigh_flops,  # tridiagonalisation + QR with eigenvectors: ≈ 9n³
    _ATEN.linalg_lu_factor_ex: _lu_factor_flops,  # 2n³/3
    _ATEN.linalg_lu_solve: _lu_solve_flops,  # 2n²k
}
# Tagged pointwise by torch but pure data movement: no arithmetic.
_DATA_MOVEMENT = {_ATEN.clone, _ATEN.copy_, _ATEN.copy, _ATEN._to_copy, _ATEN.fill_, _ATEN.zero_, _ATEN.fill}
_WINDOW_POOLS = {_ATEN.max_pool2d_with_indices, _ATEN.avg_pool2d, _ATEN.max_pool2d}


class _UncountedFlops(TorchDispatchMode):
    """Flops of the ops ``FlopCounterMode`` does not count (it counts matmul, conv and attention only).

    - Dense linear algebra: :data:`_LINALG_FLOPS` (Cholesky n³/3, Cholesky solve 2n²k, triangular
      solve n²k, symmetric eigendecomposition 9n³, LU 2n³/3 and its solve 2n²k).
    - Pointwise ops (``torch.Tag.pointwise``): one flop per output element.
    - Reductions (``torch.Tag.reduction``) and adaptive pools: one flop per input element.
    - Window pools (max/avg pool2d): kernel area flops per output element.
    - Sort: n·⌈log2 n⌉ comparisons per sorted row of n elements; top-k: n·max(1, ⌈log2 k⌉).
    - Data movement (copies, views, indexing, dtype casts) costs no flop.

    Iterative solvers are counted as executed, so their count holds for the given input: one CG
    iteration on GMP's dual system (B samples, Φ of C×N) runs two batched matrix-vector products
    (4CN flops, seen by FlopCounterMode) and about a dozen length-N vector updates and dot products
    (pointwise/reduction flops here), i.e. ≈ B·(4CN + 12N) per iteration.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._counted_elsewhere = set(flop_registry)
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in self._counted_elsewhere or packet in _DATA_MOVEMENT:
            return out
        if packet in _LINALG_FLOPS:
            self.total += _LINALG_FLOPS[packet](args)
        elif packet in _WINDOW_POOLS:
            self.total += _window_pool_flops(args, out)
        elif packet is _ATEN.sort:
            self.total += _sort_flops(args, out)
        elif packet is _ATEN.topk:
            self.total += _topk_flops(args, out)
        elif torch.Tag.pointwise in func.tags:
            self.total += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        elif torch.Tag.reduction in func.tags or "adaptive_" in packet.__name__:
            self.total += args[0].numel() if isinstance(args[0], torch.Tensor) else 0
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """Flops of one call of ``fn``: FlopCounterMode's count plus :class:`_UncountedFlops`'s."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    extra = _UncountedFlops()
    with counter, extra:  # extra is innermost: it sees each op once, before FlopCounterMode decomposes it
        fn()
    return int(counter.get_total_flops()) + extra.total


def measure_cost(model: nn.Module, input_shape: Sequence[int], *, device: torch.device | None = None) -> dict[str, int]:
    """Forward flops of one image through ``model`` (a :class:`~poolbench.models.PoolNet`), of its
    global pool alone on the image's feature map, and the model's parameter count.

    ``input_shape`` is one image's (C, H, W). Inference only (eval mode, no autograd); see
    :func:`count_flops` for what is counted. The model, its mode and the RNG states are left as they were.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(1, *input_shape, device=device)
        model.eval()
        try:
            with torch.no_grad():
                flops = count_flops(lambda: model(x))
                fmap = model.features(x)
                pool_flops = count_flops(lambda: model.pool(fmap))
        finally:
            model.train(was_training)
    return {"flops_per_image": flops, "pool_flops": pool_flops, "params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------------- run latency


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's with the thread count the timings ran with."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


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
