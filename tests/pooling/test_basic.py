"""Global pools of poolbench.pooling.basic against plain-Python references, plus gradients and edge inputs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from poolbench.pooling import basic, create, spec, specs

# Every global operator basic.py registers: a new one is tested by being registered (and fails until
# _channel_reference knows its formula).
NAMES = [s.name for s in specs("global") if s.cls.__module__ == basic.__name__]
LEARNABLE = {name for name in NAMES if spec(name).learnable}
# (name, params): defaults for all, plus non-default values of every parameter.
CASES = [(name, {}) for name in NAMES] + [
    ("power", {"p": 2.5}),
    ("lpnorm", {"p": 1.5}),
    ("gem", {"p": 4.5}),
    ("lse", {"r": 2.0}),
    ("mixed", {"a": 0.3}),
    ("sort", {"k": 1}),
    ("sort", {"k": 7}),
]
CASE_IDS = [f"{name}{params or ''}" for name, params in CASES]


def make(name: str, **params: Any) -> nn.Module:
    module = create(name, **params)
    return module.eval() if name == "stochastic" else module


# ---------------------------------------------------------------------------- references (plain Python)


def _softmax(values: np.ndarray) -> np.ndarray:
    e = np.exp(values - values.max())
    return e / e.sum()


def _stochastic_eval(v: list[float]) -> float:
    weights = [max(t, 0.0) for t in v]
    total = sum(weights)
    probs = [w / total for w in weights] if total > 0 else [1.0 / len(v)] * len(v)
    return sum(p * t for p, t in zip(probs, v, strict=True))


def _channel_reference(name: str, m: nn.Module) -> Callable[[list[float]], float]:
    """The pooled value of one channel's N values ``v`` (plain Python), with m's current parameters."""
    if name == "power":
        return lambda v: (sum(max(t, m.eps) ** m.p for t in v) / len(v)) ** (1 / m.p)
    if name == "gem":
        p = math.exp(m.log_p.item())
        return lambda v: (sum(max(t, m.eps) ** p for t in v) / len(v)) ** (1 / p)
    if name == "lpnorm":
        return lambda v: sum(abs(t) ** m.p for t in v) ** (1 / m.p)
    if name == "lse":
        r = math.exp(m.log_r.item())
        return lambda v: math.log(sum(math.exp(r * t) for t in v) / len(v)) / r
    if name == "mixed":
        a = 1 / (1 + math.exp(-m.logit.item()))
        return lambda v: a * max(v) + (1 - a) * sum(v) / len(v)
    if name == "sort":
        weights = _softmax(m.logits.detach().double().numpy())
        return lambda v: sum(w * t for w, t in zip(weights, sorted(v, reverse=True)[: m.k], strict=True))
    return {
        "avg": lambda v: sum(v) / len(v),
        "max": max,
        "min": min,
        "sum": sum,
        "l2": lambda v: math.sqrt(sum(t * t for t in v)),
        "avgmax": lambda v: 0.5 * (max(v) + sum(v) / len(v)),
        "stochastic": _stochastic_eval,
        "softpool": lambda v: sum(math.exp(t) * t for t in v) / sum(math.exp(t) for t in v),
    }[name]


def reference(name: str, m: nn.Module, x: torch.Tensor) -> np.ndarray:
    values = x.detach().double().flatten(2).tolist()  # (B, C, N) nested lists
    if name == "catavgmax":
        return np.concatenate([reference("avg", m, x), reference("max", m, x)], axis=1)
    pool = _channel_reference(name, m)
    return np.array([[pool(channel) for channel in sample] for sample in values])


# ---------------------------------------------------------------------------- registry and configs


def test_every_operator_is_registered_with_its_metadata() -> None:
    for name in NAMES:
        s = spec(name)
        assert s.kind == "global" and s.formula and s.reference
        module = create(name)
        assert s.learnable == any(p.requires_grad for p in module.parameters())
        assert s.width == {1: "C", 2: "2C"}[module.out_features(3) // 3]
        assert (s.cls.__doc__ or "").strip()


@pytest.mark.parametrize("name", NAMES)
def test_config_file_creates_the_operator(name: str, load_pooling_config: Callable) -> None:
    config = load_pooling_config(name)
    assert config.pop("name") == name
    assert config.pop("lr_mult") == (10 if name in LEARNABLE else 1)
    assert isinstance(create(name, **config), spec(name).cls)


def test_unknown_name_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown global pooling 'gemm'. Did you mean 'gem'\?.*avg.*softpool"):
        create("gemm")


def test_unknown_parameter_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter 'q' for global pooling 'gem'. Valid: p, eps"):
        create("gem", q=2)
    with pytest.raises(ValueError, match=r"unknown parameter 'p' for global pooling 'avg'. Valid: none"):
        create("avg", p=2)


@pytest.mark.parametrize(
    ("name", "params", "arg"),
    [
        ("power", {"p": 0}, "p"),
        ("power", {"eps": -1e-6}, "eps"),
        ("lpnorm", {"p": -1.0}, "p"),
        ("lpnorm", {"p": float("inf")}, "p"),
        ("gem", {"p": 0.0}, "p"),
        ("gem", {"p": "3"}, "p"),
        ("lse", {"r": 0}, "r"),
        ("mixed", {"a": 0.0}, "a"),
        ("mixed", {"a": 1.0}, "a"),
        ("sort", {"k": 0}, "k"),
        ("sort", {"k": 2.5}, "k"),
        ("sort", {"k": True}, "k"),
    ],
)
def test_invalid_parameter_values_raise_one_line_value_error(name: str, params: dict, arg: str) -> None:
    with pytest.raises(ValueError, match=rf"^{arg} must be [^\n]*$"):
        create(name, **params)


# ---------------------------------------------------------------------------- values


def test_worked_vectors() -> None:
    matrix = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    assert create("max")(matrix).item() == 16
    assert create("avg")(matrix).item() == 8.5
    sequence = torch.tensor([0.0, 1, 2, 2, 5, 1, 2]).reshape(1, 1, 1, 7)
    assert create("max")(sequence).item() == 5


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 3)])
def test_matches_plain_python_reference(name: str, params: dict, shape: tuple, random_map: Callable) -> None:
    m = make(name, **params)
    for seed, x in enumerate([random_map(*shape), random_map(*shape, seed=1).abs()]):  # signed, then positive
        out = m(x)
        assert out.shape == (shape[0], m.out_features(shape[1])), (seed, out.shape)
        np.testing.assert_allclose(out.detach().numpy(), reference(name, m, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_reference_holds_after_learnable_parameters_move(name: str, random_map: Callable) -> None:
    m = make(name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(random_map(*p.shape, seed=5, dtype=p.dtype, scale=0.3))
    x = random_map(2, 3, 3, 4)
    np.testing.assert_allclose(m(x).detach().numpy(), reference(name, m, x), rtol=1e-6, atol=1e-6)


def test_learnable_parameters_start_at_their_documented_values() -> None:
    assert create("gem").p.item() == pytest.approx(3.0)
    assert create("gem", p=2.0).p.item() == pytest.approx(2.0)
    assert create("lse").r.item() == pytest.approx(10.0)
    assert create("mixed").a.item() == pytest.approx(0.5)
    assert create("mixed", a=0.2).a.item() == pytest.approx(0.2)
    weights = create("sort").logits.softmax(0)
    torch.testing.assert_close(weights, torch.tensor([0.865, 0.117, 0.016, 0.002]), atol=1e-3, rtol=0)


def test_limits_of_the_parametrised_pools(random_map: Callable) -> None:
    x = random_map(2, 3, 4, 4)
    avg, mx = create("avg")(x), create("max")(x)
    torch.testing.assert_close(create("lse", r=1e-4)(x), avg, atol=1e-3, rtol=0)
    torch.testing.assert_close(create("lse", r=1e3)(x), mx, atol=5e-3, rtol=0)
    torch.testing.assert_close(create("gem", p=1.0)(x.abs()), create("avg")(x.abs()))
    torch.testing.assert_close(create("sort", k=1)(x), mx)
    torch.testing.assert_close(create("mixed")(x), create("avgmax")(x))
    torch.testing.assert_close(create("power", p=2.0)(x) ** 2, create("avg")(x.clamp(min=1e-6) ** 2))


def test_lpnorm_fractional_p_on_negatives_is_finite_unlike_lppool() -> None:
    x = -torch.rand(1, 2, 3, 3, dtype=torch.float64) - 0.1
    out = create("lpnorm", p=2.5)(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, create("lpnorm", p=2.5)(-x))


def test_sort_needs_k_positions() -> None:
    m = create("sort", k=5)
    assert m(torch.zeros(1, 2, 1, 5)).shape == (1, 2)
    with pytest.raises(ValueError, match=r"top k=5 .* only H·W = 2·2 = 4 positions; use k <= 4"):
        m(torch.zeros(1, 2, 2, 2))


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("name", "params"), CASES, ids=CASE_IDS)
def test_gradcheck_float64_input_and_parameters(
    name: str, params: dict, random_map: Callable, gradcheck_pool: Callable
) -> None:
    assert gradcheck_pool(make(name, **params), random_map(2, 2, 3, 4, seed=3))


@pytest.mark.parametrize("name", sorted(LEARNABLE))
def test_learnable_parameters_receive_gradients(name: str, random_map: Callable) -> None:
    m = make(name)
    m(random_map(2, 3, 4, 4, dtype=torch.float32)).square().sum().backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------- edge inputs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_output_keeps_the_input_dtype(name: str, dtype: torch.dtype, random_map: Callable) -> None:
    assert make(name)(random_map(2, 3, 3, 3, dtype=dtype)).dtype == dtype


@pytest.mark.parametrize("name", NAMES)
def test_one_by_one_map_returns_the_value(name: str, random_map: Callable) -> None:
    m = make(name, **({"k": 1} if name == "sort" else {}))
    x = random_map(3, 4, 1, 1).abs() + 0.1
    expected = x.flatten(1).repeat(1, 2) if name == "catavgmax" else x.flatten(1)
    torch.testing.assert_close(m(x), expected)
    if name == "stochastic":
        torch.testing.assert_close(m.train()(x), expected)
    if name in ("l2", "lpnorm"):
        torch.testing.assert_close(m(-x), expected)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("train", [False, True])
def test_all_zero_map_gives_finite_output_and_gradients(
    name: str, train: bool, assert_finite_output_and_gradients: Callable
) -> None:
    m = make(name).train(train)
    out = assert_finite_output_and_gradients(m, torch.zeros(2, 3, 4, 4))
    expected = 1e-6 if name in ("power", "gem") else 0.0
    torch.testing.assert_close(out, torch.full_like(out, expected))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_is_finite_and_close_to_float32(
    name: str, dtype: torch.dtype, random_map: Callable, assert_low_precision_close: Callable
) -> None:
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2  # about two units of the last place
    assert_low_precision_close(make(name), random_map(2, 3, 5, 5), dtype, tol)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_large_activations_stay_finite(name: str, sign: float, assert_finite_output_and_gradients: Callable) -> None:
    x = sign * (1e4 + 1e3 * torch.rand(2, 3, 6, 6))
    out = assert_finite_output_and_gradients(make(name), x)
    if name in ("lse", "softpool"):
        flat = x.flatten(2)
        assert (out >= flat.mean(-1) - 1e-2).all() and (out <= flat.amax(-1) + 1e-2).all()


@pytest.mark.parametrize("name", [name for name in NAMES if name != "sum"])  # Σ of 36 × 1e4 exceeds fp16's max
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_activations_in_half_precision_stay_finite(name: str, dtype: torch.dtype) -> None:
    x = (1e4 * torch.rand(2, 3, 6, 6)).to(dtype)
    assert torch.isfinite(make(name)(x)).all()


def test_gem_stays_differentiable_for_large_p_on_all_zero_maps(assert_finite_output_and_gradients: Callable) -> None:
    # eps^p underflows to 0 in float32 for p > 7 without the max rescaling, giving an infinite gradient.
    assert_finite_output_and_gradients(create("gem", p=12.0), torch.zeros(1, 2, 3, 3))


# ---------------------------------------------------------------------------- stochastic pooling


def test_stochastic_train_draws_one_positive_input_per_channel() -> None:
    torch.manual_seed(0)
    x = torch.tensor([[[[0.0, -1.0, 2.0], [3.0, 0.0, -4.0]]]]).repeat(500, 3, 1, 1)
    out = create("stochastic").train()(x)
    assert set(out.unique().tolist()) == {2.0, 3.0}  # never a position with x <= 0


def test_stochastic_train_frequencies_follow_x_over_sum() -> None:
    torch.manual_seed(1)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 2, 2).expand(20000, 1, 2, 2)
    out = create("stochastic").train()(x)
    frequencies = torch.stack([(out == v).double().mean() for v in (1.0, 2.0, 3.0, 4.0)])
    torch.testing.assert_close(frequencies, torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64), atol=0.015, rtol=0)
    # the eval output is the expectation of the draw
    torch.testing.assert_close(out.mean(), create("stochastic").eval()(x[:1]).squeeze(), atol=0.02, rtol=0)


def test_stochastic_train_draws_a_subnormal_only_positive_value() -> None:
    # u·Σ rounds up to Σ for a subnormal Σ: the draw must still land on the positive position.
    tiny = torch.finfo(torch.float32).smallest_normal * 2**-23  # the smallest subnormal
    x = torch.tensor([0.0, tiny, 0.0, -1.0]).reshape(1, 1, 2, 2).expand(2000, 1, 2, 2)
    torch.manual_seed(3)
    assert (create("stochastic").train()(x) == tiny).all()


def test_stochastic_train_is_uniform_when_nothing_is_positive() -> None:
    torch.manual_seed(2)
    x = -torch.arange(1.0, 5.0).reshape(1, 1, 2, 2).expand(4000, 1, 2, 2)
    out = create("stochastic").train()(x)
    counts = torch.stack([(out == -v).sum() for v in (1.0, 2.0, 3.0, 4.0)])
    assert counts.sum() == 4000 and (counts > 850).all()


def test_stochastic_train_is_reproducible_under_torch_manual_seed(random_map: Callable) -> None:
    m = create("stochastic").train()
    x = random_map(8, 16, 5, 5).abs()
    torch.manual_seed(7)
    first = m(x)
    torch.manual_seed(7)
    torch.testing.assert_close(m(x), first, rtol=0, atol=0)
    assert not torch.equal(m(x), first)  # the RNG advanced, so the next draw differs somewhere


def test_stochastic_train_gradient_goes_to_the_drawn_position(random_map: Callable) -> None:
    torch.manual_seed(3)
    x = random_map(2, 3, 3, 3).abs().requires_grad_()
    out = create("stochastic").train()(x)
    out.sum().backward()
    grad = x.grad.flatten(2)
    assert torch.equal(grad.sum(-1), torch.ones(2, 3, dtype=grad.dtype))
    drawn = x.detach().flatten(2).gather(-1, grad.argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(drawn, out.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(name: str, random_map: Callable) -> None:
    x = random_map(2, 3, 5, 5, dtype=torch.float32)
    m = make(name)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), m.cpu()(x), atol=1e-5, rtol=1e-5)
    if name == "stochastic":
        assert m.cuda().train()(x.cuda()).device.type == "cuda"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lse_inference_path_matches_the_differentiable_one(dtype: torch.dtype, random_map: Callable) -> None:
    # Under no_grad lse skips its hand-written backward's shifted copy; the value must not change.
    m = create("lse", r=3.0).to(dtype)
    x = random_map(2, 3, 5, 5, dtype=dtype) + 20.0
    with torch.no_grad():
        inference = m(x)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(inference, m(x).detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(inference.double(), torch.tensor(reference("lse", m, x)), rtol=tol, atol=tol)
