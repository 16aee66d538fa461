"""Classification datasets, all read locally: digits, fashion_mnist, cifar10/100, imagefolder, clamm.

Images are kept in memory as uint8 and returned as float (C, H, W) standardised with the training
split's per-channel mean and std (CLaMM: the DGMP authors' grey mean/std). Unreadable images are a
DataError naming the file, never skipped; a training set with a single class is refused (accuracy
would be 1.0 whatever the model). ``val_share`` holds out a stratified, seeded share (or count) of the
training items as the validation split (imagefolder: its own ``val/`` folder when present), disjoint
from training and test. One epoch is one pass over the training set (``steps_per_epoch:
null``). CIFAR's pickled batches are read with an unpickler that can only build plain containers and
numpy arrays, so a crafted batch cannot run code.
"""

from __future__ import annotations

import gzip
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    IMAGE_SUFFIXES,
    VAL_SEED,
    Augment,
    NormalisedImages,
    Progress,
    Transform,
    channel_stats,
    check_classes,
    entries,
    existing_dir,
    file_kind,
    image_files,
    read_csv_rows,
    read_image,
    read_images,
    refuse_small_classes,
    require_file,
    resize_images,
    shown,
    stratified_val,
    subfolders,
)
from poolbench.data.schemas import (
    CifarConfig,
    ClammConfig,
    DigitsConfig,
    FashionMnistConfig,
    ImageFolderConfig,
)
from poolbench.errors import DataError


def in_memory_bundle(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                     test_labels: torch.Tensor, num_classes: int, image_size: int | None, augment: Augment,
                     info: dict[str, Any] | None = None, *, val_share: float = 0.0, val_seed: int = VAL_SEED,
                     val: tuple[torch.Tensor, torch.Tensor] | None = None, notes: list[str] | None = None
                     ) -> DataBundle:
    """Bundle uint8 (N, C, H, W) splits, resized to ``image_size`` and standardised with train statistics;
    training items go through the ``augment`` recipe's transform. The validation split is ``val`` (the
    data's own) or else a stratified ``val_share`` of the training items drawn with ``val_seed``."""
    info = dict(info or {})
    if val is None and val_share > 0:
        kept, held = stratified_val(train_labels.numpy(), val_share, val_seed, name)
        val = train_images[held], train_labels[held]
        train_images, train_labels = train_images[kept], train_labels[kept]
        info["val_source"] = f"val_share={val_share:g} of the training items, stratified"
    check_classes(train_labels, name)
    train_images, test_images = resize_images(train_images, image_size), resize_images(test_images, image_size)
    mean, std = channel_stats(train_images)
    size = train_images.shape[-1]
    val_set = None
    if val is not None:
        val_set = NormalisedImages(resize_images(val[0], image_size), val[1], mean, std)
        info["val_size"] = len(val[1])
    return DataBundle(
        name=name,
        task="classification",
        train=NormalisedImages(train_images, train_labels, mean, std, augment(size)),
        test=NormalisedImages(test_images, test_labels, mean, std),
        train_labels=train_labels,
        num_classes=num_classes,
        in_channels=train_images.shape[1],
        input_size=size,
        info={"train_size": len(train_labels), "test_size": len(test_labels),
              "normalisation": "per-channel train mean/std", **info},
        val=val_set,
        notes=list(notes or []),
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

def build_digits(s: DigitsConfig, *, seed: int, transform: Augment, progress: Progress = None) -> DataBundle:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None]
    labels = torch.from_numpy(digits.target.astype(np.int64))
    train, test = stratified_split(digits.target, s.test_fraction, s.split_seed)
    return in_memory_bundle("digits", images[train], labels[train], images[test], labels[test], 10, s.image_size,
                            transform, val_share=s.val_share, val_seed=s.split_seed)


# --- fashion_mnist ------------------------------------------------------------------------------

IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally .gz): magic 0 0 dtype ndim, big-endian int32 dims, data."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"cannot read IDX file '{shown(path)}': {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"'{shown(path)}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"IDX file '{shown(path)}' is truncated in its header")
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX file '{shown(path)}' is truncated: expected {int(np.prod(dims))} values, "
                        f"found {data.size}")
    return data.reshape(tuple(dims))


def find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if file_kind(candidate) is not None:
            return require_file(candidate, "fashion_mnist")  # a FIFO or device is never opened
    raise DataError(f"fashion_mnist: '{stem}(.gz)' not found in '{shown(root)}' (install Debian's "
                    f"dataset-fashion-mnist or set dataset.root to a folder with the four IDX files)")


def build_fashion_mnist(s: FashionMnistConfig, *, seed: int, transform: Augment, progress: Progress = None
                        ) -> DataBundle:
    """train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-..., t10k-labels-..."""
    root = existing_dir(s.root, "fashion_mnist")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"fashion_mnist {split}: {images.shape} images do not match {labels.shape} labels")
        splits[split] = (torch.from_numpy(images.copy())[:, None], torch.from_numpy(labels.astype(np.int64)))
    return in_memory_bundle("fashion_mnist", *splits["train"], *splits["test"], 10, s.image_size, transform,
                            {"root": shown(root)}, val_share=s.val_share)


# --- cifar10 / cifar100 -------------------------------------------------------------------------

CIFAR_LAYOUT = {
    # name: (folder, training batch files, test batch file, label key, classes)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", b"fine_labels", 100),
}


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR batches hold: builtin containers, bytes, str, numbers and numpy arrays.

    Any other global (a function or class a crafted file names to run code) is refused before it is
    looked up, so nothing in the file can execute.
    """

    ALLOWED = frozenset({
        (module, name)
        for package in ("numpy.core", "numpy._core")
        for module, name in ((f"{package}.multiarray", "_reconstruct"), (f"{package}.multiarray", "scalar"),
                             (f"{package}.numeric", "_frombuffer"))
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never contains")
        return super().find_class(module, name)


def read_cifar_batches(folder: Path, files: list[str], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the python pickle batches of the CIFAR distribution (a dict with b"data" (N, 3072) uint8 and
    the label list), read directly rather than through torchvision.datasets, whose md5 checks reject the
    small batches the tests write and whose reader is a plain pickle.load."""
    images, labels = [], []
    for name in files:
        path = require_file(folder / name, "CIFAR batch")
        try:
            batch = ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
            images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
            if len(images[-1]) != len(labels[-1]):
                raise ValueError(f"{len(images[-1])} images but {len(labels[-1])} labels")
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, IndexError, AttributeError,
                OSError) as err:
            raise DataError(f"cannot read CIFAR batch '{shown(path)}': {err}") from None
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def build_cifar(s: CifarConfig, *, seed: int, transform: Augment, progress: Progress = None) -> DataBundle:
    folder_name, train_files, test_file, label_key, classes = CIFAR_LAYOUT[s.name]
    root = existing_dir(s.root, s.name)
    folder = root / folder_name if file_kind(root / folder_name) == "dir" else root
    if file_kind(folder / test_file) is None:
        raise DataError(f"{s.name}: no '{folder_name}/{test_file}' under '{shown(root)}'; extract the python "
                        f"version of {s.name} there (nothing is downloaded)")
    train_images, train_labels = read_cifar_batches(folder, train_files, label_key)
    test_images, test_labels = read_cifar_batches(folder, [test_file], label_key)
    for labels in (train_labels, test_labels):
        if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
            raise DataError(f"{s.name}: labels in '{shown(folder)}' must lie in 0..{classes - 1}")
    return in_memory_bundle(s.name, train_images, train_labels, test_images, test_labels, classes, s.image_size,
                            transform, {"root": shown(root)}, val_share=s.val_share)


# --- imagefolder --------------------------------------------------------------------------------

def read_class_tree(folder: Path, mode: str, size: int, classes: list[str] | None, progress: Progress, *,
                    min_per_class: int | None = None, dropped: frozenset[str] = frozenset()
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str], frozenset[str], str | None]:
    """Images, labels and classes of one ``<class>/<image>`` tree. Without ``classes`` (a training tree),
    the classes are its folders (empty ones refused, or dropped below ``min_per_class``); otherwise its
    folders must be among ``classes`` or the ``dropped`` ones."""
    files_of = {sub.name: image_files(sub) for sub in subfolders(folder)}
    note = None
    if classes is None:
        dropped_now, note = refuse_small_classes({n: len(f) for n, f in files_of.items()}, min_per_class,
                                                 f"imagefolder '{shown(folder)}'", "min_per_class", "class folder")
        dropped = frozenset(dropped_now)
        classes = [name for name in files_of if name not in dropped]
    if not classes:
        raise DataError(f"imagefolder: no class folders with images in '{shown(folder)}' (expected "
                        f"<root>/<class>/<image>)")
    unknown = sorted(set(files_of) - set(classes) - dropped)
    if unknown:
        raise DataError(f"imagefolder: class folder '{shown(unknown[0])}' in '{shown(folder)}' is not a "
                        f"training class")
    files = [(path, label) for label, name in enumerate(classes) for path in files_of.get(name, [])]
    if not files:
        raise DataError(f"imagefolder: no images ({', '.join(IMAGE_SUFFIXES)}) in the class folders of "
                        f"'{shown(folder)}'")
    images = read_images([path for path, _ in files], mode, size, progress, shown(folder.name))
    return images, torch.tensor([label for _, label in files]), classes, dropped, note


def follow_channels(splits: list[torch.Tensor]) -> list[torch.Tensor]:
    """RGB images kept as RGB when any pixel of any split has colour, else reduced to one grey channel."""
    grey = all(bool((images[:, 1:] == images[:, :1]).all()) for images in splits)
    return [images[:, :1].contiguous() for images in splits] if grey else splits


def build_imagefolder(s: ImageFolderConfig, *, seed: int, transform: Augment, progress: Progress = None
                      ) -> DataBundle:
    mode = "L" if s.channels == 1 else "RGB"
    root = existing_dir(s.root, "imagefolder")
    notes: list[str] = []
    val = None
    if file_kind(root / "train") == "dir" and file_kind(root / "test") == "dir":
        train_images, train_labels, classes, dropped, note = read_class_tree(
            root / "train", mode, s.image_size, None, progress, min_per_class=s.min_per_class)
        notes += [note] if note else []
        test_images, test_labels, *_ = read_class_tree(root / "test", mode, s.image_size, classes, progress,
                                                       dropped=dropped)
        if file_kind(root / "val") == "dir":  # the dataset's own validation split wins over val_share
            val = read_class_tree(root / "val", mode, s.image_size, classes, progress, dropped=dropped)[:2]
        layout = "train/test folders" + (" + val folder" if val is not None else "")
    else:
        images, labels, classes, _, note = read_class_tree(root, mode, s.image_size, None, progress,
                                                           min_per_class=s.min_per_class)
        notes += [note] if note else []
        sizes = labels.bincount(minlength=len(classes))
        if bool((sizes < 2).any()):  # one image cannot be both trained on and tested
            small = [classes[i] for i in (sizes < 2).nonzero().flatten().tolist()]
            raise DataError(f"imagefolder: {len(small)} class folder(s) hold a single image (e.g. "
                            f"'{shown(small[0])}'); a train/test split needs 2 per class (dataset.min_per_class=2 "
                            f"drops them knowingly)")
        train, test = stratified_split(labels.numpy(), s.test_fraction, s.split_seed)
        train_images, train_labels, test_images, test_labels = images[train], labels[train], images[test], labels[test]
        layout = f"split {s.test_fraction} of one tree"
    if s.channels is None:
        parts = follow_channels([train_images, test_images, *([val[0]] if val is not None else [])])
        train_images, test_images = parts[0], parts[1]
        val = (parts[2], val[1]) if val is not None else None
    info = {"root": shown(root), "classes": ",".join(map(shown, classes)), "layout": layout,
            "channels": int(train_images.shape[1])}
    if val is not None:
        info["val_source"] = "val folder"
    return in_memory_bundle("imagefolder", train_images, train_labels, test_images, test_labels, len(classes),
                            None, transform, info, val_share=s.val_share, val_seed=s.split_seed, val=val,
                            notes=notes)


# --- clamm --------------------------------------------------------------------------------------

# Grey mean and std of CLaMM pages, as used by the DGMP authors.
CLAMM_MEAN, CLAMM_STD = 185.2293 / 255, 61.8040 / 255


def read_label_csv(path: Path, filename_column: int, label_column: int) -> list[tuple[str, str]]:
    """(file name, label) rows of a semicolon-separated CLaMM file list; a header row is skipped."""
    rows = read_csv_rows(path, "clamm label file", delimiter=";")
    needed = max(filename_column, label_column) + 1
    if rows and not (len(rows[0]) > filename_column and rows[0][filename_column].lower().endswith(IMAGE_SUFFIXES)):
        rows = rows[1:]  # header such as FILENAME;SCRIPT_TYPE;...
    if not rows:
        raise DataError(f"clamm: label file '{shown(path)}' has no rows")
    short = [i for i, row in enumerate(rows) if len(row) < needed]
    if short:
        raise DataError(f"clamm: row {short[0] + 1} of '{shown(path)}' has fewer than {needed} ';'-separated "
                        f"columns")
    return [(row[filename_column], row[label_column]) for row in rows]


def find_label_csv(folder: Path, configured: str | None) -> Path:
    if configured:
        path = Path(configured).expanduser()
        path = path if path.is_absolute() else folder / path
        if not path.is_file():
            raise DataError(f"clamm: label file '{shown(path)}' does not exist")
        return path
    candidates = [p for p in entries(folder) if p.suffix.lower() == ".csv"]
    if len(candidates) != 1:
        found = ", ".join(shown(p.name) for p in candidates) or "none"
        raise DataError(f"clamm: expected one .csv label file in '{shown(folder)}' (found {found}); set "
                        f"dataset.train_csv/test_csv")
    return candidates[0]


class PageCrops(Dataset):
    """Crops of grey pages, standardised: the centre crop (test); for training a random crop, or the
    ``transform`` of the whole page when an augment recipe is given (e.g. ``document``'s random resized
    crop of the page, as the DGMP authors trained on CLaMM)."""

    def __init__(self, pages: list[torch.Tensor], labels: torch.Tensor, size: int, random_crop: bool,
                 transform: Transform | None = None):
        self.pages, self.labels, self.size, self.random_crop = pages, labels, size, random_crop
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pages)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        page, size = self.pages[index], self.size
        if self.transform is not None:
            crop = self.transform(page[None])[0]
        else:
            if self.random_crop:
                y = int(torch.randint(0, page.shape[0] - size + 1, ()))
                x = int(torch.randint(0, page.shape[1] - size + 1, ()))
            else:
                y, x = (page.shape[0] - size) // 2, (page.shape[1] - size) // 2
            crop = page[y:y + size, x:x + size]
        crop = crop.float().div_(255.0)[None]
        return (crop - CLAMM_MEAN) / CLAMM_STD, int(self.labels[index])


def read_clamm_split(folder: Path, csv_path: Path, s: ClammConfig, classes: list[str] | None,
                     split: str, progress: Progress) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    rows = read_label_csv(csv_path, s.filename_column, s.label_column)
    names = [name for name, _ in rows]
    if len(set(names)) != len(names):  # a page listed twice would count twice (in test: inflate accuracy)
        twice = next(name for name in names if names.count(name) > 1)
        raise DataError(f"clamm {split}: '{shown(twice)}' is listed more than once in '{shown(csv_path)}'; every "
                        f"page may be listed once")
    if classes is None:
        classes = sorted({label for _, label in rows})
    unknown = sorted({label for _, label in rows} - set(classes))
    if unknown:
        raise DataError(f"clamm {split}: label '{shown(unknown[0])}' in '{shown(csv_path)}' does not occur in the "
                        f"training labels")
    pages = []
    for done, (name, _) in enumerate(rows, start=1):
        path = folder / name
        if file_kind(path) != "file":
            raise DataError(f"clamm {split}: '{shown(name)}' is listed in '{shown(csv_path.name)}' but missing from "
                            f"'{shown(folder)}'")
        page = torch.from_numpy(read_image(path, "L", short_side=s.short_side))
        if min(page.shape) < s.input_size:
            raise DataError(f"clamm {split}: '{shown(name)}' is smaller than input_size {s.input_size} after scaling "
                            f"its short side to {s.short_side}")
        pages.append(page)
        if progress is not None:
            progress(f"reading clamm {split} images", done, len(rows))
    labels = torch.tensor([classes.index(label) for _, label in rows])
    return pages, labels, classes


def build_clamm(s: ClammConfig, *, seed: int, transform: Augment, progress: Progress = None) -> DataBundle:
    """Pages are scaled so their short side is ``short_side``; training items are random ``input_size``
    crops (or the augment recipe's transform of the page), test items the centre crop."""
    train_folder = existing_dir(s.train_images, "clamm train_images")
    test_folder = existing_dir(s.test_images, "clamm test_images")
    train_pages, train_labels, classes = read_clamm_split(
        train_folder, find_label_csv(train_folder, s.train_csv), s, None, "train", progress)
    test_pages, test_labels, _ = read_clamm_split(
        test_folder, find_label_csv(test_folder, s.test_csv), s, classes, "test", progress)
    val, val_info = None, {}
    if s.val_share > 0:
        kept, held = stratified_val(train_labels.numpy(), s.val_share, VAL_SEED, "clamm")
        val = PageCrops([train_pages[i] for i in held], train_labels[held], s.input_size, random_crop=False)
        train_pages, train_labels = [train_pages[i] for i in kept], train_labels[kept]
        val_info = {"val_size": len(held), "val_source": f"val_share={s.val_share:g} of the training pages, stratified"}
    check_classes(train_labels, "clamm")
    return DataBundle(
        name="clamm",
        task="classification",
        train=PageCrops(train_pages, train_labels, s.input_size, random_crop=True,
                        transform=transform(s.input_size)),
        test=PageCrops(test_pages, test_labels, s.input_size, random_crop=False),
        train_labels=train_labels,
        num_classes=len(classes),
        in_channels=1,
        input_size=s.input_size,
        info={"train_size": len(train_pages), "test_size": len(test_pages), "classes": ",".join(classes),
              "normalisation": "grey, CLaMM mean 185.23/255, std 61.80/255", **val_info},
        val=val,
    )
