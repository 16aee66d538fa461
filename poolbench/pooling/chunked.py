"""Window-sum pools as autograd Functions: forward over chunks of planes, analytic backward.

Why. Power mean, Lp norm, SoftPool and stochastic pooling are a few window sums (``F.avg_pool2d``)
of elementwise maps of the input (x^p, e^x, max(x, 0)·x). Written as differentiable tensor
expressions, autograd keeps x^p / e^x and several other input-sized intermediates alive until the
backward and walks each of them again: about three times the memory of native max pooling and as
much time again. Here each operator is one :class:`torch.autograd.Function`:

* the forward runs without a graph, over chunks of whole (H, W) planes of the flattened
  batch×channel dimension, so the elementwise temporaries never reach the input's size and mostly
  stay in cache; it saves only the input (alive anyway) and output-sized tensors (window sums,
  sampled indices);
* the backward recomputes per chunk what it needs from the input and applies the analytic
  gradient with the transpose of the same window sum on the native kernel
  (``aten.avg_pool2d_backward`` with the forward's divisor semantics, or
  ``aten.max_pool2d_with_indices_backward`` for a sampled position), written straight into the
  input gradient.

The rare planes that need another formulation (x^p overflowing, SoftPool's extreme spreads,
stochastic windows without a positive value) are found after the chunked pass from the
output-sized sums and recomputed on their own.

First order only: the backward is not itself differentiable, and a backward with
``create_graph=True`` raises instead of silently treating these gradients as constants.

Half-precision inputs are computed in float32 chunk by chunk (no float32 copy of the whole input);
outputs and gradients are cast back, as the module's other operators do. A non-contiguous input
(e.g. channels_last) is made contiguous once, because the chunks are runs of whole planes.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import FunctionCtx

_HALF = (torch.float16, torch.bfloat16)
# Elements of the input per chunk: at most CHUNK_ELEMENTS_*, and at most 1/CHUNKS_AT_LEAST of the
# input so that the two or three chunk-sized temporaries stay a small fraction of it (peak memory
# within 1.2× native max pooling's at any size), but not below CHUNK_MIN_* elements. Small chunks
# keep the temporaries in cache, but every op over a chunk is one parallel region: with the cores
# shared with other processes each region can wait for a descheduled thread, so fewer, larger
# chunks are the robust choice. On a 2-core CPU, 2 threads, 32×64×112×112: 2^21 (8 MiB of float32)
# was within a few % of 2^17–2^19 when the cores were quiet and several times faster than them
# while another process kept both cores busy. Accelerators: few kernel launches.
CHUNK_ELEMENTS_CPU = 1 << 21
CHUNK_ELEMENTS_DEVICE = 1 << 24
CHUNK_MIN_CPU = 1 << 15
CHUNK_MIN_DEVICE = 1 << 20
CHUNKS_AT_LEAST = 16
_PLANE_DIMS = (-2, -1)


Backward = Callable[..., tuple[Tensor | None, ...]]


def _first_order(backward: Backward) -> Backward:
    """Run ``backward`` without a graph; refuse ``create_graph=True`` (grad mode on in the backward)."""

    @functools.wraps(backward)
    def wrapper(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():
            raise RuntimeError(
                "poolbench's local min/mixed/power/lpnorm/l2/softpool/stochastic pools have no second-order gradients "
                "(backward with create_graph=True)"
            )
        return backward(ctx, *grads)

    return wrapper


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def _as_planes(x: Tensor) -> Tensor:
    """(..., H, W) as (N, H, W), a view for a contiguous input."""
    return x.contiguous().view(-1, *x.shape[-2:])


def planes_per_chunk(count: int, plane_elements: int, most: int, least: int) -> int:
    """Planes per chunk of ``count`` planes of ``plane_elements`` each: at most ``most`` elements and
    at most 1/CHUNKS_AT_LEAST of the whole, but not below ``least`` (see CHUNK_ELEMENTS_CPU); at
    least one plane. The one chunk-size policy, also used by :mod:`poolbench.pooling.sort_select`."""
    budget = min(most, max(least, count * plane_elements // CHUNKS_AT_LEAST))
    return max(1, budget // max(1, plane_elements))


def _step(planes: Tensor) -> int:
    """Planes per chunk."""
    cpu = planes.device.type == "cpu"
    return planes_per_chunk(
        planes.shape[0],
        planes.shape[-2] * planes.shape[-1],
        CHUNK_ELEMENTS_CPU if cpu else CHUNK_ELEMENTS_DEVICE,
        CHUNK_MIN_CPU if cpu else CHUNK_MIN_DEVICE,
    )


# ---------------------------------------------------------------- chunk loops under contention
# On a CPU with several intra-op threads, every op over a chunk is one parallel region that ends in
# a barrier: when another process takes a core, the region waits for the descheduled thread, op after
# op (SoftPool fwd+bwd read 3x its peer's time under a competing 2-thread load, native kernels 1x).
# `_each_span` runs the chunks instead as independent tasks on as many threads as torch uses, each
# thread's ops single-threaded: a descheduled thread delays only its own chunk while the others take
# the next ones, and there are no per-op barriers. Each task writes its own rows of preallocated
# outputs, so the result is the same, bit for bit, as the serial loop's. Chunks are 1/threads the
# size, so the temporaries in flight (and the peak memory) stay those of the serial loop.
_POOL_LOCK = threading.Lock()
_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, threads, pool)
_WORKER = threading.local()


def _chunk_pool(threads: int) -> ThreadPoolExecutor:
    """The pool of ``threads`` chunk workers, each with one intra-op thread (made once per thread count)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is not None and _POOL[:2] == (os.getpid(), threads):
            return _POOL[2]
        ready = threading.Barrier(threads)

        def start() -> None:
            _WORKER.active = True
            torch.get_num_threads()  # its first query: torch gives this thread the current count, 1
            ready.wait()

        # torch sets a thread's OpenMP thread count from the global count the first time the thread
        # asks for it: 1 while the workers start, then the caller's count again (which it keeps).
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="poolbench-chunks")
            for started in [pool.submit(start) for _ in range(threads)]:
                started.result()
        finally:
            torch.set_num_threads(previous)
        if _POOL is not None and _POOL[0] == os.getpid():  # a forked child has none of its parent's threads
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), threads, pool)
        return pool


def _threads_for(planes: Tensor) -> int:
    """Chunk workers for a loop over ``planes``: torch's thread count for a plain CPU tensor; 1 (the
    serial loop) on a device, for a tensor subclass, inside a worker, and under a dispatch mode
    (FakeTensorMode, a memory tracker, tracing), which is per thread and would not see the workers' ops."""
    if (
        planes.device.type != "cpu"
        or type(planes) is not Tensor
        or getattr(_WORKER, "active", False)
        or torch._C._len_torch_dispatch_stack() > 0
    ):
        return 1
    return torch.get_num_threads()


def each_chunk(
    like: Tensor,
    count: int,
    step: int,
    body: Callable[..., None],
    prepare: Callable[[slice], Any] | None = None,
) -> None:
    """``body(span)``, or ``body(span, prepare(span))``, for spans of rows covering ``range(count)``,
    each writing only its own rows of preallocated outputs; ``step`` is the serial loop's chunk size.
    On several CPU threads (see _threads_for, ``like`` the tensor looped over) the spans are 1/threads
    of ``step`` and run as independent tasks (see _chunk_pool), else in a loop. ``prepare`` runs in the
    caller, span after span in order (e.g. draws from the global generator: the same numbers for the
    same rows as one draw), at most ``threads`` spans ahead of the tasks (memory)."""
    threads = _threads_for(like)
    step = max(1, step // threads)
    spans = [slice(start, min(start + step, count)) for start in range(0, count, step)]
    if threads <= 1 or len(spans) < 2:
        for span in spans:
            body(span) if prepare is None else body(span, prepare(span))
        return
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def task(span: slice, *prepared: Any) -> None:  # grad and inference mode are per thread: the caller's
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            body(span, *prepared)

    pool = _chunk_pool(threads)
    tasks: list[Future[None]] = []
    try:
        for span in spans:
            if prepare is None:
                tasks.append(pool.submit(task, span))
                continue
            tasks.append(pool.submit(task, span, prepare(span)))
            if len(tasks) > threads:
                tasks[-threads - 1].result()
    finally:  # no task may still write into the outputs once this returns (or raises)
        wait(tasks)
    for done in tasks:
        done.result()


def _each_span(planes: Tensor, body: Callable[..., None], prepare: Callable[[slice], Any] | None = None) -> None:
    """:func:`each_chunk` over the planes with the window-sum pools' chunk size."""
    each_chunk(planes, planes.shape[0], _step(planes), body, prepare)


def _row_chunks(planes: Tensor, flagged: Callable[[], Tensor]) -> Iterator[Tensor]:
    """The indices of the planes where ``flagged()`` (N,) holds, in chunks; nothing when none does.
    Only called after a one-pass test over the output found something."""
    yield from flagged().nonzero().flatten().split(_step(planes))


@dataclass(frozen=True)
class Window:
    """One k×k window grid (``nn.MaxPool2d``'s floor size) and its window sums on the native kernels."""

    kernel_size: int
    stride: int
    padding: int

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (height + 2 * p - k) // s + 1, (width + 2 * p - k) // s + 1

    def _args(self) -> tuple[list[int], list[int], list[int]]:
        return [self.kernel_size] * 2, [self.stride] * 2, [self.padding] * 2

    def _pool(self, t: Tensor, mean: bool, out: Tensor | None) -> Tensor:
        # zero padding adds nothing to a sum; the mean divides by the in-map count
        args = (*self._args(), False, not mean, None if mean else 1)
        if out is None:
            return torch.ops.aten.avg_pool2d(t, *args)
        return torch.ops.aten.avg_pool2d.out(t, *args, out=out)

    def sum(self, t: Tensor, out: Tensor | None = None) -> Tensor:
        """Σ over the in-map positions of each window."""
        return self._pool(t, False, out)

    def mean(self, t: Tensor, out: Tensor | None = None) -> Tensor:
        """mean over the in-map positions of each window (``count_include_pad=False``)."""
        return self._pool(t, True, out)

    def transpose(self, grad: Tensor, like: Tensor, mean: bool = False, out: Tensor | None = None) -> Tensor:
        """P^T grad for P = :meth:`sum` (``mean`` False) or :meth:`mean`: each position gets the
        (count-divided) grad of every window holding it."""
        args = (grad, like, *self._args(), False, not mean, None if mean else 1)
        if out is None:
            return torch.ops.aten.avg_pool2d_backward(*args)
        return torch.ops.aten.avg_pool2d_backward.grad_input(*args, grad_input=out)


def _output(planes: Tensor, window: Window, dtype: torch.dtype) -> Tensor:
    return planes.new_empty((planes.shape[0], *window.out_size(*planes.shape[-2:])), dtype=dtype)


def _shaped(x: Tensor, out: Tensor) -> Tensor:
    return out.view(*x.shape[:-2], *out.shape[-2:])


# ------------------------------------------------------------------------------------- power mean


def _pow_(a: Tensor, p: float) -> Tensor:
    """a^p in place for a >= 0 (torch's pow has exact fast paths for 2 and 3)."""
    return a.square_() if p == 2.0 else a.pow_(p)


def _slope(a: Tensor, p: float) -> Tensor:
    """a^(p−1) for a >= 0, may reuse ``a``: d(a^p)/da / p as ``nonnegative_power``'s autograd has
    it: 1 for p = 1 (0^0 = 1), 0 at a = 0 for p < 1 (where a^(p−1) is infinite)."""
    if p == 1.0:
        return a.fill_(1.0)
    if p == 2.0:
        return a
    if p == 3.0:
        return a.square_()
    if p < 1.0:
        return torch.where(a > 0, a.pow(p - 1.0), 0.0)
    return a.pow_(p - 1.0)


class PowerMean(torch.autograd.Function):
    """y = pool(a^p)^(1/p) per window, a = max(x, eps) with pool = in-map mean (``eps`` given: power
    average) or a = |x| with pool = window sum (``eps`` None: Lp norm).

    Gradient, with T = pool(a^p) and P^T the transpose of the pool:
    ∂L/∂a = a^(p−1) ⊙ P^T(g ⊙ T^((1−p)/p)), times ∂a/∂x = 1[x >= eps] (clamp) or sign(x) (|x|);
    windows with T = 0 pass no gradient (the root's slope is infinite there, as ``safe_root``).

    Overflow: planes whose result is not finite (x^p overflowed) although their input is, and every
    plane when eps^p underflows, are divided by their max m (exact: the pool is 1-homogeneous);
    T is kept for a/m and the backward uses (a/m)^(p−1) with that T: the m's cancel.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, window: Window, p: float, eps: float | None) -> Tensor:  # type: ignore[override]
        planes = _as_planes(x)
        work = _work_dtype(x.dtype)
        out = _output(planes, window, x.dtype)
        totals = _output(planes, window, work)
        norm = eps is None
        pool = window.sum if norm else window.mean

        def magnitude(chunk: Tensor) -> Tensor:  # a new tensor
            return chunk.abs() if eps is None else chunk.clamp_min(eps)

        # Loop bodies are functions so that a chunk's temporaries are freed before the next chunk's.
        def direct(span: slice) -> None:
            chunk = planes[span].to(work)
            pool(chunk.square() if norm and p == 2.0 else _pow_(magnitude(chunk), p), out=totals[span])
            if out.dtype == work:
                torch.pow(totals[span], 1.0 / p, out=out[span])
            else:
                out[span] = totals[span].pow(1.0 / p)

        def rescale(rows: Tensor | slice) -> None:
            a = magnitude(planes[rows].to(work))
            peak = a.amax(dim=_PLANE_DIMS, keepdim=True)
            peak = torch.where(peak > 0, peak, 1.0)
            total = pool(_pow_(a.div_(peak), p))
            totals[rows], scale[rows] = total, peak
            out[rows] = total.pow(1.0 / p).mul_(peak)

        scale = planes.new_ones((planes.shape[0], 1, 1), dtype=work)
        rescaled = False
        if eps is not None and eps**p < torch.finfo(work).tiny:  # the root of ~0 has an infinite slope
            _each_span(planes, rescale)
            rescaled = True
        else:
            _each_span(planes, direct)
            # x^p overflowed (a total is inf; amax propagates NaN): rescale those planes, not where
            # the input itself is inf or NaN
            if totals.numel() and not bool(totals.amax().isfinite()):
                for rows in _row_chunks(planes, lambda: ~totals.isfinite().all(dim=_PLANE_DIMS)):
                    rows = rows[planes[rows].isfinite().all(dim=_PLANE_DIMS)]
                    if rows.numel():
                        rescale(rows)
                        rescaled = True
        ctx.save_for_backward(x, totals, scale if rescaled else None)
        ctx.setup = (window, p, eps)  # type: ignore[attr-defined]
        return _shaped(x, out)

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        x, totals, scale = ctx.saved_tensors
        window, p, eps = ctx.setup
        planes, grads = _as_planes(x), _as_planes(grad_out)
        work = _work_dtype(x.dtype)
        grad = torch.empty_like(planes)
        # T > 0 everywhere for the power average unless rescaling underflowed. Where T = 0 (p > 1)
        # T^((1−p)/p) is inf: T is set to inf there instead, so the coefficient is 0. threshold()
        # and not where()/masked_fill(): a select on a bool mask is ~20× slower on CPU (branches).
        may_vanish = (eps is None or scale is not None) and p > 1.0
        if eps is not None:  # x >= eps as x > below, so that threshold() zeroes x < eps
            below = torch.nextafter(torch.tensor(eps, dtype=work), torch.tensor(-math.inf, dtype=work)).item()

        def gradient(span: slice) -> None:
            chunk, total = planes[span].to(work), totals[span]
            if may_vanish:
                total = F.threshold(total, 0.0, math.inf)
            coef = total.pow((1.0 - p) / p).mul_(grads[span])
            back = window.transpose(coef, chunk, mean=eps is not None, out=grad[span] if grad.dtype == work else None)
            peak = None if scale is None else scale[span]
            if eps is None and p == 2.0:  # |x|^(p−1)·sign(x) = x
                slope = chunk if peak is None else chunk / peak
            elif eps is None and p == 3.0:  # |x|²·sign(x)
                scaled = chunk if peak is None else chunk / peak
                slope = scaled.abs().mul_(scaled)
            elif eps is None:
                magnitude = chunk.abs() if peak is None else chunk.abs().div_(peak)
                slope = _slope(magnitude, p).mul_(chunk.sign())
            elif p > 1.0:  # 0^(p−1) = 0: zeroing x < eps first is the clamp's zero gradient
                a = F.threshold(chunk, below, 0.0)
                slope = _slope(a if peak is None else a.div_(peak), p)
            else:
                a = chunk.clamp_min(eps)
                slope = _slope(a if peak is None else a.div_(peak), p).mul_(chunk >= eps)
            back.mul_(slope)
            if grad.dtype != work:
                grad[span] = back

        _each_span(planes, gradient)
        return grad.view(x.shape), None, None, None


# --------------------------------------------------------------------------------------- SoftPool


class SoftPool(torch.autograd.Function):
    """y = m + Σ e^(x−m)·(x−m) / Σ e^(x−m) per window, m the per-plane max (Stergiou et al. 2021);
    the same as Σ e^x·x / Σ e^x, with terms near 1 for the sums (better rounding).

    Gradient, with e_i = e^(x_i−m), S = Σ e, c = g/S and P^T the window-sum transpose:
    ∂L/∂x_i = Σ_o c_o e_i (1 + x_i − y_o) = e_i ⊙ [(x_i − m) P^T(c) − P^T(c ⊙ (y − m − 1))].

    ``fallback(planes)`` computes planes with a window whose S leaves full precision (see
    :func:`poolbench.pooling.local.softpool`) under autograd; the backward recomputes their graph.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, x: Tensor, window: Window, fallback: Callable[[Tensor], Tensor]
    ) -> Tensor:
        planes = _as_planes(x)
        work = _work_dtype(x.dtype)
        masses, offsets = _output(planes, window, work), _output(planes, window, work)
        peaks = planes.new_empty((planes.shape[0], 1, 1), dtype=work)

        def sums(span: slice) -> None:  # a function: the chunk's temporaries go before the next chunk's
            chunk = planes[span].to(work)
            peak = torch.amax(chunk, dim=_PLANE_DIMS, keepdim=True, out=peaks[span])
            shifted = chunk - peak
            weights = shifted.exp()
            window.sum(weights, out=masses[span])
            window.sum(weights.mul_(shifted), out=offsets[span])

        _each_span(planes, sums)
        offsets.div_(masses)  # y − m
        out = (offsets + peaks).to(x.dtype)
        offsets.sub_(1.0)  # y − m − 1, what the backward needs
        # Below this the largest term of a window is subnormal: float rounding is no longer relative.
        smallest = torch.finfo(work).tiny * window.kernel_size**2 / torch.finfo(work).eps
        fallback_rows = []
        if masses.numel() and not bool(masses.amin() >= smallest):  # NaN too (amin propagates it)
            fallback_rows = list(_row_chunks(planes, lambda: ~(masses >= smallest).all(dim=_PLANE_DIMS)))
        for rows in fallback_rows:
            out[rows] = fallback(planes[rows].to(work)).to(x.dtype)
        ctx.save_for_backward(x, peaks, masses, offsets)
        ctx.setup = (window, fallback, fallback_rows)  # type: ignore[attr-defined]
        return _shaped(x, out)

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        x, peaks, masses, offsets = ctx.saved_tensors
        window, fallback, fallback_rows = ctx.setup
        planes, grads = _as_planes(x), _as_planes(grad_out)
        work = _work_dtype(x.dtype)
        grad = torch.empty_like(planes)

        def gradient(span: slice) -> None:  # a function: the chunk's temporaries go before the next chunk's
            chunk = planes[span].to(work)
            coef = grads[span].to(work).div_(masses[span]) if grads.dtype != work else grads[span] / masses[span]
            # two chunk-sized temporaries: (x − m) then e^(x − m) in one, P^T(c) in the other
            shifted = chunk - peaks[span]
            inner = window.transpose(coef, chunk).mul_(shifted)
            weights = shifted.exp_()
            same = grad.dtype == work
            inner.sub_(window.transpose(coef.mul_(offsets[span]), chunk, out=grad[span] if same else None))
            if same:
                torch.mul(inner, weights, out=grad[span])
            else:
                grad[span] = inner.mul_(weights)

        _each_span(planes, gradient)
        for rows in fallback_rows:  # their rows above hold garbage (S may be 0): overwritten
            with torch.enable_grad():
                leaf = planes[rows].to(work).requires_grad_()
                (value,) = torch.autograd.grad(fallback(leaf), leaf, grads[rows].to(work))
            grad[rows] = value.to(grad.dtype)
        return grad.view(x.shape), None, None


# ------------------------------------------------------------------------------------- stochastic


class StochasticMean(torch.autograd.Function):
    """Stochastic pooling's expectation y = N/S per window, S = Σ x⁺, N = Σ x⁺·x (x⁺ = max(x, 0));
    the in-map mean where the window has no positive value (S = 0).

    Gradient, with c = g/S where S > 0 (else 0), P^T the window-sum transpose and P_mean^T the
    mean's: ∂L/∂x_i = 1[x_i >= 0]·(2 x_i P^T(c) − P^T(c ⊙ y)) + P_mean^T(g·1[S = 0])
    (1[x >= 0] is ``clamp_min``'s gradient mask).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, window: Window) -> Tensor:  # type: ignore[override]
        planes = _as_planes(x)
        work = _work_dtype(x.dtype)
        masses, sums = _output(planes, window, work), _output(planes, window, work)

        def window_sums(span: slice) -> None:  # a function: the chunk's temporaries go before the next chunk's
            chunk = planes[span].to(work)
            positive = chunk.clamp_min(0.0)
            window.sum(positive, out=masses[span])
            window.sum(positive.mul_(chunk), out=sums[span])

        _each_span(planes, window_sums)
        out = (sums / masses).to(x.dtype)
        # no positive value in some window (S = 0, or NaN from a NaN input): the in-map mean there
        empty_rows = []
        if masses.numel() and not bool(masses.amin() > 0):
            empty_rows = list(_row_chunks(planes, lambda: ~(masses > 0).all(dim=_PLANE_DIMS)))
        for rows in empty_rows:
            has_mass = masses[rows] > 0
            out[rows] = torch.where(has_mass, out[rows], window.mean(planes[rows].to(work)).to(x.dtype))
        ctx.save_for_backward(x, masses, sums)
        ctx.setup = (window, empty_rows)  # type: ignore[attr-defined]
        return _shaped(x, out)

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        x, masses, sums = ctx.saved_tensors
        window, empty_rows = ctx.setup
        planes, grads = _as_planes(x), _as_planes(grad_out)
        work = _work_dtype(x.dtype)
        grad = torch.empty_like(planes)

        def gradient(rows: Tensor | slice, masked: bool, out: Tensor | None = None) -> Tensor:
            chunk, g, mass = planes[rows].to(work), grads[rows].to(work), masses[rows]
            if masked:
                has_mass = mass > 0
                mass = torch.where(has_mass, mass, 1.0)
            coef = g / mass
            if masked:
                coef.masked_fill_(~has_mass, 0.0)
            inner = window.transpose(coef, chunk)
            result = window.transpose(coef.mul_(sums[rows]).div_(mass), chunk, out=out)
            result.neg_().addcmul_(inner, chunk, value=2.0).masked_fill_(chunk < 0, 0.0)
            if masked:
                result += window.transpose(g.masked_fill_(has_mass, 0.0), chunk, mean=True)
            return result

        def unmasked(span: slice) -> None:
            if grad.dtype == work:
                gradient(span, masked=False, out=grad[span])
            else:
                grad[span] = gradient(span, masked=False)

        _each_span(planes, unmasked)
        for rows in empty_rows:  # their rows above hold NaN (c = g/0): overwritten
            grad[rows] = gradient(rows, masked=True).to(grad.dtype)
        return grad.view(x.shape), None


class StochasticDraw(torch.autograd.Function):
    """Stochastic pooling's training draw: x at one position per window, drawn with probability
    x⁺_i / Σ x⁺, uniformly where no value is positive (see :func:`poolbench.pooling.local.stochastic_pool`).

    One max-pool race per window on the keys x_i/E_i where x_i > 0 and −E_i elsewhere
    (E_i = −log U_i ~ Exp(1)): a positive value always beats a non-positive one, the positives race
    as argmax x⁺/E, and a window without positive values picks argmax −E = argmax U (uniform).

    The U are drawn per chunk in order; on CPU the global generator then yields the same numbers
    for the same positions as one draw for the whole input. Only the drawn flat indices (int64,
    output-sized, as native max pooling keeps) are saved; the backward routes g to them with the
    native max-pool backward (a position drawn by overlapping windows sums their gradients).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, window: Window) -> Tensor:  # type: ignore[override]
        planes = _as_planes(x)
        work = _work_dtype(x.dtype)
        out = _output(planes, window, x.dtype)
        indices = _output(planes, window, torch.int64)
        k, s, p = window._args()

        def uniform(span: slice) -> Tensor:  # in the caller, chunk after chunk: one stream, in order
            return torch.rand(planes[span].shape, dtype=work, device=planes.device)

        def draw(span: slice, log_u: Tensor) -> None:  # a function: the chunk's temporaries go before the next's
            chunk = planes[span]
            # −E from U: 4× cheaper than exponential_(). U = 0 (probability 2⁻²⁴ per draw in float32)
            # gives E = inf: key 0 for x > 0, which loses to any other positive value of its window.
            # E = 0 cannot occur (U < 1), so x / E is never 0/0.
            log_u.log_()
            values = chunk.to(work)
            # where(x > 0, x/E, −E) as max(x/E if > 0 else −inf, −E), without a select on a bool
            # mask (~20× slower on CPU). NaN stays NaN (and wins, as in max pooling); an x > 0 whose
            # x/E underflows to 0 races like the non-positive values (the window's draw is uniform
            # if it has no other positive value, as the original two-pass draw did)
            keys = torch.maximum(F.threshold(values.div(log_u).neg_(), 0.0, -math.inf), log_u)
            best = _output(keys, window, work)  # the keys' maxima, not needed
            torch.ops.aten.max_pool2d_with_indices.out(keys, k, s, p, [1, 1], False, out=best, indices=indices[span])
            torch.gather(chunk.flatten(1), 1, indices[span].flatten(1), out=out[span].flatten(1))

        _each_span(planes, draw, uniform)
        ctx.save_for_backward(x, indices)
        ctx.window = window  # type: ignore[attr-defined]
        return _shaped(x, out)

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        planes, grads = _as_planes(x), _as_planes(grad_out)
        work = _work_dtype(x.dtype)
        grad = torch.empty_like(planes)
        k, s, p = ctx.window._args()
        def route(span: slice) -> None:
            args = (grads[span].to(work), planes[span].to(work), k, s, p, [1, 1], False, indices[span])
            if grad.dtype == work:
                torch.ops.aten.max_pool2d_with_indices_backward.grad_input(*args, grad_input=grad[span])
            else:  # summed in float32, as the module computes halves
                grad[span] = torch.ops.aten.max_pool2d_with_indices_backward(*args)

        _each_span(planes, route)
        return grad.view(x.shape), None


# ------------------------------------------------------------------------------- min and mixed


class MinPool(torch.autograd.Function):
    """min over the window as −max(−x) on the native max-pool kernel, values bit for bit.

    Through autograd, −max(−x) keeps −x's max-pool indices and walks two negations of the gradient
    (an input-sized tensor each). Here the negated copy lives only during the forward, and the
    backward is the native max-pool backward with those indices: the two signs cancel, so the
    window's argmin gets g. Same memory as native max pooling.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, window: Window) -> Tensor:  # type: ignore[override]
        k, s, p = window._args()
        out, indices = torch.ops.aten.max_pool2d_with_indices(x.neg(), k, s, p)
        ctx.save_for_backward(x, indices)
        ctx.window = window  # type: ignore[attr-defined]
        return out.neg_()

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        x, indices = ctx.saved_tensors
        k, s, p = ctx.window._args()
        return torch.ops.aten.max_pool2d_with_indices_backward(grad_out, x, k, s, p, [1, 1], False, indices), None


class MixedPool(torch.autograd.Function):
    """y = a·max + (1−a)·mean per window (mean over the in-map positions), a a 0-dim tensor.

    ∂L/∂x = a·S^T g + (1−a)·P^T g, S^T the native max-pool backward (argmax scatter) and P^T the
    mean's transpose, added chunk by chunk into the same gradient; ∂L/∂a = Σ g·(max − mean), with
    max gathered at the saved indices and the mean recomputed (output-sized). Only the max-pool
    indices are saved: the peak memory is max pooling's, not two input-sized gradients summed.
    Forward and backward run chunk by chunk (see _each_span: no per-op barriers under contention),
    the same values bit for bit as whole-tensor calls (every op is per plane).
    float32/float64 (``poolbench.pooling.local.mixed_pool`` hands halves over as float32).
    """

    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, a: Tensor, window: Window) -> Tensor:  # type: ignore[override]
        x = x.contiguous()  # saved as the planes the backward reads
        planes = _as_planes(x)
        k, s, p = window._args()
        out = _output(planes, window, x.dtype)
        indices = _output(planes, window, torch.int64)

        def pool(span: slice) -> None:
            chunk, peak = planes[span], out[span]
            torch.ops.aten.max_pool2d_with_indices.out(chunk, k, s, p, [1, 1], False, out=peak, indices=indices[span])
            mean = window.mean(chunk)
            peak.sub_(mean).mul_(a).add_(mean)  # mean + a·(max − mean)

        _each_span(planes, pool)
        ctx.save_for_backward(x, a, indices)
        ctx.window = window  # type: ignore[attr-defined]
        return _shaped(x, out)

    @staticmethod
    @_first_order
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        x, a, indices = ctx.saved_tensors
        window: Window = ctx.window
        k, s, p = window._args()
        want_x, want_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        planes, grads = _as_planes(x), _as_planes(grad_out)
        grad = torch.empty_like(planes) if want_x else None
        spread = _output(planes, window, x.dtype) if want_a else None  # max − mean

        def gradient(span: slice) -> None:
            chunk, g = planes[span], grads[span]
            if spread is not None:
                torch.gather(chunk.flatten(1), 1, indices[span].flatten(1), out=spread[span].flatten(1))
                spread[span].sub_(window.mean(chunk))
            if grad is not None:
                into = grad[span]
                torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                    g, chunk, k, s, p, [1, 1], False, indices[span], grad_input=into
                )
                into.mul_(a).addcmul_(window.transpose(g, chunk, mean=True), 1 - a)

        _each_span(planes, gradient)
        grad_a = spread.mul_(grads).sum().reshape(a.shape) if spread is not None else None
        return (grad.view(x.shape) if grad is not None else None), grad_a, None
