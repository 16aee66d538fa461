"""Forward flops of a function (:func:`count_flops`) or of a model and its pool (:func:`measure_cost`):
PyTorch's ``FlopCounterMode`` (matmul, conv, attention) plus the analytic counts of :class:`_UncountedFlops`
for what it does not see.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _matrix_dims(tensor: torch.Tensor) -> tuple[int, int]:
    """(batch count, n) of a batch of n×n matrices."""
    return math.prod(tensor.shape[:-2]), int(tensor.shape[-1])


def _rhs_columns(rhs: torch.Tensor) -> int:
    return math.prod(rhs.shape[:-2]) * int(rhs.shape[-1])


def _cholesky_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * n**3 // 3


def _cholesky_solve_flops(args: tuple) -> int:
    return 2 * int(args[1].shape[-1]) ** 2 * _rhs_columns(args[0])


def _triangular_solve_flops(args: tuple) -> int:
    return int(args[0].shape[-1]) ** 2 * _rhs_columns(args[1])


def _eigh_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * 9 * n**3


def _lu_factor_flops(args: tuple) -> int:
    batch, n = _matrix_dims(args[0])
    return batch * 2 * n**3 // 3


def _lu_solve_flops(args: tuple) -> int:
    return 2 * int(args[0].shape[-1]) ** 2 * _rhs_columns(args[2])


def _row_length(values: torch.Tensor, dim: int) -> int:
    return int(values.shape[dim]) if values.dim() else 1


def _sort_flops(args: tuple, out: Any) -> int:
    """n·⌈log2 n⌉ comparisons per sorted row of n elements (comparison sort)."""
    n = _row_length(args[0], args[1] if len(args) > 1 and isinstance(args[1], int) else -1)
    return args[0].numel() * math.ceil(math.log2(n)) if n > 1 else 0


def _topk_flops(args: tuple, out: Any) -> int:
    """n·max(1, ⌈log2 k⌉) comparisons per row of n elements: a heap of the k largest, every element compared."""
    return args[0].numel() * max(1, math.ceil(math.log2(max(int(args[1]), 1))))


def _window_pool_flops(args: tuple, out: Any) -> int:
    kernel = args[1] if len(args) > 1 else 1
    area = math.prod(kernel) if isinstance(kernel, (list, tuple)) else int(kernel) ** 2
    return tree_leaves(out)[0].numel() * area


_ATEN = torch.ops.aten
# Dense linear algebra FlopCounterMode has no formula for; standard counts (Golub & Van Loan,
# Matrix Computations, 4th ed.), one multiply or add = one flop, n×n matrices, k right-hand sides.
_LINALG_FLOPS: dict[Any, Callable[[tuple], int]] = {
    _ATEN.linalg_cholesky_ex: _cholesky_flops,  # n³/3
    _ATEN.cholesky_solve: _cholesky_solve_flops,  # two triangular solves: 2n²k
    _ATEN.linalg_solve_triangular: _triangular_solve_flops,  # n²k
    _ATEN.triangular_solve: _triangular_solve_flops,
    _ATEN._linalg_eigh: _eigh_flops,  # tridiagonalisation + QR with eigenvectors: ≈ 9n³
    _ATEN.linalg_lu_factor_ex: _lu_factor_flops,  # 2n³/3
    _ATEN.linalg_lu_solve: _lu_solve_flops,  # 2n²k
}
# Tagged pointwise by torch but pure data movement: no arithmetic.
_DATA_MOVEMENT = {_ATEN.clone, _ATEN.copy_, _ATEN.copy, _ATEN._to_copy, _ATEN.fill_, _ATEN.zero_, _ATEN.fill}
_WINDOW_POOLS = {_ATEN.max_pool2d_with_indices, _ATEN.avg_pool2d, _ATEN.max_pool2d}


class _UncountedFlops(TorchDispatchMode):
    """Flops of the ops ``FlopCounterMode`` does not count (it counts matmul, conv and attention only).

    - Dense linear algebra: :data:`_LINALG_FLOPS` (Cholesky n³/3, Cholesky solve 2n²k, triangular
      solve n²k, symmetric eigendecomposition 9n³, LU 2n³/3 and its solve 2n²k).
    - Pointwise ops (``torch.Tag.pointwise``): one flop per output element.
    - Reductions (``torch.Tag.reduction``) and adaptive pools: one flop per input element.
    - Window pools (max/avg pool2d): kernel area flops per output element.
    - Sort: n·⌈log2 n⌉ comparisons per sorted row of n elements; top-k: n·max(1, ⌈log2 k⌉).
    - Data movement (copies, views, indexing, dtype casts) costs no flop.

    Iterative solvers are counted as executed, so their count holds for the given input: one CG
    iteration on GMP's dual system (B samples, Φ of C×N) runs two batched matrix-vector products
    (4CN flops, seen by FlopCounterMode) and about a dozen length-N vector updates and dot products
    (pointwise/reduction flops here), i.e. ≈ B·(4CN + 12N) per iteration.
    """

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    def __init__(self) -> None:
        super().__init__()
        from torch.utils.flop_counter import flop_registry

        self._counted_elsewhere = set(flop_registry)
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        if packet in self._counted_elsewhere or packet in _DATA_MOVEMENT:
            return out
        if packet in _LINALG_FLOPS:
            self.total += _LINALG_FLOPS[packet](args)
        elif packet in _WINDOW_POOLS:
            self.total += _window_pool_flops(args, out)
        elif packet is _ATEN.sort:
            self.total += _sort_flops(args, out)
        elif packet is _ATEN.topk:
            self.total += _topk_flops(args, out)
        elif torch.Tag.pointwise in func.tags:
            self.total += sum(t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        elif torch.Tag.reduction in func.tags or "adaptive_" in packet.__name__:
            self.total += args[0].numel() if isinstance(args[0], torch.Tensor) else 0
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """Flops of one call of ``fn``: FlopCounterMode's count plus :class:`_UncountedFlops`'s."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    extra = _UncountedFlops()
    with counter, extra:  # extra is innermost: it sees each op once, before FlopCounterMode decomposes it
        fn()
    return int(counter.get_total_flops()) + extra.total


def measure_cost(model: nn.Module, input_shape: Sequence[int], *, device: torch.device | None = None) -> dict[str, int]:
    """Forward flops of one image through ``model`` (a :class:`~poolbench.models.PoolNet`), of its
    global pool alone on the image's feature map, and the model's parameter count.

    ``input_shape`` is one image's (C, H, W). Inference only (eval mode, no autograd); see
    :func:`count_flops` for what is counted. The model, its mode and the RNG states are left as they were.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(1, *input_shape, device=device)
        model.eval()
        try:
            with torch.no_grad():
                flops = count_flops(lambda: model(x))
                fmap = model.features(x)
                pool_flops = count_flops(lambda: model.pool(fmap))
        finally:
            model.train(was_training)
    return {"flops_per_image": flops, "pool_flops": pool_flops, "params": sum(p.numel() for p in model.parameters())}
