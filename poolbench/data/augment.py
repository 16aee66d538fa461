"""Training augmentation recipes: the ``augment`` config group, built on ``torchvision.transforms.v2``.

Each recipe is a schema whose fields are its parameters; ``transform(size)`` returns the transform of
one uint8 (C, H, W) training image to a uint8 (C, size, size) one (or None for ``none``). Test items
are never augmented. Every random draw of these transforms comes from torch's global RNG, which the
engine re-seeds from (seed, epoch) every epoch and the DataLoader seeds per worker, so a resumed run
draws the same augmentations as an uninterrupted one.

``augment=auto`` (the default, resolved by :mod:`poolbench.config`) picks the recipe a dataset option
names in its ``meta["augment"]`` — the one the literature uses for it:

- ``cifar``: pad by 4 and take a random crop of the original size, horizontal flip (He et al. 2016,
  "Deep residual learning", CIFAR-10 setup); default for digits, fashion_mnist, cifar10, cifar100.
- ``imagenet``: random resized crop (scale 0.08-1, aspect 3/4-4/3) + horizontal flip (Szegedy et al.
  2015, torchvision's reference recipe); default for imagefolder.
- ``document``: random resized crop, ±5° rotation, brightness/contrast jitter 0.1, no flips (the DGMP
  authors' CLaMM training, VChristlein/dgmp clamm/clamm.py); default for clamm.
- ``none``: default for the writer-retrieval sets, whose training crops are already random.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated

from poolbench.data.schemas import Transform
from poolbench.errors import ConfigError
from poolbench.schema import Range, option, options

# augment=auto (the default) stands for the dataset's own recipe (its option's meta "augment").
AUTO_AUGMENT = "auto"


def default_augment(dataset: str | None) -> str:
    """The augmentation recipe the literature uses for a dataset option (``augment=auto``); ``none``
    when the dataset names no recipe or one that is not registered."""
    dataset_option = options("dataset").get(str(dataset))
    recipe = dataset_option.meta.get("augment", "none") if dataset_option else "none"
    return recipe if recipe in options("augment") else "none"


if TYPE_CHECKING:
    from torchvision.transforms import v2

Probability = Annotated[float, Range(ge=0, le=1)]
AreaFraction = Annotated[float, Range(gt=0, le=1)]
AspectRatio = Annotated[float, Range(gt=0)]


@dataclass
class NoAugment:
    """Training items as the dataset gives them."""

    name: str = "none"

    def transform(self, size: int) -> Transform | None:
        return None


@dataclass
class CifarAugment:
    """Zero-pad by ``padding`` pixels, crop ``size`` back at random, flip horizontally with ``hflip``."""

    name: str = "cifar"
    padding: Annotated[int, Range(ge=0)] = 4
    hflip: Probability = 0.5

    def transform(self, size: int) -> Transform | None:
        from torchvision.transforms import v2  # here, not at import: composing a config needs no torchvision

        return v2.Compose([v2.RandomCrop(size, padding=self.padding), v2.RandomHorizontalFlip(self.hflip)])


def _resized_crop(size: int, scale: tuple[float, float], ratio: tuple[float, float], recipe: str) -> v2.Transform:
    if scale[0] > scale[1] or ratio[0] > ratio[1]:
        raise ConfigError(f"augment={recipe}: min_scale/min_ratio must not exceed max_scale/max_ratio, "
                          f"got scale {scale} and ratio {ratio}")
    from torchvision.transforms import v2

    return v2.RandomResizedCrop(size, scale=scale, ratio=ratio, antialias=True)


@dataclass
class ImagenetAugment:
    """Random resized crop (a random area fraction and aspect ratio, resized to ``size``) + flip."""

    name: str = "imagenet"
    min_scale: AreaFraction = 0.08
    max_scale: AreaFraction = 1.0
    min_ratio: AspectRatio = 0.75
    max_ratio: AspectRatio = 4 / 3
    hflip: Probability = 0.5

    def transform(self, size: int) -> Transform | None:
        from torchvision.transforms import v2

        crop = _resized_crop(size, (self.min_scale, self.max_scale), (self.min_ratio, self.max_ratio), self.name)
        return v2.Compose([crop, v2.RandomHorizontalFlip(self.hflip)])


@dataclass
class DocumentAugment:
    """Random resized crop, rotation within ±``degrees`` (corners filled with ``fill``) and brightness /
    contrast jitter; no flips (mirrored script is not script)."""

    name: str = "document"
    min_scale: AreaFraction = 0.08
    max_scale: AreaFraction = 1.0
    min_ratio: AspectRatio = 0.75
    max_ratio: AspectRatio = 4 / 3
    degrees: Annotated[float, Range(ge=0, le=180)] = 5.0
    fill: Annotated[int, Range(ge=0, le=255)] = 0
    brightness: Annotated[float, Range(ge=0, le=1)] = 0.1
    contrast: Annotated[float, Range(ge=0, le=1)] = 0.1

    def transform(self, size: int) -> Transform | None:
        from torchvision.transforms import v2

        crop = _resized_crop(size, (self.min_scale, self.max_scale), (self.min_ratio, self.max_ratio), self.name)
        return v2.Compose([
            crop,
            v2.RandomRotation(self.degrees, fill=self.fill),
            v2.ColorJitter(brightness=self.brightness, contrast=self.contrast),
        ])


option("augment", "none", NoAugment)
option("augment", "cifar", CifarAugment)
option("augment", "imagenet", ImagenetAugment)
option("augment", "document", DocumentAugment)
