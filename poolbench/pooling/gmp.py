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

``solver="auto"`` takes the smaller Cholesky form, except on CPU once min(N, C) ≥ 1024, where CG
(with an iteration budget, then Cholesky) was measured faster; see CG_AUTO_MIN_SIZE.

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
# "auto" picks CG on CPU once min(N, C) reaches this. Measured with scripts/bench_dgmp_solvers.py
# (torch 2.15, 1 thread, post-ReLU features, fwd+bwd CPU time, CG/Cholesky): 0.86 at N = 576 with
# λ = 1000 but 1.5 and 1.9 with λ = 100 and 10 (CG's iterations grow as λ shrinks against ‖Φ‖²,
# Cholesky's cost does not), 0.64 at N = 1024 and 0.38 at N = 1600. Off CPU, fast GEMMs favour
# Cholesky (not measured here), so "auto" never picks CG there.
CG_AUTO_MIN_SIZE = 1024
# Iterations per CG solve: an explicit solver="cg" gets CG_MAX_ITER; "auto" gets min(N, C) / 40,
# about the cost of the direct solve on CPU, so that a badly conditioned batch, which then falls
# back to Cholesky, costs at most about twice the direct solve.
CG_MAX_ITER = 100
CG_AUTO_UNKNOWNS_PER_ITERATION = 40
# Relative residual at which CG stops: gives ≤ 1e-4 relative agreement of ξ with the direct solve.
CG_TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
# Estimated float32 rounding error of ξ (relative) above which it is solved again in float64.
FLOAT32_ERROR = 1e-4
# Floor on ‖ξ‖ in DGMP's L2 normalisation: an all-zero map gives ξ = 0 → output 0, finite gradient.
NORM_EPS = 1e-6

# Block rows of the symmetric Gram product on CPU (see _gram): 4–6 blocks at M = 576 were fastest
# (195–200 ms vs 209 ms for 8 and 220 ms for 2–3); rows thinner than ~100 lose GEMM efficiency.
GRAM_BLOCK = 96
GRAM_MAX_BLOCKS = 6

SolveFn = Callable[[Tensor], Tensor]


def _cholesky_solve(chol: Tensor, rhs: Tensor) -> Tensor:
    """L Lᵀ x = rhs as two batched triangular solves: 3× faster than ``torch.cholesky_solve`` for one
    right-hand side (3.6 vs 10.6 ms CPU at B = 32, N = 576, 2 threads, torch 2.14)."""
    half = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False)
    return torch.linalg.solve_triangular(chol.mT, half, upper=True).squeeze(-1)


def _spd_solver(matrix: Tensor, lam: Tensor) -> SolveFn:
    """Factorise a batch of SPD matrices (eigenvalues ≥ lam) once; return rhs (B, M) -> solution (B, M).

    When Cholesky reports failure (rounding made the matrix indefinite, e.g. tiny λ against a large
    Gram matrix in float32), fall back to a float64 eigendecomposition with the eigenvalues clamped
    at λ, their exact lower bound, for the whole batch.
    """
    chol, info = torch.linalg.cholesky_ex(matrix)
    if not bool(info.any()):
        return lambda rhs: _cholesky_solve(chol, rhs)
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix.double())
    eigenvalues = eigenvalues.clamp_min(float(lam))

    def solve(rhs: Tensor) -> Tensor:
        coeffs = (eigenvectors.mT @ rhs.double().unsqueeze(-1)).squeeze(-1) / eigenvalues
        return (eigenvectors @ coeffs.unsqueeze(-1)).squeeze(-1).to(rhs.dtype)

    return solve


def _gram(a: Tensor) -> Tensor:
    """aᵀa for a batch a (B, K, M): (B, M, M), symmetric.

    On CPU, for M ≥ 2·GRAM_BLOCK, computes only the block rows on and above the diagonal (one GEMM
    per block row against the columns to its right) and mirrors them: (b + 1)/(2b) of the
    multiply-adds for b blocks, the saving of BLAS's syrk, which torch does not expose. Measured
    (torch 2.14, 2 threads, Φ 32×2048×576): 195–200 ms against 280–336 ms for one bmm; the
    entries are the same dot products over K (equal to one bmm's up to summation order). Off CPU
    one large bmm is left as it is (not measured here).
    """
    size = a.shape[-1]
    if a.device.type != "cpu" or size < 2 * GRAM_BLOCK:
        return a.mT @ a
    blocks = min(GRAM_MAX_BLOCKS, size // GRAM_BLOCK)
    bounds = [round(i * size / blocks) for i in range(blocks + 1)]
    gram = a.new_empty(a.shape[0], size, size)
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        row = a[..., start:stop].mT @ a[..., start:]  # block row: its diagonal block and everything right of it
        gram[:, start:stop, start:] = row
        gram[:, stop:, start:stop] = row[..., stop - start :].mT
    return gram


def _with_ridge(gram: Tensor, lam: Tensor) -> Tensor:
    gram.diagonal(dim1=-2, dim2=-1).add_(lam)
    return gram


def _bmv(matrices: Tensor, vectors: Tensor) -> Tensor:
    """Batched matrix-vector product (B, P, Q) x (B, Q) -> (B, P), computed as row vector times matrix.

    On CPU the row form (B, 1, Q) @ (B, Q, P) was 2.5-6x faster than bmm with a single right-hand
    column and 1.6-2.8x faster than one ``torch.mv`` per sample (torch 2.15, 2 threads, Φ of shape
    (32, 2048, 49) and (32, 2048, 576)).
    """
    return (vectors.unsqueeze(1) @ matrices.mT).squeeze(1)


def _dual_matvec(phi: Tensor, lam: Tensor, v: Tensor) -> Tensor:
    """(ΦᵀΦ + λI) v without forming ΦᵀΦ: two passes over Φ."""
    return _bmv(phi.mT, _bmv(phi, v)) + lam * v


def _cg(matvec: SolveFn, rhs: Tensor, diag: Tensor, tol: float, max_iter: int) -> Tensor | None:
    """Batched Jacobi-preconditioned CG for SPD systems; None unless every sample converged."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = r / diag
    p = z.clone()
    rz = (r * z).sum(-1)
    threshold = tol * rhs.norm(dim=-1)
    for _ in range(max_iter):
        active = r.norm(dim=-1) > threshold
        if not bool(active.any()):
            return x
        ap = matvec(p)
        # Converged samples get step 0, so their 0/0 never reaches x.
        step = torch.where(active, rz / (p * ap).sum(-1), 0.0).unsqueeze(-1)
        x = x + step * p
        r = r - step * ap
        z = r / diag
        rz_next = (r * z).sum(-1)
        p = z + torch.where(active, rz_next / rz, 0.0).unsqueeze(-1) * p
        rz = rz_next
    return x if bool((r.norm(dim=-1) <= threshold).all()) else None


def _direct_form(phi: Tensor) -> str:
    """The Cholesky form with the smaller system: dual (N×N) when N ≤ C, else primal (C×C)."""
    return "dual" if phi.shape[2] <= phi.shape[1] else "primal"


def _factorise(phi: Tensor, lam: Tensor, form: str) -> SolveFn:
    return _spd_solver(_with_ridge(_gram(phi if form == "dual" else phi.mT), lam), lam)


def _solve(
    phi: Tensor, lam: Tensor, method: str, max_iter: int
) -> tuple[Tensor, Tensor | None, Callable[[Tensor], Tensor | None]]:
    """ξ, the dual coefficients α (None for the primal) and the solver the backward reuses.

    The CG solver returns None where it does not converge; the forward then falls back to Cholesky.
    """
    if method == "primal":
        # Cholesky's relative error is about ε·cond ≤ ε(‖Φ‖²_F + λ)/λ: large for a tiny λ against a
        # rank-deficient ΦΦᵀ (e.g. duplicated channels), whose null space then takes rounding noise.
        if phi.dtype == torch.float32:
            condition = 1 + torch.linalg.vector_norm(phi, dim=(1, 2)).square().max() / lam
            if float(condition) * torch.finfo(torch.float32).eps > FLOAT32_ERROR:
                return _solve(phi.double(), lam.double(), method, max_iter)
        solve = _factorise(phi, lam, "primal")
        return solve(phi.sum(-1)), None, solve
    ones = phi.new_ones(phi.shape[0], phi.shape[2])
    if method == "cg":
        diag = torch.linalg.vector_norm(phi, dim=1).square() + lam
        tol = CG_TOL[phi.dtype]

        def solve(rhs: Tensor) -> Tensor | None:
            return _cg(lambda v: _dual_matvec(phi, lam, v), rhs, diag, tol, max_iter)

        alpha = solve(ones)
        if alpha is None:
            return _solve(phi, lam, _direct_form(phi), max_iter)
        frobenius_sq = (diag.sum(-1) - lam * phi.shape[2]).clamp_min(0)
    else:
        gram = _gram(phi)
        frobenius_sq = gram.diagonal(dim1=-2, dim2=-1).sum(-1)  # ‖Φ‖²_F = trace(ΦᵀΦ), no extra pass over Φ
        solve = _spd_solver(_with_ridge(gram, lam), lam)
        alpha = solve(ones)
    xi = _bmv(phi, alpha)
    if phi.dtype == torch.float32:
        # ξ = Φα cancels large α components when λ is tiny and the descriptors are linearly
        # dependent (α ~ 1/λ along null(Φ)); its float32 rounding error is about ε‖Φ‖‖α‖.
        # Beyond FLOAT32_ERROR relative to ‖ξ‖, solve again in float64.
        error = torch.finfo(torch.float32).eps * frobenius_sq.sqrt() * alpha.norm(dim=-1)
        if bool((error > FLOAT32_ERROR * xi.norm(dim=-1)).any()):
            return _solve(phi.double(), lam.double(), method, max_iter)
    return xi, alpha, solve


class _GMPSolve(torch.autograd.Function):
    """ξ(Φ, λ) for Φ (B, C, N), λ a 0-dim tensor; backward by implicit differentiation."""

    @staticmethod
    def forward(ctx, phi: Tensor, lam: Tensor, method: str, max_iter: int) -> Tensor:  # type: ignore[override]
        xi, alpha, solve = _solve(phi, lam, method, max_iter)
        # Which system the backward solves: CG and its fallbacks end up in either form. The saved
        # tensors are float64 when a float32 input was re-solved in float64.
        ctx.method = "primal" if alpha is None else "dual"
        ctx.solve, ctx.input_dtype = solve, phi.dtype
        ctx.save_for_backward(phi.to(xi.dtype), lam.to(xi.dtype), xi, alpha)
        return xi.to(phi.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_xi: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        # With y the adjoint solution (same SPD matrix), dL/dλ = −yᵀ(solution) and dL/dΦ is a
        # rank-2 matrix U Vᵀ; see the module docstring for the two systems.
        phi, lam, xi, alpha = ctx.saved_tensors
        grad_xi = grad_xi.to(phi.dtype)
        form, solve = ctx.method, ctx.solve
        y = None
        if form == "dual":
            y = solve(_project(phi, grad_xi))
            if y is None:  # CG did not converge: the direct form gives the same gradient
                form = _direct_form(phi)
                solve = _factorise(phi, lam, form)
                y = solve(_project(phi, grad_xi)) if form == "dual" else None
        if form == "primal":
            y = solve(grad_xi)
            left = torch.stack((y, -xi), dim=-1)
            right = torch.stack((1.0 - _project(phi, xi), _project(phi, y)), dim=-1)
            solution = xi
        else:
            left = torch.stack((grad_xi - _bmv(phi, y), -xi), dim=-1)
            right = torch.stack((alpha, y), dim=-1)
            solution = alpha
        grad_phi = (left @ right.mT).to(ctx.input_dtype) if ctx.needs_input_grad[0] else None
        grad_lam = -(y * solution).sum().to(ctx.input_dtype).reshape(()) if ctx.needs_input_grad[1] else None
        return grad_phi, grad_lam, None, None


def _project(phi: Tensor, v: Tensor) -> Tensor:
    """Φᵀv for Φ (B, C, N), v (B, C)."""
    return _bmv(phi.mT, v)


def _check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"unknown GMP solver '{solver}'. Valid choices: {', '.join(SOLVERS)}")


def resolve_solver(solver: str, channels: int, positions: int, device_type: str = "cpu") -> tuple[str, int]:
    """(method, CG iteration budget) that ``solver`` means for C = channels, N = positions."""
    _check_solver(solver)
    if solver != "auto":
        return solver, CG_MAX_ITER
    unknowns = min(channels, positions)
    if device_type == "cpu" and unknowns >= CG_AUTO_MIN_SIZE:
        return "cg", unknowns // CG_AUTO_UNKNOWNS_PER_ITERATION
    return ("dual" if positions <= channels else "primal"), CG_MAX_ITER


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
    method, max_iter = resolve_solver(solver, x.shape[1], x.shape[2] * x.shape[3], x.device.type)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        phi = x.flatten(2).to(compute_dtype)
        if isinstance(lam, Tensor):
            lam_t = lam.to(device=x.device, dtype=compute_dtype).reshape(())
        else:
            lam_t = torch.tensor(float(lam), dtype=compute_dtype, device=x.device)
        xi = _GMPSolve.apply(phi, lam_t, method, max_iter)
        if normalize:
            # The output direction does not depend on a positive per-sample scale, so divide ξ by
            # its detached max |ξ_c| (exact gradients, since normalisation is 0-homogeneous): ‖ξ‖ ≥ 1
            # whenever ξ ≠ 0, far from NORM_EPS even for huge λ, at O(B·C) rather than a pass over Φ.
            largest = xi.detach().abs().amax(-1, keepdim=True)
            scale = torch.where(largest > 0, largest, torch.ones_like(largest))  # ξ = 0 stays 0
            xi = F.normalize(xi / scale, dim=-1, eps=NORM_EPS)
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

    def __init__(self, lam: float = 1000, solver: str = "auto") -> None:
        super().__init__()
        _check_lam(lam)
        _check_solver(solver)
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
    # λ is learnt as θ = log λ. The authors trained raw λ with Adam at lr × 1000: Adam's step is about
    # lr × mult whatever the gradient's scale, so raw λ moved by ~lr·1000, i.e. a relative step of
    # lr·1000/λ = lr at λ = 1000. On log λ Adam's step *is* the relative step, so lr_mult 1 matches
    # them (with the default Adam trainer). Under SGD the gradient scales instead: ∂L/∂θ = λ·∂L/∂λ,
    # and matching lr × 1000 on raw λ at λ = 1000 would need lr_mult = 1000/λ² = 1e-3.
    lr_mult=1,
)
class DGMP(GlobalPool):
    """Deep generalized max pooling (Christlein et al., ICDAR 2019, arXiv 1908.05040).

    GMP's ξ with a learnable λ, L2-normalised (the authors: it does not learn without). λ is kept
    positive by learning θ = log λ (``log_lam``); gradients reach both the features and θ.
    """

    def __init__(self, lam: float = 1000, solver: str = "auto") -> None:
        super().__init__()
        _check_lam(lam)
        _check_solver(solver)
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam)))
        self.solver = solver

    @property
    def lam(self) -> Tensor:
        return self.log_lam.exp()

    def forward(self, x: Tensor) -> Tensor:
        return generalized_max_pool(x, self.lam, self.solver, normalize=True)

    def learned_values(self) -> dict[str, float]:
        return {"lam": float(self.lam.detach())}

    def extra_repr(self) -> str:
        return f"lam={float(self.lam.detach()):g} (learnable, log-parametrised), solver={self.solver}"
