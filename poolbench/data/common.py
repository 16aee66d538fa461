"""Helpers every dataset builder shares: validated settings, safe file listing, image decoding and
in-memory image sets.

Every reader of user files here turns a bad file into one :class:`DataError` line naming it: broken
or looping symlinks, undecodable images, images beyond Pillow's decompression-bomb limit. File names
that are not valid UTF-8 are shown with ``\\xNN`` escapes (:func:`shown`), never crash a message.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from poolbench import schema
from poolbench.errors import ConfigError, DataError, unknown_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
Progress = Callable[[str, int, int], None] | None
# A training-time transform of one uint8 (C, H, W) image (see poolbench.data.augment).
Transform = Callable[[torch.Tensor], torch.Tensor]
# What a builder receives: the chosen augment recipe as ``size -> transform`` (None = no augmentation).
Augment = Callable[[int], Transform | None]
PositiveInt = Annotated[int, schema.Range(ge=1)]
# dataset.steps_per_epoch: the epoch trainer.steps_per_epoch follows by default; null = one pass.
StepsPerEpoch = Annotated[int | None, schema.Range(ge=1)]


def settings(group: str, node: Mapping[str, Any]) -> tuple[schema.Option, Any]:
    """The registered option a ``group`` node names, and the node as that option's validated dataclass.

    Missing keys take the option's values (so API callers may pass a partial mapping); types, ranges,
    choices and unknown keys are checked by the schema (one-line ConfigError).
    """
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = plain.get("name")
    registered = schema.options(group)
    if name not in registered:
        raise ConfigError(unknown_choice(f"{group} option", name, registered))
    opt = registered[str(name)]
    merged = {**opt.node(), **plain}
    schema.check(merged, opt.schema, group, label=f"{group}={name}")
    return opt, opt.schema(**merged)


def shown(path: str | os.PathLike[str]) -> str:
    """A path as text that can always be printed: bytes that are not UTF-8 become ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def existing_dir(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{what}: no folder configured (set dataset.root)")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"{what}: folder '{shown(folder)}' does not exist")
    if not folder.is_dir():
        raise DataError(f"{what}: '{shown(folder)}' is not a folder")
    return folder


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a broken or looping symlink among them is a DataError naming it
    (it would otherwise be neither a file nor a folder and silently drop out of the data)."""
    try:
        found = sorted(folder.iterdir())
    except OSError as err:
        raise DataError(f"cannot list folder '{shown(folder)}': {err.strerror or err}") from None
    for path in found:
        if path.is_symlink():
            try:
                path.resolve(strict=True)
            except (OSError, RuntimeError) as err:
                what = "a symlink loop" if isinstance(err, RuntimeError) or getattr(err, "errno", 0) == 40 else \
                    "a broken symlink"
                raise DataError(f"'{shown(path)}' is {what}; fix or remove it (nothing is skipped silently)") \
                    from None
    return found


def subfolders(folder: Path) -> list[Path]:
    return [p for p in entries(folder) if p.is_dir()]


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted so every run sees the same order."""
    return [p for p in entries(folder) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def read_image(path: Path, mode: str, scale: float = 1.0, short_side: int | None = None) -> np.ndarray:
    """Decode one image as uint8 (H, W) for mode "L" or (H, W, 3) for "RGB".

    It is rescaled by ``scale``, or so that its shorter side is ``short_side`` when that is given.

    An unreadable or corrupt file, or one with more pixels than Pillow's decompression-bomb limit
    (``PIL.Image.MAX_IMAGE_PIXELS``), is a DataError naming it: a benchmark must evaluate exactly the
    set it declares, so nothing is skipped silently.
    """
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit and still decodes: refuse it there too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = image.convert(mode)
                if short_side is not None:
                    scale = short_side / min(image.size)
                if scale != 1.0:
                    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    image = image.resize(size, Image.Resampling.BOX)
                return np.array(image, dtype=np.uint8)  # a writable copy, as torch wants
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise DataError(f"image '{shown(path)}' has more pixels than Pillow's decompression-bomb limit "
                        f"({Image.MAX_IMAGE_PIXELS}); refusing to decode it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image '{shown(path)}': {shown(str(err))}") from None


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to size x size (antialiased); None keeps them as they are."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


def read_images(paths: list[Path], mode: str, size: int, progress: Progress, what: str) -> torch.Tensor:
    """Decode and resize images to uint8 (N, C, size, size), one at a time (only the small copies stay)."""
    images = []
    for done, path in enumerate(paths, start=1):
        image = torch.from_numpy(read_image(path, mode))
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        images.append(resize_images(image[None], size)[0])
        if progress is not None:
            progress(f"reading {what} images", done, len(paths))
    return torch.stack(images)


class NormalisedImages(Dataset):
    """uint8 images kept in memory, returned as float (C, H, W) standardised per channel.

    ``transform`` (training only) maps the uint8 image to a uint8 image of the same size before it is
    standardised; its randomness comes from torch's global RNG, which the engine seeds per epoch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                 transform: Transform | None = None):
        self.images = images
        self.labels = labels
        self.mean = mean.view(-1, 1, 1)
        self.std = std.view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return (image.float().div_(255.0) - self.mean) / self.std, int(self.labels[index])


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).float().div_(255.0)
    return flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-3)


def check_classes(labels: torch.Tensor, name: str) -> None:
    """A classifier trained on one class scores acc@1 = 1.0 whatever it learns: refuse such a set."""
    if len(labels.unique()) < 2:
        raise DataError(f"{name}: the training set has a single class; classification needs at least 2 "
                        f"(accuracy would be 1.0 whatever the model)")


def read_csv_rows(path: Path, what: str, delimiter: str = ",") -> list[list[str]]:
    """The non-empty rows of a text table (UTF-8, optional BOM), cells stripped; any problem reading it
    (missing, not UTF-8, NUL bytes, a broken quote) is one DataError line naming the file."""
    import csv

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [[cell.strip() for cell in row] for row in csv.reader(handle, delimiter=delimiter, strict=True)]
    except UnicodeDecodeError as err:
        raise DataError(f"{what}: '{shown(path)}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except (OSError, csv.Error) as err:
        raise DataError(f"{what}: cannot read '{shown(path)}': {err}") from None
    return [row for row in rows if any(row)]
