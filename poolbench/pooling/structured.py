"""Global pools that keep spatial or second-order structure: SPP, bilinear, NetVLAD (width != C)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedParameter

from poolbench.pooling.numerics import compute_dtype
from poolbench.pooling.registry import GlobalPool, register

SPP_MODES = ("max", "avg")
# sign(g)·(sqrt(|g| + ε) − sqrt(ε)): continuous, odd, and its slope is at most 1/(2·sqrt(ε)) = 5000
# instead of infinite at g = 0; it differs from sign(g)·sqrt(|g|) by at most sqrt(ε) = 1e-4.
SIGNED_SQRT_EPS = 1e-8
# NetVLAD's assignment starts as softmax_k(−α‖x − c_k‖²), i.e. conv weight 2α·c_k, bias −α‖c_k‖².
NETVLAD_ALPHA = 1.0


# ---------------------------------------------------------------------------- the maths


def spatial_pyramid(x: Tensor, levels: Sequence[int], mode: str = "max") -> Tensor:
    """For each level l, max (or avg) over an l×l grid of bins, flattened (C, l, l) and concatenated.

    Bins follow adaptive pooling: rows floor(i·H/l) to ceil((i+1)·H/l), likewise columns.
    """
    height, width = x.shape[-2:]
    largest = max(levels)
    if height < largest or width < largest:
        raise ValueError(
            f"spp level {largest} needs a feature map of at least {largest}×{largest}, got {height}×{width}; "
            f"use smaller levels or a larger input"
        )
    pool = F.adaptive_max_pool2d if mode == "max" else F.adaptive_avg_pool2d
    return torch.cat([pool(x, level).flatten(1) for level in levels], dim=1)


class _SignedSqrt(torch.autograd.Function):
    """sign(g)·(sqrt(|g| + ε) − sqrt(ε)) = g / (sqrt(|g| + ε) + sqrt(ε)), slope 1 / (2·sqrt(|g| + ε)).

    The quotient form has no cancellation near 0 and needs no sign; the forward builds the
    denominator in place in one buffer (two full-size allocations, not six: the Gram's upper
    triangle is B·C(C+1)/2 values, 270 MB at B = 32, C = 2048) and saves it for the backward.
    """

    @staticmethod
    def forward(ctx, g: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        root_eps = eps**0.5
        denominator = g.abs().add_(eps).sqrt_().add_(root_eps)
        ctx.root_eps = root_eps
        ctx.save_for_backward(denominator)
        return g / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (denominator,) = ctx.saved_tensors
        return grad / (denominator - ctx.root_eps).mul_(2.0), None


def signed_sqrt(g: Tensor, eps: float = SIGNED_SQRT_EPS) -> Tensor:
    """sign(g)·(sqrt(|g| + ε) − sqrt(ε)), computed as g / (sqrt(|g| + ε) + sqrt(ε))."""
    return _SignedSqrt.apply(g, eps)


def bilinear_pool(x: Tensor) -> Tensor:
    """Upper triangle (row-major, diagonal included) of signed_sqrt((1/N) ΦΦᵀ), then L2-normalised."""
    flat = x.flatten(2).to(compute_dtype(x))
    channels, positions = flat.shape[1:]
    gram = flat @ flat.transpose(1, 2) / positions
    rows, cols = torch.triu_indices(channels, channels, device=x.device)
    return F.normalize(signed_sqrt(gram[:, rows, cols]), dim=1)


def netvlad(
    x: Tensor, centroids: Tensor, assign_weight: Tensor, assign_bias: Tensor, normalize_input: bool = True
) -> Tensor:
    """V_k = Σ_i a_k(x_i)(x_i − c_k), a = softmax_k(W x_i + b); each V_k L2-normalised, then all of V.

    Returns (B, K·C), cluster-major: [V_1 ; V_2 ; ...].
    """
    dtype = torch.promote_types(compute_dtype(x), centroids.dtype)
    flat = x.flatten(2).to(dtype)  # (B, C, N)
    if normalize_input:
        flat = F.normalize(flat, dim=1)
    logits = torch.einsum("kc,bcn->bkn", assign_weight.to(dtype), flat) + assign_bias.to(dtype)[:, None]
    assign = logits.softmax(dim=1)  # (B, K, N)
    residuals = torch.einsum("bkn,bcn->bkc", assign, flat) - assign.sum(-1, keepdim=True) * centroids.to(dtype)
    return F.normalize(F.normalize(residuals, dim=2).flatten(1), dim=1)


# ---------------------------------------------------------------------------- the modules


@register(
    "spp",
    kind="global",
    formula="concat_l max (or avg) over an l×l grid, l in levels",
    reference="SPP (He, Zhang, Ren & Sun, ECCV 2014)",
    width="C·Σl²",
)
class SpatialPyramidPool(GlobalPool):
    """Spatial pyramid pooling: for each level l, max (or avg) over each cell of an l×l grid.

    He, Zhang, Ren & Sun, "Spatial pyramid pooling in deep convolutional networks", ECCV 2014.
    Output: level-major, then channel, then grid row and column; width C·Σ l². The map must be at
    least max(levels) on each side (ValueError otherwise).
    """

    def __init__(self, levels: Sequence[int] = (1, 2, 4), mode: str = "max") -> None:
        super().__init__()
        if isinstance(levels, str) or not isinstance(levels, Sequence) or not levels:
            raise ValueError(f"levels must be a non-empty list of integers >= 1, got {levels!r}")
        if any(isinstance(level, bool) or not isinstance(level, int) or level < 1 for level in levels):
            raise ValueError(f"levels must be integers >= 1, got {list(levels)!r}")
        if mode not in SPP_MODES:
            raise ValueError(f"unknown spp mode '{mode}'. Valid choices: {', '.join(SPP_MODES)}")
        self.levels = tuple(int(level) for level in levels)
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        return spatial_pyramid(x, self.levels, self.mode)

    def out_features(self, channels: int) -> int:
        return channels * sum(level * level for level in self.levels)

    def extra_repr(self) -> str:
        return f"levels={list(self.levels)}, mode={self.mode}"


@register(
    "bilinear",
    kind="global",
    formula="triu(signed_sqrt((1/N) Φ Φᵀ)), L2-normalised",
    reference="bilinear CNN (Lin, RoyChowdhury & Maji, ICCV 2015)",
    width="C(C+1)/2",
)
class BilinearPool(GlobalPool):
    """Bilinear pooling: G = (1/N) ΦΦᵀ, y = L2-normalise(signed_sqrt(upper triangle of G)).

    Lin, RoyChowdhury & Maji, "Bilinear CNN models for fine-grained visual recognition", ICCV 2015.
    G is symmetric, so only its upper triangle (diagonal included, row-major) is kept: C(C+1)/2
    values. The signed square root is sign(g)·(sqrt(|g| + ε) − sqrt(ε)) with ε = 1e-8: the exact
    sign(g)·sqrt(|g|) has an infinite derivative at g = 0 (NaN gradients on all-zero maps).
    """

    def forward(self, x: Tensor) -> Tensor:
        return bilinear_pool(x).to(x.dtype)

    def out_features(self, channels: int) -> int:
        return channels * (channels + 1) // 2


@register(
    "netvlad",
    kind="global",
    formula="V_k = Σ_i softmax_k(w_k·x_i + b_k)(x_i − c_k); intra-L2, then L2",
    reference="NetVLAD (Arandjelović et al., CVPR 2016)",
    learnable=True,
    width="K·C",
)
class NetVLAD(LazyModuleMixin, GlobalPool):
    """NetVLAD: V_k = Σ_i a_k(x_i)(x_i − c_k) with soft assignment a = softmax_k(W x_i + b) (a 1×1 conv).

    Arandjelović, Gronat, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly supervised
    place recognition", CVPR 2016. Each V_k is L2-normalised (intra-normalisation), then the whole
    K·C vector (cluster-major). With ``normalize_input`` each descriptor x_i is L2-normalised first,
    as in common implementations. Parameters: centroids c (K, C), assignment W (K, C) and b (K).
    Init: c_k random unit vectors, W = 2α·c, b = −α‖c_k‖² (α = 1), so the assignment starts as
    softmax_k(−α‖x_i − c_k‖²), consistent with the centroids (the paper initialises c by k-means,
    which needs data). ``in_channels=None`` makes c and W lazy: they are created at the first forward,
    so run one batch before building the optimiser.
    """

    cls_to_become = None

    def __init__(self, clusters: int = 16, in_channels: int | None = None, normalize_input: bool = True) -> None:
        super().__init__()
        for arg, value in (("clusters", clusters), ("in_channels", in_channels)):
            if arg == "in_channels" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
        self.clusters = clusters
        self.normalize_input = bool(normalize_input)
        if in_channels is None:
            self.centroids: nn.Parameter = UninitializedParameter()
            self.assign_weight: nn.Parameter = UninitializedParameter()
        else:
            self.centroids = nn.Parameter(torch.empty(clusters, in_channels))
            self.assign_weight = nn.Parameter(torch.empty(clusters, in_channels))
        self.assign_bias = nn.Parameter(torch.zeros(clusters))
        self.reset_parameters()

    @property
    def in_channels(self) -> int | None:
        """C, known once the parameters exist (given, inferred at the first forward, or loaded)."""
        return None if self.has_uninitialized_params() else self.centroids.shape[1]

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params():
            return
        with torch.no_grad():
            self.centroids.copy_(F.normalize(torch.randn_like(self.centroids), dim=1))
            self.assign_weight.copy_(2 * NETVLAD_ALPHA * self.centroids)
            self.assign_bias.copy_(-NETVLAD_ALPHA * self.centroids.pow(2).sum(dim=1))

    def initialize_parameters(self, x: Tensor) -> None:  # called by LazyModuleMixin before the 1st forward
        if self.has_uninitialized_params():
            with torch.no_grad():
                self.centroids.materialize((self.clusters, x.shape[1]))
                self.assign_weight.materialize((self.clusters, x.shape[1]))
            self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.in_channels:
            raise ValueError(f"netvlad was built for {self.in_channels} input channels, got {x.shape[1]}")
        return netvlad(x, self.centroids, self.assign_weight, self.assign_bias, self.normalize_input).to(x.dtype)

    def out_features(self, channels: int) -> int:
        return self.clusters * channels

    def extra_repr(self) -> str:
        return f"clusters={self.clusters}, in_channels={self.in_channels}, normalize_input={self.normalize_input}"
