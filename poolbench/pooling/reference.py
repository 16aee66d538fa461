"""The best known formulation of each operator's maths, written from the formulas, for side-by-side timing.

:func:`reference_for` returns, for one operator instance (with its current parameters), a function
computing the same output the way its peers do it: timm's fast global pools, cirtorch's GeM, the
DGMP authors' dual system with a general LU solve, PyTorch's native pooling modules for local
operators. ``poolbench bench`` times them next to poolbench's own operators ("vs reference"), so a
claim such as "max costs what timm's max costs" can be re-checked on any machine. Agreement of the
numbers is tested in ``tests/pooling/test_reference.py``. Stochastic pooling's reference draws
from the same distribution (not the same sample) in training mode and is its expectation in eval.

None where no independent formulation exists.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reference = Callable[[Tensor], Tensor]
# Batched LU (torch.linalg.solve) fails on CPU from about this many positions when B > 1
# ("Pivots given to lu_solve must all be greater or equal to 1"); the reference then loops per sample.
BATCHED_LU_CPU_MAX_POSITIONS = 150


def _avg(x: Tensor) -> Tensor:  # timm FastAdaptiveAvgPool(flatten=True)
    return x.mean((2, 3))


def _max(x: Tensor) -> Tensor:  # timm adaptive_max_pool2d / cirtorch MAC
    return F.adaptive_max_pool2d(x, 1).flatten(1)


def _global(name: str, module: nn.Module) -> Reference | None:
    if name in ("avg", "max", "min", "sum", "avgmax", "catavgmax"):
        return {
            "avg": _avg,
            "max": _max,
            "min": lambda x: x.amin((2, 3)),
            "sum": lambda x: x.sum((2, 3)),
            # timm adaptive_avgmax_pool2d and adaptive_catavgmax_pool2d
            "avgmax": lambda x: 0.5 * (F.adaptive_avg_pool2d(x, 1) + F.adaptive_max_pool2d(x, 1)).flatten(1),
            "catavgmax": lambda x: torch.cat((F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)), 1).flatten(1),
        }[name]
    if name in ("l2", "lpnorm"):  # PyTorch's LPPool over the whole map, on |x|
        p = 2.0 if name == "l2" else module.p
        return lambda x: F.lp_pool2d(x.abs(), p, kernel_size=x.shape[-2:]).flatten(1)
    if name in ("power", "gem"):  # cirtorch's gem(): avg_pool2d(x.clamp(eps)^p, (H, W))^(1/p)
        eps = module.eps

        def gem(x: Tensor) -> Tensor:
            p = module.p  # a Parameter in cirtorch; here exp(log_p), read at each call
            return F.avg_pool2d(x.clamp(min=eps).pow(p), x.shape[-2:]).pow(1.0 / p).flatten(1)

        return gem
    if name == "lse":  # Pinheiro & Collobert / the DGMP authors' baseline: (1/r) log mean exp(r x)
        return lambda x: (torch.logsumexp(module.r * x.flatten(2), -1) - math.log(x.shape[-2] * x.shape[-1])) / module.r
    if name == "mixed":  # Lee et al.: a·max + (1 − a)·avg
        return lambda x: module.a * _max(x) + (1 - module.a) * _avg(x)
    if name == "stochastic":
        return lambda x: _stochastic(x.flatten(2), None, module.training)
    if name == "sort":
        return lambda x: (x.flatten(2).topk(module.k, dim=-1).values * module.logits.softmax(0)).sum(-1)
    if name == "softpool":
        return lambda x: (x.flatten(2).softmax(-1) * x.flatten(2)).sum(-1)
    if name == "spp":
        pool = F.adaptive_max_pool2d if module.mode == "max" else F.adaptive_avg_pool2d
        return lambda x: torch.cat([pool(x, level).flatten(1) for level in module.levels], 1)
    if name == "bilinear":
        return _bilinear
    if name == "netvlad":
        return lambda x: _netvlad(x, module)
    if name in ("gmp", "dgmp"):
        return lambda x: _gmp_dual_lu(x, module.lam, normalize=name == "dgmp")
    return None


def _stochastic(values: Tensor, valid: Tensor | None, training: bool) -> Tensor:
    """Zeiler & Fergus over the last axis: p = x⁺/Σ x⁺, uniform over the ``valid`` positions where no
    value is positive. Training: one position per row by inverse CDF (u·Σ against the cumulative
    weights, the vectorised form of ``torch.multinomial``); eval: the expectation Σ p·x."""
    positive = values.clamp(min=0)
    uniform = torch.ones_like(values) if valid is None else valid.to(values.dtype).expand_as(values)
    weights = torch.where(positive.sum(-1, keepdim=True) > 0, positive, uniform)
    if not training:
        return (weights * values).sum(-1) / weights.sum(-1)
    cdf = weights.detach().cumsum(-1)
    threshold = torch.rand(cdf.shape[:-1], dtype=cdf.dtype, device=cdf.device).unsqueeze(-1) * cdf[..., -1:]
    # the first position whose cumulative weight exceeds u·Σ (clamped: u·Σ may round up to Σ)
    index = (cdf <= threshold).sum(-1, keepdim=True).clamp_max(values.shape[-1] - 1)
    return values.gather(-1, index).squeeze(-1)


def _windows(x: Tensor, kernel: int, stride: int, padding: int, fill: float) -> Tensor:
    """(B, C, H', W', k²): the windows cut out (``Tensor.unfold``), ``fill`` where one hangs over the border."""
    padded = F.pad(x, (padding,) * 4, value=fill) if padding else x
    return padded.unfold(2, kernel, stride).unfold(3, kernel, stride).flatten(-2)


def _bilinear(x: Tensor) -> Tensor:
    """Lin et al.'s bilinear CNN: Gram / N, signed square root, L2 normalisation (upper triangle, ε = 1e-8)."""
    flat = x.flatten(2)
    channels, positions = flat.shape[1:]
    gram = torch.bmm(flat, flat.transpose(1, 2)) / positions
    rows, cols = torch.triu_indices(channels, channels, device=x.device)
    g = gram[:, rows, cols]
    return F.normalize(torch.sign(g) * (torch.sqrt(g.abs() + 1e-8) - 1e-4), dim=1)


def _netvlad(x: Tensor, module: nn.Module) -> Tensor:
    """The common PyTorch NetVLAD layer: 1×1-conv soft assignment, residuals (B, K, C, N) summed."""
    flat = F.normalize(x, dim=1) if module.normalize_input else x
    assign = F.conv2d(flat, module.assign_weight[:, :, None, None], module.assign_bias).flatten(2).softmax(1)
    flat = flat.flatten(2)
    residuals = flat.unsqueeze(1) - module.centroids[None, :, :, None]
    vlad = (residuals * assign.unsqueeze(2)).sum(-1)
    return F.normalize(F.normalize(vlad, dim=2).flatten(1), dim=1)


def _gmp_dual_lu(x: Tensor, lam: Tensor | float, normalize: bool) -> Tensor:
    """The DGMP authors' layer: (ΦᵀΦ + λI) α = 1 by LU (``torch.linalg.solve``), ξ = Φα, L2-normalised."""
    batch, channels = x.shape[:2]
    descriptors = x.flatten(2).transpose(1, 2)  # (B, N, C)
    positions = descriptors.shape[1]
    system = descriptors @ descriptors.transpose(1, 2) + lam * torch.eye(positions, device=x.device, dtype=x.dtype)
    ones = torch.ones(batch, positions, 1, device=x.device, dtype=x.dtype)
    if x.device.type == "cpu" and batch > 1 and positions >= BATCHED_LU_CPU_MAX_POSITIONS:
        alpha = torch.stack([torch.linalg.solve(system[i], ones[i]) for i in range(batch)])
    else:
        alpha = torch.linalg.solve(system, ones)
    xi = (alpha.transpose(1, 2) @ descriptors).reshape(batch, channels)
    return F.normalize(xi) if normalize else xi


def _local(name: str, module: nn.Module) -> Reference | None:
    k, s, pad = module.kernel_size, module.stride, module.padding
    if name == "max":  # nn.MaxPool2d
        return lambda x: F.max_pool2d(x, k, s, pad)
    if name == "min":
        return lambda x: -F.max_pool2d(-x, k, s, pad)
    if name == "avg":  # nn.AvgPool2d(count_include_pad=False)
        return lambda x: F.avg_pool2d(x, k, s, pad, count_include_pad=False)
    if name == "sum":  # the zero-padded average times the window size
        return lambda x: F.avg_pool2d(x, k, s, pad) * (k * k)
    if name in ("l2", "lpnorm"):  # nn.LPPool2d on |x|; zero padding adds nothing to Σ|x|^p
        p = 2.0 if name == "l2" else module.p
        return lambda x: F.lp_pool2d(F.pad(x.abs(), (pad,) * 4), p, k, s)
    if name == "power":  # cirtorch's GeM on each window
        p, eps = module.p, module.eps
        return lambda x: F.avg_pool2d(x.clamp(min=eps).pow(p), k, s, pad, count_include_pad=False).pow(1.0 / p)
    if name == "mixed":

        def mixed(x: Tensor) -> Tensor:
            a = torch.sigmoid(module.logit)
            return a * F.max_pool2d(x, k, s, pad) + (1 - a) * F.avg_pool2d(x, k, s, pad, count_include_pad=False)

        return mixed
    if name == "softpool":  # the SoftPool authors' PyTorch formulation: Σ e^x x / Σ e^x on avg_pool2d

        def soft(x: Tensor) -> Tensor:
            e = x.exp()
            return F.avg_pool2d(x * e, k, s, pad) / F.avg_pool2d(e, k, s, pad)

        return soft
    if name == "stochastic":  # Zeiler & Fergus on the windows cut out; padding is not part of a window

        def stochastic(x: Tensor) -> Tensor:
            in_map = _windows(x.new_ones((1, 1, *x.shape[-2:])), k, s, pad, 0.0) > 0 if pad else None
            return _stochastic(_windows(x, k, s, pad, 0.0), in_map, module.training)

        return stochastic
    if name == "sort":  # sorted pooling as usually written: windows cut out, topk, softmax-weighted

        def sort(x: Tensor) -> Tensor:
            top = _windows(x, k, s, pad, -math.inf).topk(module.logits.numel(), dim=-1).values
            weights = module.logits.softmax(0).to(top.dtype)
            if pad:  # a border window with fewer than k in-map values: the weights renormalised over those
                ranked = top > -math.inf
                weights = weights * ranked
                weights = weights / weights.sum(-1, keepdim=True)
                top = top.masked_fill(~ranked, 0.0)
            return (top * weights).sum(-1)

        return sort
    if name == "fractional":  # the native kernel, with the module's eval-mode samples

        def fractional(x: Tensor) -> Tensor:
            size = tuple(min(max(1, math.floor(module.output_ratio * n)), n + 2 * pad - k + 1) for n in x.shape[-2:])
            samples = x.new_full((x.shape[0], x.shape[1], 2), 0.5)
            return F.fractional_max_pool2d(
                F.pad(x, (pad,) * 4, value=-math.inf), k, output_size=size, _random_samples=samples
            )

        return fractional
    return None


def reference_for(kind: str, name: str, module: nn.Module) -> Reference | None:
    """The peers' formulation of operator ``name`` (``kind`` "global" or "local") with ``module``'s
    parameters (read at each call, so gradients reach them), or None where none exists."""
    if kind not in ("global", "local"):
        raise ValueError(f"unknown operator kind '{kind}'. Valid choices: global, local")
    return _global(name, module) if kind == "global" else _local(name, module)
