"""Every operator against its peers' formulation (reference_for): same values and input gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poolbench.pooling import create, create_local, local_names, names
from poolbench.pooling.reference import BATCHED_LU_CPU_MAX_POSITIONS, reference_for

OPERATORS = [("global", name) for name in names()] + [("local", name) for name in local_names()]
WITHOUT_REFERENCE: set[tuple[str, str]] = set()  # every operator has one


def build(kind: str, name: str, x: torch.Tensor) -> nn.Module:
    module = create(name) if kind == "global" else create_local(name, kernel_size=3, stride=2, padding=1)
    module = module.double().eval()
    with torch.no_grad():
        module(x)  # materialises lazy parameters (netvlad)
        for param in module.parameters():  # away from the initial values, so the parameters are really read
            param.mul_(1.1)
    return module


def sample(kind: str, name: str, seed: int = 0) -> torch.Tensor:
    shape = (2, 6, 9, 7) if kind == "local" else (2, 8, 5, 6) if name not in ("sort",) else (2, 8, 3, 3)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5


@pytest.mark.parametrize(("kind", "name"), OPERATORS, ids=[f"{k}-{n}" for k, n in OPERATORS])
def test_reference_agrees_with_the_operator(kind: str, name: str) -> None:
    x = sample(kind, name)
    module = build(kind, name, x)
    reference = reference_for(kind, name, module)
    if reference is None:
        assert (kind, name) in WITHOUT_REFERENCE
        return
    inputs = x.clone().requires_grad_()
    expected_inputs = x.clone().requires_grad_()
    out, expected = module(inputs), reference(expected_inputs)
    torch.testing.assert_close(out, expected, rtol=1e-7, atol=1e-9)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (grad,) = torch.autograd.grad(out, inputs, cotangent)
    (expected_grad,) = torch.autograd.grad(expected, expected_inputs, cotangent)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["gmp", "dgmp"])
def test_dual_lu_reference_loops_where_batched_lu_fails_on_cpu(name: str) -> None:
    side = int(BATCHED_LU_CPU_MAX_POSITIONS**0.5) + 1  # N = side² positions >= the limit, C = 4 < N
    x = torch.rand(3, 4, side, side, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    module = create(name, lam=2.0).double()
    torch.testing.assert_close(reference_for("global", name, module)(x), module(x), rtol=1e-7, atol=1e-9)


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"unknown operator kind 'pool'. Valid choices: global, local"):
        reference_for("pool", "max", create("max"))


def one_positive_per_window(kind: str) -> torch.Tensor:
    """Negative except one value per window (local 3×3/s2/p1: the (even, even) positions, one in each
    window; global: one per channel), so that every draw picks it: the draws agree exactly."""
    x = -torch.rand(2, 6, 9, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64) - 0.1
    if kind == "local":
        x[..., ::2, ::2] = torch.rand(2, 6, 5, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    else:
        x[..., 4, 3] = torch.rand(2, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    return x


@pytest.mark.parametrize("kind", ["global", "local"])
def test_stochastic_reference_draws_what_the_operator_draws(kind: str) -> None:
    x = one_positive_per_window(kind)
    module = build(kind, "stochastic", x).train()
    reference = reference_for(kind, "stochastic", module)
    assert reference is not None
    results = []
    for fn in (module, reference):
        inputs = x.clone().requires_grad_()
        out = fn(inputs)
        cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        results.append((out, *torch.autograd.grad(out, inputs, cotangent)))
    for ours, theirs in zip(*results, strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_stochastic_reference_draws_with_the_operators_probabilities(kind: str) -> None:
    # One 2×2 map, one window (locally 3×3/s2/p1, with a padded border): a plane with two positive
    # values draws them with max(x, 0)/Σ max(x, 0), an all-negative plane uniformly over its positions.
    x = torch.tensor([[1.0, -1.0], [3.0, -2.0]], dtype=torch.float64)
    planes = torch.stack([x, -x.abs()]).expand(4000, 2, 2, 2)
    local = create_local("stochastic", kernel_size=3, stride=2, padding=1)
    module = create("stochastic") if kind == "global" else local
    reference = reference_for(kind, "stochastic", module.train())
    assert reference is not None
    torch.manual_seed(0)
    draws = reference(planes).flatten(1)  # (4000, 2)
    expected = {0: {1.0: 0.25, 3.0: 0.75}, 1: {-1.0: 0.5, -3.0: 0.25, -2.0: 0.25}}
    for plane, probabilities in expected.items():
        values = list(probabilities)
        assert set(draws[:, plane].unique().tolist()) == set(values)
        frequencies = torch.stack([(draws[:, plane] == v).double().mean() for v in values])
        torch.testing.assert_close(
            frequencies, torch.tensor(list(probabilities.values()), dtype=torch.float64), atol=0.03, rtol=0
        )
