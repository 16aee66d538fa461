"""``retrieval_folder``: instance retrieval on any images grouped by identity (writers, objects, people);
``icdar17`` is a preset of it.

Where the images and their identities come from (``root`` is the folder holding them):

- one sub-folder per identity: ``<root>/<identity>/*.png`` (default);
- a flat folder whose file names carry the identity: ``identity_pattern``, a regular expression whose
  first group is the identity, e.g. ``^([^-]+)-`` for ``alice-0.png`` or ICDAR17's ``1001-IMG_MAX_1.jpg``;
- a CSV file ``csv`` with rows ``path,identity[,split]`` (paths relative to ``root``; an optional
  header row ``path,identity,split``; split is ``train`` or ``test``).

Train and test identities are disjoint. The split comes from ``<root>/<train_dir>/`` and
``<root>/<test_dir>/`` when both exist (each in the layout above), from the CSV's split column, or else
from a seeded split of the identities: ``test_identities`` of them (a fraction, drawn with
``identity_split_seed`` among identities with at least 2 images) go to the test set.

Evaluation is writer retrieval's leave-one-out protocol (poolbench.metrics.writer_retrieval): every
test image is a query against all other test images, ranked by the cosine similarity of their
descriptors. Images are used whole, resized to ``input_size`` x ``input_size`` (objects, people;
RGB unless ``channels=1``), or, with ``patch_size`` set, as documents: read grey, inverted (ink
bright on dark), scaled by ``page_scale`` and tiled into patches like ICDAR17 (poolbench.data.pages).

Errors (DataError, one line): missing folders, an image whose name does not match the pattern, a
broken symlink, an unreadable image, an identity in both splits, a test identity with a single image,
fewer than 2 identities on either side (mAP would be 1.0 with a single test identity), a page
smaller than the patch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    IMAGE_SUFFIXES,
    Augment,
    NormalisedImages,
    PositiveInt,
    Progress,
    StepsPerEpoch,
    channel_stats,
    existing_dir,
    image_files,
    read_csv_rows,
    read_image,
    read_images,
    shown,
    subfolders,
)
from poolbench.data.pages import RandomPatches, TiledPatches, check_page_sizes, check_test_pages, edge_mask
from poolbench.errors import ConfigError, DataError
from poolbench.schema import Range, Required, option

# ICDAR17 names start with the writer id: 1001-IMG_MAX_116403.jpg (any id before the first '-').
ICDAR17_PATTERN = r"^([^-]+)-"


@dataclass
class RetrievalFolderConfig:
    """``dataset=retrieval_folder``: images grouped by identity, evaluated by leave-one-out retrieval."""

    name: str = "retrieval_folder"
    task: Literal["retrieval"] = "retrieval"
    root: Annotated[str | None, Required("the folder holding the images (one sub-folder per identity, "
                                         "train/ and test/ folders, or the files a csv lists)")] = None
    csv: str | None = None  # rows path,identity[,split], paths relative to root; null = read the folders
    identity_pattern: str | None = None  # regex, group 1 = identity, on names in flat folders; null = sub-folders
    train_dir: str = "train"  # split folders, used when both exist under root
    test_dir: str = "test"
    test_identities: Annotated[float, Range(gt=0, lt=1)] = 0.5  # without split folders/column: held-out fraction
    identity_split_seed: Annotated[int, Range(ge=0, lt=2**32)] = 0  # fixes that split (not the run seed)
    check_disjoint: bool = True  # error when an identity is in both given splits
    channels: Literal[1, 3] | None = None  # null = 3 (RGB) for whole images, 1 for tiled pages (always grey)
    input_size: PositiveInt = 128  # network input: whole images or patches are resized to this
    patch_size: Annotated[int | None, Range(ge=1)] = None  # tile pages into patches of this; null = whole images
    page_scale: Annotated[float, Range(gt=0, le=1)] = 1.0  # tiled pages are downscaled by this when read
    min_edges: Annotated[float, Range(ge=0, le=1)] = 0.03  # tiled: keep patches with this Sobel-edge fraction
    train_patches_per_page: PositiveInt = 100  # tiled: random training crops per page and epoch pass
    steps_per_epoch: StepsPerEpoch = None  # null = one pass over the training items


Item = tuple[Path, str]  # (image file, identity)


def _match(pattern: re.Pattern[str], path: Path, folder: Path) -> str:
    match = pattern.search(path.name)
    if match is None or not match.groups() or not match.group(1):
        raise DataError(f"'{shown(path.name)}' in '{shown(folder)}' does not match identity_pattern "
                        f"'{pattern.pattern}' (its first group must capture the identity)")
    return match.group(1)


def read_tree(folder: Path, pattern: re.Pattern[str] | None) -> list[Item]:
    """(image, identity) pairs of one folder: its identity sub-folders, or its files named by ``pattern``."""
    folder = existing_dir(folder, "retrieval_folder")
    if pattern is not None:
        items = [(path, _match(pattern, path, folder)) for path in image_files(folder)]
    else:
        items = [(path, sub.name) for sub in subfolders(folder) for path in image_files(sub)]
    if not items:
        where = "" if pattern is not None else "the identity sub-folders of "
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {where}'{shown(folder)}'")
    return items


def read_csv_items(path: Path, root: Path) -> tuple[list[Item], list[str] | None]:
    """(image, identity) pairs and the split column (or None) of a ``path,identity[,split]`` CSV."""
    rows = read_csv_rows(path, "retrieval_folder csv")
    if rows and [cell.lower() for cell in rows[0][:2]] == ["path", "identity"]:
        rows = rows[1:]
    if not rows:
        raise DataError(f"retrieval_folder csv '{shown(path)}' has no rows")
    widths = {len(row) for row in rows}
    if not widths <= {2, 3} or len(widths) != 1:
        bad = next(i for i, row in enumerate(rows, start=1) if len(row) not in (2, 3) or len(row) != len(rows[0]))
        raise DataError(f"retrieval_folder csv '{shown(path)}': row {bad} has {len(rows[bad - 1])} columns; every "
                        f"row needs path,identity or every row path,identity,split")
    items = []
    for number, row in enumerate(rows, start=1):
        if not row[0] or not row[1]:
            raise DataError(f"retrieval_folder csv '{shown(path)}': row {number} has an empty path or identity")
        image = Path(row[0]).expanduser()
        image = image if image.is_absolute() else root / image
        if not image.is_file():
            raise DataError(f"retrieval_folder csv '{shown(path)}': row {number} names '{shown(image)}', which is "
                            f"not a file")
        items.append((image, row[1]))
    if widths != {3}:
        return items, None
    splits = [row[2].lower() for row in rows]
    odd = next((i for i, split in enumerate(splits, start=1) if split not in ("train", "test")), None)
    if odd is not None:
        raise DataError(f"retrieval_folder csv '{shown(path)}': row {odd} has split '{rows[odd - 1][2]}'; "
                        f"use train or test")
    return items, splits


def split_identities(items: list[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """Hold out ``fraction`` of the identities with >= 2 images (seeded); the rest train."""
    counts: dict[str, int] = {}
    for _, identity in items:
        counts[identity] = counts.get(identity, 0) + 1
    eligible = sorted(identity for identity, count in counts.items() if count >= 2)
    n_test = min(len(eligible), max(2, round(fraction * len(counts))))
    held_out = {eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))[:n_test]}
    return [i for i in items if i[1] not in held_out], [i for i in items if i[1] in held_out]


def gather(s: RetrievalFolderConfig, root: Path) -> tuple[list[Item], list[Item], str]:
    """Training and test items, and a description of where the split came from."""
    pattern = None
    if s.identity_pattern is not None:
        try:
            pattern = re.compile(s.identity_pattern)
        except re.error as err:
            raise ConfigError(f"dataset.identity_pattern '{s.identity_pattern}' is not a regular expression: "
                              f"{err}") from None
    if s.csv is not None:
        csv_path = Path(s.csv).expanduser()
        csv_path = csv_path if csv_path.is_absolute() else root / csv_path
        if not csv_path.is_file():
            raise DataError(f"retrieval_folder: csv '{shown(csv_path)}' does not exist")
        items, splits = read_csv_items(csv_path, root)
        if splits is not None:
            train = [item for item, split in zip(items, splits, strict=True) if split == "train"]
            test = [item for item, split in zip(items, splits, strict=True) if split == "test"]
            return train, test, "csv split column"
        return (*split_identities(items, s.test_identities, s.identity_split_seed), "seeded identity split of csv")
    train_dir, test_dir = root / s.train_dir, root / s.test_dir
    if train_dir.is_dir() and test_dir.is_dir():
        return read_tree(train_dir, pattern), read_tree(test_dir, pattern), "split folders"
    if train_dir.is_dir() != test_dir.is_dir():
        present, missing = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise DataError(f"retrieval_folder: found '{shown(present)}' but not '{shown(missing)}'; give both split "
                        f"folders, or neither (then identities are split by dataset.test_identities)")
    items = read_tree(root, pattern)
    return (*split_identities(items, s.test_identities, s.identity_split_seed), "seeded identity split")


def build_retrieval_folder(s: RetrievalFolderConfig, *, seed: int, transform: Augment,
                           progress: Progress = None) -> DataBundle:
    del seed  # the split is fixed by the data (or identity_split_seed); crops use torch's global RNG
    tiled = s.patch_size is not None
    if tiled and s.channels == 3:
        raise ConfigError("dataset.channels=3 needs whole images (dataset.patch_size=null): tiled pages are read grey")
    root = existing_dir(s.root, s.name)
    train_items, test_items, layout = gather(s, root)
    train_ids = sorted({identity for _, identity in train_items})
    test_ids = sorted({identity for _, identity in test_items})
    shared = sorted(set(train_ids) & set(test_ids))
    if shared and s.check_disjoint:
        raise DataError(f"{s.name}: {len(shared)} identit(y/ies) appear in both train and test (e.g. "
                        f"'{shown(shared[0])}'); the splits must be disjoint (if they number identities "
                        f"independently, set dataset.check_disjoint=false)")
    if len(train_ids) < 2:
        raise DataError(f"{s.name}: the training set has {len(train_ids)} identity; triplet training needs at "
                        f"least 2")
    # Identities as integers: training ones 0..n-1 (the classes), test ones numbered on from there, so
    # no test identity shares a number with a training one even when check_disjoint is off.
    train_index = {identity: i for i, identity in enumerate(train_ids)}
    test_index = {identity: len(train_ids) + i for i, identity in enumerate(test_ids)}
    train_labels = torch.tensor([train_index[i] for _, i in train_items], dtype=torch.int64)
    page_writers = torch.tensor([test_index[i] for _, i in test_items], dtype=torch.int64)
    counts = page_writers.bincount(minlength=len(train_ids) + len(test_ids))[len(train_ids):]
    if bool((counts < 2).any()):
        single = test_ids[int((counts < 2).nonzero()[0])]
        raise DataError(f"{s.name}: {int((counts < 2).sum())} test identit(y/ies) have a single image (e.g. "
                        f"'{shown(single)}'); leave-one-out retrieval needs at least 2 images per test identity")
    check_test_pages(page_writers, s.name)
    train_paths, test_paths = [p for p, _ in train_items], [p for p, _ in test_items]
    info = {"layout": layout, "train_images": len(train_items), "train_identities": len(train_ids),
            "test_images": len(test_items), "test_identities": len(test_ids)}
    if tiled:
        train, test, channels = tiled_sets(s, train_paths, test_paths, train_labels, transform, progress)
        info.update(test_patches=len(test), normalisation="grey, inverted (ink bright on dark), [0, 1]")
    else:
        mode = "RGB" if s.channels in (None, 3) else "L"
        train_images = read_images(train_paths, mode, s.input_size, progress, f"{s.name} train")
        test_images = read_images(test_paths, mode, s.input_size, progress, f"{s.name} test")
        mean, std = channel_stats(train_images)
        train = NormalisedImages(train_images, train_labels, mean, std, transform(s.input_size))
        # A test item's label is its image index: evaluation pools each image's items into one descriptor.
        test = NormalisedImages(test_images, torch.arange(len(test_images)), mean, std)
        channels = train_images.shape[1]
        info.update(normalisation="per-channel train mean/std")
    return DataBundle(
        name=s.name,
        task="retrieval",
        train=train,
        test=test,
        train_labels=train_labels if not tiled else train.labels,
        num_classes=len(train_ids),
        in_channels=channels,
        input_size=s.input_size,
        page_writers=page_writers,
        info=info,
    )


def tiled_sets(s: RetrievalFolderConfig, train_paths: list[Path], test_paths: list[Path],
               train_labels: torch.Tensor, transform: Augment, progress: Progress
               ) -> tuple[RandomPatches, TiledPatches, int]:
    """Documents: pages read grey, inverted (ink bright), scaled; random training crops and test tiles."""
    assert s.patch_size is not None
    pages = {}
    for split, paths in (("train", train_paths), ("test", test_paths)):
        pages[split] = []
        for done, path in enumerate(paths, start=1):
            pages[split].append(255 - torch.from_numpy(read_image(path, "L", s.page_scale)))
            if progress is not None:
                progress(f"reading {s.name} {split} pages", done, len(paths))
        check_page_sizes(pages[split], [shown(p.name) for p in paths], s.patch_size)
    train = RandomPatches(pages["train"], edge_mask, train_labels, s.patch_size, s.input_size,
                          s.train_patches_per_page, s.min_edges, transform=transform(s.patch_size))
    test = TiledPatches(pages["test"], edge_mask, s.patch_size, s.input_size, s.min_edges)
    return train, test, 1


@dataclass
class Icdar17Config(RetrievalFolderConfig):
    """``dataset=icdar17``: ICDAR 2017 Historical-WI writer retrieval in the layout
    scripts/prepare_icdar17.py makes: flat folders ``<root>/train/`` (394 writers x 3 pages) and
    ``<root>/test/`` (720 writers x 5), file names starting with the writer id. Pages are halved (200 px
    patches = the authors' 400 at full size); patches need >= 3 % Sobel-edge pixels (the authors: Canny,
    > 2000 edge pixels in 256^2)."""

    name: str = "icdar17"
    identity_pattern: str | None = ICDAR17_PATTERN
    patch_size: Annotated[int | None, Range(ge=1)] = 200
    page_scale: Annotated[float, Range(gt=0, le=1)] = 0.5
    steps_per_epoch: StepsPerEpoch = 60  # training crops are random: 60 P x K batches


option("dataset", "retrieval_folder", RetrievalFolderConfig,
       meta={"augment": "none", "build": build_retrieval_folder})
option("dataset", "icdar17", Icdar17Config, meta={"augment": "none", "build": build_retrieval_folder})
