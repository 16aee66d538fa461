"""The model poolbench trains: a backbone trunk, the configured global pool and a task head
(:func:`build_model`, :class:`PoolNet`); reached as ``poolbench.models.build_model`` etc."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from poolbench import pooling
from poolbench.errors import ConfigError
from poolbench.models import custom, smallcnn, surgery
from poolbench.models import timm as timm_backbones
from poolbench.models import torchvision as torchvision_backbones
from poolbench.models.settings import backbone_name, library_and_arch, resolve

# A final map with at most this many positions leaves global pools little to differ on.
SMALL_MAP_POSITIONS = 4


class L2Normalize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


class PoolNet(nn.Module):
    """Backbone trunk → global pool → head.

    ``forward`` returns logits (classification) or L2-normalised embeddings (retrieval).
    """

    def __init__(
        self,
        features: nn.Module,
        pool: nn.Module,
        head: nn.Module,
        *,
        feature_channels: int,
        feature_map_size: tuple[int, int],
        pool_out_features: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.head = head
        self.feature_channels = feature_channels
        self.feature_map_size = feature_map_size
        self.pool_out_features = pool_out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))

    def global_pool_parameters(self) -> list[nn.Parameter]:
        return list(self.pool.parameters())

    def local_pool_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.features.modules() if isinstance(m, pooling.LocalPool) for p in m.parameters()]

    def pool_parameters(self) -> list[nn.Parameter]:
        """The global and local pools' own parameters (their own optimiser groups, no weight decay)."""
        return self.global_pool_parameters() + self.local_pool_parameters()

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not a pool's: trunk and head."""
        own = {id(p) for p in self.pool_parameters()}
        return [p for p in self.parameters() if id(p) not in own]


def _plain(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_trunk(model_cfg: DictConfig | Mapping[str, Any], in_channels: int) -> nn.Module:
    """The backbone trunk of a model node, → (B, C, h, w), with its input channels, small-input stem
    and last stride as configured. Weights are initialised from torch's global RNG."""
    option, cfg = resolve(_plain(model_cfg))
    library, arch = library_and_arch(cfg)
    if library == "smallcnn":
        trunk = smallcnn.build(in_channels, width=cfg["width"], depth=cfg["depth"], pretrained=cfg["pretrained"])
        what = "smallcnn"
    elif library == "torchvision":
        trunk = torchvision_backbones.build(arch, cfg["pretrained"])
        what = f"torchvision {arch}"
    elif library == custom.LIBRARY:
        trunk = custom.build(cfg, option.meta, in_channels)
        what = f"model {backbone_name(cfg)}"
    else:
        trunk = timm_backbones.build(arch, cfg["pretrained"], in_channels)
        what = f"timm {arch}"
    if library != custom.LIBRARY or cfg["cifar_stem"] or surgery.has_conv(trunk):
        surgery.adapt_stem(trunk, in_channels, cfg["cifar_stem"], what)  # your module: only where it has a stem
    if cfg["last_stride"] == 1:
        surgery.unstride_last(trunk, in_channels, what)
    return trunk


def small_map_warning(
    model_cfg: DictConfig | Mapping[str, Any],
    feature_map: tuple[int, int],
    dataset_cfg: DictConfig | Mapping[str, Any] | None = None,
) -> str | None:
    """The warning for a final feature map too small to compare global pools on, with only the remedies
    the config does not use yet (never ``model.cifar_stem=true`` when it is set); None for a large map."""
    height, width = feature_map
    if height * width > SMALL_MAP_POSITIONS:
        return None
    node, data = _plain(model_cfg), _plain(dataset_cfg or {})
    size_key = next((f"dataset.{k}" for k in ("image_size", "input_size") if k in data), None)
    remedies = [f"a larger {size_key}" if size_key else "a larger input"]
    if not node.get("cifar_stem"):
        remedies.append("model.cifar_stem=true")
    if node.get("last_stride") != 1:
        remedies.append("model.last_stride=1")
    return f"the final feature map is {height}x{width}: global pools barely differ on it; use " + " or ".join(
        remedies
    )


def _probe(
    trunk: nn.Module, pool: nn.Module, pool_name: str, in_channels: int, input_size: int, what: str
) -> tuple[torch.Size, int]:
    """The real feature-map shape and pool width from one dummy forward, which also materialises lazy
    parameters (netvlad); eval mode keeps the BatchNorm statistics untouched."""
    probe = torch.randn(2, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    trunk.eval()
    pool.eval()
    with torch.no_grad():
        try:
            fmap = trunk(probe)
        except RuntimeError as exc:
            raise ConfigError(f"model {what} cannot process {input_size}x{input_size} inputs: {exc}") from None
        if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
            shape = tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
            raise ConfigError(f"model {what} returns {shape}, not a (B, C, h, w) feature map")
        try:
            pooled = pool(fmap)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"pooling {pool_name} fails on the {fmap.shape[2]}x{fmap.shape[3]} feature map of {what}: {exc}"
            ) from None
    if not isinstance(pooled, torch.Tensor) or pooled.ndim != 2 or pooled.shape[0] != 2:
        shape = tuple(pooled.shape) if isinstance(pooled, torch.Tensor) else type(pooled).__name__
        raise ConfigError(f"pooling {pool_name} returned {shape} for a (2, C, h, w) map, expected (B, F)")
    if pooled.dtype != fmap.dtype:  # the head (and AMP) would fail later on mixed dtypes
        raise ConfigError(
            f"pooling {pool_name} returned {str(pooled.dtype).removeprefix('torch.')} from a "
            f"{str(fmap.dtype).removeprefix('torch.')} map; an operator must keep its input's dtype"
        )
    return fmap.shape, int(pooled.shape[1])


def _head(task: str, width: int, num_classes: int, embedding_dim: int | None) -> nn.Module:
    if task == "classification":
        return nn.Linear(width, num_classes)
    if task != "retrieval":
        raise ValueError(f"unknown task {task!r}: classification or retrieval")
    # BatchNorm before the L2 normalisation: without it, batch-hard triplet training from scratch
    # collapses every embedding onto one direction (loss stuck at the margin, measured on synthwriters).
    embed = [nn.Linear(width, embedding_dim), nn.BatchNorm1d(embedding_dim)] if embedding_dim else [nn.Identity()]
    return nn.Sequential(*embed, L2Normalize())


def build_model(
    model_cfg: DictConfig | Mapping[str, Any],
    pooling_cfg: DictConfig | Mapping[str, Any],
    local_pooling_cfg: DictConfig | Mapping[str, Any],
    *,
    in_channels: int,
    input_size: int,
    num_classes: int,
    task: str,
) -> PoolNet:
    """The backbone of ``model_cfg`` (a ``model`` node, possibly partial: ``{"name": "resnet18"}``) with
    the configured global/local pooling and a task head.

    Weights are initialised from torch's global RNG: seed it before calling for reproducible runs.
    """
    mcfg, lcfg = resolve(_plain(model_cfg))[1], _plain(local_pooling_cfg)
    what = backbone_name(mcfg)
    trunk = build_trunk(mcfg, in_channels)
    if lcfg.get("name", "none") != "none" and surgery.replace_max_pools(trunk, lcfg) == 0:
        raise ConfigError(
            f"local_pooling={lcfg['name']}: model {what} (with these options) has no max-pool layer to replace; "
            "use local_pooling=none"
        )
    pcfg = _plain(pooling_cfg)
    pool = pooling.from_config(pcfg, "global")
    fmap, width = _probe(trunk, pool, pooling.operator_name(pcfg), in_channels, input_size, what)
    model = PoolNet(
        trunk,
        pool,
        _head(task, width, num_classes, mcfg["embedding_dim"]),
        feature_channels=int(fmap[1]),
        feature_map_size=(int(fmap[2]), int(fmap[3])),
        pool_out_features=width,
    )
    return model.train()
