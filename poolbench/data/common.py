"""Helpers every dataset builder shares: option checking, image decoding and in-memory image sets."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from poolbench.errors import ConfigError, DataError, unknown_choice

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def dataset_options(cfg: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset group as a plain dict with defaults filled in; a mistyped key is a ConfigError.

    ``name`` and ``task`` are accepted everywhere; ``task`` must match what the dataset is.
    """
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    except ImportError:  # pragma: no cover - omegaconf ships with hydra, a hard dependency
        pass
    name = str(cfg.get("name"))
    allowed = {"name", "task", "steps_per_epoch", *defaults}
    for key in cfg:
        if key not in allowed:
            raise ConfigError(unknown_choice(f"option of dataset '{name}'", key, allowed))
    merged = {**defaults, **{k: v for k, v in cfg.items() if k not in ("name", "task", "steps_per_epoch")}}
    return merged


def check_task(cfg: Mapping[str, Any], expected: str) -> None:
    task = cfg.get("task")
    if task is not None and task != expected:
        raise ConfigError(f"dataset '{cfg.get('name')}' is a {expected} dataset, but task is '{task}'")


def positive_int(options: Mapping[str, Any], key: str, minimum: int = 1) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"dataset option '{key}' must be an integer >= {minimum}, got {value!r}")
    return value


def fraction(options: Mapping[str, Any], key: str) -> float:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"dataset option '{key}' must be a number in [0, 1], got {value!r}")
    return float(value)


def existing_dir(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{what}: no folder configured (set dataset.root)")
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"{what}: folder '{folder}' does not exist")
    if not folder.is_dir():
        raise DataError(f"{what}: '{folder}' is not a folder")
    return folder


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted so every run sees the same order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_image(path: Path, mode: str, scale: float = 1.0, short_side: int | None = None) -> np.ndarray:
    """Decode one image as uint8 (H, W) for mode "L" or (H, W, 3) for "RGB".

    It is rescaled by ``scale``, or so that its shorter side is ``short_side`` when that is given.

    An unreadable or corrupt file is a DataError naming it: a benchmark must evaluate exactly the
    set it declares, so nothing is skipped silently.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = image.convert(mode)
                if short_side is not None:
                    scale = short_side / min(image.size)
                if scale != 1.0:
                    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
                    image = image.resize(size, Image.Resampling.BOX)
                return np.array(image, dtype=np.uint8)  # a writable copy, as torch wants
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise DataError(f"cannot read image '{path}': {err}") from None


def resize_images(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to size x size (antialiased); None keeps them as they are."""
    if size is None or tuple(images.shape[-2:]) == (size, size):
        return images
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return resized.round().clamp(0, 255).to(torch.uint8)


class NormalisedImages(Dataset):
    """uint8 images kept in memory, returned as float (C, H, W) standardised per channel."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor):
        self.images = images
        self.labels = labels
        self.mean = mean.view(-1, 1, 1)
        self.std = std.view(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].float().div_(255.0)
        return (image - self.mean) / self.std, int(self.labels[index])


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 (N, C, H, W) images on the [0, 1] scale."""
    flat = images.transpose(0, 1).reshape(images.shape[1], -1).float().div_(255.0)
    return flat.mean(dim=1), flat.std(dim=1).clamp_min(1e-3)
