"""Every learnable operator (from the registry): float32 parameter gradients match float64, and
learned scalars are reported in their natural units."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from poolbench.pooling import create, create_local, spec, specs

LEARNABLE = [(s.kind, s.name) for kind in ("global", "local") for s in specs(kind) if s.learnable]
IDS = [f"{kind}-{name}" for kind, name in LEARNABLE]


def build(kind: str, name: str) -> nn.Module:
    return create(name) if kind == "global" else create_local(name, kernel_size=3, stride=2, padding=1)


def parameter_gradients(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    module = copy.deepcopy(module).to(dtype)
    out = module(x.to(dtype))
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(cotangent.to(dtype))
    return {name: p.grad.double() for name, p in module.named_parameters()}


@pytest.mark.parametrize(("kind", "name"), LEARNABLE, ids=IDS)
def test_float32_parameter_gradients_match_float64(kind: str, name: str) -> None:
    # Post-ReLU-like maps with an offset: large max(x) is what made LSE's gradient w.r.t. r cancel
    # (1e-4 off in float32 before it was written around the detached max).
    shape = (4, 32, 7, 7) if kind == "global" else (4, 8, 14, 14)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).relu() * 3 + 5
    module = build(kind, name)
    module(x.float())  # materialises lazy parameters (netvlad)
    single, double = parameter_gradients(module, x, torch.float32), parameter_gradients(module, x, torch.float64)
    for pname, expected in double.items():
        error = (single[pname] - expected).abs().max().item()
        assert error <= 1e-5 * max(1.0, expected.abs().max().item()), (pname, error, expected.abs().max().item())


def _scalar_parameters(module: nn.Module) -> list[str]:
    return [pname for pname, p in module.named_parameters() if p.numel() == 1]


@pytest.mark.parametrize(("kind", "name"), LEARNABLE, ids=IDS)
def test_learned_scalars_are_reported_in_natural_units(kind: str, name: str) -> None:
    module = build(kind, name)
    module(torch.rand(1, 3, 5, 5))  # materialises lazy parameters (netvlad)
    scalars = _scalar_parameters(module)
    if not scalars:  # weight vectors (sort, netvlad) have no single natural value
        assert not hasattr(module, "learned_values")
        return
    values = module.learned_values()
    assert len(values) == len(scalars)
    defaults = spec(name, kind).params
    for key, value in values.items():
        assert isinstance(value, float) and math.isfinite(value)
        assert value == pytest.approx(defaults[key], rel=1e-6), key  # the constructor's value, e.g. p = 3
