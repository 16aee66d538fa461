"""Evaluation metrics: leave-one-out writer retrieval and top-k classification accuracy.

Retrieval follows the ICDAR17 Historical-WI protocol (see REFERENCES.md "Retrieval metrics").
Choices where public evaluators differ (Nicolaou et al., arXiv 1806.07171):

- the query itself is removed from its own ranking;
- equal distances are ranked by item index, lower first (a stable sort of the similarities);
- mAP, Top-1, soft and hard Top-k average over the queries with at least one relevant item
  (a query whose writer has no other item cannot score and would only lower every method alike);
- hard Top-k needs all k nearest items to be relevant, so it is 0 for a query with fewer than k
  relevant items; k larger than the number of other items is clipped to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(values: torch.Tensor | np.ndarray | Sequence, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to(device="cpu", dtype=dtype)
    return torch.as_tensor(np.asarray(values), dtype=dtype)


def writer_retrieval(
    descriptors: torch.Tensor | np.ndarray,
    writer_ids: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 2, 3, 4),
) -> dict[str, float]:
    """Leave-one-out retrieval of every item against all others by cosine similarity.

    Returns ``mAP``, ``top1`` and ``soft@k`` / ``hard@k`` for each k in ``ks``, as fractions in [0, 1].
    """
    # float64: near-equal cosines must not flip order between runs or devices.
    x = _as_tensor(descriptors, torch.float64)
    writers = _as_tensor(writer_ids, torch.int64)
    if x.ndim != 2 or writers.ndim != 1 or len(x) != len(writers):
        raise ValueError(
            f"expected descriptors (n, d) and writer_ids (n,), got {tuple(x.shape)} and {tuple(writers.shape)}"
        )
    if len(x) < 2:
        raise ValueError(f"retrieval needs at least 2 items, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError("descriptors contain NaN or Inf values")
    n = len(x)
    x = F.normalize(x, dim=1)
    similarity = x @ x.T
    similarity.fill_diagonal_(-torch.inf)  # self goes last and is then cut off
    order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, : n - 1]
    relevant = writers[order] == writers[:, None]  # (n, n-1): is the item at rank r by the query's writer

    num_relevant = relevant.sum(dim=1)
    scored = num_relevant > 0
    if not scored.any():
        raise ValueError("no query has a relevant item: every writer has a single item")
    rel = relevant[scored].to(torch.float64)
    ranks = torch.arange(1, n, dtype=torch.float64)
    precision_at_rank = rel.cumsum(dim=1) / ranks
    average_precision = (precision_at_rank * rel).sum(dim=1) / num_relevant[scored]

    result = {"mAP": average_precision.mean().item(), "top1": rel[:, 0].mean().item()}
    for k in ks:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        top = rel[:, : min(k, n - 1)]
        result[f"soft@{k}"] = top.amax(dim=1).mean().item()
        result[f"hard@{k}"] = top.amin(dim=1).mean().item()
    return result


def accuracy(
    logits: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray | Sequence[int],
    ks: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy as fractions, keys ``acc@k``, for the k below the number of classes only: with k
    at or above it every label is in the top k and acc@k is 1.0 whatever the model (a 3-class set has
    no acc@5); acc@1 is always there."""
    scores = _as_tensor(logits, torch.float32)
    targets = _as_tensor(labels, torch.int64)
    if scores.ndim != 2 or targets.ndim != 1 or len(scores) != len(targets) or len(scores) == 0:
        raise ValueError(
            f"expected logits (n, classes) and labels (n,) with n > 0, got {tuple(scores.shape)} "
            f"and {tuple(targets.shape)}"
        )
    # A stable sort, not topk: tied scores rank the lower class index first, deterministically.
    classes = scores.shape[1]
    ks = [k for k in ks if k == 1 or k < classes]
    top = scores.sort(dim=1, descending=True, stable=True).indices[:, : min(max(ks, default=1), classes)]
    hits = top == targets[:, None]
    return {f"acc@{k}": hits[:, :k].any(dim=1).float().mean().item() for k in ks}
