"""Datasets: every builder returns a ``DataBundle`` (see ``poolbench.data.base``).

Public API::

    build_dataset(cfg, *, seed, progress=None) -> DataBundle   # cfg = the Hydra `dataset` group
    dataset_names() -> list[str]

Nothing downloads: every dataset is generated, bundled with a package, or read from a local
``root``. Problems with the data raise ``poolbench.errors.DataError`` with one line; a corrupt or
unreadable image is an error naming the file (never skipped), so a benchmark always evaluates the
set it declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from poolbench.data import classification, synthwriters, writers
from poolbench.data.base import DataBundle
from poolbench.errors import ConfigError, unknown_choice

Builder = Callable[..., DataBundle]

BUILDERS: dict[str, Builder] = {
    "synthwriters": synthwriters.build,
    "icdar17": writers.build_icdar17,
    "digits": classification.build_digits,
    "fashion_mnist": classification.build_fashion_mnist,
    "cifar10": classification.build_cifar10,
    "cifar100": classification.build_cifar100,
    "imagefolder": classification.build_imagefolder,
    "clamm": classification.build_clamm,
}


def dataset_names() -> list[str]:
    return sorted(BUILDERS)


def build_dataset(cfg: Mapping[str, Any], *, seed: int,
                  progress: Callable[[str, int, int], None] | None = None) -> DataBundle:
    """Build the dataset the ``dataset`` config group describes; ``progress(description, done, total)``
    is called during long preparation (synthwriters generation)."""
    name = cfg.get("name")
    if name not in BUILDERS:
        raise ConfigError(unknown_choice("dataset", name, BUILDERS))
    return BUILDERS[str(name)](cfg, seed=seed, progress=progress)


__all__ = ["DataBundle", "build_dataset", "dataset_names"]
