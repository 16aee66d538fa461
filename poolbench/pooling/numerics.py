"""Numeric helpers the operator families share: safe dtypes, powers and roots with finite gradients.

A leaf module (torch only): the families import it and the registry, never each other, so any of them
can be imported first (the registry loads every family when it loads; a family half-loaded at that
moment must not be asked for a name it has not defined yet).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16 inputs (exp, pow and squares overflow or round there), else x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def safe_root(total: Tensor, p: float) -> Tensor:
    # total^(1/p) with a zero (not NaN) gradient where total == 0: the double-where trick.
    positive = total > 0
    return torch.where(positive, torch.where(positive, total, 1.0) ** (1.0 / p), 0.0)


def nonnegative_power(magnitude: Tensor, p: float) -> Tensor:
    """a^p for a >= 0, with a zero gradient at a = 0 for every p (a^p has an infinite slope there when p < 1)."""
    if p == 2.0:
        return magnitude.square()
    if p >= 1.0:  # p·a^(p−1) is finite at 0
        return magnitude.pow(p)
    nonzero = magnitude > 0
    return torch.where(nonzero, torch.where(nonzero, magnitude, 1.0) ** p, 0.0)
