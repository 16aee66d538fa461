"""Evaluation of one split (``test``, or ``val`` when the dataset has a validation split): writer
retrieval on page descriptors, or top-k classification accuracy."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from poolbench.data.base import DataBundle
from poolbench.engine.policies import amp_dtype, autocast
from poolbench.errors import DataError
from poolbench.metrics import accuracy, writer_retrieval


def evaluate(
    model: nn.Module,
    data: DataBundle,
    *,
    device: torch.device,
    batch_size: int,
    amp: str = "none",
    progress: Callable[[str, int, int], None] | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Metrics of the ``split`` ("test" or "val") of ``data``, unprefixed (callers name them).

    Retrieval: page descriptor = mean of the L2-normalised patch embeddings, L2-normalised again,
    scored by :func:`~poolbench.metrics.writer_retrieval` against the split's page writers
    (leave-one-out within the split). Classification: ``acc@1`` and ``acc@5`` (``acc@k`` only for k
    below the number of classes, :func:`~poolbench.metrics.accuracy`). The model's train/eval mode is
    kept. ``progress("evaluate", batches_done, batches_total)`` is called after every batch.
    """
    dataset, page_writers = data.split(split)
    dtype = amp_dtype(amp, device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, pin_memory=device.type == "cuda")
    outputs: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), autocast(device, dtype):
            for i, (x, y) in enumerate(loader, start=1):
                outputs.append(model(x.to(device, non_blocking=True)).float())
                targets.append(torch.as_tensor(y).to(device))
                if progress:
                    progress("evaluate", i, len(loader))
    finally:
        model.train(was_training)
    out, labels = torch.cat(outputs), torch.cat(targets)
    if data.task == "classification":
        return accuracy(out.cpu(), labels.cpu(), ks=(1, 5))
    if page_writers is None:
        raise DataError(f"retrieval dataset {data.name} has no page writers for its {split} split")
    num_pages = len(page_writers)
    sums = torch.zeros(num_pages, out.shape[1], device=out.device).index_add_(0, labels, F.normalize(out, dim=1))
    counts = torch.bincount(labels, minlength=num_pages)
    if bool((counts == 0).any()):
        empty = int((counts == 0).sum())
        raise DataError(f"{empty} of {num_pages} {split} pages of {data.name} have no patches to describe them")
    return writer_retrieval(F.normalize(sums, dim=1).cpu(), page_writers)
