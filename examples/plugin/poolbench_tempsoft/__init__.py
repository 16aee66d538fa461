"""Softmax pooling with a learnable temperature, registered as the global pooling ``tempsoft``.

y_c = Σ_i softmax_i(x_ci / τ) · x_ci over the H·W positions of channel c, with τ = exp(θ) learnt
(θ kept unconstrained so τ stays positive). τ → 0 gives max pooling, τ → ∞ average pooling; τ = 1 is
SoftPool's weighting (Stergiou et al., ICCV 2021, arXiv 2101.00440) applied globally.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poolbench.pooling import GlobalPool, register


@register(
    "tempsoft",
    kind="global",
    formula="Σ_i softmax_i(x_i/τ) x_i, τ = exp(θ) learnable",
    reference="softmax pooling with learnable temperature (cf. SoftPool, Stergiou et al. 2021)",
    learnable=True,
)
class TempSoftPool(GlobalPool):
    def __init__(self, tau: float = 1.0) -> None:
        super().__init__()
        if not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        self.log_tau = nn.Parameter(torch.tensor(math.log(tau)))

    def forward(self, x: Tensor) -> Tensor:
        # At least float32 inside: a float16 softmax of x/τ loses the small weights.
        flat = x.flatten(2).to(torch.promote_types(x.dtype, torch.float32))
        weights = torch.softmax(flat / self.log_tau.exp().to(flat.dtype), dim=-1)
        return (weights * flat).sum(dim=-1).to(x.dtype)

    def learned_values(self) -> dict[str, float]:
        return {"tau": float(self.log_tau.detach().exp())}
