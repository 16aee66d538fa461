"""Generic edits of a backbone trunk, found by module type and by where the network downsamples —
never from a per-architecture table: input channels and a small-input stem, a stride-1 last stage,
and local pools in place of every ``nn.MaxPool2d``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from poolbench import pooling
from poolbench.errors import ConfigError

# Layers that downsample when their stride exceeds 1 (adaptive pools reduce to a fixed size instead).
STRIDED = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
# The probe size that finds where a network downsamples: the ImageNet size every library designs for,
# so no map collapses to 1x1 before the last stage.
PROBE_SIZE = 224


def _first(value: int | tuple[int, ...]) -> int:
    return value if isinstance(value, int) else max(value)


def _strides(module: nn.Module) -> bool:
    return isinstance(module, STRIDED) and _first(module.stride) > 1


def set_module(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent, _, child = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def adapt_conv(
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


def has_conv(trunk: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in trunk.modules())


def adapt_stem(trunk: nn.Module, in_channels: int, cifar_stem: bool, what: str) -> None:
    """Give the stem conv (the trunk's first ``nn.Conv2d``) ``in_channels`` inputs and, with
    ``cifar_stem``, stride 1 (a kernel larger than 3 becomes a fresh 3x3) and no max-pool right after
    it (before any other strided layer). One replacement conv, so the RNG draws match poolbench 0.1."""
    layers = [(name, m) for name, m in trunk.named_modules() if isinstance(m, STRIDED)]
    convs = [(name, m) for name, m in layers if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError(f"{what} has no convolution to use as its stem")
    stem_name, stem = convs[0]
    strided = cifar_stem and _first(stem.stride) > 1
    kernel = 3 if strided and _first(stem.kernel_size) > 3 else None
    if strided or stem.in_channels != in_channels:
        set_module(trunk, stem_name, adapt_conv(stem, in_channels, stride=1 if strided else None, kernel_size=kernel))
    if not cifar_stem:
        return
    after = [(name, m) for name, m in layers[layers.index((stem_name, stem)) + 1 :] if _strides(m)]
    stem_pool = after[0][0] if after and isinstance(after[0][1], nn.MaxPool2d) else None
    if stem_pool is not None:
        set_module(trunk, stem_pool, nn.Identity())
    elif not strided:
        raise ConfigError(f"model.cifar_stem=true: {what} has no strided stem conv or stem max-pool to remove")


def probe(trunk: nn.Module, in_channels: int, size: int = PROBE_SIZE) -> tuple[torch.Size, list[tuple[str, Any]]]:
    """The trunk's output shape on a (1, in_channels, size, size) input and its strided layers in the
    order they run, each as (name, input (h, w), output (h, w)). Shapes only: fake tensors, no compute."""
    names = {m: name for name, m in trunk.named_modules() if _strides(m)}
    events: list[tuple[str, Any]] = []

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        events.append((names[module], tuple(args[0].shape[-2:]), tuple(out.shape[-2:])))

    hooks = [m.register_forward_hook(record) for m in names]
    was_training = trunk.training
    trunk.eval()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            shape = trunk(torch.empty(1, in_channels, size, size)).shape
    finally:
        trunk.train(was_training)
        for hook in hooks:
            hook.remove()
    return shape, list(dict.fromkeys(events))


def unstride_last(trunk: nn.Module, in_channels: int, what: str) -> None:
    """Stride 1 for the network's last downsampling step: every strided layer that maps the same input
    size to the same output size as the last one (a residual block's conv and its shortcut together).
    Convs get stride 1; pooling layers are removed."""
    before, events = probe(trunk, in_channels)
    if not events:
        raise ConfigError(f"model.last_stride=1: {what} has no strided layer to change")
    last = events[-1][1:]
    if last[1] != tuple(before[-2:]):  # it downsamples later by other means (Swin's patch merging)
        raise ConfigError(
            f"model.last_stride=1: {what} downsamples after its last strided layer ({events[-1][0]}) "
            "in a way poolbench cannot change"
        )
    step = [name for name, *sizes in events if tuple(sizes) == last]
    for name in step:
        module = trunk.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            module.stride = (1, 1)
        else:
            set_module(trunk, name, nn.Identity())
    after, _ = probe(trunk, in_channels)
    if after[-2:] == before[-2:]:
        raise ConfigError(
            f"model.last_stride=1: {what} keeps its final map size with {', '.join(step)} at stride 1; "
            "it downsamples in a way poolbench cannot change"
        )


def _square(value: int | tuple[int, ...]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise ConfigError(f"cannot replace a non-square max-pool ({value}) with a local pooling")
    return value[0]


def replace_max_pools(trunk: nn.Module, local_cfg: Mapping[str, Any]) -> int:
    """Put the configured local pool in place of every ``nn.MaxPool2d`` of the trunk, inheriting its
    kernel, stride and padding unless ``local_pooling.kernel_size/stride`` are set. Returns the count."""
    name = pooling.operator_name(local_cfg)
    inherit = local_cfg.get("kernel_size") is None
    targets = [target for target, m in trunk.named_modules() if isinstance(m, nn.MaxPool2d)]
    for target in targets:
        old: nn.MaxPool2d = trunk.get_submodule(target)  # type: ignore[assignment]
        if old.ceil_mode:
            raise ConfigError(
                f"local_pooling={name}: the max-pool {target} rounds up (ceil_mode); local pools round down"
            )
        kernel = _square(old.kernel_size) if inherit else local_cfg["kernel_size"]
        stride = local_cfg.get("stride")
        stride = _square(old.stride) if stride is None and inherit else stride
        padding = _square(old.padding) if inherit else 0
        new = pooling.from_config(local_cfg, "local", kernel_size=kernel, stride=stride, padding=padding)
        set_module(trunk, target, new)
    return len(targets)
