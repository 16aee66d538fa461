"""Any timm model as a trunk (``model=timm model.arch=<name>``; needs ``pip install 'poolbench[timm]'``).

The trunk is timm's own: ``timm.create_model(arch, num_classes=0, global_pool='', in_chans=...)`` and
its ``forward_features``; when timm's head keeps the map's shape without a pool (ConvNeXt's LayerNorm2d)
it runs too, so the configured pool reads the map timm would have pooled. Pretrained weights come only
from the local Hugging Face cache (``HF_HUB_OFFLINE=1``) or, for timm's older URL weights, from the
torch hub cache.
"""

from __future__ import annotations

import difflib
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from poolbench.errors import ConfigError
from poolbench.models.settings import TimmSettings  # noqa: F401 - the schema of model=timm

# Hugging Face file names timm loads weights from, in its order of preference.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _timm() -> Any:
    # huggingface_hub reads HF_HUB_OFFLINE when first imported: poolbench never downloads. A program
    # that imported timm (hence huggingface_hub) before us has read it already: set its flag too.
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    try:
        import timm
    except ImportError:
        raise ConfigError("model=timm needs the timm package: pip install 'poolbench[timm]'") from None
    return timm


def check_arch(arch: str) -> str | None:
    """ConfigError for a name timm does not know; returns the name's source (``hf-hub``, ``local-dir``)
    or None for a name of timm's registry."""
    timm = _timm()
    try:
        source, name = timm.models.parse_model_name(arch)
    except ValueError as exc:
        raise ConfigError(f"model.arch={arch}: {exc}") from None
    if source is not None:
        return source  # a hub repo (loaded from the cache) or a local folder: checked when loaded
    base, _ = timm.models.split_model_name_tag(name)
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.5)
        hint = f" Close: {', '.join(close)}." if close else ""
        raise ConfigError(
            f"unknown timm model '{arch}' (model.arch).{hint} All: python -c 'import timm; print(timm.list_models())'"
        )
    return None


def cached_weights(arch: str) -> str:
    """The local file holding the pretrained weights of ``arch``; ConfigError naming what is expected."""
    timm = _timm()
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError as exc:
        raise ConfigError(f"model.arch={arch}: {exc}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise ConfigError(f"model.pretrained=true: timm {arch} has no pretrained weights")
    never = "poolbench never downloads; put them there or set model.pretrained=false"
    if cfg.hf_hub_id:
        from huggingface_hub import constants, try_to_load_from_cache

        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        for filename in files:
            path = try_to_load_from_cache(cfg.hf_hub_id, filename)
            if isinstance(path, str):
                return path
        raise ConfigError(
            f"model.pretrained=true but the weights of timm {arch} are not in the Hugging Face cache: expected "
            f"repo {cfg.hf_hub_id} ({' or '.join(files)}) under {constants.HF_HUB_CACHE} ({never})"
        )
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(cfg.url).name
    if not path.is_file():
        raise ConfigError(
            f"model.pretrained=true but the weights of timm {arch} are not cached: expected {path} ({never})"
        )
    return str(path)


class TimmTrunk(nn.Module):
    """A timm model without pool and classifier: ``forward_features`` (and the shape-keeping head)."""

    def __init__(self, model: nn.Module, with_head: bool) -> None:
        super().__init__()
        self.model = model
        self.with_head = with_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(x)
        return self.model.forward_head(features, pre_logits=True) if self.with_head else features


def _trunk(model: nn.Module, arch: str, in_channels: int) -> TimmTrunk:
    """timm's features, plus its head when that keeps the map's shape without a pool (then it holds only
    per-position layers such as a norm, which belong in front of the configured pool). Children with
    parameters that neither runs (MobileNetV3's post-pool conv_head) are dropped: they would never train."""
    layout = str(getattr(model, "output_fmt", "NCHW"))
    if layout != "NCHW":  # e.g. Swin's (B, H, W, C): pooling it as (B, C, H, W) would be silently wrong
        raise ConfigError(f"timm {arch} yields {layout} features, not a (B, C, H, W) map; poolbench pools CNN maps")
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))[1:])
    called: set[str] = set()
    hooks = [
        child.register_forward_hook(lambda *_, name=name: called.add(name)) for name, child in model.named_children()
    ]
    model.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            try:
                features = model.forward_features(torch.empty(1, in_channels, *size))
            except Exception as exc:  # the model's own input checks (fixed sizes, token counts)
                raise ConfigError(f"timm {arch} cannot serve as a trunk: {str(exc).splitlines()[0]}") from None
            if features.ndim != 4:
                raise ConfigError(
                    f"timm {arch} yields features of shape {tuple(features.shape)}, not a (B, C, H, W) map; "
                    "poolbench pools convolutional feature maps"
                )
            used = set(called)
            with_head = model.forward_head(features, pre_logits=True).shape == features.shape
            if with_head:
                used = set(called)
    finally:
        for hook in hooks:
            hook.remove()
        model.train()
    for name, child in list(model.named_children()):
        if name not in used and any(True for _ in child.parameters()):
            setattr(model, name, nn.Identity())
    return TimmTrunk(model, with_head)


def build(arch: str, pretrained: bool, in_channels: int) -> nn.Module:
    source = check_arch(arch)
    timm = _timm()
    # A verified local file: timm loads it (adapting in_chans, dropping the classifier) without the hub.
    # A hub repo (hf-hub:...) is read from the Hugging Face cache in offline mode.
    overlay = {}
    if pretrained and source is None:
        overlay = {"pretrained_cfg_overlay": {"file": cached_weights(arch), "source": ""}}
    try:
        model = timm.create_model(
            arch, pretrained=pretrained, num_classes=0, global_pool="", in_chans=in_channels, **overlay
        )
    except (OSError, RuntimeError, ValueError) as exc:  # an uncached hub repo, a bad tag, a bad checkpoint
        if source == "hf-hub":
            from huggingface_hub import constants

            raise ConfigError(
                f"model.arch={arch}: the Hugging Face repo {arch.partition(':')[2]} is not in the local cache "
                f"{constants.HF_HUB_CACHE} (poolbench never downloads; put it there or use a timm name)"
            ) from None
        raise ConfigError(f"timm {arch}: {str(exc).splitlines()[0]}") from None
    return _trunk(model, arch, in_channels)
