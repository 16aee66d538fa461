"""Any torchvision classification model as a trunk (``model=torchvision model.arch=<name>``), and
poolbench 0.1's backbone names as aliases of it (``model=resnet18`` ...).

The trunk is cut generically from the model's own forward: a top-level ``torch.fx`` trace gives the
chain of children and functions that runs before the first adaptive pooling; that chain is the trunk,
and normalisation layers that torchvision applies right after the pool (ConvNeXt's LayerNorm2d sits in
its classifier) move in front of it, so they normalise every position of the map the configured pool
reads. Everything after the pool (flatten, dropout, classifier) is dropped.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn import functional as F

from poolbench.errors import ConfigError
from poolbench.models.settings import TorchvisionSettings  # noqa: F401 - the schema of model=torchvision

ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
ADAPTIVE_POOL_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


def architectures() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def check_arch(arch: str) -> None:
    known = architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f" Close: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown torchvision model '{arch}' (model.arch).{hint} "
            "All: python -c 'import torchvision; print(torchvision.models.list_models(module=torchvision.models))'"
        )


def weights_path(arch: str) -> tuple[Any, Path]:
    """The default ImageNet weights of ``arch`` and where the torch hub cache keeps their file."""
    import torchvision

    weights = torchvision.models.get_model_weights(arch).DEFAULT
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _model(arch: str, pretrained: bool) -> nn.Module:
    import torchvision

    weights = None
    if pretrained:
        weights, path = weights_path(arch)
        if not path.is_file():
            raise ConfigError(
                f"model.pretrained=true but the {arch} weights are not in the local torch hub cache: "
                f"expected {path} (poolbench never downloads; copy the file there or set model.pretrained=false)"
            )
    return torchvision.models.get_model(arch, weights=weights)


class _TopLevel(torch.fx.Tracer):
    """Traces only the model's own forward: its direct children stay single calls."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return "." not in qualified_name or super().is_leaf_module(m, qualified_name)


class Call(nn.Module):
    """A function of the model's forward (DenseNet's final ``F.relu``) as a trunk layer."""

    def __init__(self, fn: Callable[..., torch.Tensor], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.fn, self.kwargs = fn, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, **self.kwargs)

    def extra_repr(self) -> str:
        return f"{getattr(self.fn, '__name__', self.fn)}, {self.kwargs}"


def _is_global_pool(node: torch.fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(str(node.target)), ADAPTIVE_POOLS)
    return node.op == "call_function" and node.target in ADAPTIVE_POOL_FUNCTIONS


def _leading_norms(module: nn.Module) -> list[nn.Module]:
    layers = list(module) if isinstance(module, nn.Sequential) else [module]
    norms = []
    for layer in layers:
        if not isinstance(layer, NORMS):
            break
        norms.append(layer)
    return norms


def cut_trunk(model: nn.Module, arch: str) -> nn.Module:
    """The part of ``model`` that runs before its global pool, as described in the module docstring.

    A single child (VGG's, MobileNet's, EfficientNet's ``features``) is returned as it is, several as an
    ``nn.Sequential`` named like the model's children, so state-dict keys follow the model's own.
    """
    what = f"torchvision {arch}"
    try:
        graph = _TopLevel().trace(model)
    except Exception as exc:  # any tracing failure means the forward is not a plain chain
        raise ConfigError(f"{what}: cannot trace its forward to find the trunk ({type(exc).__name__})") from None
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    nodes = list(graph.nodes)
    previous = nodes[0]
    for index, node in enumerate(nodes[1:], start=1):
        if _is_global_pool(node, model):
            pool_index = index
            break
        if node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            layers[node.name] = model.get_submodule(str(node.target))
        elif node.op == "call_function" and node.args == (previous,):
            layers[node.name] = Call(node.target, dict(node.kwargs))  # type: ignore[arg-type]
        else:
            raise ConfigError(f"{what} has no global pool after a chain of layers; it cannot serve as a trunk")
        previous = node
    else:
        raise ConfigError(f"{what} has no global pool after a chain of layers; it cannot serve as a trunk")
    following = nodes[pool_index + 1]
    if following.op == "call_module" and following.args == (nodes[pool_index],):
        for i, norm in enumerate(_leading_norms(model.get_submodule(str(following.target)))):
            layers[f"{following.name}_norm{i}"] = norm
    if not layers:
        raise ConfigError(f"{what} has no layers before its global pool")
    if len(layers) == 1:
        return next(iter(layers.values()))
    return nn.Sequential(layers)


def build(arch: str, pretrained: bool) -> nn.Module:
    check_arch(arch)
    return cut_trunk(_model(arch, pretrained), arch)
