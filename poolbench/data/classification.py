"""Classification datasets, all read locally: digits, fashion_mnist, cifar10/100, imagefolder, clamm.

Images are kept in memory as uint8 and returned as float (C, H, W) standardised with the training
split's per-channel mean and std (CLaMM: the DGMP authors' grey mean/std). Unreadable images are a
DataError naming the file, never skipped.
"""

from __future__ import annotations

import csv
import gzip
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    IMAGE_SUFFIXES,
    NormalisedImages,
    channel_stats,
    check_task,
    dataset_options,
    existing_dir,
    fraction,
    image_files,
    positive_int,
    read_image,
    resize_images,
)
from poolbench.errors import ConfigError, DataError

Progress = Callable[[str, int, int], None] | None

# Where Debian's `dataset-fashion-mnist` package installs the four IDX files (dpkg -L shows them).
FASHION_MNIST_DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"


def optional_size(options: Mapping[str, Any], key: str = "image_size") -> int | None:
    return None if options[key] is None else positive_int(options, key)


def in_memory_bundle(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int, image_size: int | None,
                     info: dict[str, Any] | None = None) -> DataBundle:
    """Bundle uint8 (N, C, H, W) splits, resized to ``image_size`` and standardised with train statistics."""
    train_images, test_images = resize_images(train_images, image_size), resize_images(test_images, image_size)
    mean, std = channel_stats(train_images)
    return DataBundle(
        name=name,
        task="classification",
        train=NormalisedImages(train_images, train_labels, mean, std),
        test=NormalisedImages(test_images, test_labels, mean, std),
        train_labels=train_labels,
        num_classes=num_classes,
        in_channels=train_images.shape[1],
        input_size=train_images.shape[-1],
        info={"train_size": len(train_labels), "test_size": len(test_labels),
              "normalisation": "per-channel train mean/std", **(info or {})},
    )


def stratified_split(labels: np.ndarray, test_fraction: float, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test indices (independent of the run seed)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    try:
        train, test = train_test_split(indices, test_size=test_fraction, stratify=labels, random_state=split_seed)
    except ValueError as err:
        raise DataError(f"cannot split the data {1 - test_fraction:.0%}/{test_fraction:.0%} by class: {err}") from None
    return np.sort(train), np.sort(test)


# --- digits -------------------------------------------------------------------------------------

DIGITS_DEFAULTS = {"image_size": 32, "test_fraction": 0.25, "split_seed": 0}


def build_digits(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes); upsampled to ``image_size``."""
    from sklearn.datasets import load_digits

    check_task(cfg, "classification")
    options = dataset_options(cfg, DIGITS_DEFAULTS)
    test_fraction = fraction(options, "test_fraction")
    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train, test = stratified_split(digits.target, test_fraction, positive_int(options, "split_seed", 0))
    return in_memory_bundle("digits", images[train], labels[train], images[test], labels[test], 10,
                            optional_size(options))


# --- fashion_mnist ------------------------------------------------------------------------------

FASHION_DEFAULTS = {"root": FASHION_MNIST_DEBIAN_ROOT, "image_size": 32}
IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz): magic 0 0 dtype ndim, big-endian int32 dims, data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file '{path}': {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX file '{path}' is truncated: expected {int(np.prod(dims))} values, found {data.size}")
    return data.reshape(tuple(dims))


def find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise DataError(f"fashion_mnist: '{stem}(.gz)' not found in '{root}' (install Debian's dataset-fashion-mnist "
                    f"or set dataset.root to a folder with the four IDX files)")


def build_fashion_mnist(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    """Fashion-MNIST from its IDX files (train-images-idx3-ubyte[.gz], ..., t10k-labels-idx1-ubyte[.gz])."""
    check_task(cfg, "classification")
    options = dataset_options(cfg, FASHION_DEFAULTS)
    root = existing_dir(options["root"], "fashion_mnist")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"fashion_mnist {split}: {images.shape} images do not match {labels.shape} labels")
        splits[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    return in_memory_bundle("fashion_mnist", *splits["train"], *splits["test"], 10, optional_size(options),
                            {"root": str(root)})


# --- cifar10 / cifar100 -------------------------------------------------------------------------

CIFAR_DEFAULTS = {"root": None, "image_size": None}
CIFAR_LAYOUT = {
    # name: (folder, training batch files, test batch file, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}


def read_cifar_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the python pickle batches of the CIFAR distribution.

    Read directly rather than through torchvision.datasets.CIFAR10/100, whose md5 checks reject the
    small fake batches the tests write; the format is the same (dict with b"data" (N, 3072) uint8
    and the label list).
    """
    images, labels = [], []
    for name in files:
        path = folder / name
        if not path.exists():
            raise DataError(f"CIFAR batch '{path}' is missing")
        try:
            with path.open("rb") as handle:
                batch = pickle.load(handle, encoding="bytes")  # noqa: S301 - the user's own dataset files
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as err:
            raise DataError(f"cannot read CIFAR batch '{path}': {err!r}") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def build_cifar(name: str, cfg: Mapping[str, Any]) -> DataBundle:
    check_task(cfg, "classification")
    options = dataset_options(cfg, CIFAR_DEFAULTS)
    folder_name, train_files, test_file, label_key, classes = CIFAR_LAYOUT[name]
    root = existing_dir(options["root"], name)
    folder = root / folder_name if (root / folder_name).is_dir() else root
    if not (folder / test_file).exists():
        raise DataError(f"{name}: no '{folder_name}/{test_file}' under '{root}'; extract the python version of "
                        f"{name} there (nothing is downloaded)")
    train_images, train_labels = read_cifar_batches(folder, train_files, label_key)
    test_images, test_labels = read_cifar_batches(folder, [test_file], label_key)
    return in_memory_bundle(name, train_images, train_labels, test_images, test_labels, classes,
                            optional_size(options), {"root": str(root)})


def build_cifar10(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    return build_cifar("cifar10", cfg)


def build_cifar100(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    return build_cifar("cifar100", cfg)


# --- imagefolder --------------------------------------------------------------------------------

IMAGEFOLDER_DEFAULTS = {"root": None, "channels": 1, "image_size": 64, "test_fraction": 0.2, "split_seed": 0}


def read_class_tree(folder: Path, mode: str, size: int, classes: list[str] | None,
                    progress: Progress) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    found = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if classes is None:
        classes = found
    if not classes:
        raise DataError(f"imagefolder: no class folders in '{folder}' (expected <root>/<class>/<image>)")
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(f"imagefolder: class folder '{unknown[0]}' in '{folder}' is not a training class")
    files = [(path, label) for label, name in enumerate(classes) if (folder / name).is_dir()
             for path in image_files(folder / name)]
    if not files:
        raise DataError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of '{folder}'")
    images = []
    for done, (path, _) in enumerate(files, start=1):
        image = torch.from_numpy(read_image(path, mode))
        image = image[None] if image.ndim == 2 else image.permute(2, 0, 1)
        images.append(resize_images(image[None], size)[0])
        if progress is not None:
            progress(f"reading {folder.name} images", done, len(files))
    return torch.stack(images), torch.tensor([label for _, label in files]), classes


def build_imagefolder(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    """A class-per-folder tree: <root>/train/<class>/* and <root>/test/<class>/*, or <root>/<class>/*
    split deterministically by ``test_fraction`` (stratified, ``split_seed``)."""
    check_task(cfg, "classification")
    options = dataset_options(cfg, IMAGEFOLDER_DEFAULTS)
    if options["channels"] not in (1, 3):
        raise ConfigError(f"dataset option 'channels' must be 1 (grey) or 3 (RGB), got {options['channels']!r}")
    mode = "L" if options["channels"] == 1 else "RGB"
    size = positive_int(options, "image_size")
    root = existing_dir(options["root"], "imagefolder")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_images, train_labels, classes = read_class_tree(root / "train", mode, size, None, progress)
        test_images, test_labels, _ = read_class_tree(root / "test", mode, size, classes, progress)
        layout = "train/test folders"
    else:
        images, labels, classes = read_class_tree(root, mode, size, None, progress)
        test_fraction, split_seed = fraction(options, "test_fraction"), positive_int(options, "split_seed", 0)
        train, test = stratified_split(labels.numpy(), test_fraction, split_seed)
        train_images, train_labels, test_images, test_labels = images[train], labels[train], images[test], labels[test]
        layout = f"split {options['test_fraction']} of one tree"
    return in_memory_bundle("imagefolder", train_images, train_labels, test_images, test_labels, len(classes),
                            None, {"root": str(root), "classes": ",".join(classes), "layout": layout})


# --- clamm --------------------------------------------------------------------------------------

CLAMM_DEFAULTS = {
    "train_images": None,
    "train_csv": None,  # null = the one .csv file in train_images
    "test_images": None,
    "test_csv": None,
    "filename_column": 0,
    "label_column": 1,
    "short_side": 512,
    "input_size": 224,
}
# Grey mean and std of CLaMM pages, as used by the DGMP authors.
CLAMM_MEAN, CLAMM_STD = 185.2293 / 255, 61.8040 / 255


def read_label_csv(path: Path, filename_column: int, label_column: int) -> list[tuple[str, str]]:
    """(file name, label) rows of a semicolon-separated CLaMM file list; a header row is skipped."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [row for row in csv.reader(handle, delimiter=";") if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"clamm: cannot read label file '{path}': {err}") from None
    needed = max(filename_column, label_column) + 1
    if rows and not rows[0][filename_column].lower().endswith(IMAGE_SUFFIXES):
        rows = rows[1:]  # header such as FILENAME;SCRIPT_TYPE;...
    if not rows:
        raise DataError(f"clamm: label file '{path}' has no rows")
    short = [i for i, row in enumerate(rows) if len(row) < needed]
    if short:
        raise DataError(f"clamm: row {short[0] + 1} of '{path}' has fewer than {needed} ';'-separated columns")
    return [(row[filename_column].strip(), row[label_column].strip()) for row in rows]


def find_label_csv(folder: Path, configured: str | None) -> Path:
    if configured:
        path = Path(configured).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.exists():
            raise DataError(f"clamm: label file '{path}' does not exist")
        return path
    candidates = sorted(folder.glob("*.csv"))
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise DataError(f"clamm: expected one .csv label file in '{folder}' (found {found}); set dataset.train_csv/"
                        f"test_csv")
    return candidates[0]


class PageCrops(Dataset):
    """Crops of grey pages: random crops (training) or the centre crop (test), standardised."""

    def __init__(self, pages: list[torch.Tensor], labels: torch.Tensor, size: int, random_crop: bool):
        self.pages, self.labels, self.size, self.random_crop = pages, labels, size, random_crop

    def __len__(self) -> int:
        return len(self.pages)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        page, size = self.pages[index], self.size
        if self.random_crop:
            y = int(torch.randint(0, page.shape[0] - size + 1, ()))
            x = int(torch.randint(0, page.shape[1] - size + 1, ()))
        else:
            y, x = (page.shape[0] - size) // 2, (page.shape[1] - size) // 2
        crop = page[y:y + size, x:x + size].float().div_(255.0)[None]
        return (crop - CLAMM_MEAN) / CLAMM_STD, int(self.labels[index])


def read_clamm_split(folder: Path, csv_path: Path, options: Mapping[str, Any], classes: list[str] | None,
                     split: str, progress: Progress) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    rows = read_label_csv(csv_path, options["filename_column"], options["label_column"])
    if classes is None:
        classes = sorted({label for _, label in rows})
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise DataError(f"clamm {split}: label '{unknown[0]}' in '{csv_path}' does not occur in the training labels")
    pages = []
    for done, (name, _) in enumerate(rows, start=1):
        path = folder / name
        if not path.exists():
            raise DataError(f"clamm {split}: '{name}' is listed in '{csv_path.name}' but missing from '{folder}'")
        page = torch.from_numpy(read_image(path, "L", short_side=options["short_side"]))
        if min(page.shape) < options["input_size"]:
            raise DataError(f"clamm {split}: '{name}' is smaller than input_size {options['input_size']} after "
                            f"scaling its short side to {options['short_side']}")
        pages.append(page)
        if progress is not None:
            progress(f"reading clamm {split} images", done, len(rows))
    labels = torch.tensor([classes.index(label) for _, label in rows])
    return pages, labels, classes


def build_clamm(cfg: Mapping[str, Any], *, seed: int, progress: Progress = None) -> DataBundle:
    """CLaMM'16/'17 script classification: a folder of .tif pages plus a semicolon-separated label file
    per split (``FILENAME;SCRIPT_TYPE;...``; columns set by ``filename_column`` / ``label_column``).
    Pages are scaled so their short side is ``short_side``; training items are random
    ``input_size`` crops, test items the centre crop."""
    check_task(cfg, "classification")
    options = dataset_options(cfg, CLAMM_DEFAULTS)
    positive_int(options, "short_side")
    positive_int(options, "filename_column", 0)
    positive_int(options, "label_column", 0)
    input_size = positive_int(options, "input_size")
    if input_size > options["short_side"]:
        raise ConfigError(f"clamm: input_size {input_size} is larger than short_side {options['short_side']}")
    train_folder = existing_dir(options["train_images"], "clamm train_images")
    test_folder = existing_dir(options["test_images"], "clamm test_images")
    train_pages, train_labels, classes = read_clamm_split(
        train_folder, find_label_csv(train_folder, options["train_csv"]), options, None, "train", progress)
    test_pages, test_labels, _ = read_clamm_split(
        test_folder, find_label_csv(test_folder, options["test_csv"]), options, classes, "test", progress)
    return DataBundle(
        name="clamm",
        task="classification",
        train=PageCrops(train_pages, train_labels, input_size, random_crop=True),
        test=PageCrops(test_pages, test_labels, input_size, random_crop=False),
        train_labels=train_labels,
        num_classes=len(classes),
        in_channels=1,
        input_size=input_size,
        info={"train_size": len(train_pages), "test_size": len(test_pages), "classes": ",".join(classes),
              "normalisation": "grey, CLaMM mean 185.23/255, std 61.80/255"},
    )
