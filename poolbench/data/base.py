"""The one shape every dataset builder returns, so the engine never needs to know which set it got."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

Task = Literal["retrieval", "classification"]


@dataclass
class DataBundle:
    """A ready-to-train dataset.

    Classification: ``train`` and ``test`` yield ``(image, label)``.
    Retrieval (writer identification): ``train`` yields ``(patch, writer)`` for training writers;
    ``test`` yields ``(patch, page_index)`` for patches tiled over each test page, and
    ``page_writers[page_index]`` is that page's writer. Test writers are disjoint from training ones.
    Images are float tensors (C, H, W), already normalised.
    """

    name: str
    task: Task
    train: Dataset
    test: Dataset
    train_labels: torch.Tensor  # (len(train),) int64: class or writer of every training item
    num_classes: int  # training classes (writers for retrieval)
    in_channels: int
    input_size: int  # H = W of one training input
    page_writers: torch.Tensor | None = None  # retrieval only: (num_test_pages,) int64
    info: dict[str, Any] = field(default_factory=dict)  # flat facts worth recording (sizes, cache path)
