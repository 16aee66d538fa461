"""Global pools over the N = H·W positions of each channel: (B, C, H, W) -> (B, C) (catavgmax: 2C).

Each operator is a plain function of the tensor (the maths) plus a thin registered module. Where
half precision would overflow or lose accuracy (powers, exponentials, square roots, sums of
squares) the functions compute in float32 and the modules return the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poolbench.pooling.numerics import compute_dtype, nonnegative_power, safe_root
from poolbench.pooling.registry import GlobalPool, register


def _positions(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, N), in a dtype safe for exp/pow/sqrt."""
    return x.flatten(2).to(compute_dtype(x))


def _promoted(param: Tensor, x: Tensor) -> Tensor:
    """``param`` in the dtype the pools compute x in (at least float32, float64 for float64 x or params)."""
    return param.to(torch.promote_types(compute_dtype(x), param.dtype))


def _as_tensor(value: Tensor | float, like: Tensor) -> Tensor:
    return value.to(like) if isinstance(value, Tensor) else torch.tensor(value, dtype=like.dtype, device=like.device)


def _check_positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_open_unit(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# ---------------------------------------------------------------------------- the maths


def avg_pool(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3))


def max_pool(x: Tensor) -> Tensor:
    # adaptive_max_pool2d's backward scatters to one saved index per channel; amax's builds tie masks,
    # counts and a division (9.8 ms vs 5.5 ms at 32×2048×7×7). On ties the gradient goes to one position.
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def min_pool(x: Tensor) -> Tensor:
    return x.amin(dim=(2, 3))


def sum_pool(x: Tensor) -> Tensor:
    return x.sum(dim=(2, 3))


def _detached_scale(values: Tensor) -> Tensor:
    """max over positions, detached, 1 where it is 0: dividing by it keeps powers in [0, 1] (no overflow)."""
    scale = values.detach().amax(dim=-1, keepdim=True)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def lp_norm(x: Tensor, p: float) -> Tensor:
    """(Σ |x|^p)^(1/p): |x| keeps fractional p finite on negatives (PyTorch's LPPool2d gives NaN there).

    p = 2 is the native ``vector_norm`` (fastest there); other p are |x|^p summed and rooted, with a
    zero (not NaN) gradient where the norm is 0, so all-zero maps stay trainable (``vector_norm``
    with p = 3 was 3× slower than this forward). Where |x|^p overflows (large activations or large p)
    it is computed again as s·‖x/s‖_p with s = max |x| held constant: the norm is 1-homogeneous, so
    value and gradient are exact.
    """
    flat = _positions(x)

    def norm(values: Tensor) -> Tensor:
        if p == 2.0:
            return torch.linalg.vector_norm(values, dim=-1)
        return safe_root(nonnegative_power(values.abs(), p).sum(dim=-1), p)

    pooled = norm(flat)
    if bool(pooled.isfinite().all()) or not bool(flat.isfinite().all()):
        return pooled
    scale = _detached_scale(flat.abs())
    return scale.squeeze(-1) * norm(flat / scale)


def l2_pool(x: Tensor) -> Tensor:
    return lp_norm(x, 2.0)


def gem(x: Tensor, p: Tensor | float, eps: float) -> Tensor:
    """(mean max(x, eps)^p)^(1/p): the power average / GeM. Negative activations are clamped to eps.

    A fixed p stays a Python float: a 0-dim tensor exponent sends ``pow`` down a generic path (5.0 ms
    vs 0.59 ms for ``pow(3)`` at 32×2048×7×7). Where x^p would overflow, or eps^p underflow to 0 (an
    infinite gradient, p ≳ 6 in float32), it is computed as s·(mean (x/s)^p)^(1/p) with s = max x
    held constant: exact, and the mean is then >= 1/N.
    """
    flat = _positions(x).clamp(min=eps)
    p_value = float(p.detach()) if isinstance(p, Tensor) else float(p)
    if p_value * math.log(eps) > math.log(torch.finfo(flat.dtype).tiny):
        pooled = flat.pow(p).mean(dim=-1).pow(1.0 / p)
        if bool(pooled.isfinite().all()) or not bool(flat.isfinite().all()):
            return pooled
    scale = _detached_scale(flat)
    return scale.squeeze(-1) * (flat / scale).pow(p).mean(dim=-1).pow(1.0 / p)


class _LogMeanExp(torch.autograd.Function):
    """y = m + (log Σ e^z − log N)/r over the last axis, z = r(x − m), m = max x, with a hand-written backward.

    ∂y/∂x = softmax(r·x) = e^z/S (S = Σ e^z); ∂y/∂r = (Σ e^z·z/S − (log S − log N))/r²: both terms are
    O(spread of x), so nothing of size max(x)/r cancels (autograd through (logsumexp(r·x) − log N)/r
    gave a float32 error of 4e-4 in ∂L/∂r at 32×2048×7×7 post-ReLU + 5, this 1e-6). z's max is
    exactly 0 (the addcmul rounds r·x at the peak as it rounds r·m), so Σ e^z is logsumexp's own sum
    without its second max pass, and in [1, N]. The forward keeps e^z (the backward is one pass,
    e^z·g/S) and, when r needs a gradient, the output-sized Σ e^z·z: fwd+bwd reads the input 5 times
    where autograd through the plain formula reads it about 9 times.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, r: Tensor) -> Tensor:  # type: ignore[override]
        peak = flat.amax(dim=-1, keepdim=True)
        shifted = torch.addcmul(-r * peak, flat, r)
        weights = shifted.exp()
        mass = weights.sum(dim=-1, keepdim=True)
        total = mass.log()
        log_n = math.log(flat.shape[-1])
        spread = None  # Σ p·z − (log S − log N), ∂y/∂r·r²
        if ctx.needs_input_grad[1]:
            spread = (weights * shifted).sum(-1, keepdim=True).div_(mass).sub_(total - log_n)
        ctx.save_for_backward(weights, mass, spread, r)
        return (peak + (total - log_n) / r).squeeze(-1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        weights, mass, spread, r = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_r = (grad * spread).sum().reshape(r.shape) / (r * r) if spread is not None else None
        grad_x = weights * (grad / mass) if ctx.needs_input_grad[0] else None  # softmax(r·x)·g
        return grad_x, grad_r


def lse(x: Tensor, r: Tensor | float) -> Tensor:
    """(1/r) log mean exp(r·x) = m + (1/r) log mean exp(r(x − m)), m = max x.

    With gradients: :class:`_LogMeanExp` (precise ∂/∂r). Without (inference), logsumexp's own max
    shift suffices: the value's rounding, about ε·max x, is the same either way.
    """
    flat = _positions(x)
    r = _as_tensor(r, flat)
    if torch.is_grad_enabled() and (flat.requires_grad or r.requires_grad):
        return _LogMeanExp.apply(flat, r)
    return (torch.logsumexp(r * flat, dim=-1) - math.log(flat.shape[-1])) / r


def mixed(x: Tensor, a: Tensor | float) -> Tensor:
    return a * max_pool(x) + (1 - a) * avg_pool(x)


def avgmax(x: Tensor) -> Tensor:
    return 0.5 * (avg_pool(x) + max_pool(x))


def catavgmax(x: Tensor) -> Tensor:
    return torch.cat([avg_pool(x), max_pool(x)], dim=1)


def stochastic_sample(x: Tensor) -> Tensor:
    """x at one position per channel, drawn with p_i = x⁺_i / Σ x⁺ (uniform where no x_i is positive)
    from torch's global RNG.

    Inverse CDF with one uniform u per channel: the first position whose cumulative weight exceeds
    u·Σ, weights x⁺ (1 everywhere in a channel without a positive value). ``torch.multinomial``,
    an exponential drawn per position (argmax p/E), made fwd+bwd about 2× slower at 32×2048×7×7.
    """
    flat = x.flatten(2)
    cdf = flat.detach().to(compute_dtype(x)).clamp(min=0).cumsum_(-1)
    total = cdf[..., -1:]
    empty = total <= 0  # no positive value: cumulative weights 1, 2, ..., N (uniform)
    if bool(empty.any()):
        cdf = torch.where(empty, torch.arange(1, cdf.shape[-1] + 1, dtype=cdf.dtype, device=cdf.device), cdf)
        total = cdf[..., -1:]
    # u·Σ below Σ itself (u < 1 may round up to it), so the drawn position has a positive weight
    threshold = torch.minimum(
        torch.rand(total.shape, dtype=cdf.dtype, device=cdf.device) * total, total.nextafter(cdf.new_zeros(()))
    )
    return flat.gather(-1, (cdf <= threshold).sum(-1, keepdim=True)).squeeze(-1)


def stochastic_expectation(x: Tensor) -> Tensor:
    """Σ p_i·x_i = Σ x⁺·x / Σ x⁺: the expected value of stochastic_sample (Zeiler & Fergus's test-time
    rule); the mean where no x_i is positive. Two sums, no normalised probabilities (an input-sized
    division and two bool selects fewer); the selects only when some channel has no positive value."""
    flat = _positions(x)
    positive = flat.clamp(min=0)
    mass = positive.sum(dim=-1)
    weighted = (positive * flat).sum(dim=-1)
    has_mass = mass > 0
    if bool(has_mass.all()):
        return weighted / mass
    # Divide by 1 where the mass is 0 so the unused branch of `where` has a finite gradient.
    return torch.where(has_mass, weighted / torch.where(has_mass, mass, 1.0), flat.mean(dim=-1))


def sort_pool(x: Tensor, k: int, logits: Tensor) -> Tensor:
    """Σ_j softmax(logits)_j · (j-th largest x): the top k values, weighted; k = 1 is max pooling."""
    positions = x.shape[-2] * x.shape[-1]
    if k > positions:
        raise ValueError(
            f"sort pooling keeps the top k={k} values but the feature map has only "
            f"H·W = {x.shape[-2]}·{x.shape[-1]} = {positions} positions; "
            f"use k <= {positions} or a larger input"
        )
    flat = _positions(x)
    top = flat.topk(k, dim=-1, sorted=True).values
    return (top * logits.to(flat.dtype).softmax(dim=0)).sum(dim=-1)


def softpool(x: Tensor) -> Tensor:
    """Σ softmax(x)·x over positions; softmax subtracts the maximum, so large activations do not overflow."""
    flat = _positions(x)
    return (flat.softmax(dim=-1) * flat).sum(dim=-1)


# ---------------------------------------------------------------------------- the modules


@register("avg", kind="global", formula="mean_i x_i", reference="average pooling (Lin et al. 2014, NiN)")
class AvgPool(GlobalPool):
    """Global average pooling: y_c = (1/N) Σ_i x_ci. Lin, Chen & Yan, "Network in Network", ICLR 2014."""

    def forward(self, x: Tensor) -> Tensor:
        return avg_pool(x)


@register("max", kind="global", formula="max_i x_i", reference="max pooling (Boureau et al. 2010)")
class MaxPool(GlobalPool):
    """Global max pooling: y_c = max_i x_ci. Boureau, Ponce & LeCun, ICML 2010."""

    def forward(self, x: Tensor) -> Tensor:
        return max_pool(x)


@register("min", kind="global", formula="min_i x_i", reference="min pooling (mirror of max)")
class MinPool(GlobalPool):
    """Global min pooling: y_c = min_i x_ci (the mirror image of max pooling)."""

    def forward(self, x: Tensor) -> Tensor:
        return min_pool(x)


@register("sum", kind="global", formula="sum_i x_i", reference="sum pooling (Babenko & Lempitsky 2015, SPoC)")
class SumPool(GlobalPool):
    """Global sum pooling: y_c = Σ_i x_ci.

    Babenko & Lempitsky, "Aggregating local deep features for image retrieval" (SPoC), ICCV 2015.
    """

    def forward(self, x: Tensor) -> Tensor:
        return sum_pool(x)


@register("l2", kind="global", formula="sqrt(sum_i x_i^2)", reference="L2 pooling (Sermanet et al. 2012)")
class L2Pool(GlobalPool):
    """Global L2 pooling: y_c = sqrt(Σ_i x_ci²). Sermanet, Chintala & LeCun, ICPR 2012.

    The gradient at an all-zero channel is 0 (the subgradient), not NaN.
    """

    def forward(self, x: Tensor) -> Tensor:
        return l2_pool(x).to(x.dtype)


@register(
    "power",
    kind="global",
    formula="(mean_i max(x_i, eps)^p)^(1/p)",
    reference="power average = GeM with fixed p (Radenović et al., TPAMI 2018)",
)
class PowerPool(GlobalPool):
    """Power-average pooling: y_c = ((1/N) Σ_i max(x_ci, eps)^p)^(1/p); GeM (Radenović et al. 2018), p fixed.

    Meant for non-negative (post-ReLU) maps: negative activations are clamped to eps, as in GeM
    (cirtorch #73); use ``lpnorm`` for signed maps.
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        _check_positive("p", p)
        _check_positive("eps", eps)
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, self.p, self.eps).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


@register(
    "lpnorm", kind="global", formula="(sum_i |x_i|^p)^(1/p)", reference="Lp pooling (Sermanet et al. 2012)"
)
class LpNormPool(GlobalPool):
    """Lp-norm pooling: y_c = (Σ_i |x_ci|^p)^(1/p). Sermanet, Chintala & LeCun, ICPR 2012.

    Uses |x|, so negative inputs with fractional p give a finite value (pytorch #184037: LPPool2d gives NaN).
    """

    def __init__(self, p: float = 3.0) -> None:
        super().__init__()
        _check_positive("p", p)
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        return lp_norm(x, self.p).to(x.dtype)

    def extra_repr(self) -> str:
        return f"p={self.p}"


@register(
    "gem",
    kind="global",
    formula="(mean_i max(x_i, eps)^p)^(1/p), p learnable",
    reference="GeM (Radenović, Tolias & Chum, TPAMI 2018)",
    learnable=True,
    # learnable p needs a higher lr and no weight decay (cirtorch #61)
    lr_mult=10,
)
class GeM(GlobalPool):
    """Generalised-mean pooling: y_c = ((1/N) Σ_i max(x_ci, eps)^p)^(1/p) with a learnable p.

    Radenović, Tolias & Chum, "Fine-tuning CNN image retrieval with no human annotation", TPAMI 2018.
    p is log-parametrised (``log_p``; p = exp(log_p)) so it stays positive without a clamp that would
    stop its gradient. Negative activations are clamped to eps (needed for the log in dy/dp; cirtorch
    #73): use it on post-ReLU maps. Give ``log_p`` a higher lr and no weight decay (cirtorch #61).
    """

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        _check_positive("p", p)
        _check_positive("eps", eps)
        self.log_p = nn.Parameter(torch.tensor(math.log(p)))
        self.eps = float(eps)

    @property
    def p(self) -> Tensor:
        return self.log_p.exp()

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, _promoted(self.log_p, x).exp(), self.eps).to(x.dtype)

    def learned_values(self) -> dict[str, float]:
        return {"p": float(self.p.detach())}

    def extra_repr(self) -> str:
        return f"p={self.p.item():.4g} (learnable), eps={self.eps}"


@register(
    "lse",
    kind="global",
    formula="(1/r) log mean_i exp(r x_i), r learnable",
    reference="log-sum-exp pooling (Pinheiro & Collobert, CVPR 2015)",
    learnable=True,
    lr_mult=10,  # as the DGMP authors trained their LSE baseline
)
class LSEPool(GlobalPool):
    """Log-sum-exp pooling: y_c = (1/r) log((1/N) Σ_i exp(r·x_ci)), between avg (r → 0) and max (r → ∞).

    Pinheiro & Collobert, "From image-level to pixel-level labeling with CNNs", CVPR 2015. r is
    log-parametrised (``log_r``; r = exp(log_r)) to stay positive; computed with the max subtracted.
    """

    def __init__(self, r: float = 10.0) -> None:
        super().__init__()
        _check_positive("r", r)
        self.log_r = nn.Parameter(torch.tensor(math.log(r)))

    @property
    def r(self) -> Tensor:
        return self.log_r.exp()

    def forward(self, x: Tensor) -> Tensor:
        return lse(x, _promoted(self.log_r, x).exp()).to(x.dtype)

    def learned_values(self) -> dict[str, float]:
        return {"r": float(self.r.detach())}

    def extra_repr(self) -> str:
        return f"r={self.r.item():.4g} (learnable)"


@register(
    "mixed",
    kind="global",
    formula="a max_i x_i + (1-a) mean_i x_i, a = sigmoid(learnable logit)",
    reference="mixed pooling (Lee, Gallagher & Tu, AISTATS 2016)",
    learnable=True,
    lr_mult=10,  # as the DGMP authors trained their mixed baseline
)
class MixedPool(GlobalPool):
    """Mixed max-average pooling: y_c = a·max_i x_ci + (1 − a)·mean_i x_ci, a = sigmoid(logit) in (0, 1).

    Lee, Gallagher & Tu, "Generalizing pooling functions in CNNs: mixed, gated, and tree", AISTATS 2016.
    One learnable ``logit`` shared by all channels; ``a`` is its initial value (0.5 → logit 0).
    """

    def __init__(self, a: float = 0.5) -> None:
        super().__init__()
        _check_open_unit("a", a)
        self.logit = nn.Parameter(torch.tensor(math.log(a / (1 - a))))

    @property
    def a(self) -> Tensor:
        return self.logit.sigmoid()

    def forward(self, x: Tensor) -> Tensor:
        return mixed(x, _promoted(self.logit, x).sigmoid()).to(x.dtype)

    def learned_values(self) -> dict[str, float]:
        return {"a": float(self.a.detach())}

    def extra_repr(self) -> str:
        return f"a={self.a.item():.4g} (learnable)"


@register(
    "avgmax", kind="global", formula="(mean_i x_i + max_i x_i) / 2", reference="timm adaptive_avgmax_pool2d"
)
class AvgMaxPool(GlobalPool):
    """Average of global avg and max pooling: y_c = ½(mean_i x_ci + max_i x_ci) (timm's 'avgmax')."""

    def forward(self, x: Tensor) -> Tensor:
        return avgmax(x)


@register(
    "catavgmax",
    kind="global",
    formula="concat(mean_i x_i, max_i x_i)",
    reference="timm adaptive_catavgmax_pool2d",
    width="2C",
)
class CatAvgMaxPool(GlobalPool):
    """Global avg and max pooling concatenated: y = [mean_i x_i ; max_i x_i] ∈ R^{2C} (timm's 'catavgmax')."""

    def forward(self, x: Tensor) -> Tensor:
        return catavgmax(x)

    def out_features(self, channels: int) -> int:
        return 2 * channels


@register(
    "stochastic",
    kind="global",
    formula="train: x_j, j ~ x+/sum x+; eval: sum_i (x_i+/sum x+) x_i",
    reference="stochastic pooling (Zeiler & Fergus, ICLR 2013)",
)
class StochasticPool(GlobalPool):
    """Stochastic pooling (Zeiler & Fergus, "Stochastic pooling for regularization of deep CNNs", ICLR 2013).

    p_i = x⁺_i / Σ_j x⁺_j with x⁺ = max(x, 0) (uniform when no x_i > 0). Training: y_c = x_cj with
    j ~ p, one draw per channel from torch's global RNG (``torch.manual_seed`` makes it reproducible);
    the gradient goes to the drawn position. Eval: y_c = Σ_i p_i·x_ci, the expectation of the draw.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return stochastic_sample(x)
        return stochastic_expectation(x).to(x.dtype)


@register(
    "sort",
    kind="global",
    formula="sum_{j<=k} softmax(w)_j x_(j), x_(1) >= x_(2) >= ...",
    reference="sorted pooling (Singla et al.)",
    learnable=True,
    lr_mult=10,  # like the other learnable pooling weights
)
class SortPool(GlobalPool):
    """Sorted pooling: y_c = Σ_{j=1..k} softmax(w)_j · x_c,(j), the k largest values in descending order.

    Singla et al., sorted/ordinal pooling. The k weights w are learnable and shared by all channels;
    k = 1 is max pooling. Initial logits are w_j = −2(j − 1), i.e. weights ∝ e^{−2(j−1)}
    (0.865, 0.117, 0.016, 0.002 for k = 4): close to max pooling, yet the softmax is not saturated,
    so the weights can still learn. The map needs at least k positions (ValueError otherwise).
    """

    def __init__(self, k: int = 4) -> None:
        super().__init__()
        _check_count("k", k)
        self.k = k
        self.logits = nn.Parameter(-2.0 * torch.arange(k, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return sort_pool(x, self.k, self.logits).to(x.dtype)

    def extra_repr(self) -> str:
        return f"k={self.k}"


@register(
    "softpool",
    kind="global",
    formula="sum_i softmax(x)_i x_i",
    reference="SoftPool (Stergiou, Poppe & Kalliatakis, ICCV 2021)",
)
class SoftPool(GlobalPool):
    """SoftPool: y_c = Σ_i softmax(x_c)_i · x_ci = Σ_i e^{x_ci} x_ci / Σ_j e^{x_cj}.

    Stergiou, Poppe & Kalliatakis, "Refining activation downsampling with SoftPool", ICCV 2021. The
    softmax subtracts the channel maximum and normalises over positions, avoiding the overflow and
    wrong-axis bugs of the reference kernels (SoftPool #4, #61).
    """

    def forward(self, x: Tensor) -> Tensor:
        return softpool(x).to(x.dtype)
