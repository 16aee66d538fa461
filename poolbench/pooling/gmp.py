"""Generalized max pooling (GMP) and Deep GMP (DGMP).

For one image, Φ ∈ R^{C×N} holds its N = H·W local descriptors as columns. GMP pools them into the
ξ ∈ R^C whose dot product with every descriptor is (as close as possible to) the same constant,
so frequent and rare descriptors contribute equally:

    ξ = argmin_ξ ‖Φᵀξ − 1_N‖² + λ‖ξ‖²

Two equivalent closed forms, both symmetric positive definite (all eigenvalues ≥ λ > 0):

    dual   (N ≤ C):  (ΦᵀΦ + λI_N) α = 1_N,   ξ = Φα     (an N×N system)
    primal (N > C):  (ΦΦᵀ + λI_C) ξ = Φ1_N              (a C×C system)

Solved batched with a Cholesky factorisation, or matrix-free with preconditioned conjugate
gradients (CG) on the dual, which never forms the N×N Gram matrix. Gradients are by implicit
differentiation: the backward solves the adjoint system (same matrix) with the saved factor or CG
again, so it costs a solve and rank-2 updates, not a second Gram-sized product.

Batched LU (``torch.linalg.solve``) is deliberately not used: on CPU it fails for N ≥ ~150 with B > 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poolbench.pooling.registry import GlobalPool, register

SOLVERS = ("auto", "dual", "primal", "cg")
# "auto" switches from Cholesky to CG once min(N, C) reaches this (scripts/bench_dgmp_solvers.py).
CG_MIN_SIZE = 10**9
CG_MAX_ITER = 100
# Relative residual at which CG stops: gives ≤ 1e-4 relative agreement of ξ with the direct solve.
CG_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
# Estimated float32 rounding error of the dual's ξ (relative) above which it is solved in float64.
DUAL_FLOAT32_ERROR = 1e-4
# Floor on ‖ξ‖ in DGMP's L2 normalisation: an all-zero map gives ξ = 0 → output 0, finite gradient.
NORM_EPS = 1e-6

SolveFn = Callable[[Tensor], Tensor]


def _spd_solver(matrix: Tensor, lam: Tensor) -> SolveFn:
    """Factorise a batch of SPD matrices (eigenvalues ≥ lam) once; return rhs (B, M) -> solution (B, M).

    When Cholesky reports failure (rounding made the matrix indefinite, e.g. tiny λ against a large
    Gram matrix in float32), fall back to a float64 eigendecomposition with the eigenvalues clamped
    at λ, their exact lower bound, for the whole batch.
    """
    chol, info = torch.linalg.cholesky_ex(matrix)
    if not bool(info.any()):
        return lambda rhs: torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    eigenvalues = eigenvalues.clamp_min(float(lam))

    def solve(rhs: Tensor) -> Tensor:
        coeffs = (eigenvectors.mT @ rhs.double().unsqueeze(-1)).squeeze(-1) / eigenvalues
        return (eigenvectors @ coeffs.unsqueeze(-1)).squeeze(-1).to(rhs.dtype)

    return solve


def _with_ridge(gram: Tensor, lam: Tensor) -> Tensor:
    gram.diagonal(dim1=-2, dim2=-1).add_(lam)
    return gram


def _bmv(matrices: Tensor, vectors: Tensor) -> Tensor:
    """Batched matrix-vector product (B, P, Q) x (B, Q) -> (B, P).

    On CPU, bmm with a single right-hand column is 4-25x slower than one ``torch.mv`` per sample
    (measured with torch 2.15, 2 threads, (32, 2048, 49) and (32, 2048, 576)), so loop there.
    """
    if matrices.device.type == "cpu":
        return torch.stack([torch.mv(m, v) for m, v in zip(matrices, vectors, strict=True)])
    return (matrices @ vectors.unsqueeze(-1)).squeeze(-1)


def _dual_matvec(phi: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """(ΦᵀΦ + λI) v without forming ΦᵀΦ: two passes over Φ."""
    return _bmv(phi.mT, _bmv(phi, v)) + lam * v


def _cg(matvec: SolveFn, rhs: Tensor, diag: Tensor, tol: float, max_iter: int) -> tuple[Tensor, bool]:
    """Batched Jacobi-preconditioned CG for SPD systems; returns (solution, every sample converged)."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(-1)
    threshold = tol * rhs.norm(dim=-1)
    for _ in range(max_iter):
        active = r.norm(dim=-1) > threshold
        if not bool(active.any()):
            return x, True
        ap = matvec(p)
        # Converged samples get step 0, so their 0/0 never reaches x.
        step = torch.where(active, rz / (p * ap).sum(-1), 0.0).unsqueeze(-1)
        x = x + step * p
        r = r - step * ap
        z = r / diag
        rz_next = (r * z).sum(-1)
        p = z + torch.where(active, rz_next / rz, 0.0).unsqueeze(-1) * p
        rz = rz_next
    return x, bool((r.norm(dim=-1) <= threshold).all())


def _dual_solver(phi: Tensor, lam: Tensor, method: str) -> tuple[SolveFn, Tensor]:
    """A solver for (ΦᵀΦ + λI) a = rhs (Cholesky, or CG falling back to Cholesky if it stalls) and
    the system's diagonal ‖φ_i‖² + λ."""
    if method == "dual":
        system = _with_ridge(phi.mT @ phi, lam)
        return _spd_solver(system, lam), system.diagonal(dim1=-2, dim2=-1)
    diag = phi.square().sum(1) + lam
    tol = CG_TOL[phi.dtype]
    direct: list[SolveFn] = []

    def solve(rhs: Tensor) -> Tensor:
        x, converged = _cg(lambda v: _dual_matvec(phi, lam, v), rhs, diag, tol, CG_MAX_ITER)
        if converged:
            return x
        if not direct:
            direct.append(_spd_solver(_with_ridge(phi.mT @ phi, lam), lam))
        return direct[0](rhs)

    return solve, diag


def _solve(phi: Tensor, lam: Tensor, method: str) -> tuple[Tensor, tuple[Tensor, ...], SolveFn]:
    """ξ, the tensors the backward needs, and the factorised solver it reuses."""
    if method == "primal":
        solve = _spd_solver(_with_ridge(phi @ phi.mT, lam), lam)
        xi = solve(phi.sum(-1))
        return xi, (phi, xi), solve
    solve, diag = _dual_solver(phi, lam, method)
    alpha = solve(phi.new_ones(phi.shape[0], phi.shape[2]))
    xi = _bmv(phi, alpha)
    if phi.dtype == torch.float32:
        # ξ = Φα cancels large α components when λ is tiny and the descriptors are linearly
        # dependent (α ~ 1/λ along null(Φ)); its float32 rounding error is about ε‖Φ‖‖α‖.
        # Beyond DUAL_FLOAT32_ERROR relative to ‖ξ‖, solve again in float64.
        frobenius = (diag.sum(-1) - lam * phi.shape[2]).clamp_min(0).sqrt()
        error = torch.finfo(torch.float32).eps * frobenius * alpha.norm(dim=-1)
        if bool((error > DUAL_FLOAT32_ERROR * xi.norm(dim=-1)).any()):
            return _solve(phi.double(), lam.double(), method)
    return xi, (phi, xi, alpha), solve


class _GMPSolve(torch.autograd.Function):
    """ξ(Φ, λ) for Φ (B, C, N), λ a 0-dim tensor; backward by implicit differentiation."""

    @staticmethod
    def forward(ctx, phi: Tensor, lam: Tensor, method: str) -> Tensor:  # type: ignore[override]
        xi, saved, solve = _solve(phi, lam, method)
        ctx.method, ctx.solve, ctx.input_dtype = method, solve, phi.dtype
        ctx.save_for_backward(*saved)
        return xi.to(phi.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_xi: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        # With y the adjoint solution (same SPD matrix), dL/dλ = −yᵀ(solution) and dL/dΦ is a
        # rank-2 matrix U Vᵀ; see the module docstring for the two systems.
        if ctx.method == "primal":
            phi, xi = ctx.saved_tensors
            y = ctx.solve(grad_xi.to(phi.dtype))
            left = torch.stack((y, -xi), dim=-1)
            right = torch.stack((1.0 - _project(phi, xi), _project(phi, y)), dim=-1)
            solution = xi
        else:
            phi, xi, alpha = ctx.saved_tensors
            grad_xi = grad_xi.to(phi.dtype)
            y = ctx.solve(_project(phi, grad_xi))
            left = torch.stack((grad_xi - _bmv(phi, y), -xi), dim=-1)
            right = torch.stack((alpha, y), dim=-1)
            solution = alpha
        grad_phi = (left @ right.mT).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_lam = -(y * solution).sum().to(ctx.input_dtype).reshape(()) if ctx.needs_input_grad[1] else None
        return grad_phi, grad_lam, None


def _project(phi: Tensor, v: Tensor) -> Tensor:
    """Φᵀv for Φ (B, C, N), v (B, C)."""
    return _bmv(phi.mT, v)


def _resolve_solver(solver: str, channels: int, positions: int) -> str:
    if solver not in SOLVERS:
        raise ValueError(f"unknown GMP solver '{solver}'. Valid choices: {', '.join(SOLVERS)}")
    if solver != "auto":
        return solver
    if min(channels, positions) >= CG_MIN_SIZE:
        return "cg"
    return "dual" if positions <= channels else "primal"


def _check_lam(lam: float | Tensor) -> None:
    value = float(lam.detach()) if isinstance(lam, Tensor) else float(lam)
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"GMP lam must be a finite number > 0, got {value}")


def generalized_max_pool(x: Tensor, lam: float | Tensor, solver: str = "auto", *, normalize: bool = False) -> Tensor:
    """Generalized max pooling of x (B, C, H, W) -> ξ (B, C); ``normalize=True`` L2-normalises ξ (DGMP).

    ``lam`` is a float or a 0-dim tensor (gradients flow to it). ``solver``: ``auto`` (picked per
    shape), ``dual`` / ``primal`` (Cholesky on the N×N / C×C system) or ``cg`` (matrix-free
    conjugate gradients on the dual). Computed in float32 (float64 for float64 input) with autocast
    off; returned in x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"generalized_max_pool expects (B, C, H, W), got shape {tuple(x.shape)}")
    _check_lam(lam)
    method = _resolve_solver(solver, x.shape[1], x.shape[2] * x.shape[3])
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        phi = x.flatten(2).to(compute_dtype)
        if isinstance(lam, Tensor):
            lam_t = lam.to(device=x.device, dtype=compute_dtype).reshape(())
        else:
            lam_t = torch.tensor(float(lam), dtype=compute_dtype, device=x.device)
        xi = _GMPSolve.apply(phi, lam_t, method)
        if normalize:
            # The output direction does not depend on a positive per-sample scale, so rescale ξ
            # (detached: exact gradients, since normalisation is 0-homogeneous) to the order of
            # ‖Φ1‖ for large λ and of ‖Φ‖ for small λ, keeping ‖ξ‖ far from NORM_EPS.
            scale = lam_t.detach() + phi.detach().square().sum((1, 2)) / phi.shape[2]
            xi = F.normalize(xi * scale.unsqueeze(-1), dim=-1, eps=NORM_EPS)
    return xi.to(x.dtype)


@register(
    "gmp",
    kind="global",
    formula="ξ = argmin ‖Φᵀξ − 1‖² + λ‖ξ‖² (fixed λ, unnormalised)",
    reference="Murray & Perronnin, Generalized Max Pooling, CVPR 2014",
)
class GMP(GlobalPool):
    """Generalized max pooling with a fixed λ (Murray & Perronnin, CVPR 2014); no normalisation.

    ξ = argmin_ξ ‖Φᵀξ − 1‖² + λ‖ξ‖²: the pooled vector has the same similarity to every local
    descriptor. λ → ∞ gives sum pooling up to scale; λ → 0 the min-norm equalising solution.
    """

    def __init__(self, lam: float = 1000.0, solver: str = "auto") -> None:
        super().__init__()
        _check_lam(lam)
        _resolve_solver(solver, 1, 1)
        self.lam = float(lam)
        self.solver = solver

    def forward(self, x: Tensor) -> Tensor:
        return generalized_max_pool(x, self.lam, self.solver)

    def extra_repr(self) -> str:
        return f"lam={self.lam:g}, solver={self.solver}"


@register(
    "dgmp",
    kind="global",
    formula="ξ/‖ξ‖, ξ = argmin ‖Φᵀξ − 1‖² + λ‖ξ‖², λ = exp(θ) learnable",
    reference="Christlein et al., Deep Generalized Max Pooling, ICDAR 2019 (arXiv 1908.05040)",
    learnable=True,
)
class DGMP(GlobalPool):
    """Deep generalized max pooling (Christlein et al., ICDAR 2019, arXiv 1908.05040).

    GMP's ξ with a learnable λ, L2-normalised (the authors: it does not learn without). λ is kept
    positive by learning θ = log λ (``log_lam``); gradients reach both the features and θ.
    """

    def __init__(self, lam: float = 1000.0, solver: str = "auto") -> None:
        super().__init__()
        _check_lam(lam)
        _resolve_solver(solver, 1, 1)
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)))
        self.solver = solver

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    def forward(self, x: Tensor) -> Tensor:
        return generalized_max_pool(x, self.lam, self.solver, normalize=True)

    def extra_repr(self) -> str:
        return f"lam={float(self.lam.detach()):g} (learnable, log-parametrised), solver={self.solver}"
