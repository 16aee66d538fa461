"""Local sorted pooling on CPU without cutting the windows out: a selection network of elementwise max/min.

``topk`` on millions of 9-element rows is the cost of the straightforward formulation (plus the
k²/s²-fold copy :func:`~poolbench.pooling.local.unfold_windows` makes). Here the k largest values of
every window are found by a comparator network run on whole strided views at once, each comparator
one ``torch.maximum``/``torch.minimum`` over all windows of a chunk of planes:

1. Vertical: the K values of each column segment (rows i·s … i·s+K−1, every padded column) are sorted
   once; horizontally overlapping windows share these sorted columns.
2. Horizontal: the K sorted columns of each window (strided views of step 1's output) are merged into
   the window's k largest values, descending (Batcher's odd-even merge, pruned to the outputs used).

Gradients (:class:`_SortPoolFn`) need to know which position holds each rank. In float32 every
value carries its position in its own bits: it is widened to float64 (exact) and its *label*
(r mod K)·K + (c mod K) — distinct for the K×K positions of any window — is written into the low 8
mantissa bits, 2⁻⁴⁴ of the value and so far below float32's resolution that (a) the order of
distinct float32 values is kept, (b) equal values differ (ties are broken by label: every rank
gets its own position, a valid subgradient), and (c) rounding back to float32 restores the value
exactly. max/min then move the label along with its value for free. float64 inputs (gradcheck)
run the same network on (value, label) pairs with ``torch.where``. Forward saves one uint8 label
per rank and output; backward maps labels to flat positions with a small per-geometry table and
scatters w_j·grad_out there (``scatter_add_``); the logits' gradient is Σ grad_out·ω_j·(x_(j) − out).

Everything runs in chunks of planes so that temporaries stay small (memory) and in cache (speed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

from poolbench.pooling.chunked import CHUNK_MIN_CPU, Window, each_chunk, planes_per_chunk

# Windows up to this size take the network; larger ones (a 5×5 network has hundreds of comparators)
# keep unfold + topk. Labels must also fit in the 8 bits written into the mantissa.
MAX_KERNEL = 4
LABEL_BITS = 8
# Padded-map elements per chunk: at most 2¹⁹ (4 MiB of float64 keys, within L3), smaller than the
# window-sum pools' chunks because the temporaries are ~32 bytes per chunk element against native
# max's ~7 bytes per input element; the share of the whole and the floor are the common policy of
# chunked.planes_per_chunk (a chunk of 1/16 keeps the peak within 1.2× of native max).
CHUNK_ELEMENTS = 1 << 19

Wire = int  # index into a program's wire list
Op = tuple[str, Wire, Wire, Wire, Wire]  # ("cx" | "max" | "min", a, b, hi_out, lo_out); -1 = not needed


def _merge(a: list[object], b: list[object], keep: int, emit: object) -> list[object]:
    """Batcher's odd-even merge of two descending lists, only the first ``keep`` outputs.

    The evens' and the odds' merges differ by at most two "large" values (0-1 principle), so one
    rank of compare-exchanges (odd_i, even_{i+1}) finishes the merge for any two lengths.
    """
    a, b = a[:keep], b[:keep]
    if not a or not b:
        return (a or b)[:keep]
    if len(a) == 1 and len(b) == 1:
        return list(emit(a[0], b[0]))[:keep]  # type: ignore[operator]
    even = _merge(a[0::2], b[0::2], keep, emit)
    odd = _merge(a[1::2], b[1::2], keep, emit)
    out = [even[0]]
    for i, o in enumerate(odd):
        if i + 1 < len(even):
            out += list(emit(o, even[i + 1]))  # type: ignore[operator]
        else:
            out.append(o)
    out += even[len(odd) + 1 :]
    return out[:keep]


def _program(inputs: list[list[int]], keep: int) -> tuple[int, list[Op], list[Wire]]:
    """Merge descending input lists (of wire ids) into the ``keep`` largest, as a pruned comparator program.

    Returns (number of wires, ops, output wires). Only the comparator outputs an output depends on
    are computed; a comparator whose max (or min) nobody reads becomes a single min (or max).
    """
    nodes: list[tuple[int, int]] = []  # comparator -> its two input wires
    n_inputs = sum(len(lst) for lst in inputs)

    def emit(x: int, y: int) -> tuple[int, int]:
        nodes.append((x, y))
        c = len(nodes) - 1
        return n_inputs + 2 * c, n_inputs + 2 * c + 1  # wire ids of (max, min)

    merged: list[int] = []
    for lst in inputs:
        merged = _merge(merged, lst, keep, emit) if merged else lst[:keep]
    needed = set(merged)
    for c in range(len(nodes) - 1, -1, -1):
        if n_inputs + 2 * c in needed or n_inputs + 2 * c + 1 in needed:
            needed.update(nodes[c])
    ops: list[Op] = []
    for c, (x, y) in enumerate(nodes):
        hi, lo = n_inputs + 2 * c, n_inputs + 2 * c + 1
        hi, lo = (hi if hi in needed else -1), (lo if lo in needed else -1)
        if hi >= 0 or lo >= 0:
            ops.append(("cx" if hi >= 0 and lo >= 0 else "max" if hi >= 0 else "min", x, y, hi, lo))
    return n_inputs + 2 * len(nodes), ops, merged


@functools.lru_cache(maxsize=64)
def _programs(kernel_size: int, k: int) -> tuple[tuple[int, list[Op], list[Wire]], tuple[int, list[Op], list[Wire]]]:
    """(vertical, horizontal) programs: sort K rows keeping m = min(K, k); merge K sorted columns to top k."""
    m = min(kernel_size, k)
    vertical = _program([[a] for a in range(kernel_size)], m)
    horizontal = _program([[b * m + r for r in range(m)] for b in range(kernel_size)], k)
    return vertical, horizontal


def _run(program: tuple[int, list[Op], list[Wire]], inputs: list[object], cx: object) -> list[object]:
    """Execute a program; ``cx(a, b, want_hi, want_lo)`` returns (max or None, min or None)."""
    n_wires, ops, outputs = program
    wires: list[object] = list(inputs) + [None] * (n_wires - len(inputs))
    last_use = {}
    for t, (_, a, b, _, _) in enumerate(ops):
        last_use[a] = last_use[b] = t
    for w in outputs:
        last_use[w] = len(ops)
    for t, (_, a, b, hi, lo) in enumerate(ops):
        wires[hi], wires[lo] = cx(wires[a], wires[b], hi >= 0, lo >= 0)  # type: ignore[operator]
        for w in (a, b):  # free what no later op reads (memory: chunks stay small)
            if last_use[w] == t and w >= len(inputs):
                wires[w] = None
    return [wires[w] for w in outputs]


def _cx_values(a: Tensor, b: Tensor, want_hi: bool, want_lo: bool) -> tuple[Tensor | None, Tensor | None]:
    return (torch.maximum(a, b) if want_hi else None), (torch.minimum(a, b) if want_lo else None)


def _cx_pairs(
    a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor], want_hi: bool, want_lo: bool
) -> tuple[tuple[Tensor, Tensor] | None, tuple[Tensor, Tensor] | None]:
    # Ties go to a as the max, b as the min: each output keeps its own label.
    first = a[0] >= b[0]
    hi = (torch.where(first, a[0], b[0]), torch.where(first, a[1], b[1])) if want_hi else None
    lo = (torch.where(first, b[0], a[0]), torch.where(first, b[1], a[1])) if want_lo else None
    return hi, lo


class _Geometry:
    """Everything about one (H, W, K, s, p, k) that does not depend on the values."""

    def __init__(self, height: int, width: int, kernel_size: int, stride: int, padding: int, k: int) -> None:
        self.kernel_size, self.stride, self.padding, self.k = kernel_size, stride, padding, k
        self.out_h, self.out_w = Window(kernel_size, stride, padding).out_size(height, width)
        # The padded rows/columns any window reaches (floor mode drops the rest) and the map part of them.
        self.rows = stride * (self.out_h - 1) + kernel_size
        self.cols = stride * (self.out_w - 1) + kernel_size
        self.map_h = min(height, self.rows - padding)
        self.map_w = min(width, self.cols - padding)
        self.width = width
        r = torch.arange(self.rows)
        c = torch.arange(self.cols)
        self.labels = ((r % kernel_size)[:, None] * kernel_size + (c % kernel_size)[None, :]).to(torch.int64)
        # table[i, j, label] = flat H·W index of window (i, j)'s position with that label; 0 for padding
        # (its weight is 0, see valid_counts). base[i, j] = (i·W' + j)·K², so table.flatten()[base + label].
        window = torch.arange(kernel_size)
        rows = torch.arange(self.out_h)[:, None] * stride + window  # (H', K) padded rows of each window
        cols = torch.arange(self.out_w)[:, None] * stride + window
        table = torch.zeros(self.out_h, self.out_w, kernel_size * kernel_size, dtype=torch.int64)
        rr = rows[:, None, :, None].expand(self.out_h, self.out_w, kernel_size, kernel_size)
        cc = cols[None, :, None, :].expand(self.out_h, self.out_w, kernel_size, kernel_size)
        label = (rr % kernel_size) * kernel_size + cc % kernel_size
        inside = (rr >= padding) & (rr < padding + height) & (cc >= padding) & (cc < padding + width)
        flat = torch.where(inside, (rr - padding) * width + (cc - padding), 0)
        table.scatter_(2, label.flatten(2), flat.flatten(2))
        self.table = table.flatten()
        self.base = (torch.arange(self.out_h * self.out_w) * kernel_size * kernel_size).view(self.out_h, self.out_w)
        self.valid_counts = ((rows >= padding) & (rows < padding + height)).sum(1)[:, None] * (
            (cols >= padding) & (cols < padding + width)
        ).sum(1)[None, :]  # (H', W') in-map positions of each window
        self.renormalise = bool((self.valid_counts < k).any())

    def weights(self, logits: Tensor, dtype: torch.dtype) -> Tensor:
        """(k, 1, H', W') softmax weights per output position, renormalised over the in-map ranks."""
        rank_valid = torch.arange(self.k)[:, None, None] < self.valid_counts
        w = torch.softmax(logits.to(dtype), 0)[:, None, None].expand(self.k, self.out_h, self.out_w)
        w = w.masked_fill(~rank_valid.to(w.device), 0.0)
        return (w / w.sum(0, keepdim=True)).unsqueeze(1)


@functools.lru_cache(maxsize=32)
def geometry(height: int, width: int, kernel_size: int, stride: int, padding: int, k: int) -> _Geometry:
    return _Geometry(height, width, kernel_size, stride, padding, k)


def _each_chunk(planes: Tensor, g: _Geometry, body: Callable[[slice], None]) -> None:
    """``body(chunk)`` over chunks of the (B·C, ...) ``planes``; on several CPU threads as independent
    single-threaded tasks (:func:`~poolbench.pooling.chunked.each_chunk`: the selection network is
    dozens of small ops per chunk, each a parallel region that waits for a descheduled thread)."""
    count = planes.shape[0]
    each_chunk(planes, count, planes_per_chunk(count, g.rows * g.cols, CHUNK_ELEMENTS, CHUNK_MIN_CPU), body)


def _padded(x: Tensor, g: _Geometry, dtype: torch.dtype) -> Tensor:
    """(n, rows, cols) buffer: the map in ``dtype``, −inf where a window hangs over the border."""
    buf = x.new_full((x.shape[0], g.rows, g.cols), -math.inf, dtype=dtype)
    p = g.padding
    buf[:, p : p + g.map_h, p : p + g.map_w] = x[:, : g.map_h, : g.map_w]
    return buf


def _select(buf: object, g: _Geometry, cx: object, view: object) -> list[object]:
    """The k largest values (descending) of every window of a padded buffer, through both programs."""
    vertical, horizontal = _programs(g.kernel_size, g.k)
    s, K = g.stride, g.kernel_size
    row_span, col_span = s * (g.out_h - 1) + 1, s * (g.out_w - 1) + 1
    rows = [view(buf, (slice(None), slice(a, a + row_span, s), slice(None))) for a in range(K)]
    columns = _run(vertical, rows, cx)  # m sorted (n, H', cols) wires
    cells = [
        view(columns[r], (slice(None), slice(None), slice(b, b + col_span, s)))
        for b in range(K)
        for r in range(len(columns))
    ]
    return _run(horizontal, cells, cx)


def _tensor_view(t: Tensor, index: tuple[slice, ...]) -> Tensor:
    return t[index]


def _pair_view(t: tuple[Tensor, Tensor], index: tuple[slice, ...]) -> tuple[Tensor, Tensor]:
    return t[0][index], t[1][index]


def _weighted_sum(top: list[Tensor], g: _Geometry, w: Tensor, out: Tensor) -> None:
    """out = Σ_j ω_j·x_(j) (ω renormalised per window where needed); ``top`` in any float dtype."""
    if not g.renormalise:  # one weight per rank: Python scalars
        w_list = w.flatten(1)[:, 0].tolist()
        torch.mul(top[0], w_list[0], out=out)
        for t, wj in zip(top[1:], w_list[1:], strict=True):
            out.add_(t, alpha=wj)
        return
    out.zero_()
    for j, t in enumerate(top):  # −inf padding ranks have weight 0 (and must not make 0·inf = NaN)
        out.add_(torch.where(w[j] > 0, t, 0.0) * w[j])


def _forward_values(x: Tensor, g: _Geometry, logits: Tensor) -> Tensor:
    """No-gradient forward: the network on the values themselves (no labels needed)."""
    planes = x.flatten(0, 1)
    out = x.new_empty(planes.shape[0], g.out_h, g.out_w)
    w = g.weights(logits.detach(), x.dtype)

    def forward(chunk: slice) -> None:
        top = _select(_padded(planes[chunk], g, x.dtype), g, _cx_values, _tensor_view)
        _weighted_sum(top, g, w, out[chunk])  # type: ignore[arg-type]

    _each_chunk(planes, g, forward)
    return out.view(*x.shape[:2], g.out_h, g.out_w)


def _keys(x: Tensor, g: _Geometry) -> Tensor:
    """float32 → float64 keys with the position label in the low mantissa bits (module docstring)."""
    buf = _padded(x, g, torch.float64)
    p = g.padding
    inner = buf[:, p : p + g.map_h, p : p + g.map_w]
    inner.view(torch.int64).bitwise_or_(g.labels[p : p + g.map_h, p : p + g.map_w].to(x.device))
    return buf


def _forward_labels(x: Tensor, g: _Geometry, w: Tensor) -> tuple[Tensor, Tensor]:
    """Forward that also returns each rank's label, (B·C, k, H', W') uint8."""
    planes = x.flatten(0, 1)
    out = x.new_empty(planes.shape[0], g.out_h, g.out_w)
    # (B·C, k, H', W'): a chunk's labels of all ranks are one block for backward's single scatter
    labels = torch.empty(planes.shape[0], g.k, g.out_h, g.out_w, dtype=torch.uint8, device=x.device)

    def forward(chunk: slice) -> None:
        if x.dtype == torch.float32:
            keys = _select(_keys(planes[chunk], g), g, _cx_values, _tensor_view)
            top = [key.to(torch.float32) for key in keys]  # rounds the label bits away: the exact value
            for j, key in enumerate(keys):
                labels[chunk, j] = key.view(torch.int64) & ((1 << LABEL_BITS) - 1)
        else:
            pairs = (_padded(planes[chunk], g, x.dtype), g.labels.to(x.device).expand(chunk.stop - chunk.start, -1, -1))
            selected = _select(pairs, g, _cx_pairs, _pair_view)
            top = [value for value, _ in selected]  # type: ignore[misc]
            for j, (_, label) in enumerate(selected):  # type: ignore[misc]
                labels[chunk, j] = label
        _weighted_sum(top, g, w, out[chunk])

    _each_chunk(planes, g, forward)
    return out.view(*x.shape[:2], g.out_h, g.out_w), labels


class _SortPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: Tensor, logits: Tensor, g: _Geometry) -> Tensor:  # type: ignore[override]
        w = g.weights(logits, x.dtype)
        out, labels = _forward_labels(x, g, w)
        ctx.save_for_backward(x, labels, out, w)
        ctx.geometry = g  # type: ignore[attr-defined]
        ctx.logits_dtype = logits.dtype  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, labels, out, w = ctx.saved_tensors  # type: ignore[attr-defined]
        g: _Geometry = ctx.geometry  # type: ignore[attr-defined]
        planes = x.flatten(0, 1).flatten(1)
        grad_planes = grad_out.reshape(-1, g.out_h * g.out_w)
        out_planes = out.view(-1, g.out_h * g.out_w)
        want_x, want_logits = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        grad_x = torch.zeros_like(planes) if want_x else None
        table, base = g.table.to(x.device), g.base.to(x.device).flatten()
        w_flat = w.flatten(1)  # (k, H'·W'): ω_j per window, 0 for ranks a border window does not have
        # Σ over each plane's positions, then over the planes: the same sums whatever the chunks
        dots = torch.empty(planes.shape[0], g.k, dtype=x.dtype, device=x.device) if want_logits else None

        def backward(chunk: slice) -> None:
            n = chunk.stop - chunk.start
            # All k ranks at once (few large ops): label → flat H·W position of each rank in each window.
            index = table[labels[chunk].view(n, g.k, -1) + base].view(n, -1)
            src = grad_planes[chunk, None, :] * w_flat  # (n, k, H'·W') = ω_j·grad_out
            if grad_x is not None:
                grad_x[chunk].scatter_add_(1, index, src.view(n, -1))
            if dots is not None:
                # Σ grad·ω_j·(x_(j) − out): padding ranks have ω_j = 0 and a finite (dummy) x
                value = planes[chunk].gather(1, index).view_as(src)
                torch.sum(value.sub_(out_planes[chunk, None, :]).mul_(src), 2, out=dots[chunk])

        _each_chunk(planes, g, backward)
        grad_logits = dots.sum(0).to(ctx.logits_dtype) if dots is not None else None  # type: ignore[attr-defined]
        return (grad_x.view_as(x) if grad_x is not None else None), grad_logits, None


def supported(x: Tensor, kernel_size: int, k: int) -> bool:
    """Whether the selection network handles this input (else: unfold + topk)."""
    return (
        x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and 1 < kernel_size <= MAX_KERNEL and k > 1
    )


def sort_pool_network(x: Tensor, kernel_size: int, stride: int, padding: int, logits: Tensor) -> Tensor:
    """Σ_j softmax(w)_j·x_(j) over the k largest in-map values of each window (see ``local.sort_pool``)."""
    g = geometry(x.shape[-2], x.shape[-1], kernel_size, stride, padding, logits.numel())
    if torch.is_grad_enabled() and (x.requires_grad or logits.requires_grad):
        return _SortPoolFn.apply(x.contiguous(), logits, g)
    return _forward_values(x, g, logits)
