"""A tiny residual backbone of your own, for poolbench's ``model=custom`` (see the README).

    poolbench train model=custom model._target_=examples.my_backbone.TinyRes +model.width=16 dataset=digits
    poolbench train 'plugins=[examples/my_backbone.py]' model=tinyres model.width=16 dataset=digits

Any nn.Module (or function returning one) mapping images (B, in_channels, H, W) to a feature map
(B, C, h, w) works: poolbench puts its own global pool and head behind it, and replaces its
nn.MaxPool2d layers when local_pooling is set.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn(self.conv(x)))


class TinyRes(nn.Module):
    """Strided stem, a max-pool, then ``depth`` residual stages, each doubling the width and halving the map
    with a strided conv."""

    def __init__(self, in_channels: int = 3, width: int = 16, depth: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        for _ in range(depth):
            layers += [Block(width), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)]
            width *= 2
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# As a plugin (plugins=[examples/my_backbone.py]) it also registers `model=tinyres`, with model.width and
# model.depth as typed keys (from the signature). Harmless when imported through model._target_.
from poolbench.models import custom  # noqa: E402

custom.register("tinyres", TinyRes)
