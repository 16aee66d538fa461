"""Datasets: every builder returns a ``DataBundle`` (see ``poolbench.data.base``).

Public API::

    build_dataset(cfg, *, seed, augment=None, progress=None) -> DataBundle  # cfg = the `dataset` group
    dataset_names() -> list[str]

A dataset is one schema dataclass registered as an option of the ``dataset`` config group
(``schema.option("dataset", name, Schema, meta={"augment": recipe, "build": builder})``): its fields are
the ``dataset.*`` keys with their types, ranges and defaults, ``meta["augment"]`` the training
augmentation ``augment=auto`` picks (poolbench.data.augment), ``meta["build"]`` the function
``build(settings, *, seed, transform, progress) -> DataBundle`` that reads it. The built-in schemas live
in poolbench.data.schemas, which imports no torch (composing a config needs only them); their builders
(torch, numpy) load when a dataset is built.

Nothing downloads: every dataset is generated, bundled with a package, or read from a local
``root``. Problems with the data raise ``poolbench.errors.DataError`` with one line; a corrupt or
unreadable image is an error naming the file (never skipped), so a benchmark always evaluates the
set it declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from poolbench import schema
from poolbench.data import augment as _augment  # noqa: F401 - registers the augment recipes
from poolbench.data.augment import AUTO_AUGMENT, default_augment
from poolbench.data.schemas import Augment, settings  # registers the datasets

if TYPE_CHECKING:
    from poolbench.data.base import DataBundle


def dataset_names() -> list[str]:
    return sorted(schema.options("dataset"))


def augment_transform(augment: Mapping[str, Any] | None, dataset: str) -> Augment:
    """``size -> transform`` of the ``augment`` node (``auto`` = the dataset's recipe; None = no
    augmentation); the recipe's values are validated by its schema."""
    if augment is None:
        return lambda size: None
    node = dict(augment)
    if node.get("name") == AUTO_AUGMENT:
        node = {"name": default_augment(dataset)}
    _, recipe = settings("augment", node)
    return recipe.transform


def build_dataset(cfg: Mapping[str, Any], *, seed: int, augment: Mapping[str, Any] | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> DataBundle:
    """Build the dataset the ``dataset`` config node describes (missing keys take the option's
    defaults), with the ``augment`` node's transform on training items (None: none);
    ``progress(description, done, total)`` is called during long preparation."""
    option, dataset_settings = settings("dataset", cfg)
    transform = augment_transform(augment, option.name)
    return option.meta["build"](dataset_settings, seed=seed, transform=transform, progress=progress)


def __getattr__(name: str) -> Any:
    if name == "DataBundle":  # torch: loaded on first use
        from poolbench.data.base import DataBundle

        return DataBundle
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataBundle", "augment_transform", "build_dataset", "dataset_names"]
