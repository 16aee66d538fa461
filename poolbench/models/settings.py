"""The keys every backbone option takes (``model.*``): the schema the backbone options build on."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, OmegaConf

from poolbench import schema
from poolbench.errors import ConfigError, unknown_choice
from poolbench.schema import Range


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
