"""Local (downsampling) pools against independent numpy loop references, worked vectors and edge cases."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from poolbench.config import compose, group_options
from poolbench.pooling import create_local, local_names, spec

# Every registered local operator: a new one is tested by being registered (and fails until REFERENCES
# or a test of its own covers it).
OPERATORS = local_names()
FLOOR_SIZED = [name for name in OPERATORS if name != "fractional"]
# (height, width, kernel, stride, padding); (7, 5, 3, 2, 1) is ResNet's stem max-pool geometry.
GEOMETRIES = [(4, 4, 2, 2, 0), (7, 5, 3, 2, 1), (6, 6, 3, 1, 1), (5, 6, 2, 1, 1), (5, 5, 3, 3, 0), (1, 1, 1, 1, 0)]
# mixed's a as the module holds it: sigmoid of a float32 logit.
MIXED_A = float(torch.sigmoid(torch.tensor(math.log(0.3 / 0.7)).double()))
SORT_LOGITS = [0.75, -0.25, 0.25, 1.125]  # exact in float32, so the float64 reference sees the same


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _stochastic_eval(v: np.ndarray) -> float:
    r = np.maximum(v, 0)
    return float((r / r.sum() * v).sum()) if r.sum() > 0 else float(v.mean())


def _sort_ref(v: np.ndarray, logits: np.ndarray) -> float:
    top = np.sort(v)[::-1][: len(logits)]
    return float((_softmax(logits[: len(top)]) * top).sum())


REFERENCES: dict[str, Callable[..., float]] = {
    "max": lambda v: v.max(),
    "avg": lambda v: v.mean(),
    "min": lambda v: v.min(),
    "sum": lambda v: v.sum(),
    "l2": lambda v: math.sqrt((v**2).sum()),
    "power": lambda v: float(np.mean(np.maximum(v, 1e-6) ** 3) ** (1 / 3)),
    "lpnorm": lambda v: float((np.abs(v) ** 3).sum() ** (1 / 3)),
    "stochastic": _stochastic_eval,
    "sort": lambda v, k: _sort_ref(v, np.array(SORT_LOGITS[:k])),
    "softpool": lambda v: float((_softmax(v) * v).sum()),
    "mixed": lambda v: MIXED_A * v.max() + (1 - MIXED_A) * v.mean(),
}


def _in_map_windows(x: np.ndarray, kernel: int, stride: int, padding: int) -> list[list[np.ndarray]]:
    """Loop over output positions of one (H, W) map; each window keeps only its in-map values."""
    height, width = x.shape
    out_h = (height + 2 * padding - kernel) // stride + 1
    out_w = (width + 2 * padding - kernel) // stride + 1
    rows = []
    for i in range(out_h):
        row = []
        for j in range(out_w):
            top, left = i * stride - padding, j * stride - padding
            values = [
                x[r, c]
                for r in range(top, top + kernel)
                for c in range(left, left + kernel)
                if 0 <= r < height and 0 <= c < width
            ]
            row.append(np.array(values))
        rows.append(row)
    return rows


def reference(name: str, x: torch.Tensor, kernel: int, stride: int, padding: int) -> np.ndarray:
    fn = REFERENCES[name]
    if name == "sort":
        k = min(4, kernel * kernel)

        def fn(v: np.ndarray, k: int = k) -> float:
            return REFERENCES["sort"](v, k)

    maps = x.double().numpy()
    return np.array(
        [
            [[[fn(v) for v in row] for row in _in_map_windows(m, kernel, stride, padding)] for m in image]
            for image in maps
        ]
    )


def make(name: str, kernel: int = 2, stride: int | None = None, padding: int = 0) -> nn.Module:
    """An operator with non-default learnable state so the references check the weighting too."""
    if name == "sort":
        k = min(4, kernel * kernel)
        pool = create_local(name, kernel_size=kernel, stride=stride, padding=padding, k=k)
        with torch.no_grad():
            pool.logits.copy_(torch.tensor(SORT_LOGITS[:k]))
        return pool.eval()
    params = {"a": 0.3} if name == "mixed" else {}
    return create_local(name, kernel_size=kernel, stride=stride, padding=padding, **params).eval()


def test_every_operator_is_registered_with_formula_and_reference() -> None:
    assert set(OPERATORS) <= set(local_names())
    for name in OPERATORS:
        s = spec(name, "local")
        assert s.formula and s.reference
        assert s.learnable == any(p.requires_grad for p in create_local(name).parameters())


WORKED = {
    "max": [[6, 8], [14, 16]],
    "avg": [[3.5, 5.5], [11.5, 13.5]],
    "min": [[1, 3], [9, 11]],
    "sum": [[14, 22], [46, 54]],
    "l2": [[8.1240384, 11.7473401], [23.3666429, 27.3130006]],
    "power": [[4.43952001, 6.18410776], [11.85828674, 13.80774612]],
    "lpnorm": [[7.04729873, 9.81665916], [18.82385684, 21.91843072]],
}


@pytest.mark.parametrize("name", WORKED)
def test_worked_vectors_4x4(name: str) -> None:
    x = torch.arange(1.0, 17.0, dtype=torch.float64).view(1, 1, 4, 4)
    out = create_local(name, kernel_size=2, stride=2)(x)
    torch.testing.assert_close(out[0, 0], torch.tensor(WORKED[name], dtype=torch.float64), rtol=1e-7, atol=1e-7)


def test_worked_vector_sequence_max_window_3_stride_1() -> None:
    # The 1-D sequence as three identical rows: every 3x3 window's max is the 1-D max of 3 neighbours.
    x = torch.tensor([0.0, 1, 2, 2, 5, 1, 2]).expand(1, 1, 3, 7)
    out = create_local("max", kernel_size=3, stride=1)(x)
    assert out.shape == (1, 1, 1, 5)
    assert out.flatten().tolist() == [2, 2, 5, 5, 5]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "h{}w{}k{}s{}p{}".format(*g))
@pytest.mark.parametrize("name", [n for n in OPERATORS if n in REFERENCES])
def test_matches_loop_reference(name: str, geometry: tuple[int, int, int, int, int]) -> None:
    height, width, kernel, stride, padding = geometry
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[0, 0] = x[0, 0].abs()  # one all-positive map: stochastic then never falls back to uniform
    out = make(name, kernel, stride, padding).double()(x)
    expected = reference(name, x, kernel, stride, padding)
    assert out.shape == expected.shape == nn.MaxPool2d(kernel, stride, padding)(x).shape
    np.testing.assert_allclose(out.detach().numpy(), expected, rtol=1e-10, atol=1e-12)


def _fractional_starts(size: int, out: int, kernel: int, sample: float = 0.5) -> list[int]:
    # Graham's pseudo-random increments as torch generates them (computed in the input's float32).
    if out == 1:
        return [size - kernel]
    alpha = np.float32(size - kernel) / np.float32(out - 1)
    s = np.float32(sample)
    return [int((np.float32(i) + s) * alpha) - int(s * alpha) for i in range(out - 1)] + [size - kernel]


@pytest.mark.parametrize("geometry", [(9, 7, 2, 0), (9, 7, 3, 1), (5, 6, 3, 0), (1, 1, 1, 0)])
def test_fractional_eval_matches_reference(geometry: tuple[int, int, int, int]) -> None:
    height, width, kernel, padding = geometry
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    out = create_local("fractional", kernel_size=kernel, padding=padding).eval()(x)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (padding,) * 2, (padding,) * 2), constant_values=-np.inf)
    sizes = [min(max(1, math.floor(n / math.sqrt(2))), n + 2 * padding - kernel + 1) for n in (height, width)]
    rows = _fractional_starts(height + 2 * padding, sizes[0], kernel)
    cols = _fractional_starts(width + 2 * padding, sizes[1], kernel)
    expected = np.array(
        [[[padded[..., r : r + kernel, c : c + kernel].max(axis=(-2, -1)) for c in cols] for r in rows]]
    )
    np.testing.assert_array_equal(out.numpy(), np.moveaxis(expected[0], (0, 1), (-2, -1)))
    assert out.shape[-2:] == tuple(sizes)


def test_fractional_eval_is_deterministic_and_per_image_train_is_seeded() -> None:
    x = torch.randn(4, 2, 16, 16)
    pool = create_local("fractional")
    torch.testing.assert_close(pool.eval()(x)[:1], pool(x[:1]), rtol=0, atol=0)
    pool.train()
    torch.manual_seed(3)
    first = pool(x)
    torch.manual_seed(3)
    torch.testing.assert_close(pool(x), first, rtol=0, atol=0)
    assert first.shape == (4, 2, 11, 11)
    assert set(first.flatten().tolist()) <= set(x.flatten().tolist())


@pytest.mark.parametrize("name", OPERATORS)
def test_gradcheck_float64_with_padding(name: str) -> None:
    pool = make(name, kernel=3, stride=2, padding=1).double()
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    params = dict(pool.named_parameters())

    def fn(inp: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(0)  # fixes stochastic/fractional draws in training mode
        return torch.func.functional_call(pool, dict(zip(params, values, strict=True)), (inp,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params.values()))
    for mode in (False, True):
        pool.train(mode)
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shape", [(32, 32), (17, 9), (7, 7), (3, 3)])
@pytest.mark.parametrize("geometry", [(2, 2, 0), (3, 2, 1), (3, 1, 1), (2, 1, 0)])
def test_output_shape_follows_maxpool_floor_formula(shape: tuple[int, int], geometry: tuple[int, int, int]) -> None:
    kernel, stride, padding = geometry
    x = torch.randn(2, 3, *shape)
    expected = nn.MaxPool2d(kernel, stride, padding)(x).shape
    for name in FLOOR_SIZED:
        assert make(name, kernel, stride, padding)(x).shape == expected, name


@pytest.mark.parametrize("name", OPERATORS)
def test_one_by_one_map_with_kernel_one(name: str) -> None:
    x = torch.tensor([[[[2.5]], [[-1.5]]]])
    out = make(name, kernel=1)(x)
    expected = {"power": [2.5, 1e-6], "l2": [2.5, 1.5], "lpnorm": [2.5, 1.5]}.get(name, [2.5, -1.5])
    torch.testing.assert_close(out.flatten(), torch.tensor(expected))


@pytest.mark.parametrize("name", OPERATORS)
def test_all_zero_input_gives_finite_output_and_gradient(name: str) -> None:
    pool = make(name, kernel=3, stride=2, padding=1)
    for mode in (False, True):
        x = torch.zeros(2, 3, 8, 8, requires_grad=True)
        out = pool.train(mode)(x)
        out.sum().backward()
        assert out.isfinite().all() and x.grad is not None and x.grad.isfinite().all()
        if name != "power":  # power clamps at eps
            assert (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OPERATORS)
def test_half_precision_is_finite_and_close_to_float32(name: str, dtype: torch.dtype) -> None:
    pool = make(name, kernel=3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9)
    out = pool(x.to(dtype))
    assert out.dtype == dtype and out.isfinite().all()
    torch.testing.assert_close(out.float(), pool(x.to(dtype).float()), rtol=2e-2, atol=2e-2)


def test_every_operator_has_an_independent_reference() -> None:
    assert set(OPERATORS) <= {*REFERENCES, "fractional"}  # fractional: test_fractional_eval_matches_reference


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", [n for n in OPERATORS if n in REFERENCES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_activations_do_not_overflow(name: str, dtype: torch.dtype, sign: float) -> None:
    # x² (1e8) and exp(1e4) overflow fp16/fp32 when computed naively; every result here is representable.
    # A spread of 1e3 within a channel also sends softpool to its per-window shift.
    if name == "sum" and dtype == torch.float16:
        pytest.skip("a sum of nine values of 1e4 exceeds float16's largest value, 65504")
    x = (sign * (1e4 + 1e3 * torch.rand(1, 2, 4, 4))).to(dtype).requires_grad_()
    out = make(name, kernel=3, stride=2, padding=1)(x)
    expected = reference(name, x.detach(), 3, 2, 1)
    assert out.isfinite().all()
    # float16 holds power's clamp value 1e-6 only to its subnormal step, 6e-8
    tolerance = {"rtol": 1e-3, "atol": 6e-8} if dtype == torch.float16 else {"rtol": 1e-6}
    np.testing.assert_allclose(out.detach().double().numpy(), expected, **tolerance)
    out.sum().backward()
    assert x.grad is not None and x.grad.isfinite().all()


@pytest.mark.parametrize("name", ["lpnorm", "power"])
def test_large_p_on_large_activations_rescales_exactly(name: str) -> None:
    # x^12 overflows float32 at 1e4 (lpnorm), eps^12 underflows (power): both take the rescaled path.
    x = (1e4 * torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))).requires_grad_()
    out = create_local(name, kernel_size=3, stride=2, padding=1, p=12.0)(x)
    p = 12.0
    if name == "power":
        expected = reference("avg", x.detach().double().clamp_min(1e-6) ** p, 3, 2, 1) ** (1 / p)
    else:
        expected = reference("sum", x.detach().double() ** p, 3, 2, 1) ** (1 / p)
    np.testing.assert_allclose(out.detach().double().numpy(), expected, rtol=1e-5)
    out.sum().backward()
    assert x.grad.isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_max_and_min_are_the_native_max_pool_bit_for_bit(dtype: torch.dtype) -> None:
    x = torch.randn(2, 3, 9, 8).to(dtype)
    native = nn.MaxPool2d(3, 2, 1)
    assert torch.equal(create_local("max", kernel_size=3, stride=2, padding=1)(x), native(x))
    assert torch.equal(create_local("min", kernel_size=3, stride=2, padding=1)(x), -native(-x))


def test_lpnorm_negative_inputs_give_no_nan_for_fractional_p() -> None:
    x = -torch.rand(1, 1, 4, 4) - 0.5
    out = create_local("lpnorm", p=2.5)(x)
    expected = (x.abs() ** 2.5).unfold(2, 2, 2).unfold(3, 2, 2).sum((-1, -2)) ** (1 / 2.5)
    torch.testing.assert_close(out, expected)


def test_stochastic_training_samples_a_positive_window_value_with_prob_proportional_to_it() -> None:
    pool = create_local("stochastic", kernel_size=3, stride=2, padding=1).train()
    x = torch.randn(3, 2, 7, 7).relu()
    out = pool(x)
    for image, pooled in zip(x.numpy(), out.numpy(), strict=True):
        for channel, values in zip(image, pooled, strict=True):
            windows = _in_map_windows(channel, 3, 2, 1)
            for row, sampled_row in zip(windows, values, strict=True):
                for window, sampled in zip(row, sampled_row, strict=True):
                    candidates = window[window > 0] if (window > 0).any() else window
                    assert sampled in candidates

    one_window = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2).expand(20000, 1, 2, 2)
    counts = torch.bincount(create_local("stochastic").train()(one_window).flatten().long(), minlength=5)
    np.testing.assert_allclose((counts[1:] / 20000).numpy(), [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_stochastic_all_non_positive_window_is_sampled_uniformly_and_eval_is_its_mean() -> None:
    x = torch.tensor([-1.0, -2.0, 0.0, -5.0]).view(1, 1, 2, 2)
    pool = create_local("stochastic")
    assert pool.eval()(x).item() == pytest.approx(-2.0)
    samples = pool.train()(x.expand(8000, 1, 2, 2)).flatten()
    np.testing.assert_allclose([(samples == v).float().mean().item() for v in (-1, -2, 0, -5)], [0.25] * 4, atol=0.02)


def test_stochastic_seeding_reproduces() -> None:
    pool = create_local("stochastic", kernel_size=3, stride=2, padding=1).train()
    x = torch.rand(2, 3, 9, 9)
    torch.manual_seed(7)
    first = pool(x)
    torch.manual_seed(7)
    torch.testing.assert_close(pool(x), first, rtol=0, atol=0)


def test_sort_k1_is_max_and_learnable_weights_get_gradients() -> None:
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(
        create_local("sort", kernel_size=3, stride=2, padding=1, k=1)(x), nn.MaxPool2d(3, 2, 1)(x)
    )
    for name, param in (("sort", "logits"), ("mixed", "logit")):
        pool = create_local(name, kernel_size=3, stride=2, padding=1)
        pool(x).sum().backward()
        grad = getattr(pool, param).grad
        assert grad is not None and grad.abs().sum() > 0


def test_mixed_starts_at_half_max_half_avg() -> None:
    x = torch.randn(1, 2, 6, 6)
    expected = 0.5 * nn.MaxPool2d(2)(x) + 0.5 * nn.AvgPool2d(2)(x)
    torch.testing.assert_close(create_local("mixed")(x), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", OPERATORS)
def test_cuda_matches_cpu(name: str) -> None:
    pool = make(name, kernel=3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 8)
    torch.testing.assert_close(pool.cuda()(x.cuda()).cpu(), pool.cpu()(x))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: create_local("maxx"), r"unknown local pooling 'maxx'.*Valid choices: .*avg.*max"),
        (lambda: create_local("max", p=3), r"unknown parameter 'p' for local pooling 'max'"),
        (lambda: create_local("power", q=3), r"unknown parameter 'q'.*Valid: p, eps"),
        (lambda: create_local("sort", kernel_size=2, k=5), r"k must be an integer in \[1, 4\]"),
        (lambda: create_local("sort", kernel_size=2, k=0), r"k must be an integer in \[1, 4\]"),
        (lambda: create_local("max", kernel_size=0), r"kernel_size must be an integer >= 1"),
        (lambda: create_local("avg", kernel_size=2, padding=2), r"padding must be at most"),
        (lambda: create_local("power", p=0), r"p must be a finite number > 0"),
        (lambda: create_local("lpnorm", p=-1.0), r"p must be a finite number > 0"),
        (lambda: create_local("fractional", output_ratio=1.0), r"output_ratio must be a number in \(0, 1\)"),
        (lambda: create_local("mixed", a=1.5), r"a must be a number in \(0, 1\)"),
        (lambda: create_local("max", kernel_size=3)(torch.zeros(1, 1, 2, 5)), r"smaller than the 3x3"),
        (lambda: create_local("fractional", kernel_size=3)(torch.zeros(1, 1, 2, 5)), r"smaller than the 3x3"),
    ],
)
def test_bad_names_params_and_sizes_raise_one_line_value_error(call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", OPERATORS)
def test_composed_config_matches_registry(name: str) -> None:
    conf = OmegaConf.to_container(compose([f"local_pooling={name}"]).local_pooling)
    assert conf.pop("name") == name
    assert conf.pop("kernel_size") is None and conf.pop("stride") is None
    assert conf.pop("lr_mult") == (10 if spec(name, "local").learnable else 1)
    assert conf == {k: v for k, v in spec(name, "local").params.items()}
    create_local(name, kernel_size=3, stride=2, padding=1, **conf)


def test_none_config_keeps_the_backbone() -> None:
    assert OmegaConf.to_container(compose(["local_pooling=none"]).local_pooling) == {"name": "none"}
    assert set(group_options("local_pooling")) == {*OPERATORS, "none"}
