"""Peak memory (:func:`peak_memory_mb`), one definition everywhere (run latency, ``poolbench bench``,
side by side): the most bytes that one call of a
function has allocated at any moment beyond what existed before the call. CUDA: the caching
allocator's ``max_memory_allocated`` above ``memory_allocated`` before the call. CPU, where torch
keeps no allocator statistics: the peak of live bytes of tensor storages created during the call,
tracked per ATen op by a ``__torch_dispatch__`` mode until each storage is freed (an op's internal
scratch buffers that never become tensors are not seen).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class _LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storage created inside the ``with`` block and still alive."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:  # the default imports torch._dynamo (seconds) for nothing here
        return False

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: dict[int, list[int]] = {}  # data_ptr -> [nbytes, tensors referring to it]

    def _release(self, ptr: int) -> None:
        entry = self._storages[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._storages[ptr]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        input_ptrs = None
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._storages.get(ptr)
            if entry is None:
                if input_ptrs is None:  # views and in-place results share an input's storage: not new
                    input_ptrs = {
                        a.untyped_storage().data_ptr()
                        for a in tree_leaves((args, kwargs))
                        if isinstance(a, torch.Tensor)
                    }
                if ptr in input_ptrs:
                    continue
                entry = self._storages[ptr] = [storage.nbytes(), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
            entry[1] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory (MiB) one call of ``fn`` allocates beyond what was allocated before it (see the module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak / 2**20
