"""Backbones whose global (and optionally local) pooling comes from the operator registry.

:func:`build_model` returns a :class:`PoolNet`: ``features`` (the backbone trunk, → (B, C, h, w)),
``pool`` (the configured global pool, → (B, F)) and ``head`` (classifier, or embedding + L2
normalisation for retrieval). The libraries' own classifiers are dropped: every backbone gets a
single linear layer sized from the pool's output width, so only the pooling differs between runs.

Backbone options (``model=<name>``, each a schema registered with :func:`poolbench.schema.option`):
``smallcnn``; ``torchvision`` with ``model.arch`` any torchvision classification model; ``timm`` with
``model.arch`` any timm CNN; ``custom`` with ``model._target_`` your own nn.Module class or factory
(:mod:`poolbench.models.custom`, also names plugins register); and poolbench 0.1's names
(``resnet18``, ...) as torchvision aliases.
``cifar_stem``, ``last_stride`` and ``local_pooling`` act on every backbone the same generic way
(:mod:`poolbench.models.surgery`), or stop with a one-line error naming the architecture.
"""

from __future__ import annotations

import importlib
from typing import Any

# Torch-free (what composing a config needs): the schemas and checks of poolbench.models.settings.
from poolbench.models.settings import BackboneSettings, backbone_name, check, label, resolve

__all__ = [
    "backbone_name",
    "BackboneSettings",
    "PoolNet",
    "build_model",
    "build_trunk",
    "check",
    "label",
    "resolve",
    "small_map_warning",
]


def __getattr__(name: str) -> Any:
    """The model code (torch) loads on first use: ``models.build_model``, ``models.PoolNet``, ..."""
    if not name.startswith("__"):
        net = importlib.import_module("poolbench.models.net")
        if hasattr(net, name):
            return getattr(net, name)
    try:  # a submodule reached as an attribute before anything imported it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
