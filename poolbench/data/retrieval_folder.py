"""``retrieval_folder``: instance retrieval on any images grouped by identity (writers, objects, people);
``icdar17`` is a preset of it.

Where the images and their identities come from (``root`` is the folder holding them):

- one sub-folder per identity: ``<root>/<identity>/*.png`` (default);
- a flat folder whose file names carry the identity: ``identity_pattern``, a regular expression whose
  first group is the identity, e.g. ``^([^-]+)-`` for ``alice-0.png`` or ICDAR17's ``1001-IMG_MAX_1.jpg``;
- a CSV file ``csv`` with rows ``path,identity[,split]`` (paths relative to ``root``; an optional
  header row ``path,identity,split``; split is ``train``, ``val`` or ``test``).

Train, validation and test identities are disjoint. The split comes from ``<root>/<train_dir>/`` and
``<root>/<test_dir>/`` when both exist (each in the layout above; ``<root>/<val_dir>/`` too when it
exists), from the CSV's split column, or else from a seeded split of the identities:
``test_identities`` of them (a fraction, drawn with ``identity_split_seed`` among identities with at
least 2 images) go to the test set. Without a validation folder or CSV rows, ``val_share`` of the
training identities (a share or a count, drawn with ``identity_split_seed`` on a stream of its own, so
the test split is the same with or without it) are held out as validation identities, evaluated with
the same leave-one-out protocol as the test identities.

Evaluation is writer retrieval's leave-one-out protocol (poolbench.metrics.writer_retrieval): every
test image is a query against all other test images, ranked by the cosine similarity of their
descriptors. Images are used whole, resized to ``input_size`` x ``input_size`` (objects, people;
RGB unless ``channels=1``), or, with ``patch_size`` set, as documents: read grey, inverted (ink
bright on dark), scaled by ``page_scale`` and tiled into patches like ICDAR17 (poolbench.data.pages).

Errors (DataError, one line): missing folders, an image whose name does not match the pattern, a
broken symlink, an entry that is not a regular file (FIFO, device), an unreadable image, a CSV row
listed twice, an identity in two splits, a test or validation identity with a single image (unless
``min_per_identity`` drops it), fewer than 2 identities on any side (mAP would be 1.0 with a single
test identity), training identities that all have a single whole image (their positives would be
copies: nothing to learn), a page smaller than the patch. Training identities with a single image
are named in one line (``min_per_identity=2`` drops them).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from poolbench.data.base import DataBundle
from poolbench.data.common import (
    IMAGE_SUFFIXES,
    Augment,
    NormalisedImages,
    Progress,
    channel_stats,
    existing_dir,
    file_kind,
    held_out_identities,
    image_files,
    read_csv_rows,
    read_image,
    read_images,
    refuse_small_classes,
    shown,
    subfolders,
    val_count,
)
from poolbench.data.pages import RandomPatches, TiledPatches, check_page_sizes, check_test_pages, edge_mask
from poolbench.data.schemas import RetrievalFolderConfig
from poolbench.errors import ConfigError, DataError

Item = tuple[Path, str]  # (image file, identity)
SPLITS = ("train", "val", "test")


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
        kind = file_kind(image)
        if kind != "file":
            what = "missing" if kind is None else f"a {'folder' if kind == 'dir' else kind}"
            raise DataError(f"retrieval_folder csv '{shown(path)}': row {number} names '{shown(image)}', which is "
                            f"not a file ({what})")
        items.append((image, row[1]))
    # A row listed twice would let an image retrieve itself (a test identity's single image would pass
    # the two-images check and score a perfect hit): refuse it, whatever its identity or split.
    seen: dict[Path, int] = {}
    for number, (image, _) in enumerate(items, start=1):
        key = Path(os.path.realpath(image))
        if key in seen:
            raise DataError(f"retrieval_folder csv '{shown(path)}': rows {seen[key]} and {number} list the same "
                            f"image '{shown(image)}'; every image may be listed once")
        seen[key] = number
    if widths != {3}:
        return items, None
    splits = [row[2].lower() for row in rows]
    odd = next((i for i, split in enumerate(splits, start=1) if split not in SPLITS), None)
    if odd is not None:
        raise DataError(f"retrieval_folder csv '{shown(path)}': row {odd} has split '{shown(rows[odd - 1][2])}'; "
                        f"use train, val or test")
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


def gather(s: RetrievalFolderConfig, root: Path) -> tuple[list[Item], list[Item] | None, list[Item], str]:
    """Training, own validation (None when the data has none) and test items, and where the split came from."""
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
        if file_kind(csv_path) != "file":
            raise DataError(f"retrieval_folder: csv '{shown(csv_path)}' does not exist or is not a regular file")
        items, splits = read_csv_items(csv_path, root)
        if splits is not None:
            parts = {name: [item for item, split in zip(items, splits, strict=True) if split == name]
                     for name in SPLITS}
            return parts["train"], parts["val"] or None, parts["test"], "csv split column"
        train, test = split_identities(items, s.test_identities, s.identity_split_seed)
        return train, None, test, "seeded identity split of csv"
    train_dir, test_dir, val_dir = root / s.train_dir, root / s.test_dir, root / s.val_dir
    if train_dir.is_dir() and test_dir.is_dir():
        val = read_tree(val_dir, pattern) if file_kind(val_dir) == "dir" else None
        return read_tree(train_dir, pattern), val, read_tree(test_dir, pattern), "split folders"
    if train_dir.is_dir() != test_dir.is_dir():
        present, missing = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise DataError(f"retrieval_folder: found '{shown(present)}' but not '{shown(missing)}'; give both split "
                        f"folders, or neither (then identities are split by dataset.test_identities)")
    items = read_tree(root, pattern)
    train, test = split_identities(items, s.test_identities, s.identity_split_seed)
    return train, None, test, "seeded identity split"


def counts_of(items: list[Item]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, identity in items:
        counts[identity] = counts.get(identity, 0) + 1
    return counts


def seeded_val(s: RetrievalFolderConfig, train: list[Item]) -> tuple[list[Item], list[Item] | None]:
    """Hold out ``val_share`` of the training identities (among those with >= 2 images: leave-one-out
    needs two) as validation identities, drawn with ``identity_split_seed`` on its own stream."""
    counts = counts_of(train)
    count = val_count(s.val_share, len(counts), f"{s.name} training identities", minimum=2)
    if count == 0:
        return train, None
    eligible = [identity for identity, n in counts.items() if n >= 2]
    if count > len(eligible):
        raise DataError(f"{s.name}: dataset.val_share={s.val_share:g} asks for {count} validation identities but "
                        f"only {len(eligible)} training identities have the 2 images leave-one-out needs")
    held = held_out_identities(eligible, count, s.identity_split_seed)
    return [i for i in train if i[1] not in held], [i for i in train if i[1] in held]


def build_retrieval_folder(s: RetrievalFolderConfig, *, seed: int, transform: Augment,
                           progress: Progress = None) -> DataBundle:
    del seed  # the split is fixed by the data (or identity_split_seed); crops use torch's global RNG
    tiled = s.patch_size is not None
    root = existing_dir(s.root, s.name)
    train_items, val_items, test_items, layout = gather(s, root)
    notes: list[str] = []
    if s.min_per_identity is not None:  # knowingly: identities with too few images leave every split
        for what, part in (("training", train_items), ("validation", val_items), ("test", test_items)):
            if part:
                dropped, note = refuse_small_classes(counts_of(part), s.min_per_identity, s.name, "min_per_identity",
                                                     f"{what} identit(y/ies)")
                part[:] = [item for item in part if item[1] not in dropped]
                notes += [note] if note else []
    val_source = "val folder" if val_items is not None and layout == "split folders" else \
        "csv val rows" if val_items is not None else None
    if val_items is None:
        train_items, val_items = seeded_val(s, train_items)
        val_source = f"val_share={s.val_share:g} of the training identities" if val_items is not None else None
    splits = {"train": train_items, "val": val_items or [], "test": test_items}
    ids = {name: sorted({identity for _, identity in part}) for name, part in splits.items()}
    for a, b in (("train", "test"), ("train", "val"), ("val", "test")):
        shared = sorted(set(ids[a]) & set(ids[b]))
        if shared and s.check_disjoint:
            raise DataError(f"{s.name}: {len(shared)} identit(y/ies) appear in both {a} and {b} (e.g. "
                            f"'{shown(shared[0])}'); the splits must be disjoint (if they number identities "
                            f"independently, set dataset.check_disjoint=false)")
    if len(ids["train"]) < 2:
        raise DataError(f"{s.name}: the training set has {len(ids['train'])} identity; triplet training needs at "
                        f"least 2")
    # Identities as integers: training ones 0..n-1 (the classes), test ones numbered on from there, then
    # validation ones, so no two splits share a number even when check_disjoint is off.
    offsets = {"train": 0, "test": len(ids["train"]), "val": len(ids["train"]) + len(ids["test"])}
    index = {name: {identity: offsets[name] + i for i, identity in enumerate(ids[name])} for name in splits}
    labels = {name: torch.tensor([index[name][i] for _, i in part], dtype=torch.int64)
              for name, part in splits.items()}
    train_labels, page_writers = labels["train"], labels["test"]
    for name, what in (("test", "test"), ("val", "validation")):
        counts = counts_of(splits[name])
        single = sorted(identity for identity, n in counts.items() if n < 2)
        if single:
            raise DataError(f"{s.name}: {len(single)} {what} identit(y/ies) have a single image (e.g. "
                            f"'{shown(single[0])}'); leave-one-out retrieval needs at least 2 images per {what} "
                            f"identity (dataset.min_per_identity=2 drops them knowingly)")
    check_test_pages(page_writers, s.name)
    if val_items:
        check_test_pages(labels["val"], s.name, "validation")
    notes += single_image_note(s, counts_of(train_items), tiled)
    paths = {name: [p for p, _ in part] for name, part in splits.items()}
    info = {"layout": layout, "train_images": len(train_items), "train_identities": len(ids["train"]),
            "test_images": len(test_items), "test_identities": len(ids["test"])}
    if val_items:
        info.update(val_images=len(val_items), val_identities=len(ids["val"]), val_source=val_source)
    val: Dataset | None
    if tiled:
        train, test, val = tiled_sets(s, paths, train_labels, transform, progress)
        channels = 1
        info.update(test_patches=len(test), normalisation="grey, inverted (ink bright on dark), [0, 1]")
    else:
        mode = "RGB" if s.channels in (None, 3) else "L"
        images = {name: read_images(paths[name], mode, s.input_size, progress, f"{s.name} {name}")
                  for name in splits if paths[name]}
        mean, std = channel_stats(images["train"])
        train = NormalisedImages(images["train"], train_labels, mean, std, transform(s.input_size))
        # A test item's label is its image index: evaluation pools each image's items into one descriptor.
        test = NormalisedImages(images["test"], torch.arange(len(images["test"])), mean, std)
        val = NormalisedImages(images["val"], torch.arange(len(images["val"])), mean, std) if val_items else None
        channels = images["train"].shape[1]
        info.update(normalisation="per-channel train mean/std")
    return DataBundle(
        name=s.name,
        task="retrieval",
        train=train,
        test=test,
        train_labels=train_labels if not tiled else train.labels,
        num_classes=len(ids["train"]),
        in_channels=channels,
        input_size=s.input_size,
        page_writers=page_writers,
        info=info,
        val=val,
        val_page_writers=labels["val"] if val_items else None,
        notes=notes,
    )


def single_image_note(s: RetrievalFolderConfig, counts: dict[str, int], tiled: bool) -> list[str]:
    """Training identities with one image train on copies (whole images) or crops (pages) of that one
    image as their positives: said in one line; with every identity like that, whole images are refused."""
    single = sorted(identity for identity, n in counts.items() if n < 2)
    if not single:
        return []
    if len(single) == len(counts) and not tiled:
        raise DataError(f"{s.name}: every training identity has a single image, so every triplet positive is a "
                        f"copy of its anchor and training learns nothing; give identities 2 or more images")
    names = ", ".join(f"'{shown(i)}'" for i in single[:5]) + (", ..." if len(single) > 5 else "")
    copies = "crops of that one page" if tiled else "copies of that one image"
    return [f"{s.name}: {len(single)} training identit(y/ies) have a single image ({names}); their triplet "
            f"positives are {copies} (dataset.min_per_identity=2 drops them)"]


def tiled_sets(s: RetrievalFolderConfig, paths: dict[str, list[Path]], train_labels: torch.Tensor,
               transform: Augment, progress: Progress) -> tuple[RandomPatches, TiledPatches, TiledPatches | None]:
    """Documents: pages read grey, inverted (ink bright), scaled; random training crops, test (and
    validation) tiles."""
    assert s.patch_size is not None
    pages = {}
    for split in ("train", "val", "test"):
        pages[split] = []
        for done, path in enumerate(paths[split], start=1):
            pages[split].append(255 - torch.from_numpy(read_image(path, "L", s.page_scale)))
            if progress is not None:
                progress(f"reading {s.name} {split} pages", done, len(paths[split]))
        check_page_sizes(pages[split], [shown(p.name) for p in paths[split]], s.patch_size)
    train = RandomPatches(pages["train"], edge_mask, train_labels, s.patch_size, s.input_size,
                          s.train_patches_per_page, s.min_edges, transform=transform(s.patch_size))
    test = TiledPatches(pages["test"], edge_mask, s.patch_size, s.input_size, s.min_edges)
    val = TiledPatches(pages["val"], edge_mask, s.patch_size, s.input_size, s.min_edges) if pages["val"] else None
    return train, test, val
