"""Tiny synthetic DataBundles built from random tensors, small enough to train in a second."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from poolbench.data.base import DataBundle


def retrieval_bundle(writers: int = 6, patches: int = 8, pages: int = 6, size: int = 16) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    train_labels = torch.arange(writers).repeat_interleave(patches)
    # A per-writer brightness offset makes the task learnable, so the loss can fall.
    train_x = torch.randn(len(train_labels), 1, size, size, generator=g) + train_labels.view(-1, 1, 1, 1) * 0.3
    page_writers = torch.arange(pages) // 2  # 3 test writers × 2 pages
    page_index = torch.arange(pages).repeat_interleave(3)  # 3 patches per page
    test_x = torch.randn(len(page_index), 1, size, size, generator=g)
    return DataBundle(
        name="tiny-retrieval",
        task="retrieval",
        train=TensorDataset(train_x, train_labels),
        test=TensorDataset(test_x, page_index),
        train_labels=train_labels,
        num_classes=writers,
        in_channels=1,
        input_size=size,
        page_writers=page_writers,
    )


def classification_bundle(classes: int = 4, per_class: int = 8, size: int = 16) -> DataBundle:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = torch.randn(len(labels), 3, size, size, generator=g) + labels.view(-1, 1, 1, 1) * 0.5
    return DataBundle(
        name="tiny-classification",
        task="classification",
        train=TensorDataset(x, labels),
        test=TensorDataset(x[::2], labels[::2]),
        train_labels=labels,
        num_classes=classes,
        in_channels=3,
        input_size=size,
    )


@pytest.fixture
def tiny_retrieval() -> DataBundle:
    return retrieval_bundle()


@pytest.fixture
def tiny_classification() -> DataBundle:
    return classification_bundle()


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)
