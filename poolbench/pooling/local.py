"""Local (downsampling) pools: (B, C, H, W) -> (B, C, H', W'), one value per k×k window.

The maths lives in plain functions built on PyTorch's native pooling kernels (``F.max_pool2d``,
``F.avg_pool2d`` as a mean or, with ``divisor_override=1``, as a window sum); the modules only hold
hyper-parameters and learnable weights. min, mixed and the operators over x^p or e^x (power,
lpnorm, l2, softpool, stochastic) run as autograd Functions in :mod:`poolbench.pooling.chunked`
(forward chunk by chunk without a graph, analytic backward on the native kernels' backward ops:
no input-sized temporaries); ``sort`` ranks with a selection network of max/min in :mod:`poolbench.pooling.sort_select`.
Only what those cannot express (larger sort windows, CUDA sort, SoftPool on extreme value spreads)
cuts the windows out with :func:`unfold_windows`. Output size is ``nn.MaxPool2d``'s floor formula
H' = (H + 2·padding − k) // stride + 1 for every operator except ``fractional``.

Padding has one meaning everywhere: a window may hang ``padding`` pixels over the border and the
positions outside the map are *not part of the window* (max ignores them like ``nn.MaxPool2d``'s −inf,
avg/power divide by the in-map count like ``count_include_pad=False``, sum/l2/lpnorm add nothing,
softpool/stochastic/sort give them no weight). ``padding <= kernel_size // 2`` (checked by
:class:`LocalPool`) guarantees every window holds at least one in-map position.

Half-precision inputs are computed in float32 (x², x^p, Σx and exp overflow in fp16) and the result is
cast back to the input dtype; max and min are exact in every dtype and stay native.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poolbench.pooling import sort_select
from poolbench.pooling.chunked import MinPool, MixedPool, PowerMean, SoftPool, StochasticDraw, StochasticMean, Window
from poolbench.pooling.numerics import nonnegative_power, safe_root  # noqa: F401 - also imported from here
from poolbench.pooling.registry import LocalPool, register

_HALF = (torch.float16, torch.bfloat16)
Fn = TypeVar("Fn", bound=Callable[..., Tensor])


def _float32_for_half(fn: Fn) -> Fn:
    """Run ``fn`` on a float32 copy of a half-precision input; return the input's dtype."""

    @functools.wraps(fn)
    def wrapper(x: Tensor, *args: object, **kwargs: object) -> Tensor:
        return fn(x.float() if x.dtype in _HALF else x, *args, **kwargs).to(x.dtype)

    return wrapper  # type: ignore[return-value]


def _check_fits(x: Tensor, kernel_size: int, padding: int) -> None:
    height, width = x.shape[-2:]
    if min(height, width) + 2 * padding < kernel_size:
        raise ValueError(
            f"feature map {height}x{width} with padding {padding} is smaller than the "
            f"{kernel_size}x{kernel_size} pooling window"
        )


def _window(x: Tensor, kernel_size: int, stride: int, padding: int) -> Window:
    _check_fits(x, kernel_size, padding)
    return Window(kernel_size, stride, padding)


def unfold_windows(
    x: Tensor, kernel_size: int, stride: int, padding: int = 0, fill: float = 0.0
) -> tuple[Tensor, Tensor | None]:
    """Cut (B, C, H, W) into windows (B, C, H', W', k²): a copy of k²/stride² times the input's size.

    Only for what no window-sum or max kernel can express (ranking). Out-of-map positions hold
    ``fill``. Returns the windows and a boolean in-map mask of shape (1, 1, H', W', k²), or ``None``
    when there is no padding (every position is in the map).
    """
    _check_fits(x, kernel_size, padding)
    height, width = x.shape[-2:]

    def cut(t: Tensor, value: float) -> Tensor:
        if padding:
            t = F.pad(t, (padding,) * 4, value=value)
        return t.unfold(2, kernel_size, stride).unfold(3, kernel_size, stride).flatten(-2)

    valid = cut(x.new_ones((1, 1, height, width)), 0.0) > 0 if padding else None
    return cut(x, fill), valid


def window_sum(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """Σ x over the in-map positions of each window, on the native average-pool kernel.

    avg_pool2d pads with zeros, which add nothing to a sum, and ``divisor_override=1`` skips the
    division: the same window grid (and floor-mode size) as ``nn.MaxPool2d``.
    """
    _check_fits(x, kernel_size, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=True, divisor_override=1)


def max_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """max over the window (``F.max_pool2d``: padding is −inf, exact in every dtype)."""
    _check_fits(x, kernel_size, padding)
    return F.max_pool2d(x, kernel_size, stride, padding)


def min_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """min over the window: −max(−x), exact (:class:`~poolbench.pooling.chunked.MinPool`: native
    max-pool kernels forward and backward, max pooling's memory)."""
    return MinPool.apply(x, _window(x, kernel_size, stride, padding))


@_float32_for_half
def sum_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """Σ x over the window."""
    return window_sum(x, kernel_size, stride, padding)


@_float32_for_half
def avg_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """mean over the in-map positions of the window (``count_include_pad=False``)."""
    _check_fits(x, kernel_size, padding)
    return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)


# The power means, SoftPool and stochastic pooling below run as autograd Functions of
# poolbench.pooling.chunked: forward over chunks of planes without a graph, analytic backward on the
# native window-sum transposes. Formulated with autograd (x^p, e^x, ... kept for the backward) they
# took about three times native max pooling's memory and time. They compute half-precision inputs in
# float32 themselves, chunk by chunk.


def lpnorm_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0, p: float = 3.0) -> Tensor:
    """(Σ |x|^p)^(1/p) over the window; unlike ``nn.LPPool2d`` it takes |x| (no NaN for x < 0).

    a^p overflows for large activations or large p (1e4³ is fine in float32, 1e4¹⁰ is not): then
    each channel where it did (and whose input is finite) is divided by its max m, exact since
    m·(Σ (a/m)^p)^(1/p) equals the result for any constant m > 0; the common case costs no extra
    pass over the input. What still rounds to 0 is a
    window whose values are all below the dtype's smallest normal number to the power 1/p (2e-13 for
    p = 3 in float32; with the rescaling: that far below its channel's max), as in nn.LPPool2d.
    """
    return PowerMean.apply(x, _window(x, kernel_size, stride, padding), float(p), None)


def l2_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """sqrt(Σ x²) over the window."""
    return lpnorm_pool(x, kernel_size, stride, padding, p=2.0)


def power_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """(mean max(x, eps)^p)^(1/p) over the in-map positions of the window (power average).

    Overflow of max(x, eps)^p is rescaled as in :func:`lpnorm_pool`; so is eps^p underflowing to 0
    for large p (an infinite slope of the root), which takes the rescaled path directly. The
    gradient is 0 where x < eps (the clamp's).
    """
    return PowerMean.apply(x, _window(x, kernel_size, stride, padding), float(p), float(eps))


def stochastic_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0, *, sample: bool = False) -> Tensor:
    """Stochastic pooling (Zeiler & Fergus 2013), probabilities π = max(x, 0)/Σ max(x, 0).

    ``sample=True`` (training) returns the value x_i at one position drawn with probability π_i from
    the global torch RNG; otherwise (inference) the expectation Σ π_i·x_i = Σ x⁺·x / Σ x⁺ (two
    window sums), which is exactly the mean of the training-time output; the in-map mean (uniform
    draw) where no value is positive.

    The draw is an exponential race on the native max-pool kernel: with one E_i = −log U_i ~ Exp(1)
    per position, argmax_i x⁺_i / E_i picks i with probability π_i (the window's Σ x⁺ cancels), and
    argmax_i U_i is uniform; one race does both, on the keys x_i/E_i where x_i > 0 and −E_i elsewhere
    (a positive value always wins over the others). Each window's draw has exactly these
    probabilities; overlapping windows share their positions' E_i, so their draws are not
    independent of each other.
    """
    window = _window(x, kernel_size, stride, padding)
    return (StochasticDraw if sample else StochasticMean).apply(x, window)


def _softpool_windows(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """SoftPool on copied windows, each with its own max subtracted: exact for any spread of values."""
    windows, valid = unfold_windows(x, kernel_size, stride, padding)
    weights = torch.softmax(windows if valid is None else windows.masked_fill(~valid, -math.inf), dim=-1)
    return (weights * windows).sum(-1)


def softpool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    """Σ softmax(x)_i·x_i over the window (Stergiou et al. 2021) = Σ e^(x−m)·x / Σ e^(x−m).

    Two window sums on the native kernel with m the per-channel max (any constant per window
    cancels; padding adds 0 to both sums). Where a window's values lie so far below its channel's
    max that its denominator leaves the dtype's full-precision range (a spread of about 69 in
    float32), that channel's windows are cut out and each gets its own max (exact, k²/s² times
    the memory of those channels).
    """
    window = _window(x, kernel_size, stride, padding)

    def per_window_shift(planes: Tensor) -> Tensor:  # (N, H, W) chunks of planes
        return _softpool_windows(planes.unsqueeze(1), kernel_size, stride, padding).squeeze(1)

    return SoftPool.apply(x, window, per_window_shift)


def sort_pool_topk(x: Tensor, kernel_size: int, stride: int, padding: int, logits: Tensor) -> Tensor:
    """:func:`sort_pool` on cut-out windows and ``topk``: the straightforward formulation (k²/s² times the
    input's memory, topk on millions of short rows). Used where the selection network is not (CUDA,
    windows larger than 4×4) and as the tests' reference."""
    k = logits.numel()
    windows, valid = unfold_windows(x, kernel_size, stride, padding, -math.inf)
    top = windows.topk(k, dim=-1).values
    weights = torch.softmax(logits.to(top.dtype), dim=0).expand_as(top)
    if valid is not None:
        ranked_valid = torch.arange(k, device=x.device) < valid.sum(-1, keepdim=True)
        weights = weights.masked_fill(~ranked_valid, 0.0)
        weights = weights / weights.sum(-1, keepdim=True)
        top = top.masked_fill(~ranked_valid, 0.0)
    return (weights * top).sum(-1)


@_float32_for_half
def sort_pool(x: Tensor, kernel_size: int, stride: int, padding: int, logits: Tensor) -> Tensor:
    """Σ_j softmax(w)_j·x_(j) over the k = len(w) largest window values, x_(1) >= x_(2) >= ...
    (sorted pooling, Singla et al.).

    Where a border window has fewer than k in-map values, the softmax is renormalised over those.
    k = 1 is max pooling, computed on the native kernel. On CPU, windows up to 4×4 are ranked by a
    selection network of elementwise max/min over strided views with a hand-written backward
    (:mod:`poolbench.pooling.sort_select`: no window copies, chunked); otherwise, or where that
    meets a non-finite input, the windows are cut out and ranked by ``topk`` (:func:`sort_pool_topk`).
    """
    k = logits.numel()
    if k == 1:  # the single weight is exactly 1; multiplying keeps the logit in the graph (gradient 0)
        return max_pool(x, kernel_size, stride, padding) * torch.softmax(logits.to(x.dtype), dim=0)
    _check_fits(x, kernel_size, padding)
    if sort_select.supported(x, kernel_size, k):
        out = sort_select.sort_pool_network(x, kernel_size, stride, padding, logits)
        # ±inf inputs turn into NaN keys (label bits in an infinity); NaN inputs fall back alike.
        if not bool(out.isnan().any()):
            return out
    return sort_pool_topk(x, kernel_size, stride, padding, logits)


@_float32_for_half
def fractional_max_pool(
    x: Tensor, kernel_size: int, padding: int, output_ratio: float, samples: Tensor | None
) -> Tensor:
    """Fractional max pooling (Graham 2014): k×k max over pseudo-random window positions.

    Output size H' = min(max(1, floor(output_ratio·H)), H + 2·padding − k + 1). ``samples`` (B, C, 2)
    in [0, 1) fix the window positions; ``None`` draws them from the global torch RNG.
    """
    height, width = x.shape[-2:]
    if padding:
        x = F.pad(x, (padding,) * 4, value=-math.inf)
    if min(x.shape[-2:]) < kernel_size:
        raise ValueError(
            f"feature map {height}x{width} with padding {padding} is smaller than the "
            f"{kernel_size}x{kernel_size} pooling window"
        )
    size = tuple(min(max(1, math.floor(output_ratio * n)), n + 2 * padding - kernel_size + 1) for n in (height, width))
    if samples is not None:
        samples = samples.to(x.dtype).expand(x.shape[0], x.shape[1], 2)
    return F.fractional_max_pool2d(x, kernel_size, output_size=size, _random_samples=samples)


def mixed_pool(x: Tensor, kernel_size: int, stride: int, padding: int = 0, a: Tensor | float = 0.5) -> Tensor:
    """a·max + (1−a)·mean over the window (mixed pooling, Lee, Gallagher & Tu, AISTATS 2016); ``a``
    a float or a 0-dim tensor (gradients flow to it). Runs as
    :class:`~poolbench.pooling.chunked.MixedPool` (max pooling's memory). Half precision runs it on a
    float32 copy and rounds value and gradient once each, to within half a unit in the last place:
    a·max, the mean, (1−a)·mean and their sum rounded in half precision would stack four such errors."""
    work = x.float() if x.dtype in _HALF else x
    a = a.to(device=x.device, dtype=work.dtype) if isinstance(a, Tensor) else work.new_tensor(a)
    return MixedPool.apply(work, a, _window(work, kernel_size, stride, padding)).to(x.dtype)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _open_unit(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


@register("max", kind="local", formula="max over the k×k window", reference="max pooling (nn.MaxPool2d)")
class MaxLocal(LocalPool):
    """max over each k×k window; padding positions are ignored (−inf)."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool(x, self.kernel_size, self.stride, self.padding)


@register(
    "avg",
    kind="local",
    formula="mean over the window",
    reference="average pooling (nn.AvgPool2d, count_include_pad=False)",
)
class AvgLocal(LocalPool):
    """mean over each k×k window; padding positions are not counted."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool(x, self.kernel_size, self.stride, self.padding)


@register("min", kind="local", formula="min over the window", reference="min pooling (mirror of max)")
class MinLocal(LocalPool):
    """min over each k×k window; padding positions are ignored (+inf)."""

    def forward(self, x: Tensor) -> Tensor:
        return min_pool(x, self.kernel_size, self.stride, self.padding)


@register("sum", kind="local", formula="Σ x over the window", reference="sum pooling (k²·avg where no padding)")
class SumLocal(LocalPool):
    """Σ x over each k×k window; padding adds nothing."""

    def forward(self, x: Tensor) -> Tensor:
        return sum_pool(x, self.kernel_size, self.stride, self.padding)


@register("l2", kind="local", formula="sqrt(Σ x²)", reference="L2 pooling (Sermanet et al. 2012)")
class L2Local(LocalPool):
    """sqrt(Σ x²) over each k×k window (L2 pooling, Sermanet et al. 2012)."""

    def forward(self, x: Tensor) -> Tensor:
        return l2_pool(x, self.kernel_size, self.stride, self.padding)


@register(
    "power",
    kind="local",
    formula="(mean max(x, eps)^p)^(1/p)",
    reference="power average, GeM with fixed p (Radenović et al. 2018)",
)
class PowerLocal(LocalPool):
    """(mean max(x, eps)^p)^(1/p) over each k×k window; power average, GeM with a fixed p
    (Radenović, Tolias & Chum, TPAMI 2018). Negative activations are clamped to eps."""

    def __init__(
        self,
        kernel_size: int = 2,
        stride: int | None = None,
        padding: int = 0,
        p: float = 3.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(kernel_size, stride, padding)
        self.p = _positive("p", p)
        self.eps = _positive("eps", eps)

    def forward(self, x: Tensor) -> Tensor:
        return power_pool(x, self.kernel_size, self.stride, self.padding, self.p, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}, eps={self.eps}"


@register("lpnorm", kind="local", formula="(Σ |x|^p)^(1/p)", reference="Lp pooling on |x| (Bruna et al. 2014)")
class LpNormLocal(LocalPool):
    """(Σ |x|^p)^(1/p) over each k×k window (Lp pooling, Bruna, Szlam & LeCun, ICML 2014).

    Takes |x|, so negative inputs give no NaN (``nn.LPPool2d`` computes x^p: pytorch #184037)."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0, p: float = 3.0) -> None:
        super().__init__(kernel_size, stride, padding)
        self.p = _positive("p", p)

    def forward(self, x: Tensor) -> Tensor:
        return lpnorm_pool(x, self.kernel_size, self.stride, self.padding, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


@register(
    "stochastic",
    kind="local",
    formula="train: x_i, i ~ max(x,0)/Σmax(x,0); eval: Σ π_i x_i",
    reference="stochastic pooling (Zeiler & Fergus, ICLR 2013)",
)
class StochasticLocal(LocalPool):
    """Stochastic pooling (Zeiler & Fergus, ICLR 2013). Training samples one position per window with
    probability π_i = max(x_i, 0)/Σ max(x, 0) (uniform when all x <= 0) from the global torch RNG;
    eval returns the expectation Σ π_i·x_i."""

    def forward(self, x: Tensor) -> Tensor:
        return stochastic_pool(x, self.kernel_size, self.stride, self.padding, sample=self.training)


@register(
    "fractional",
    kind="local",
    formula="k×k max at pseudo-random steps, H' = floor(output_ratio·H)",
    reference="fractional max pooling (Graham 2014, arXiv 1412.6071)",
)
class FractionalLocal(LocalPool):
    """Fractional max pooling (Graham 2014), wrapping ``F.fractional_max_pool2d``.

    Output H' = floor(output_ratio·H) (at least 1, at most what k×k windows allow); ``stride`` is not
    used. Training draws the pseudo-random window offsets from the global torch RNG; eval is
    deterministic: every image and channel uses the fixed offset sample 0.5 (windows spread evenly).
    """

    def __init__(
        self,
        kernel_size: int = 2,
        stride: int | None = None,
        padding: int = 0,
        output_ratio: float = 1 / math.sqrt(2),
    ) -> None:
        super().__init__(kernel_size, stride, padding)
        self.output_ratio = _open_unit("output_ratio", output_ratio)

    def forward(self, x: Tensor) -> Tensor:
        samples = None if self.training else x.new_full((1, 1, 2), 0.5, dtype=torch.float32)
        return fractional_max_pool(x, self.kernel_size, self.padding, self.output_ratio, samples)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, padding={self.padding}, output_ratio={self.output_ratio:.4f}"


@register(
    "sort",
    kind="local",
    formula="Σ_j softmax(w)_j · x_(j), top k of the window sorted descending",
    reference="sorted pooling (Singla et al.)",
    learnable=True,
    lr_mult=10,
)
class SortLocal(LocalPool):
    """Sorted pooling: the k largest values of each window, descending, weighted by softmax of k
    learnable logits shared by all channels; k=1 is max pooling (Singla et al.). As in the global
    ``sort``, the logits start at −2(j − 1) (weights 0.865, 0.117, 0.016, 0.002 for k=4): close to
    the max pooling it usually replaces, with a softmax that is not saturated."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0, k: int = 4) -> None:
        super().__init__(kernel_size, stride, padding)
        window = kernel_size * kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= window:
            raise ValueError(f"k must be an integer in [1, {window}] (the window size), got {k!r}")
        self.logits = nn.Parameter(-2.0 * torch.arange(k, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return sort_pool(x, self.kernel_size, self.stride, self.padding, self.logits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.logits.numel()}"


@register(
    "softpool",
    kind="local",
    formula="Σ softmax(x)_i · x_i",
    reference="SoftPool (Stergiou, Poppe & Kalliatakis, ICCV 2021)",
)
class SoftPoolLocal(LocalPool):
    """SoftPool (Stergiou, Poppe & Kalliatakis, ICCV 2021): Σ softmax(x)_i·x_i per window, with the
    max subtracted inside the softmax (the authors' kernels overflow: SoftPool #4, #61)."""

    def forward(self, x: Tensor) -> Tensor:
        return softpool(x, self.kernel_size, self.stride, self.padding)


@register(
    "mixed",
    kind="local",
    formula="a·max + (1−a)·avg, a = sigmoid(learnable logit)",
    reference="mixed pooling (Lee, Gallagher & Tu, AISTATS 2016)",
    learnable=True,
    lr_mult=10,
)
class MixedLocal(LocalPool):
    """Mixed max-average pooling (Lee, Gallagher & Tu, AISTATS 2016): a·max + (1−a)·avg per window,
    a = sigmoid(logit) with one learnable logit, initialised so that a = ``a``."""

    def __init__(self, kernel_size: int = 2, stride: int | None = None, padding: int = 0, a: float = 0.5) -> None:
        super().__init__(kernel_size, stride, padding)
        a = _open_unit("a", a)
        self.logit = nn.Parameter(torch.tensor(math.log(a / (1 - a))))

    def forward(self, x: Tensor) -> Tensor:
        return mixed_pool(x, self.kernel_size, self.stride, self.padding, torch.sigmoid(self.logit))

    def learned_values(self) -> dict[str, float]:
        return {"a": float(torch.sigmoid(self.logit.detach()))}
