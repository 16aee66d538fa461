"""Training losses: batch-hard triplet (writer retrieval) and cross-entropy (classification)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over anchors of relu(d(a, hardest positive) − d(a, hardest negative) + margin).

    d is the squared Euclidean distance, as in the DGMP writer-identification protocol; on
    L2-normalised embeddings it equals 2 − 2·cos. Anchors without a positive or a negative in the
    batch are left out; a batch with no valid anchor is an error (use K ≥ 2 patches per writer).
    """
    x = embeddings.float()
    squared_norms = x.pow(2).sum(dim=1)
    distances = (squared_norms[:, None] + squared_norms[None, :] - 2 * x @ x.T).clamp_min(0)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positives = same & ~eye
    # Masked entries get a value that can never be the max / min of the valid ones.
    hardest_positive = distances.masked_fill(~positives, -1.0).amax(dim=1)
    hardest_negative = distances.masked_fill(same, torch.inf).amin(dim=1)
    valid = positives.any(dim=1) & (~same).any(dim=1)
    if not bool(valid.any()):
        raise ValueError("triplet loss needs at least two items of one label and one of another in each batch")
    return F.relu(hardest_positive - hardest_negative + margin)[valid].mean()


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    del margin  # same signature as the triplet loss
    return F.cross_entropy(logits.float(), labels)
