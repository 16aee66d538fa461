"""The validation split of every dataset kind (dataset.val_share, val/ folders, CSV val rows): disjoint
from training and test (identities for retrieval), seeded and reproducible, stratified for
classification, the data's own validation split used when present; and the data-builder hardening
that goes with it (non-regular files, small identities and classes, hostile names, geometry)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poolbench import schema
from poolbench.config import IDENTITY_NEUTRAL
from poolbench.data import build_dataset, dataset_names
from poolbench.errors import ConfigError, DataError


@pytest.mark.parametrize("name", dataset_names())
def test_every_dataset_has_an_identity_neutral_val_share(name: str) -> None:
    option = schema.options("dataset")[name]
    node = {**option.node(), **{key: "somewhere" for key in schema.required_fields(option.schema)}}
    assert node["val_share"] == 0.0 == IDENTITY_NEUTRAL["dataset.val_share"]
    for bad, match in ((1.5, "whole count"), (-0.1, ">= 0")):
        with pytest.raises(ConfigError, match=match):
            schema.check({**node, "val_share": bad}, option.schema, "dataset")


# --- retrieval: held-out training identities --------------------------------------------------------

def write_people(folder: Path, people: dict[str, int]) -> dict[int, str]:
    """One sub-folder per identity of flat images whose red value is the identity's number, so every
    image's identity can be read back from the pixels of any split."""
    names = {}
    for number, (identity, count) in enumerate(sorted(people.items()), start=1):
        names[number * 5] = identity
        (folder / identity).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = np.zeros((12, 12, 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = number * 5, i * 7
            Image.fromarray(pixels).save(folder / identity / f"{i}.png")
    return names


def identities(dataset: object, names: dict[int, str]) -> Counter:
    return Counter(names[int(v)] for v in dataset.images[:, 0, 0, 0])  # type: ignore[attr-defined]


PEOPLE = {f"p{i:02d}": 2 + i % 3 for i in range(14)}


def rf(root: Path, **overrides: object) -> dict:
    return {"name": "retrieval_folder", "root": str(root), "input_size": 8, **overrides}


@pytest.mark.parametrize("val_share", [0.5, 3])
def test_retrieval_validation_identities_are_held_out_training_identities(tmp_path: Path, val_share: float) -> None:
    names = write_people(tmp_path, PEOPLE)
    plain = build_dataset(rf(tmp_path), seed=0)
    bundle = build_dataset(rf(tmp_path, val_share=val_share), seed=0)
    again = build_dataset(rf(tmp_path, val_share=val_share), seed=7)  # not the run seed
    train, val, test = (identities(d, names) for d in (bundle.train, bundle.val, bundle.test))
    assert not set(train) & set(val) and not set(val) & set(test) and not set(train) & set(test)
    assert test == identities(plain.test, names)  # the test identities are the same with or without it
    assert train + val == identities(plain.train, names)  # validation = whole training identities
    assert len(val) == (3 if val_share == 3 else round(0.5 * len(identities(plain.train, names))))
    assert identities(again.val, names) == val and torch.equal(again.val_page_writers, bundle.val_page_writers)
    other = build_dataset(rf(tmp_path, val_share=val_share, identity_split_seed=3), seed=0)
    assert identities(other.val, names) != val or identities(other.test, names) != test
    # val pages are labelled like test pages: by page, scored against their own identities (>= 2 each)
    assert len(bundle.val_page_writers) == len(bundle.val) and bundle.val_page_writers.bincount().max() >= 2
    assert bundle.num_classes == len(train) and bundle.info["val_identities"] == len(val)


def test_retrieval_val_folder_and_csv_val_rows_are_used(tmp_path: Path) -> None:
    names = write_people(tmp_path / "train", {"a": 2, "b": 3})
    names.update({k + 100: v for k, v in write_people(tmp_path / "val", {"c": 2, "d": 2}).items()})
    write_people(tmp_path / "test", {"e": 2, "f": 2})
    bundle = build_dataset(rf(tmp_path, val_share=0.5), seed=0)  # the folder wins over val_share
    assert bundle.info["val_source"] == "val folder" and bundle.info["val_identities"] == 2
    assert len(bundle.val) == 4 and bundle.num_classes == 2
    rows = [f"{split}/{who}/{i}.png,{who},{split}" for split, people in
            (("train", {"a": 2, "b": 3}), ("val", {"c": 2, "d": 2}), ("test", {"e": 2, "f": 2}))
            for who, n in people.items() for i in range(n)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    csv = build_dataset(rf(tmp_path, csv="list.csv"), seed=0)
    assert csv.info["val_source"] == "csv val rows" and len(csv.val) == 4 and len(csv.train) == 5
    (tmp_path / "clash.csv").write_text("\n".join([*rows, "test/e/0.png,a,val"]) + "\n")
    with pytest.raises(DataError, match="list the same image"):
        build_dataset(rf(tmp_path, csv="clash.csv"), seed=0)


def test_retrieval_validation_split_errors(tmp_path: Path) -> None:
    write_people(tmp_path, {"a": 2, "b": 2, "c": 1, "d": 2, "e": 2, "f": 1})
    with pytest.raises(DataError, match="leaving 1 to train on"):
        build_dataset(rf(tmp_path, val_share=2), seed=0)  # 3 training identities
    with pytest.raises(DataError, match="validation needs at least 2"):
        build_dataset(rf(tmp_path, val_share=1), seed=0)  # one identity: mAP 1.0 whatever the model


def test_synthwriters_validation_writers_are_whole_training_writers(tmp_path: Path) -> None:
    cfg = {"name": "synthwriters", "page_size": 64, "patch_size": 32, "train_writers": 6, "train_pages_per_writer": 2,
           "test_writers": 3, "test_pages_per_writer": 2, "train_patches_per_page": 2, "cache_dir": str(tmp_path)}
    plain = build_dataset(cfg, seed=0)
    bundle = build_dataset({**cfg, "val_share": 2}, seed=0)
    again = build_dataset({**cfg, "val_share": 2}, seed=0)

    def pages(dataset: object) -> list[bytes]:
        return [page.numpy().tobytes() for page in dataset.pages]  # type: ignore[attr-defined]

    assert Counter(pages(bundle.train)) + Counter(pages(bundle.val)) == Counter(pages(plain.train))
    assert pages(bundle.test) == pages(plain.test) and torch.equal(bundle.page_writers, plain.page_writers)
    assert len(bundle.val.pages) == 4 and bundle.val_page_writers.unique().numel() == 2
    assert not set(bundle.val_page_writers.tolist()) & set(bundle.page_writers.tolist())
    assert bundle.num_classes == 4 and bundle.train_labels.unique().tolist() == [0, 1, 2, 3]
    assert pages(again.val) == pages(bundle.val)
    with pytest.raises(ConfigError, match="leaves 1 of dataset.train_writers=6"):
        build_dataset({**cfg, "val_share": 5}, seed=0)


# --- classification: stratified held-out training items ---------------------------------------------

def rows(dataset: object) -> Counter:
    return Counter(image.numpy().tobytes() + bytes([int(label)])
                   for image, label in zip(dataset.images, dataset.labels, strict=True))  # type: ignore[attr-defined]


def test_classification_validation_is_a_stratified_seeded_share_of_training() -> None:
    plain = build_dataset({"name": "digits", "image_size": None}, seed=0)
    bundle = build_dataset({"name": "digits", "image_size": None, "val_share": 0.2}, seed=0)
    assert rows(bundle.train) + rows(bundle.val) == rows(plain.train)  # a partition of the training items
    assert rows(bundle.test) == rows(plain.test)
    assert not rows(bundle.val) & rows(bundle.test)
    share = bundle.val.labels.bincount(minlength=10) / plain.train.labels.bincount(minlength=10)
    assert float(share.min()) > 0.15 and float(share.max()) < 0.25  # every class keeps its proportion
    assert len(bundle.val) == round(0.2 * len(plain.train)) == bundle.info["val_size"]
    again = build_dataset({"name": "digits", "image_size": None, "val_share": 0.2}, seed=9)
    assert rows(again.val) == rows(bundle.val)
    other = build_dataset({"name": "digits", "image_size": None, "val_share": 0.2, "split_seed": 1}, seed=0)
    assert rows(other.val) != rows(bundle.val)
    count = build_dataset({"name": "digits", "val_share": 30}, seed=0)
    assert len(count.val) == 30
    with pytest.raises(DataError, match="stratified validation split of 3 items"):
        build_dataset({"name": "digits", "val_share": 3}, seed=0)  # fewer than the 10 classes


def write_image(path: Path, seed: int, colour: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (10, 10), dtype=np.uint8)
    pixels = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8) if colour else np.stack([grey] * 3, axis=-1)
    Image.fromarray(pixels).save(path)


def test_imagefolder_val_folder_channels_and_empty_classes(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        for cls in ("a", "b"):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.png", seed=hash((split, cls, i)) % 1000)
    cfg = {"name": "imagefolder", "root": str(tmp_path), "image_size": 8}
    bundle = build_dataset(cfg, seed=0)
    assert bundle.info["val_source"] == "val folder" and len(bundle.val) == 4 and len(bundle.train) == 8
    assert bundle.in_channels == 1  # grey images stay grey
    write_image(tmp_path / "test" / "a" / "9.png", seed=1, colour=True)
    assert build_dataset(cfg, seed=0).in_channels == 3  # colour follows the images, unless set
    assert build_dataset({**cfg, "channels": 1}, seed=0).in_channels == 1
    for i in range(3):
        (tmp_path / "train" / f"empty{i}").mkdir()
    with pytest.raises(DataError, match="3 class folder\\(s\\) hold no images .*dataset.min_per_class=1"):
        build_dataset(cfg, seed=0)
    dropped = build_dataset({**cfg, "min_per_class": 1}, seed=0)
    assert dropped.num_classes == 2 and "dropped 3 class folder(s)" in dropped.notes[0]


# --- retrieval identities with too few images ---------------------------------------------------------

def test_single_image_identities(tmp_path: Path) -> None:
    write_people(tmp_path / "train", {"a": 2, "b": 2, "solo": 1})
    write_people(tmp_path / "test", {"c": 2, "d": 2})
    bundle = build_dataset(rf(tmp_path), seed=0)
    assert len(bundle.notes) == 1 and "'solo'" in bundle.notes[0] and "min_per_identity=2" in bundle.notes[0]
    dropped = build_dataset(rf(tmp_path, min_per_identity=2), seed=0)
    assert dropped.num_classes == 2 and "dropped 1 training identit" in dropped.notes[0]
    write_people(tmp_path / "test", {"e": 1})
    with pytest.raises(DataError, match="1 test identit\\(y/ies\\) have a single image \\(e.g. 'e'\\)"):
        build_dataset(rf(tmp_path), seed=0)
    assert build_dataset(rf(tmp_path, min_per_identity=2), seed=0).info["test_identities"] == 2
    lonely = tmp_path / "lonely"
    write_people(lonely / "train", {"x": 1, "y": 1})
    write_people(lonely / "test", {"c": 2, "d": 2})
    with pytest.raises(DataError, match="every training identity has a single image"):
        build_dataset(rf(lonely), seed=0)


# --- files that are not regular, hostile names, paths the OS refuses ----------------------------------

@pytest.mark.parametrize("kind", ["fifo", "devzero"])
@pytest.mark.parametrize("dataset", ["retrieval_folder", "imagefolder"])
def test_non_regular_files_among_images_are_errors(tmp_path: Path, kind: str, dataset: str) -> None:
    write_people(tmp_path, {"a": 2, "b": 2, "c": 2, "d": 2})
    odd = tmp_path / "a" / "9.png"
    if kind == "fifo":
        os.mkfifo(odd)
    else:
        odd.symlink_to("/dev/zero")
    expected = "FIFO" if kind == "fifo" else "character device"
    with pytest.raises(DataError, match=f"9.png' is a {expected}, not a regular file"):  # never opened: no hang
        build_dataset({"name": dataset, "root": str(tmp_path), "image_size": 8} if dataset == "imagefolder"
                      else rf(tmp_path), seed=0)


def test_a_fifo_cifar_batch_is_refused_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(b"")
    os.mkfifo(folder / "data_batch_1")
    with pytest.raises(DataError, match="data_batch_1' is a FIFO, not a regular file"):
        build_dataset({"name": "cifar10", "root": str(tmp_path)}, seed=0)


def test_hostile_file_names_are_escaped_in_errors(tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "x\n\x1b[2J\x1b]0;pwned\x07.png").write_bytes(b"not an image")
    with pytest.raises(DataError) as info:
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)
    message = str(info.value)
    assert "\\n\\x1b[2J\\x1b]0;pwned\\x07.png" in message
    assert not any(ord(ch) < 32 or ord(ch) == 127 for ch in message)


def test_a_root_longer_than_the_os_allows_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / ("x" * 300) / "y"
    with pytest.raises(DataError, match="cannot use .*: File name too long") as info:
        build_dataset({"name": "imagefolder", "root": str(root)}, seed=0)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"name": "synthwriters", "page_size": 33}, "page_size must be an integer >= 48"),
        ({"name": "synthwriters", "page_size": 48, "patch_size": 64}, "patch_size 64 is larger than"),
        ({"name": "clamm", "train_images": "a", "test_images": "b", "short_side": 100}, "input_size 224 is larger"),
        ({"name": "retrieval_folder", "root": "x", "patch_size": 32, "channels": 3}, "channels=3 needs whole"),
    ],
)
def test_geometry_keys_are_checked_against_each_other(node: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_dataset(node, seed=0)
