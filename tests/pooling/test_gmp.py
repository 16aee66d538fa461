"""GMP / DGMP against an independent numpy reference, their defining properties, and numerical faults."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from poolbench.pooling import create, gmp, spec, specs
from poolbench.pooling.gmp import generalized_max_pool

DIRECT_SOLVERS = ("dual", "primal")
ALL_SOLVERS = ("dual", "primal", "cg", "auto")
NAMES = [s.name for s in specs("global") if s.cls.__module__ == gmp.__name__]  # gmp, dgmp


def reference_gmp(x: Tensor, lam: float) -> np.ndarray:
    """Per-sample float64 ridge regression ξ = argmin ‖Φᵀξ − 1‖² + λ‖ξ‖² via its normal equations."""
    maps = x.detach().double().numpy()
    out = []
    for sample in maps:
        phi = sample.reshape(sample.shape[0], -1)
        out.append(np.linalg.solve(phi @ phi.T + lam * np.eye(phi.shape[0]), phi.sum(axis=1)))
    return np.stack(out)


def reference_dgmp(x: Tensor, lam: float) -> np.ndarray:
    xi = reference_gmp(x, lam)
    return xi / np.linalg.norm(xi, axis=1, keepdims=True)


def relative_error(actual: Tensor, expected: np.ndarray) -> float:
    return float(np.abs(actual.detach().double().numpy() - expected).max() / np.abs(expected).max())


def relu_map(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float64).relu().to(dtype)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize(("shape", "lam"), [((3, 16, 3, 3), 1.0), ((2, 6, 4, 4), 5.0), ((4, 32, 5, 5), 1000.0)])
def test_gmp_and_dgmp_match_numpy_reference(random_map, solver: str, shape: tuple[int, ...], lam: float) -> None:
    x = random_map(*shape, dtype=torch.float32)
    assert relative_error(create("gmp", lam=lam, solver=solver)(x), reference_gmp(x, lam)) < 1e-4
    assert relative_error(create("dgmp", lam=lam, solver=solver)(x), reference_dgmp(x, lam)) < 1e-4


@pytest.mark.parametrize("shape", [(2, 12, 2, 4), (2, 8, 3, 4)])
def test_primal_and_dual_agree_in_float64(random_map, shape: tuple[int, ...]) -> None:
    x = random_map(*shape)
    dual = generalized_max_pool(x, 0.5, "dual")
    primal = generalized_max_pool(x, 0.5, "primal")
    torch.testing.assert_close(dual, primal, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-2, 1.0, 1000.0])
def test_cg_agrees_with_direct_solve_to_1e_4(lam: float) -> None:
    x = relu_map(4, 256, 12, 12, seed=1)
    direct = generalized_max_pool(x, lam, "dual")
    cg = generalized_max_pool(x, lam, "cg")
    assert ((cg - direct).norm(dim=1) / direct.norm(dim=1)).max() <= 1e-4


def test_cg_gradients_agree_with_direct_solve() -> None:
    cotangent = torch.randn(4, 256, generator=torch.Generator().manual_seed(2))
    grads = {}
    for solver in ("dual", "cg"):
        x = relu_map(4, 256, 12, 12, seed=1).requires_grad_()
        lam = torch.tensor(10.0, requires_grad=True)
        out = generalized_max_pool(x, lam, solver, normalize=True)
        grads[solver] = torch.autograd.grad(out, (x, lam), cotangent)
    for direct, cg in zip(grads["dual"], grads["cg"], strict=True):
        assert (cg - direct).norm() <= 1e-4 * direct.norm()


@pytest.mark.parametrize("shape", [(2, 64, 6, 6), (2, 8, 6, 6)])  # falls back to the dual, the primal
@pytest.mark.parametrize("failing_call", [0, 1])  # CG fails in the forward, or only in the backward
def test_cg_that_does_not_converge_falls_back_to_direct(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], failing_call: int
) -> None:
    x = relu_map(*shape, dtype=torch.float64).requires_grad_()
    lam = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    direct = generalized_max_pool(x, lam, "dual" if shape[1] >= 36 else "primal", normalize=True)
    expected_grads = torch.autograd.grad(direct.sum(), (x, lam))
    real_cg, calls = gmp._cg, []

    def cg_failing_from_call(*args: object) -> Tensor | None:
        calls.append(1)
        return None if len(calls) > failing_call else real_cg(*args)

    monkeypatch.setattr(gmp, "_cg", cg_failing_from_call)
    out = generalized_max_pool(x, lam, "cg", normalize=True)
    torch.testing.assert_close(out, direct)
    for grad, expected in zip(torch.autograd.grad(out.sum(), (x, lam)), expected_grads, strict=True):
        torch.testing.assert_close(grad, expected)
    assert len(calls) == (1 if failing_call == 0 else 2)


def test_auto_uses_cg_within_budget_on_large_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    x = relu_map(2, 1024, 32, 32, seed=3)
    factorisations = []
    monkeypatch.setattr(gmp, "_spd_solver", lambda *args: factorisations.append(1))
    auto = generalized_max_pool(x, 1000.0, "auto")
    assert not factorisations  # CG converged within its budget: no Cholesky fallback
    monkeypatch.undo()
    direct = generalized_max_pool(x, 1000.0, "dual")
    assert ((auto - direct).norm(dim=1) / direct.norm(dim=1)).max() <= 1e-4


def test_auto_solver_per_shape_and_device() -> None:
    resolve = gmp.resolve_solver
    assert resolve("auto", 2048, 7 * 7) == ("dual", gmp.CG_MAX_ITER)
    assert resolve("auto", 2048, 24 * 24)[0] == "dual"
    assert resolve("auto", 64, 24 * 24)[0] == "primal"
    assert resolve("auto", 2048, 32 * 32) == ("cg", 1024 // gmp.CG_AUTO_UNKNOWNS_PER_ITERATION)
    assert resolve("auto", 4096, 48 * 48)[0] == "cg"
    assert resolve("auto", 2048, 32 * 32, "cuda")[0] == "dual"
    assert resolve("cg", 8, 4) == ("cg", gmp.CG_MAX_ITER)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_small_lambda_equalises_every_descriptor(random_map, solver: str) -> None:
    # N = 9 <= C = 24 descriptors in general position: Φᵀξ = 1 has an exact solution.
    x = random_map(2, 24, 3, 3)
    xi = generalized_max_pool(x, 1e-8, solver)
    similarities = torch.einsum("bcn,bc->bn", x.flatten(2), xi)
    torch.testing.assert_close(similarities, torch.ones_like(similarities), rtol=0, atol=1e-5)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_large_lambda_points_like_sum_pooling(solver: str) -> None:
    x = relu_map(3, 32, 5, 5)
    xi = generalized_max_pool(x, 1e7, solver)
    assert F.cosine_similarity(xi, x.sum((2, 3))).min() > 0.99


def test_gmp_differs_from_sum_pooling_at_moderate_lambda() -> None:
    # A frequent descriptor must be down-weighted: the property that makes GMP worth its cost.
    rare, frequent = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    x = torch.stack([frequent] * 8 + [rare], dim=1).reshape(1, 2, 3, 3)
    xi = generalized_max_pool(x, 1e-3)
    # Sum pooling gives (1, 8); GMP gives both descriptors the same similarity to ξ.
    torch.testing.assert_close(xi, torch.ones(1, 2), rtol=0, atol=1e-3)


@pytest.mark.parametrize("solver", ("dual", "primal", "cg"))
@pytest.mark.parametrize("shape", [(2, 5, 2, 3), (2, 3, 3, 3)])
@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_input_and_lambda(random_map, name: str, solver: str, shape: tuple[int, ...]) -> None:
    x = random_map(*shape).requires_grad_()
    lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)

    def pooled(inp: Tensor, lam_value: Tensor) -> Tensor:
        return generalized_max_pool(inp, lam_value, solver, normalize=name == "dgmp")

    assert torch.autograd.gradcheck(pooled, (x, lam))


@pytest.mark.parametrize("solver", ("dual", "primal", "cg"))
def test_dgmp_module_gradcheck_through_log_lambda(random_map, gradcheck_pool, solver: str) -> None:
    assert gradcheck_pool(create("dgmp", lam=2.0, solver=solver), random_map(2, 5, 2, 3))


def test_dgmp_lambda_is_learnable_and_stays_positive(random_map) -> None:
    pool = create("dgmp")
    assert float(pool.lam.detach()) == pytest.approx(1000.0)
    pool(random_map(2, 8, 3, 3, dtype=torch.float32)).pow(3).sum().backward()
    assert pool.log_lam.grad is not None and pool.log_lam.grad != 0
    with torch.no_grad():
        pool.log_lam.fill_(-40.0)  # any real θ maps to a positive λ
    assert float(pool.lam.detach()) > 0
    assert torch.isfinite(pool(random_map(2, 8, 3, 3, dtype=torch.float32))).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_registry(random_map, dtype: torch.dtype) -> None:
    x = random_map(3, 7, 4, 5, dtype=dtype)
    for name in NAMES:
        pool = create(name)
        out = pool(x)
        assert out.shape == (3, pool.out_features(7)) == (3, 7)
        assert out.dtype == dtype
    torch.testing.assert_close(create("dgmp")(x).norm(dim=1), torch.ones(3, dtype=dtype))
    assert spec("dgmp").learnable and not spec("gmp").learnable
    assert spec("gmp").params == {"lam": 1000.0, "solver": "auto"}


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_one_by_one_map_has_closed_form(random_map, solver: str) -> None:
    x = random_map(4, 6, 1, 1)
    phi = x.flatten(1)
    expected = phi / (phi.square().sum(1, keepdim=True) + 2.0)
    torch.testing.assert_close(generalized_max_pool(x, 2.0, solver), expected)
    torch.testing.assert_close(generalized_max_pool(x, 2.0, solver, normalize=True), F.normalize(phi))


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("name", NAMES)
def test_all_zero_maps_give_zero_and_finite_gradients(
    assert_finite_output_and_gradients, name: str, solver: str
) -> None:
    out = assert_finite_output_and_gradients(create(name, solver=solver), torch.zeros(2, 6, 3, 3))
    assert (out == 0).all()


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("name", NAMES)
def test_rank_deficient_maps(random_map, assert_finite_output_and_gradients, name: str, solver: str) -> None:
    # Every channel duplicated, one whole sample constant: Gram matrices of rank ≤ C/2 and 1.
    half = random_map(3, 4, 4, 4, dtype=torch.float32)
    half[1] = 1.5
    x = torch.cat([half, half], dim=1)
    out = assert_finite_output_and_gradients(create(name, lam=1.0, solver=solver), x)
    reference = reference_dgmp(x, 1.0) if name == "dgmp" else reference_gmp(x, 1.0)
    assert relative_error(out, reference) < 1e-4


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("lam", [1e-6, 1e-3, 1e8])
@pytest.mark.parametrize("shape", [(2, 16, 3, 3), (2, 8, 4, 4)])  # N <= C and N > C
@pytest.mark.parametrize("name", NAMES)
def test_extreme_lambda_is_finite_and_accurate(
    random_map, assert_finite_output_and_gradients, name: str, shape: tuple[int, ...], lam: float, solver: str
) -> None:
    # Duplicated channels: rank-deficient Gram matrices, which float32 cannot solve for tiny λ
    # (the operator then re-solves in float64).
    x = 10 * random_map(*shape, dtype=torch.float32)
    x[:, shape[1] // 2 :] = x[:, : shape[1] // 2]
    out = assert_finite_output_and_gradients(create(name, lam=lam, solver=solver), x)
    if name == "dgmp":
        torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    reference = reference_dgmp(x, lam) if name == "dgmp" else reference_gmp(x, lam)
    assert relative_error(out, reference) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_inputs(random_map, assert_low_precision_close, name: str, dtype: torch.dtype) -> None:
    x = random_map(2, 16, 4, 4, dtype=torch.float32)
    assert_low_precision_close(create(name, lam=10.0), x, dtype, 1e-2)
    low = x.to(dtype).requires_grad_()
    create(name, lam=10.0)(low).sum().backward()
    assert low.grad is not None and low.grad.dtype == dtype and torch.isfinite(low.grad).all()


def test_autocast_on_cpu_computes_in_float32(random_map) -> None:
    conv = torch.nn.Conv2d(8, 16, 1)
    x = random_map(2, 8, 5, 5, dtype=torch.float32)
    pool = create("dgmp", lam=10.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = conv(x)
        from_autocast_features = pool(features)
        from_float32_features = pool(features.float())
    assert from_autocast_features.dtype == torch.bfloat16
    assert from_float32_features.dtype == torch.float32
    torch.testing.assert_close(from_float32_features, pool(features.float()))
    assert torch.isfinite(from_autocast_features).all()


def test_cholesky_failure_falls_back_to_clamped_eigendecomposition(random_map, monkeypatch: pytest.MonkeyPatch) -> None:
    x = random_map(3, 10, 2, 3).requires_grad_()
    expected = generalized_max_pool(x, 0.3, "dual", normalize=True)
    expected_grad = torch.autograd.grad(expected.sum(), x)[0]
    real_cholesky_ex = torch.linalg.cholesky_ex
    calls = {"eigh": 0}
    real_eigh = torch.linalg.eigh

    def failing_cholesky_ex(matrix: Tensor) -> tuple[Tensor, Tensor]:
        factor, info = real_cholesky_ex(matrix)
        return factor, torch.ones_like(info)  # "leading minor 1 is not positive definite"

    def counting_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        calls["eigh"] += 1
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky_ex)
    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    for solver in DIRECT_SOLVERS:
        out = generalized_max_pool(x, 0.3, solver, normalize=True)
        grad = torch.autograd.grad(out.sum(), x)[0]
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(grad, expected_grad)
    assert calls["eigh"] == 2


def test_float32_cholesky_failure_is_handled_without_patching(monkeypatch: pytest.MonkeyPatch) -> None:
    # λ = 1e-6 against a rank-1 Gram matrix with entries ~1e6: float32 rounding makes it indefinite.
    x = torch.full((2, 64, 6, 6), 30.0)
    real_eigh = torch.linalg.eigh
    calls = {"eigh": 0}

    def counting_eigh(matrix: Tensor) -> tuple[Tensor, Tensor]:
        calls["eigh"] += 1
        return real_eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    xi = generalized_max_pool(x, 1e-6, "dual")
    assert calls["eigh"] == 1
    # All N descriptors equal φ: ξ = φ·N/(N‖φ‖² + λ), so φᵀξ ≈ 1.
    torch.testing.assert_close(torch.einsum("bcn,bc->bn", x.flatten(2), xi), torch.ones(2, 36))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_lambda_is_rejected(bad: float) -> None:
    for name in NAMES:
        with pytest.raises(ValueError, match="lam must be a finite number > 0"):
            create(name, lam=bad)
    with pytest.raises(ValueError, match="lam"):
        generalized_max_pool(torch.ones(1, 2, 2, 2), bad)


def test_unknown_solver_and_parameter_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown GMP solver 'lu'. Valid choices: auto, dual, primal, cg"):
        create("dgmp", solver="lu")
    with pytest.raises(ValueError, match="Valid choices"):
        generalized_max_pool(torch.ones(1, 2, 2, 2), 1.0, "cholesky")
    with pytest.raises(ValueError, match="unknown parameter 'lamb'"):
        create("dgmp", lamb=10.0)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        generalized_max_pool(torch.ones(2, 3), 1.0)


def test_configs_create_the_operators(load_pooling_config) -> None:
    for name in NAMES:
        config = load_pooling_config(name)
        assert config["name"] == name
        params = {k: v for k, v in config.items() if k not in ("name", "lr_mult")}
        assert float(torch.as_tensor(create(name, **params).lam).detach()) == pytest.approx(1000.0)


@pytest.mark.slow
def test_paper_clamm_shape_forward_backward_is_finite() -> None:
    # Its speed is measured by scripts/bench_dgmp_solvers.py (results/bench/README.md), not here.
    x = relu_map(32, 2048, 24, 24).requires_grad_()
    pool = create("dgmp", lam=5000.0)
    out = pool(x)
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(pool.log_lam.grad)


@pytest.mark.parametrize(
    "size", [gmp.GRAM_BLOCK * 2 - 1, gmp.GRAM_BLOCK * 2, 577, gmp.GRAM_BLOCK * gmp.GRAM_MAX_BLOCKS * 2 + 5]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_row_gram_equals_the_full_product(size: int, dtype: torch.dtype) -> None:
    # The symmetric block-row product computes each entry as the same dot product as one bmm.
    a = torch.randn(3, 40, size, generator=torch.Generator().manual_seed(size), dtype=dtype).relu()
    gram = gmp._gram(a)
    torch.testing.assert_close(gram, a.mT @ a, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)


def test_dual_with_block_gram_agrees_with_primal_in_float64(random_map) -> None:
    # N = 400 positions, more than two Gram blocks; C = 500 channels so both forms are well posed.
    x = random_map(2, 500, 20, 20)
    dual = generalized_max_pool(x, 10.0, "dual", normalize=True)
    primal = generalized_max_pool(x, 10.0, "primal", normalize=True)
    torch.testing.assert_close(dual, primal, rtol=1e-9, atol=1e-12)
