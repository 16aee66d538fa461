"""Backbones whose global (and optionally local) pooling comes from the operator registry.

``build_model`` returns a :class:`PoolNet`: ``features`` (the backbone trunk, → (B, C, h, w)),
``pool`` (the configured global pool, → (B, F)) and ``head`` (classifier, or embedding + L2
normalisation for retrieval). Torchvision's own classifiers are dropped: every backbone gets a
single linear layer sized from the pool's output width, so only the pooling differs between runs.

Small-input options (the final map must stay larger than 1×1 or every global pool is the same):

- ``cifar_stem``: resnets and densenet121 get a 3×3 stride-1 stem conv and no stem max-pool
  (total stride ÷4); mobilenet_v3_large and efficientnet_b0 get a stride-1 stem conv (÷2);
  vgg16_bn and smallcnn, which have no strided stem, drop their first max-pool (÷2).
- ``last_stride=1``: the last 2× downsampling becomes stride 1, as the DGMP paper did for
  ResNet-50 — resnets: the first block of layer4; densenet121: transition3's average pool is
  removed; mobilenet/efficientnet: the last block with a stride-2 conv; vgg16_bn/smallcnn: the last
  max-pool is removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from omegaconf import DictConfig, OmegaConf
from torch import nn

from poolbench import pooling
from poolbench.errors import ConfigError, unknown_choice

TORCHVISION_MODELS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "densenet121",
    "vgg16_bn",
    "mobilenet_v3_large",
    "efficientnet_b0",
)
COMMON_KEYS = ("name", "pretrained", "cifar_stem", "last_stride", "embedding_dim")
SMALLCNN_KEYS = ("width", "depth")


def model_names() -> list[str]:
    return ["smallcnn", *TORCHVISION_MODELS]


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
        task: str,
        feature_channels: int,
        feature_map_size: tuple[int, int],
        pool_out_features: int,
    ) -> None:
        super().__init__()
        self.features = features
        self.pool = pool
        self.head = head
        self.task = task
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


def _adapt_conv(
    conv: nn.Conv2d, in_channels: int, *, stride: int | None = None, kernel_size: int | None = None
) -> nn.Conv2d:
    """A copy of ``conv`` for ``in_channels`` inputs (and optionally another stride/kernel).

    With the same kernel the weights carry over: summed over RGB for one channel (timm's rule),
    otherwise cycled over the new channels and rescaled to keep the response magnitude.
    """
    k = kernel_size or conv.kernel_size[0]
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        kernel_size=k,
        stride=stride or conv.stride,
        padding=k // 2 if kernel_size else conv.padding,
        bias=conv.bias is not None,
    )
    if kernel_size is None:
        with torch.no_grad():
            w = conv.weight
            if in_channels == 1:
                new.weight.copy_(w.sum(dim=1, keepdim=True))
            else:
                repeated = w.repeat(1, (in_channels + w.shape[1] - 1) // w.shape[1], 1, 1)[:, :in_channels]
                new.weight.copy_(repeated * (w.shape[1] / in_channels))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    return new


def _set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _max_pools(trunk: nn.Module) -> list[str]:
    return [name for name, m in trunk.named_modules() if isinstance(m, nn.MaxPool2d)]


def _unstride_last(trunk: nn.Module, blocks: Iterator[nn.Module]) -> None:
    """Set every stride-2 conv of the last block that has one to stride 1."""
    strided = [b for b in blocks if any(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in b.modules())]
    if not strided:
        raise ConfigError("last_stride=1: this backbone has no stride-2 stage to change")
    for m in strided[-1].modules():
        if isinstance(m, nn.Conv2d) and m.stride == (2, 2):
            m.stride = (1, 1)


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _smallcnn(cfg: dict[str, Any], in_channels: int) -> nn.Module:
    """Stem conv at full resolution, then ``depth`` stages of [2×2 max-pool, 3×3 conv] doubling the width.

    At 64² input and depth 3 the final map is 8×8 (the max-pools are what local pooling replaces).
    One conv per stage and width 16 keep a 64-patch train step near 0.1–0.3 s on 2 CPU cores.
    """
    width, depth = cfg.get("width", 16), cfg.get("depth", 3)
    for key, value in (("width", width), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{key} must be an integer >= 1, got {value!r}")
    layers: OrderedDict[str, nn.Module] = OrderedDict(stem=_conv_bn_relu(in_channels, width))
    channels = width
    for i in range(depth):
        out = channels * 2
        layers[f"pool{i + 1}"] = nn.MaxPool2d(2)
        layers[f"stage{i + 1}"] = _conv_bn_relu(channels, out)
        channels = out
    return nn.Sequential(layers)


def _expected_weights_path(name: str) -> tuple[Any, Path]:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    return weights, Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name


def _torchvision(name: str, pretrained: bool) -> nn.Module:
    weights = None
    if pretrained:
        weights, path = _expected_weights_path(name)
        if not path.is_file():
            raise ConfigError(
                f"model.pretrained=true but the {name} weights are not in the local torch hub cache: "
                f"expected {path} (poolbench never downloads; copy the file there or set model.pretrained=false)"
            )
    return torchvision.models.get_model(name, weights=weights)


def _resnet(net: Any, in_channels: int, cifar_stem: bool, last_stride: int | None) -> nn.Module:
    if cifar_stem:
        net.conv1 = _adapt_conv(net.conv1, in_channels, stride=1, kernel_size=3)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = _adapt_conv(net.conv1, in_channels)
    if last_stride == 1:
        _unstride_last(net, iter([net.layer4[0]]))
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return nn.Sequential(OrderedDict((n, getattr(net, n)) for n in names))


def _densenet(net: Any, in_channels: int, cifar_stem: bool, last_stride: int | None) -> nn.Module:
    f = net.features
    if cifar_stem:
        f.conv0 = _adapt_conv(f.conv0, in_channels, stride=1, kernel_size=3)
        f.pool0 = nn.Identity()
    elif in_channels != 3:
        f.conv0 = _adapt_conv(f.conv0, in_channels)
    if last_stride == 1:
        f.transition3.pool = nn.Identity()
    # torchvision applies this ReLU in DenseNet.forward, after `features`.
    return nn.Sequential(OrderedDict(features=f, relu=nn.ReLU(inplace=True)))


def _vgg(net: Any, in_channels: int, cifar_stem: bool, last_stride: int | None) -> nn.Module:
    f = net.features if isinstance(net, torchvision.models.VGG) else net
    if in_channels != 3:
        f[0] = _adapt_conv(f[0], in_channels)
    _drop_max_pools(f, cifar_stem, last_stride)
    return f


def _drop_max_pools(trunk: nn.Module, first: bool, last_stride: int | None) -> None:
    pools = _max_pools(trunk)
    chosen = ([pools[-1]] if last_stride == 1 else []) + ([pools[0]] if first else [])
    for name in dict.fromkeys(chosen):
        _set_module(trunk, name, nn.Identity())


def _mobile(net: Any, in_channels: int, cifar_stem: bool, last_stride: int | None) -> nn.Module:
    f = net.features
    stem = f[0][0]
    if in_channels != 3 or cifar_stem:
        f[0][0] = _adapt_conv(stem, in_channels, stride=1 if cifar_stem else None)
    if last_stride == 1:
        _unstride_last(f, iter(list(f)[1:]))
    return f


def _vgg16_bn_trunk() -> nn.Sequential:
    trunk = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"], batch_norm=True)
    for m in trunk.modules():  # torchvision's VGG initialisation of these layers
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return trunk


_BACKBONES: dict[str, Callable[[Any, int, bool, int | None], nn.Module]] = {
    "resnet18": _resnet,
    "resnet34": _resnet,
    "resnet50": _resnet,
    "densenet121": _densenet,
    "vgg16_bn": _vgg,
    "mobilenet_v3_large": _mobile,
    "efficientnet_b0": _mobile,
}


def _trunk(cfg: dict[str, Any], in_channels: int) -> nn.Module:
    name = cfg["name"]
    allowed = COMMON_KEYS + (SMALLCNN_KEYS if name == "smallcnn" else ())
    extra = sorted(set(cfg) - set(allowed))
    if extra:
        raise ConfigError(f"unknown key 'model.{extra[0]}' for model {name}. Valid: {', '.join(allowed)}")
    cifar_stem, last_stride = bool(cfg.get("cifar_stem") or False), cfg.get("last_stride")
    if last_stride not in (None, 1, 2):
        raise ConfigError(f"model.last_stride must be null (backbone default), 1 or 2, got {last_stride!r}")
    if name == "smallcnn":
        if cfg.get("pretrained"):
            raise ConfigError("model.pretrained=true: smallcnn has no pretrained weights")
        trunk = _smallcnn(cfg, in_channels)
        _drop_max_pools(trunk, cifar_stem, last_stride)
        return trunk
    if name == "vgg16_bn" and not cfg.get("pretrained"):
        # Only the conv trunk: building the full model would initialise a 100M-parameter classifier
        # (seconds) that is discarded anyway.
        net: Any = _vgg16_bn_trunk()
    else:
        net = _torchvision(name, bool(cfg.get("pretrained")))
    return _BACKBONES[name](net, in_channels, cifar_stem, last_stride)


def _replace_max_pools(trunk: nn.Module, local_cfg: dict[str, Any]) -> int:
    targets = _max_pools(trunk)
    for target in targets:
        old: nn.MaxPool2d = trunk.get_submodule(target)  # type: ignore[assignment]
        inherit = local_cfg.get("kernel_size") is None
        kernel = _square(old.kernel_size) if inherit else local_cfg["kernel_size"]
        stride = local_cfg.get("stride")
        stride = _square(old.stride) if stride is None and inherit else stride
        padding = local_cfg.get("padding")
        padding = (_square(old.padding) if inherit else 0) if padding is None else padding
        new = pooling.from_config(local_cfg, "local", kernel_size=kernel, stride=stride, padding=padding)
        _set_module(trunk, target, new)
    return len(targets)


def _square(value: int | tuple[int, ...]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ConfigError(f"cannot replace a non-square max-pool ({value}) with a local pooling")
    return value[0]


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
    """Backbone ``model_cfg.name`` with the configured global/local pooling and a task head.

    Weights are initialised from torch's global RNG: seed it before calling for reproducible runs.
    """
    mcfg, pcfg, lcfg = _plain(model_cfg), _plain(pooling_cfg), _plain(local_pooling_cfg)
    name = mcfg.get("name")
    if name not in model_names():
        raise ConfigError(unknown_choice("model", name, model_names()))
    if task not in ("retrieval", "classification"):
        raise ConfigError(unknown_choice("task", task, ("retrieval", "classification")))
    trunk = _trunk(mcfg, in_channels)

    if lcfg.get("name", "none") != "none" and _replace_max_pools(trunk, lcfg) == 0:
        raise ConfigError(
            f"local_pooling={lcfg['name']}: model {name} (with these options) has no max-pool layer to replace; "
            "use local_pooling=none"
        )
    pool = pooling.from_config(pcfg, "global")

    # One dummy forward gives the real map size and pool width and materialises lazy parameters
    # (netvlad); eval mode keeps the BatchNorm statistics untouched.
    probe = torch.randn(2, in_channels, input_size, input_size, generator=torch.Generator().manual_seed(0))
    trunk.eval()
    pool.eval()
    with torch.no_grad():
        try:
            fmap = trunk(probe)
        except RuntimeError as exc:
            raise ConfigError(f"model {name} cannot process {input_size}x{input_size} inputs: {exc}") from None
        try:
            pooled = pool(fmap)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(
                f"pooling {pcfg.get('name')} fails on the {fmap.shape[2]}x{fmap.shape[3]} feature map of {name}: {exc}"
            ) from None
    if pooled.ndim != 2 or pooled.shape[0] != 2:
        raise ConfigError(f"pooling {pcfg.get('name')} returned shape {tuple(pooled.shape)}, expected (B, F)")
    width = pooled.shape[1]

    if task == "classification":
        head: nn.Module = nn.Linear(width, num_classes)
    else:
        dim = mcfg.get("embedding_dim")
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ConfigError(f"model.embedding_dim must be null or an integer >= 1, got {dim!r}")
        # BatchNorm before the L2 normalisation: without it, batch-hard triplet training from scratch
        # collapses every embedding onto one direction (loss stuck at the margin, measured on synthwriters).
        embed = [nn.Linear(width, dim), nn.BatchNorm1d(dim)] if dim else [nn.Identity()]
        head = nn.Sequential(*embed, L2Normalize())
    model = PoolNet(
        trunk,
        pool,
        head,
        task=task,
        feature_channels=int(fmap.shape[1]),
        feature_map_size=(int(fmap.shape[2]), int(fmap.shape[3])),
        pool_out_features=int(width),
    )
    return model.train()
