"""The ``model`` config group without torch: the keys every backbone option takes (``model.*``), each
built-in option's schema and registration, and what a config needs of a model node (:func:`resolve`,
:func:`label`, :func:`check`). The builders (poolbench.models.smallcnn, .torchvision, .timm, .custom)
read these; a library's architecture list is imported only when a node names that library."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

from poolbench import schema
from poolbench.errors import ConfigError, unknown_choice
from poolbench.schema import Range, Required, option


@dataclass
class BackboneSettings:
    """``model.*`` keys shared by every backbone; ``name`` is fixed by the option (``model=<name>``)."""

    name: str = ""
    # true: the library's ImageNet weights, only from a local cache (poolbench never downloads).
    pretrained: bool = False
    # true: a small-input stem: the strided stem conv gets stride 1 (7x7 kernels become 3x3) and a
    # max-pool that follows it before any other strided layer is removed (final map x2 or x4).
    cifar_stem: bool = False
    # 1: the network's last downsampling step gets stride 1 (final map x2), as the DGMP paper did for
    # ResNet-50; null or 2 = the backbone's own strides.
    last_stride: Literal[1, 2] | None = None
    # Retrieval embedding width (Linear -> BatchNorm -> L2); null = the L2-normalised pool output itself.
    embedding_dim: Annotated[int | None, Range(ge=1)] = 128


def resolve(node: DictConfig | Mapping[str, Any]) -> tuple[schema.Option, dict[str, Any]]:
    """The registered option named by ``node['name']`` and the node completed with that option's
    defaults, checked against its schema (so a partial mapping such as ``{"name": "resnet18"}`` works)."""
    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = plain.get("name")
    options = schema.options("model")
    if name not in options:
        raise ConfigError(unknown_choice("model", name, options))
    option = options[name]
    merged = {**option.node(), **plain}
    schema.check(checked_part(merged, option), option.schema, "model", label=f"model={name}")
    return option, merged


def checked_part(node: Mapping[str, Any], option: schema.Option) -> Mapping[str, Any]:
    """The keys of ``node`` its schema checks: all of them, except for an option whose extra keys are
    its factory's arguments (``model=custom +model.width=32``, checked when the factory is called)."""
    if not option.meta.get("open"):
        return node
    fields = schema.defaults(option.schema)
    return {k: v for k, v in node.items() if k in fields}


def library_and_arch(node: Mapping[str, Any]) -> tuple[str, str]:
    """Which builder makes a checked model node, and the architecture it builds."""
    option_, _ = resolve(node)
    library = option_.meta.get("library", option_.name)
    return library, str(option_.meta.get("arch") or node.get("arch") or option_.name)


def backbone_name(model_node: DictConfig | Mapping[str, Any]) -> str:
    """The backbone's name for run ids, records and reports: the option's name (``resnet18``,
    ``smallcnn``), ``model.arch`` for ``model=torchvision`` / ``model=timm`` (may hold ``/`` or ``.``), or
    the factory's name for ``model=custom`` (``my_backbone.TinyRes`` → ``TinyRes``)."""
    arch = model_node.get("arch")
    if arch:
        return str(arch)
    target = model_node.get("_target_")
    if model_node.get("name") == "custom" and target not in (None, "", "???"):
        return str(target).replace(":", ".").rsplit(".", 1)[-1]
    return str(model_node["name"])


label = backbone_name  # its older, documented name


def check(model_node: DictConfig | Mapping[str, Any]) -> None:
    """ConfigError (one line) for a model node that cannot be built: the schema's checks, plus a
    ``model.arch`` the library does not know (with close matches). Builds nothing; imports torch only
    for a torchvision or timm architecture (their lists) or a custom factory."""
    plain = OmegaConf.to_container(model_node, resolve=True) if isinstance(model_node, DictConfig) else model_node
    option_, cfg = resolve(plain)
    library, arch = library_and_arch(cfg)
    if library == "torchvision":
        from poolbench.models import torchvision as torchvision_backbones

        torchvision_backbones.check_arch(arch)
    elif library == "timm":
        from poolbench.models import timm as timm_backbones

        timm_backbones.check_arch(arch)
    elif library == custom.LIBRARY and (cfg.get("_target_") or option_.meta.get("factory")):
        custom.factory_of(cfg, option_.meta)  # (a missing _target_ is the schema's Required: `train --cfg` shows it)


# ------------------------------------------------------------------------------ the built-in options


@dataclass
class SmallCNNSettings(BackboneSettings):
    """A stride-1 stem conv, then ``depth`` stages of [2x2 max-pool, 3x3 conv] doubling the width
    (final map 8x8 at 64x64 input, depth 3). ``cifar_stem`` drops the first max-pool, ``last_stride=1``
    the last one."""

    name: str = "smallcnn"
    width: Annotated[int, Range(ge=1)] = 16
    depth: Annotated[int, Range(ge=1)] = 3


option("model", "smallcnn", SmallCNNSettings, meta={"library": "smallcnn"})


@dataclass
class TorchvisionSettings(BackboneSettings):
    """``model=torchvision``: any classification model of ``torchvision.models``."""

    name: str = "torchvision"
    arch: Annotated[str | None, Required("a torchvision classification model, e.g. model.arch=resnet18")] = None


option("model", "torchvision", TorchvisionSettings)
# poolbench 0.1's names: the generic path with their architecture fixed. Their config nodes (and so
# their run ids) are those of 0.1: the shared keys without `arch`. (schema.option takes the option's
# name positionally, so each alias's fixed `name` default comes from a subclass.)
for _arch in ("resnet18", "resnet34", "resnet50", "densenet121", "vgg16_bn", "mobilenet_v3_large", "efficientnet_b0"):
    _schema = dataclasses.make_dataclass(
        f"Torchvision_{_arch}", [("name", str, dataclasses.field(default=_arch))], bases=(BackboneSettings,)
    )
    option("model", _arch, _schema, meta={"library": "torchvision", "arch": _arch})


@dataclass
class TimmSettings(BackboneSettings):
    """``model=timm``: any timm model whose features are a (B, C, H, W) map."""

    name: str = "timm"
    # A timm name (resnet18d), with a pretrained tag (resnet18.a1_in1k) or a cached hub repo (hf-hub:org/repo).
    arch: Annotated[str | None, Required("a timm model, e.g. model.arch=resnet18d")] = None


option("model", "timm", TimmSettings, meta={"library": "timm"})

# model=custom and the names plugins register: torch-free too (imported last: it builds on BackboneSettings).
from poolbench.models import custom  # noqa: E402
