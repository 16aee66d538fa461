"""Shared checks for pooling tests, exposed as fixtures that return plain functions.

    def test_x(gradcheck_pool): assert gradcheck_pool(module, x)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call


def random_map(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0) -> Tensor:
    """Seeded standard-normal map times ``scale`` (negatives included), independent of the global RNG."""
    generator = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(dtype)


def gradcheck_pool(module: nn.Module, x: Tensor) -> bool:
    """torch.autograd.gradcheck in float64 w.r.t. the input and every parameter of ``module``."""
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().to(torch.float64).requires_grad_() for _, p in module.named_parameters()]

    def pooled(inp: Tensor, *values: Tensor) -> Tensor:
        return functional_call(module, dict(zip(names, values, strict=True)), (inp,))

    inputs = (x.detach().to(torch.float64).requires_grad_(), *params)
    return torch.autograd.gradcheck(pooled, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def assert_finite_output_and_gradients(module: nn.Module, x: Tensor) -> Tensor:
    """Forward + backward of the output's sum; output, input gradient and parameter gradients finite."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad()
    out = module(x)
    assert torch.isfinite(out).all(), out
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all(), x.grad
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), (name, p.grad)
    return out.detach()


def assert_low_precision_close(module: nn.Module, x: Tensor, dtype: torch.dtype, tol: float) -> None:
    """Output on ``dtype`` input keeps that dtype, is finite, and is close to float32 on the same
    (rounded) input: |diff| <= tol·(1 + max |float32 output|)."""
    low = x.to(dtype)
    out = module(low)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), out
    expected = module(low.to(torch.float32))
    bound = tol * (1 + expected.abs().max().item())
    assert (out.float() - expected).abs().max().item() <= bound


def load_pooling_config(name: str) -> dict[str, Any]:
    """The ``pooling`` node that ``poolbench train pooling=<name>`` composes (generated from the registry)."""
    from omegaconf import OmegaConf

    from poolbench.config import compose

    return OmegaConf.to_container(compose([f"pooling={name}"]).pooling)  # type: ignore[return-value]


@pytest.fixture(name="random_map")
def random_map_fixture() -> Callable[..., Tensor]:
    return random_map


@pytest.fixture(name="gradcheck_pool")
def gradcheck_pool_fixture() -> Callable[[nn.Module, Tensor], bool]:
    return gradcheck_pool


@pytest.fixture(name="assert_finite_output_and_gradients")
def assert_finite_output_and_gradients_fixture() -> Callable[[nn.Module, Tensor], Tensor]:
    return assert_finite_output_and_gradients


@pytest.fixture(name="assert_low_precision_close")
def assert_low_precision_close_fixture() -> Callable[[nn.Module, Tensor, torch.dtype, float], None]:
    return assert_low_precision_close


@pytest.fixture(name="load_pooling_config")
def load_pooling_config_fixture() -> Callable[[str], dict[str, Any]]:
    return load_pooling_config
