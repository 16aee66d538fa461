"""Helpers every dataset builder shares: validated settings, safe file listing, image decoding and
in-memory image sets, and the validation split every builder draws the same way.

Every reader of user files here turns a bad file into one :class:`DataError` line naming it: broken
or looping symlinks, entries that are not regular files or folders (a FIFO, a device, a symlink to
``/dev/zero``: never opened), paths the OS refuses (too long), undecodable images, images beyond
Pillow's decompression-bomb limit. File names are shown through :func:`shown`: bytes that are not
UTF-8 become ``\\xNN`` and control characters (newline, ESC, ...) are escaped as in ``repr``, so a
hostile name can neither crash a message nor reach a terminal raw.
"""

from __future__ import annotations

import os
import stat
import unicodedata
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from poolbench.data.schemas import (  # noqa: F401 - the shared key types and checks, torch-free, re-exported
    VAL_SEED,
    Augment,
    MinImages,
    PositiveInt,
    Progress,
    StepsPerEpoch,
    Transform,
    ValShare,
    check_val_share,
    settings,
)
from poolbench.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def shown(path: str | os.PathLike[str]) -> str:
    """A path (or any text from the file system) that can always be printed on one line: bytes that
    are not UTF-8 become ``\\xNN``, control and format characters (newline, ESC, bidi overrides) are
    escaped as ``repr`` escapes them."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(ch.encode("unicode_escape").decode("ascii") if unicodedata.category(ch)[0] == "C" else ch
                   for ch in text)


def file_kind(path: Path) -> str | None:
    """``"dir"``, ``"file"`` (regular), another kind's name (``"FIFO"``, ``"character device"``, ...) of
    what ``path`` is after following symlinks, or None when nothing is there. Never opens it; any other
    OS refusal (a name too long, no permission) is a DataError naming the path."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    except OSError as err:
        raise DataError(f"cannot use '{shown(path)}': {err.strerror or err}") from None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
             (stat.S_ISSOCK, "socket"))
    return next((name for test, name in kinds if test(mode)), "special file")


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a regular file (symlinks followed); else one DataError line saying what it is."""
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{what}: '{shown(path)}' does not exist")
    if kind != "file":
        raise DataError(f"{what}: '{shown(path)}' is a {'folder' if kind == 'dir' else kind}, not a regular file")
    return path


def existing_dir(path: str | Path | None, what: str) -> Path:
    if path is None or str(path) == "":
        raise DataError(f"{what}: no folder configured (set dataset.root)")
    folder = Path(path).expanduser()
    kind = file_kind(folder)
    if kind is None:
        raise DataError(f"{what}: folder '{shown(folder)}' does not exist")
    if kind != "dir":
        raise DataError(f"{what}: '{shown(folder)}' is not a folder")
    return folder


def entries(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted; a broken or looping symlink among them, or an entry that is
    neither a regular file nor a folder (a FIFO, a device, a symlink to ``/dev/zero``), is a DataError
    naming it: it would otherwise silently drop out of the data, and opening it could hang or never end."""
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
        kind = file_kind(path)
        if kind not in ("dir", "file"):
            raise DataError(f"'{shown(path)}' is a {kind or 'vanished entry'}, not a regular file or folder; "
                            f"remove it (nothing is skipped silently, nor opened)")
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


# --- validation split ----------------------------------------------------------------------------

def val_count(val_share: float, available: int, what: str, minimum: int = 1) -> int:
    """How many of ``available`` training identities/items ``val_share`` holds out (0 = none).

    A share rounds to the nearest count, at least ``minimum`` (retrieval: 2 identities, as with a
    single one mAP is 1.0 whatever the model); a count is taken as is and must reach ``minimum``.
    Validation may not take everything: training keeps at least 2 (a classifier or a triplet loss
    needs two)."""
    if val_share <= 0:
        return 0
    count = int(val_share) if val_share >= 1 else max(minimum, round(val_share * available))
    if count < minimum:
        raise DataError(f"dataset.val_share={val_share:g} holds out {count} of the {what}; validation needs at least "
                        f"{minimum} (with one identity, leave-one-out mAP is 1.0 whatever the model)")
    if available - count < 2:
        raise DataError(f"dataset.val_share={val_share:g} holds out {count} of {available} {what}, leaving "
                        f"{available - count} to train on; lower it (training needs at least 2)")
    return count


def held_out_identities(identities: list[str], count: int, seed: int, stream: int = 1) -> set[str]:
    """``count`` of ``identities`` drawn with ``seed`` (numpy's ``default_rng([seed, stream])``: a stream of
    its own, so drawing validation identities never changes the test split drawn with ``seed``)."""
    ordered = sorted(identities)
    picks = np.random.default_rng([seed, stream]).permutation(len(ordered))[:count]
    return {ordered[i] for i in picks}


def stratified_val(labels: np.ndarray, val_share: float, seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices: a stratified, seeded ``val_share`` of the training items
    (every class keeps its proportion in both); refused in one line when the classes are too small."""
    from sklearn.model_selection import train_test_split

    count = val_count(val_share, len(labels), f"{name} training items")
    indices = np.arange(len(labels))
    try:
        train, val = train_test_split(indices, test_size=count, stratify=labels, random_state=seed)
    except ValueError as err:
        raise DataError(f"{name}: cannot hold out a stratified validation split of {count} items "
                        f"(dataset.val_share={val_share:g}): {err}") from None
    return np.sort(train), np.sort(val)


def refuse_small_classes(counts: Mapping[str, int], minimum: int | None, name: str, key: str,
                         unit: str) -> tuple[set[str], str | None]:
    """Classes (or identities) to drop and the one line saying so: those with fewer than ``minimum``
    images when the user set ``key``; without it, any with no image at all is refused, naming it."""
    if minimum is None:
        empty = sorted(c for c, n in counts.items() if n == 0)
        if empty:
            raise DataError(f"{name}: {len(empty)} {unit}(s) hold no images (e.g. '{shown(empty[0])}'); remove "
                            f"them, or drop them knowingly with dataset.{key}=1")
        return set(), None
    dropped = {c for c, n in counts.items() if n < minimum}
    if not dropped:
        return set(), None
    names = ", ".join(f"'{shown(c)}'" for c in sorted(dropped)[:5]) + (", ..." if len(dropped) > 5 else "")
    return dropped, f"{name}: dropped {len(dropped)} {unit}(s) with fewer than {minimum} images " \
                    f"(dataset.{key}={minimum}): {names}"
