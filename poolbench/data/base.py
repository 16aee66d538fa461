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

    ``val`` (None = no validation split, ``dataset.val_share=0``) is shaped like ``test``: held-out
    training items (classification) or held-out training identities evaluated leave-one-out like the
    test ones (retrieval, with ``val_page_writers``). It is disjoint from ``train`` and ``test``.
    ``notes`` are one-line facts the user should see (dropped or single-image identities, ...): the
    run prints them before training.
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
    val: Dataset | None = None  # validation split, shaped like test; None = none
    val_page_writers: torch.Tensor | None = None  # retrieval only: (num_val_pages,) int64
    notes: list[str] = field(default_factory=list)  # one-line warnings for the user

    def split(self, name: str) -> tuple[Dataset, torch.Tensor | None]:
        """The evaluation split ``"test"`` or ``"val"`` and its page writers (retrieval; None otherwise)."""
        if name == "test":
            return self.test, self.page_writers
        if name == "val" and self.val is not None:
            return self.val, self.val_page_writers
        raise ValueError(f"{self.name} has no {name!r} split (set dataset.val_share for a validation split)")
