"""``icdar17``: ICDAR 2017 Historical-WI writer retrieval from the folders as distributed.

Layout (``scripts/prepare_icdar17.py`` builds it from the Zenodo archives)::

    <root>/<train_dir>/1001-IMG_MAX_116403.jpg ...   flat folder, 394 writers x 3 pages
    <root>/<test_dir>/1-IMG_MAX_1234.jpg ...         flat folder, 720 writers x 5 pages

File names start with the writer id (``^(\\d+)-``); png, jpg and tif are read, binarised or colour
(converted to grey). Pages are inverted to ink bright on dark, optionally downscaled by
``page_scale`` (pages stay in memory as uint8), then cut into patches of ``patch_size`` page pixels
resized to ``input_size`` (see ``poolbench.data.pages``). Patches are kept when at least
``min_edges`` of their pixels are Sobel edges, a stand-in for the authors' Canny filter
(> 2000 edge pixels in a 256² patch, about 3 %).

Errors (DataError, one line): missing or empty folder, a file whose name does not start with a
writer id, a writer in both splits, a test writer with a single page, a page smaller than the
patch, an unreadable image (named; never skipped).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    check_task,
    dataset_options,
    existing_dir,
    fraction,
    image_files,
    positive_int,
    read_image,
)
from poolbench.data.pages import (
    RandomPatches,
    TiledPatches,
    check_page_sizes,
    check_test_pages,
    edge_mask,
)
from poolbench.errors import ConfigError, DataError

WRITER_PATTERN = re.compile(r"^(\d+)-")
EXAMPLE_NAME = "1001-IMG_MAX_116403.jpg"

DEFAULTS: dict[str, Any] = {
    "root": None,
    "train_dir": "train",
    "test_dir": "test",
    "page_scale": 0.5,
    "patch_size": 200,
    "input_size": 128,
    "min_edges": 0.03,
    "train_patches_per_page": 100,
    "check_disjoint": True,
}


def read_pages(folder: Path, what: str, scale: float,
               progress: Callable[[str, int, int], None] | None) -> tuple[list[torch.Tensor], list[int], list[str]]:
    """Pages (ink bright, uint8) and their writer ids, in file-name order."""
    files = image_files(folder)
    if not files:
        raise DataError(f"icdar17 {what}: no png/jpg/tif images in '{folder}'")
    bad = [f.name for f in files if not WRITER_PATTERN.match(f.name)]
    if bad:
        raise DataError(f"icdar17 {what}: {len(bad)} file name(s) in '{folder}' do not start with a writer id, "
                        f"e.g. '{bad[0]}'; expected names like '{EXAMPLE_NAME}'")
    pages, writer_ids = [], []
    for done, path in enumerate(files, start=1):
        pages.append(255 - torch.from_numpy(read_image(path, "L", scale)))
        writer_ids.append(int(WRITER_PATTERN.match(path.name).group(1)))  # type: ignore[union-attr]
        if progress is not None:
            progress(f"reading icdar17 {what} pages", done, len(files))
    return pages, writer_ids, [f.name for f in files]


def build_icdar17(cfg: Mapping[str, Any], *, seed: int,
                  progress: Callable[[str, int, int], None] | None = None) -> DataBundle:
    del seed  # the split is fixed by the folders; patch positions use torch's global RNG
    check_task(cfg, "retrieval")
    options = dataset_options(cfg, DEFAULTS)
    crop_size, input_size = positive_int(options, "patch_size"), positive_int(options, "input_size")
    patches_per_page = positive_int(options, "train_patches_per_page")
    min_edges = fraction(options, "min_edges")
    scale = options["page_scale"]
    if not isinstance(scale, int | float) or not 0 < scale <= 1:
        raise ConfigError(f"dataset option 'page_scale' must be in (0, 1], got {scale!r}")
    root = existing_dir(options["root"], "icdar17") if options["root"] else None
    folders = {split: Path(options[f"{split}_dir"]).expanduser() for split in ("train", "test")}
    if root is None and not all(path.is_absolute() for path in folders.values()):
        raise DataError("icdar17: no root configured; set dataset.root=<folder holding the train and test "
                        "folders> (see scripts/prepare_icdar17.py)")
    folders = {split: root / path if root is not None else path for split, path in folders.items()}

    train_pages, train_ids, train_names = read_pages(existing_dir(folders["train"], "icdar17 train"), "train",
                                                     scale, progress)
    test_pages, test_ids, test_names = read_pages(existing_dir(folders["test"], "icdar17 test"), "test",
                                                  scale, progress)
    check_page_sizes(train_pages, train_names, crop_size)
    check_page_sizes(test_pages, test_names, crop_size)
    shared = sorted(set(train_ids) & set(test_ids))
    if shared and options["check_disjoint"]:
        raise DataError(f"icdar17: {len(shared)} writer id(s) appear in both train and test (e.g. {shared[0]}); "
                        f"the splits must have disjoint writers (if they number writers independently, set "
                        f"dataset.check_disjoint=false)")
    page_writers = torch.tensor(test_ids, dtype=torch.int64)
    check_test_pages(page_writers, "icdar17")

    writer_index = {writer: i for i, writer in enumerate(sorted(set(train_ids)))}
    train_labels = torch.tensor([writer_index[w] for w in train_ids], dtype=torch.int64)
    train = RandomPatches(train_pages, edge_mask, train_labels, crop_size, input_size,
                          patches_per_page, min_edges)
    test = TiledPatches(test_pages, edge_mask, crop_size, input_size, min_edges)
    return DataBundle(
        name="icdar17",
        task="retrieval",
        train=train,
        test=test,
        train_labels=train.labels,
        num_classes=len(writer_index),
        in_channels=1,
        input_size=input_size,
        page_writers=page_writers,
        info={
            "train_pages": len(train_pages),
            "train_writers": len(writer_index),
            "test_pages": len(test_pages),
            "test_writers": len(set(test_ids)),
            "test_patches": len(test),
            "normalisation": "grey, inverted (ink bright on dark), [0, 1]",
        },
    )
