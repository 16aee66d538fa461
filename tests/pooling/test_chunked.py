"""The chunked autograd Functions (poolbench.pooling.chunked) against the autograd formulation they replaced.

``OLD`` below is local.py's formulation before the rewrite, frozen: window sums of x^p / e^x / x⁺·x
differentiated by autograd. Values and input gradients must agree on geometries with padding and odd
sizes, with one plane per chunk and with the default chunks, on the rescaling and fallback paths and in
half precision; the new backward passes float64 gradcheck on every path (first order only: a
backward with create_graph=True raises).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from poolbench.engine.memory import peak_memory_mb
from poolbench.pooling import chunked, create_local, sort_select
from poolbench.pooling.local import (
    _float32_for_half,
    avg_pool,
    lpnorm_pool,
    max_pool,
    min_pool,
    mixed_pool,
    nonnegative_power,
    power_pool,
    safe_root,
    softpool,
    stochastic_pool,
    unfold_windows,
    window_sum,
)

# ------------------------------------------------------------------ the replaced autograd formulation


def _old_power_mean(magnitude: Tensor, p: float, pool: Callable[[Tensor], Tensor], floor: float = 0.0) -> Tensor:
    if floor == 0.0 or floor**p >= torch.finfo(magnitude.dtype).tiny:
        total = pool(nonnegative_power(magnitude, p))
        pooled = total.pow(1.0 / p) if floor > 0 else safe_root(total, p)
        if bool(pooled.isfinite().all()) or not bool(magnitude.isfinite().all()):
            return pooled
    peak = magnitude.detach().amax(dim=(-2, -1), keepdim=True)
    peak = torch.where(peak > 0, peak, 1.0)
    return peak * safe_root(pool(nonnegative_power(magnitude / peak, p)), p)


@_float32_for_half
def old_lpnorm(x: Tensor, kernel_size: int, stride: int, padding: int = 0, p: float = 3.0) -> Tensor:
    magnitude = x if p == 2.0 else x.abs()
    return _old_power_mean(magnitude, p, lambda t: window_sum(t, kernel_size, stride, padding))


@_float32_for_half
def old_power(x: Tensor, kernel_size: int, stride: int, padding: int = 0, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    return _old_power_mean(x.clamp_min(eps), p, lambda t: avg_pool(t, kernel_size, stride, padding), floor=eps)


@_float32_for_half
def old_stochastic(x: Tensor, kernel_size: int, stride: int, padding: int = 0, *, sample: bool = False) -> Tensor:
    if not sample:
        positive = x.clamp_min(0.0)
        mass = window_sum(positive, kernel_size, stride, padding)
        has_mass = mass > 0
        weighted = window_sum(positive * x, kernel_size, stride, padding) / torch.where(has_mass, mass, 1.0)
        return torch.where(has_mass, weighted, avg_pool(x, kernel_size, stride, padding))
    with torch.no_grad():
        uniform = torch.rand_like(x)
        race = uniform.log().neg_()
        keys, index = F.max_pool2d(x.clamp_min(0.0) / race, kernel_size, stride, padding, return_indices=True)
        no_mass = keys <= 0
        if bool(no_mass.any()):
            index = torch.where(
                no_mass, F.max_pool2d(uniform, kernel_size, stride, padding, return_indices=True)[1], index
            )
    return x.flatten(2).gather(2, index.flatten(2)).view(index.shape)


def _old_softpool_windows(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    windows, valid = unfold_windows(x, kernel_size, stride, padding)
    weights = torch.softmax(windows if valid is None else windows.masked_fill(~valid, -math.inf), dim=-1)
    return (weights * windows).sum(-1)


@_float32_for_half
def old_softpool(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    weights = (x - x.detach().amax(dim=(-2, -1), keepdim=True)).exp()
    mass = window_sum(weights, kernel_size, stride, padding)
    smallest = torch.finfo(x.dtype).tiny * kernel_size**2 / torch.finfo(x.dtype).eps
    if bool((mass >= smallest).all()):
        return window_sum(weights * x, kernel_size, stride, padding) / mass
    return _old_softpool_windows(x, kernel_size, stride, padding)


def old_min(x: Tensor, kernel_size: int, stride: int, padding: int = 0) -> Tensor:
    return -max_pool(-x, kernel_size, stride, padding)


def old_mixed(x: Tensor, kernel_size: int, stride: int, padding: int = 0, a: Tensor | float = 0.5) -> Tensor:
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # halves: float32, rounded once
    peak, mean = max_pool(work, kernel_size, stride, padding), avg_pool(work, kernel_size, stride, padding)
    return (a * peak + (1 - a) * mean).to(x.dtype)


# ------------------------------------------------------------------------------------------ cases

Pool = Callable[..., Tensor]
# name -> (new, old, keyword parameters)
CASES: dict[str, tuple[Pool, Pool, dict[str, object]]] = {
    "power": (power_pool, old_power, {}),
    "power-p2.5": (power_pool, old_power, {"p": 2.5}),
    "power-p1": (power_pool, old_power, {"p": 1.0}),
    "power-p0.5-eps0.1": (power_pool, old_power, {"p": 0.5, "eps": 0.1}),
    "power-p2": (power_pool, old_power, {"p": 2.0}),
    "lpnorm": (lpnorm_pool, old_lpnorm, {}),
    "lpnorm-p2.5": (lpnorm_pool, old_lpnorm, {"p": 2.5}),
    "lpnorm-p1": (lpnorm_pool, old_lpnorm, {"p": 1.0}),
    "lpnorm-p0.5": (lpnorm_pool, old_lpnorm, {"p": 0.5}),
    "l2": (lpnorm_pool, old_lpnorm, {"p": 2.0}),
    "softpool": (softpool, old_softpool, {}),
    "stochastic-eval": (stochastic_pool, old_stochastic, {}),
    "stochastic-draw": (stochastic_pool, old_stochastic, {"sample": True}),
    "min": (min_pool, old_min, {}),
    "mixed": (mixed_pool, old_mixed, {"a": 0.3}),
}
# (height, width, kernel, stride, padding)
GEOMETRIES = [(7, 5, 3, 2, 1), (9, 8, 3, 2, 1), (6, 6, 3, 1, 1), (5, 6, 2, 1, 1), (5, 5, 3, 3, 0), (1, 1, 1, 1, 0)]
GEOMETRY_IDS = ["h{}w{}k{}s{}p{}".format(*g) for g in GEOMETRIES]


@pytest.fixture(params=["plane-per-chunk", "default-chunks"])
def chunks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One plane per chunk (every chunk boundary exercised) or the default budget (one chunk here)."""
    if request.param == "plane-per-chunk":
        monkeypatch.setattr(chunked, "CHUNK_ELEMENTS_CPU", 1)
    yield


def _map(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0, 0] = x[0, 0].abs()  # one all-positive plane
    if shape[1] > 1:
        x[0, 1] = -x[0, 1].abs()  # one all-negative plane: stochastic's uniform fallback, power's clamp
    return x.to(dtype)


def _value_and_grad(
    fn: Pool, x: Tensor, geometry: tuple[int, int, int], seed: int = 5, **params: object
) -> tuple[Tensor, Tensor]:
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the draw's RNG, identical for old and new
    out = fn(x, *geometry, **params)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(out, x, cotangent.to(out.dtype))
    return out.detach(), grad


@pytest.mark.usefixtures("chunks")
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("case", CASES)
def test_matches_the_autograd_formulation(case: str, geometry: tuple[int, int, int, int, int]) -> None:
    new, old, params = CASES[case]
    height, width, *window = geometry
    x = _map((2, 3, height, width))
    out, grad = _value_and_grad(new, x, window, **params)
    expected, expected_grad = _value_and_grad(old, x, window, **params)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.usefixtures("chunks")
@pytest.mark.parametrize("geometry", [(7, 5, 3, 2, 1), (5, 6, 2, 1, 1), (1, 1, 1, 1, 0)], ids=lambda g: str(g))
@pytest.mark.parametrize("case", CASES)
def test_gradcheck_float64(case: str, geometry: tuple[int, int, int, int, int]) -> None:
    new, _, params = CASES[case]
    height, width, *window = geometry
    x = _map((2, 2, height, width)).requires_grad_()

    def fn(inp: Tensor) -> Tensor:
        torch.manual_seed(0)  # the same draw at every perturbation
        return new(inp, *window, **params)

    assert torch.autograd.gradcheck(fn, (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_low_precision_matches_the_autograd_formulation(case: str, dtype: torch.dtype) -> None:
    # Both compute halves in float32; the rounding of the float32 steps differs a little.
    new, old, params = CASES[case]
    x = _map((2, 3, 9, 8), dtype=dtype)
    out, grad = _value_and_grad(new, x, (3, 2, 1), **params)
    expected, expected_grad = _value_and_grad(old, x, (3, 2, 1), **params)
    assert out.dtype == grad.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected, **tolerance)
    torch.testing.assert_close(grad, expected_grad, **tolerance)


def test_stochastic_draw_is_the_unchunked_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunked keys come from the same CPU generator stream in the same order: bit-identical samples.
    x = torch.randn(3, 4, 11, 10)
    torch.manual_seed(3)
    expected = old_stochastic(x, 3, 2, 1, sample=True)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS_CPU", 150)
    torch.manual_seed(3)
    assert torch.equal(stochastic_pool(x, 3, 2, 1, sample=True), expected)


# ------------------------------------------------------------------------- rescaling and fallbacks


@pytest.mark.usefixtures("chunks")
@pytest.mark.parametrize("name", ["lpnorm", "power"])
def test_rescaled_planes_match_float64(name: str) -> None:
    # Float32, p = 12: 1e4^12 overflows (lpnorm: the planes with large values are rescaled, the
    # others not), 1e-6^12 underflows (power: every plane is). Float64 computes all of it directly.
    x = torch.rand(2, 3, 7, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.1
    x[0] *= 1e4
    new, old = (lpnorm_pool, old_lpnorm) if name == "lpnorm" else (power_pool, old_power)
    out, grad = _value_and_grad(new, x.float(), (3, 2, 1), p=12.0)
    expected, expected_grad = _value_and_grad(old, x, (3, 2, 1), p=12.0)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize(
    ("name", "scale", "p"),
    [("lpnorm", 1e30, 12.0), ("power", 1.0, 400.0), ("lpnorm", 4.0, 400.0), ("power", 1e30, 12.0)],
)
def test_gradcheck_float64_on_the_rescaled_path(name: str, scale: float, p: float) -> None:
    # In float64 the rescaling needs 1e30^12 (overflow) or eps^400 (underflow); the input is scaled
    # inside fn so that gradcheck's perturbations keep their size.
    new = lpnorm_pool if name == "lpnorm" else power_pool
    x = (_map((2, 2, 7, 5)) * 0.5 + 1.0).requires_grad_()
    if name == "power":
        with torch.no_grad():
            x[0, 0, 0, :2] = -1.0  # clamped to eps: zero gradient there
    assert torch.autograd.gradcheck(lambda t: new(t * scale, 3, 2, 1, p=p) / scale, (x,))


@pytest.mark.usefixtures("chunks")
def test_softpool_fallback_planes_match_the_autograd_formulation() -> None:
    # A spread of 1e3 in float32 sends plane (0, 0) to the per-window shift; the others stay on the sums.
    x = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(4))
    x[0, 0, :3] -= 1e3
    out, grad = _value_and_grad(softpool, x, (3, 2, 1))
    expected, expected_grad = _value_and_grad(old_softpool, x, (3, 2, 1))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_gradcheck_float64_on_the_softpool_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS_CPU", 1)
    x = _map((2, 2, 7, 5))
    with torch.no_grad():
        x[1, 0, :2] -= 1e3  # a spread that leaves float64's full precision range
    assert torch.autograd.gradcheck(lambda t: softpool(t, 3, 2, 1), (x.requires_grad_(),))


# ------------------------------------------------------------------------------------- mechanics


@pytest.mark.parametrize("case", CASES)
def test_non_contiguous_input_and_repeated_backward(case: str) -> None:
    new, _, params = CASES[case]
    x = _map((2, 3, 9, 8)).to(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(0)
    out = new(x, 3, 2, 1, **params)
    torch.manual_seed(0)
    torch.testing.assert_close(out, new(x.detach().contiguous(), 3, 2, 1, **params), rtol=0, atol=0)
    cotangent = torch.randn_like(out)
    first = torch.autograd.grad(out, x, cotangent, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, x, cotangent)[0], first, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_empty_batch(case: str) -> None:
    new, _, params = CASES[case]
    x = torch.zeros(0, 3, 8, 8, requires_grad=True)
    out = new(x, 3, 2, 1, **params)
    out.sum().backward()
    assert out.shape == (0, 3, 4, 4) and x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("case", CASES)
def test_second_order_gradients_are_refused(case: str) -> None:
    new, _, params = CASES[case]
    x = _map((1, 2, 6, 6)).requires_grad_()
    with pytest.raises(RuntimeError, match="no second-order gradients"):
        torch.autograd.grad(new(x, 3, 2, 1, **params).sum(), x, create_graph=True)


@pytest.mark.parametrize("name", ["power", "lpnorm", "l2", "softpool", "stochastic", "min", "mixed"])
@pytest.mark.parametrize("train", [True, False])
def test_peak_memory_is_close_to_native_max_pooling(
    name: str, train: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Live tensor bytes of one forward+backward: the input's gradient, the output and output-sized
    # saved sums (max pooling keeps int64 indices); the chunks' temporaries are small. Issue 13: <= 1.2×.
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS_CPU", 1 << 14)
    x = (torch.rand(4, 16, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 0.5).requires_grad_()
    pool = create_local(name, kernel_size=3, stride=2, padding=1).train(train)
    cotangent = torch.randn(4, 16, 32, 32)

    def peak(fn: Callable[[Tensor], Tensor]) -> float:
        return peak_memory_mb(lambda: torch.autograd.grad(fn(x), x, cotangent), torch.device("cpu"))

    assert peak(pool) <= 1.2 * peak(lambda t: F.max_pool2d(t, 3, 2, 1))


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_mixed_weight_gradient_matches_the_autograd_formulation(geometry: tuple[int, int, int, int, int]) -> None:
    height, width, *window = geometry
    x = _map((2, 3, height, width))
    cotangent = torch.randn(2, 3, *chunked.Window(*window).out_size(height, width), dtype=torch.float64)
    grads = []
    for fn in (mixed_pool, old_mixed):
        a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
        grads.append(torch.autograd.grad(fn(x, *window, a=a), a, cotangent)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)
    a = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp, w: mixed_pool(inp, *window, a=w), (x.requires_grad_(), a))


def test_min_is_minus_max_of_minus_x_bit_for_bit_with_ties() -> None:
    x = torch.randint(-2, 3, (2, 3, 9, 8)).float()  # many ties: the same argmin as the native kernel
    x.requires_grad_()
    new = min_pool(x, 3, 2, 1)
    cotangent = torch.randn_like(new)
    (grad,) = torch.autograd.grad(new, x, cotangent)
    ref_x = x.detach().clone().requires_grad_()
    old = old_min(ref_x, 3, 2, 1)
    (ref_grad,) = torch.autograd.grad(old, ref_x, cotangent)
    assert torch.equal(new, old) and torch.equal(grad, ref_grad)


@pytest.fixture
def two_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("two_threads")
@pytest.mark.parametrize(
    ("name", "dtype"),
    [
        (name, dtype)
        for name in ("power", "lpnorm", "l2", "softpool", "stochastic", "mixed", "sort")
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
    ],
)
def test_chunks_on_worker_threads_match_the_serial_loop_bit_for_bit(
    name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several torch threads the chunks run as tasks on single-threaded workers (issue 22: no
    per-op barriers under contention): values and gradients are those of the serial loop, bit for
    bit, in train, eval and inference mode, and the caller keeps its thread count."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS_CPU", 1 << 12)  # many chunks at a small size
    monkeypatch.setattr(sort_select, "CHUNK_ELEMENTS", 1 << 12)
    x = (torch.rand(3, 10, 33, 31, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 - 1).to(dtype)
    x[0, 0] = 1e4  # overflows x^p in float32: the rescaled planes run after the chunk loop
    pool = create_local(name, kernel_size=3, stride=2, padding=1)
    cotangent = torch.randn(3, 10, 17, 16, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run() -> tuple[Tensor, ...]:
        torch.manual_seed(0)  # stochastic's training draw: the same stream, drawn in the same order
        leaf = x.clone().requires_grad_()
        out = pool(leaf)
        grads = torch.autograd.grad(out, [leaf, *pool.parameters()], cotangent)
        with torch.inference_mode():
            inferred = pool.eval()(x)
        pool.train()
        return out.detach(), *grads, inferred

    used = []
    threads_for = chunked._threads_for
    monkeypatch.setattr(chunked, "_threads_for", lambda planes: used.append(threads_for(planes)) or used[-1])
    pooled = run()
    assert used and set(used) == {2} and torch.get_num_threads() == 2
    monkeypatch.setattr(chunked, "_threads_for", lambda planes: 1)
    for a, b in zip(pooled, run(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("two_threads")
def test_chunk_workers_are_single_threaded_and_dispatch_modes_keep_the_serial_loop() -> None:
    pool = chunked._chunk_pool(2)
    assert {pool.submit(torch.get_num_threads).result() for _ in range(4)} == {1}
    assert torch.get_num_threads() == 2
    planes = torch.zeros(4, 8, 8)
    assert chunked._threads_for(planes) == 2
    # a memory tracker (a dispatch mode) sees only its own thread's ops: the loop stays on it
    peak_memory_mb(lambda: chunked._threads_for(planes) == 1 or pytest.fail("pooled"), torch.device("cpu"))
