"""Batch samplers with a fixed number of batches per epoch, driven by an explicit generator."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from poolbench.errors import ConfigError


class PKBatchSampler:
    """Batches of P distinct labels × K items each, for batch-hard triplet mining.

    Labels are drawn without replacement within a batch; items within a label without replacement
    when it has at least K items, with replacement otherwise.
    """

    def __init__(
        self, labels: torch.Tensor, labels_per_batch: int, items_per_label: int, num_batches: int,
        generator: torch.Generator,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        self.groups = [torch.nonzero(labels == value).flatten() for value in torch.unique(labels)]
        if labels_per_batch > len(self.groups):
            raise ConfigError(
                f"trainer.writers_per_batch={labels_per_batch} but the training set has only "
                f"{len(self.groups)} writers"
            )
        if items_per_label < 2:
            raise ConfigError(f"trainer.patches_per_writer must be >= 2 for triplet mining, got {items_per_label}")
        self.p, self.k, self.num_batches, self.generator = labels_per_batch, items_per_label, num_batches, generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        g = self.generator
        for _ in range(self.num_batches):
            batch: list[int] = []
            for group in torch.randperm(len(self.groups), generator=g)[: self.p].tolist():
                items = self.groups[group]
                if len(items) >= self.k:
                    picks = torch.randperm(len(items), generator=g)[: self.k]
                else:
                    picks = torch.randint(len(items), (self.k,), generator=g)
                batch.extend(items[picks].tolist())
            yield batch


class RandomBatchSampler:
    """``num_batches`` full batches from consecutive random permutations of the dataset."""

    def __init__(self, size: int, batch_size: int, num_batches: int, generator: torch.Generator) -> None:
        if size < 1:
            raise ConfigError("the training set is empty")
        self.size, self.batch_size = size, min(batch_size, size)
        self.num_batches, self.generator = num_batches, generator

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.empty(0, dtype=torch.int64)
        for _ in range(self.num_batches):
            while len(order) < self.batch_size:
                order = torch.cat([order, torch.randperm(self.size, generator=self.generator)])
            batch, order = order[: self.batch_size], order[self.batch_size :]
            yield batch.tolist()
