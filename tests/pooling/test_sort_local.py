"""Local sort's selection network (``poolbench.pooling.sort_select``) against unfold + topk.

``sort_pool_topk`` (windows cut out, ranked by ``topk``, autograd through it) is the reference for
values and for the gradients of x and of the logits; where values tie, any per-window assignment of
the ranks to distinct tied positions is a valid subgradient, checked by what it must preserve.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from poolbench.engine.memory import peak_memory_mb
from poolbench.pooling import sort_select
from poolbench.pooling.local import sort_pool, sort_pool_topk

# (height, width, kernel, stride, padding): overlapping, non-overlapping, stride > kernel, odd sizes,
# maps that floor mode does not cover, padding up to kernel // 2.
GEOMETRIES = [
    (4, 4, 2, 2, 0),
    (7, 5, 3, 2, 1),
    (6, 6, 3, 1, 1),
    (5, 6, 2, 1, 1),
    (5, 5, 3, 3, 0),
    (10, 7, 3, 2, 0),
    (9, 11, 4, 2, 2),
    (8, 8, 4, 3, 1),
    (6, 6, 2, 3, 1),
    (3, 3, 3, 1, 1),
]
CASES = [(*g, k) for g in GEOMETRIES for k in range(2, g[2] ** 2 + 1)]


def _grads(
    fn: Callable[..., Tensor], x: Tensor, logits: Tensor, geometry: tuple[int, int, int], grad_out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Output and the gradients of x and of the logits for ``grad_out`` (seeded random when None)."""
    x = x.detach().clone().requires_grad_()
    logits = logits.detach().clone().requires_grad_()
    out = fn(x, *geometry, logits)
    grad_out = (
        torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5))
        if grad_out is None
        else grad_out
    )
    gx, gl = torch.autograd.grad(out, (x, logits), grad_out)
    return out.detach(), gx, gl, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("height", "width", "kernel", "stride", "padding", "k"), CASES)
def test_matches_unfold_topk_in_values_and_gradients(
    height: int, width: int, kernel: int, stride: int, padding: int, k: int, dtype: torch.dtype
) -> None:
    assert sort_select.supported(torch.zeros(1, dtype=dtype), kernel, k)
    generator = torch.Generator().manual_seed(height * 100 + k)
    x = torch.randn(2, 3, height, width, generator=generator, dtype=dtype)
    logits = torch.randn(k, generator=generator, dtype=dtype)
    geometry = (kernel, stride, padding)
    with torch.no_grad():  # the value-only network (no labels)
        torch.testing.assert_close(sort_pool(x, *geometry, logits), sort_pool_topk(x, *geometry, logits))
    out, gx, gl, grad_out = _grads(sort_pool, x, logits, geometry)
    ref_out, ref_gx, ref_gl, _ = _grads(sort_pool_topk, x, logits, geometry, grad_out)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(gx, ref_gx)
    torch.testing.assert_close(gl, ref_gl)


@pytest.mark.parametrize("kernel", [2, 3, 4])
def test_network_selects_exactly_on_every_zero_one_window(kernel: int) -> None:
    # 0-1 principle: a comparator network that selects right on every 0-1 input does so on any input.
    windows = torch.tensor(list(itertools.product((0.0, 1.0), repeat=kernel * kernel)))
    windows = windows + torch.arange(kernel * kernel) * 1e-3  # distinct values: the order is checkable too
    x = windows.view(-1, 1, kernel, kernel)
    for k in range(2, kernel * kernel + 1):
        logits = torch.linspace(1.0, -1.0, k)
        with torch.no_grad():
            torch.testing.assert_close(
                sort_pool(x, kernel, kernel, 0, logits), sort_pool_topk(x, kernel, kernel, 0, logits)
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [2, 3])
def test_ties_get_a_valid_subgradient(kernel: int, dtype: torch.dtype) -> None:
    # Post-ReLU zeros and repeated integers: one window per plane, so each plane's gradient is its
    # window's. Valid: the ranks go to distinct positions holding the ranked values, i.e. the gradient
    # values are {ω_j·g} plus zeros, and Σ grad·x = Σ_j ω_j·g·x_(j) = g·out.
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (64, 1, kernel, kernel), generator=generator).clamp_min(0).to(dtype)
    for k in range(2, kernel * kernel + 1):
        logits = torch.randn(k, generator=generator, dtype=dtype)
        out, gx, gl, grad_out = _grads(sort_pool, x, logits, (kernel, kernel, 0))
        torch.testing.assert_close(out, sort_pool_topk(x, kernel, kernel, 0, logits))
        weights = torch.softmax(logits, 0)
        expected = torch.cat(
            [weights * grad_out.view(-1, 1), torch.zeros(x.shape[0], kernel * kernel - k, dtype=dtype)], 1
        )
        torch.testing.assert_close(gx.flatten(1).sort(1).values, expected.sort(1).values)
        torch.testing.assert_close((gx * x).flatten(1).sum(1), (grad_out * out).flatten())
        # The logits' gradient depends on values only, never on which tied position was picked.
        torch.testing.assert_close(gl, _grads(sort_pool_topk, x, logits, (kernel, kernel, 0), grad_out)[2])


def test_ties_in_overlapping_windows_keep_the_gradient_mass() -> None:
    x = torch.randn(2, 4, 9, 8, generator=torch.Generator().manual_seed(1)).clamp_min(0).round()
    logits = torch.tensor([0.5, -0.5, 0.25, 0.0, 1.0])
    out, gx, _, grad_out = _grads(sort_pool, x, logits, (3, 2, 1))
    _, ref_gx, _, _ = _grads(sort_pool_topk, x, logits, (3, 2, 1), grad_out)
    torch.testing.assert_close(out, sort_pool_topk(x, 3, 2, 1, logits))
    # weights sum to 1 in every window (renormalised at the corners): total mass = Σ grad_out
    torch.testing.assert_close(gx.sum((-2, -1)), ref_gx.sum((-2, -1)))
    torch.testing.assert_close(gx.sum((-2, -1)), grad_out.sum((-2, -1)))


@pytest.mark.parametrize(
    ("height", "width", "kernel", "stride", "padding", "k"),
    [
        (5, 4, 3, 2, 1, 4),
        (5, 4, 3, 2, 1, 6),
        (4, 5, 2, 1, 1, 3),
        (6, 5, 4, 2, 2, 7),
        (4, 4, 2, 2, 0, 4),
        (1, 1, 2, 1, 1, 3),
    ],
)
def test_gradcheck_float64(height: int, width: int, kernel: int, stride: int, padding: int, k: int) -> None:
    x = torch.randn(2, 2, height, width, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(k, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: sort_pool(a, kernel, stride, padding, b), (x, logits))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype: torch.dtype) -> None:
    x = torch.randn(2, 4, 9, 9).to(dtype)
    logits = torch.tensor([0.0, -1.0, -2.0, -3.0])
    xr = x.clone().requires_grad_()
    out = sort_pool(xr, 3, 2, 1, logits)
    assert out.dtype == dtype
    torch.testing.assert_close(out, sort_pool_topk(x.float(), 3, 2, 1, logits).to(dtype))
    out.float().sum().backward()
    assert xr.grad is not None and xr.grad.dtype == dtype and xr.grad.isfinite().all()


@pytest.mark.parametrize(
    "x",
    [
        torch.full((1, 2, 6, 6), 1e4),
        torch.full((1, 2, 6, 6), -1e4),
        torch.zeros(1, 2, 6, 6),
        1e4 * torch.randn(1, 2, 6, 6, generator=torch.Generator().manual_seed(3)),
        torch.tensor([[[[2.5]], [[-1.5]]]]),
    ],
)
def test_extreme_and_tiny_inputs_stay_finite(x: torch.Tensor) -> None:
    logits = torch.tensor([0.0, -1.0, -2.0])
    out, gx, gl, _ = _grads(sort_pool, x, logits, (2, 1, 1))
    assert out.isfinite().all() and gx.isfinite().all() and gl.isfinite().all()
    torch.testing.assert_close(out, sort_pool_topk(x, 2, 1, 1, logits))


def test_non_finite_inputs_fall_back_to_topk() -> None:
    # Label bits in an infinity make a NaN key: such inputs take the unfold path, with its results.
    x = torch.randn(1, 2, 6, 6)
    x[0, 0, 2, 3] = torch.inf
    x[0, 1, 0, 0] = -torch.inf
    logits = torch.tensor([0.0, -1.0, -2.0, -3.0])
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(
                sort_pool(x.requires_grad_(grad), 3, 2, 1, logits), sort_pool_topk(x, 3, 2, 1, logits), equal_nan=True
            )


def test_peak_memory_is_that_of_native_max_pool() -> None:
    # Issue 13's target, as the bench measures it: ≤ 1.2× native max's fwd+bwd live tensor bytes.
    x = (torch.rand(8, 64, 56, 56, generator=torch.Generator().manual_seed(0)) * 2 - 0.5).requires_grad_()
    logits = torch.tensor([0.0, -2.0, -4.0, -6.0], requires_grad=True)
    grad_out = torch.randn(8, 64, 28, 28)

    def sort() -> object:
        return torch.autograd.grad(sort_pool(x, 3, 2, 1, logits), (x, logits), grad_out)

    def native() -> object:
        return torch.autograd.grad(F.max_pool2d(x, 3, 2, 1), x, grad_out)

    assert peak_memory_mb(sort, torch.device("cpu")) <= 1.2 * peak_memory_mb(native, torch.device("cpu"))
