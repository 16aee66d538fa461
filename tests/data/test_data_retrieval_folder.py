"""retrieval_folder on tiny generated folders in every layout: identity sub-folders, flat folders named by
identity, CSV with and without a split column, split folders or a seeded identity split; whole images or
tiled pages; with its error cases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_data_icdar17 import make_named, write_page  # the page and image writers of the icdar17 tests

from poolbench.data import build_dataset
from poolbench.errors import ConfigError, DataError

# --- retrieval_folder ------------------------------------------------------------------------------

def make_tree(folder: Path, identities: dict[str, int]) -> None:
    """One sub-folder per identity."""
    for identity, count in identities.items():
        make_named(folder / identity, {identity: count})


def rf(root: Path, **overrides: object) -> dict:
    return {"name": "retrieval_folder", "root": str(root), "input_size": 16, **overrides}


PEOPLE = {"ann": 3, "ben": 2, "cat": 4, "dan": 2, "eve": 3, "fay": 1}


def test_identity_subfolders_with_seeded_split(tmp_path: Path) -> None:
    make_tree(tmp_path, PEOPLE)
    bundle = build_dataset(rf(tmp_path), seed=0)
    again = build_dataset(rf(tmp_path), seed=5)  # the split follows identity_split_seed, not the run seed
    assert torch.equal(bundle.page_writers, again.page_writers)
    assert bundle.task == "retrieval" and bundle.in_channels == 3 and bundle.input_size == 16
    assert bundle.info["layout"] == "seeded identity split"
    assert bundle.info["test_identities"] == 3 and bundle.info["train_identities"] == 3  # round(0.5 * 6)
    assert len(bundle.train) + len(bundle.test) == sum(PEOPLE.values())
    assert not set(bundle.train_labels.tolist()) & set(bundle.page_writers.tolist())
    assert bundle.page_writers.bincount()[bundle.page_writers.unique()].min() >= 2  # fay (1 image) trains
    image, index = bundle.test[1]
    assert image.shape == (3, 16, 16) and index == 1  # test items are labelled by their image index
    other = build_dataset(rf(tmp_path, identity_split_seed=1), seed=0)
    assert other.info["test_identities"] == 3
    grey = build_dataset(rf(tmp_path, channels=1), seed=0)
    assert grey.in_channels == 1 and grey.train[0][0].shape == (1, 16, 16)


def test_split_folders_with_identity_subfolders(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_tree(tmp_path / "test", {"c": 2, "d": 3})
    bundle = build_dataset(rf(tmp_path), seed=0)
    assert bundle.info["layout"] == "split folders"
    assert bundle.train_labels.tolist() == [0, 0, 1, 1] and bundle.page_writers.tolist() == [2, 2, 3, 3, 3]


def test_flat_folder_named_by_identity(tmp_path: Path) -> None:
    make_named(tmp_path, {"x": 2, "y": 2, "z": 2, "w": 2})
    bundle = build_dataset(rf(tmp_path, identity_pattern=r"^([^-]+)-"), seed=0)
    assert bundle.info["train_identities"] == 2 and bundle.info["test_identities"] == 2


def test_csv_with_and_without_split_column(tmp_path: Path) -> None:
    make_named(tmp_path / "img", {"p": 2, "q": 2, "r": 2, "s": 2})
    rows = [(f"img/{who}-{i}.png", who) for who in "pqrs" for i in range(2)]
    (tmp_path / "all.csv").write_text("path,identity\n" + "".join(f"{p},{w}\n" for p, w in rows))
    seeded = build_dataset(rf(tmp_path, csv="all.csv"), seed=0)
    assert seeded.info["layout"] == "seeded identity split of csv" and seeded.info["test_identities"] == 2
    split = {"p": "train", "q": "train", "r": "test", "s": "TEST"}
    (tmp_path / "split.csv").write_text("".join(f"{p},{w},{split[w]}\n" for p, w in rows))
    bundle = build_dataset(rf(tmp_path, csv=str(tmp_path / "split.csv")), seed=0)
    assert bundle.info["layout"] == "csv split column"
    assert bundle.train_labels.tolist() == [0, 0, 1, 1] and bundle.page_writers.tolist() == [2, 2, 3, 3]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("path,identity\n", "has no rows"),
        ("img/p-0.png\n", "row 1 has 1 columns"),
        ("img/p-0.png,p,train\nimg/p-1.png,p\n", "row 2 has 2 columns"),
        ("img/p-0.png,p,dev\n", "split 'dev'; use train, val or test"),
        ("img/p-0.png,p\nimg/./p-0.png,p\n", "rows 1 and 2 list the same image"),
        ("img/missing.png,p\n", "names '.*missing.png', which is not a file"),
        (",p\n", "row 1 has an empty path"),
        (b"img/p-0.png,caf\xe9\n", "is not UTF-8"),
    ],
)
def test_csv_errors(tmp_path: Path, text: str | bytes, match: str) -> None:
    make_named(tmp_path / "img", {"p": 2})
    path = tmp_path / "bad.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=match) as info:
        build_dataset(rf(tmp_path, csv="bad.csv"), seed=0)
    assert "\n" not in str(info.value)


def test_tiled_pages_in_identity_folders(tmp_path: Path) -> None:
    for split, writers in (("train", ("w1", "w2")), ("test", ("w3", "w4"))):
        for n, writer in enumerate(writers):
            (tmp_path / split / writer).mkdir(parents=True)
            for page in range(2):
                write_page(tmp_path / split / writer / f"p{page}.png", seed=n * 10 + page)
    bundle = build_dataset(rf(tmp_path, patch_size=60, input_size=32, train_patches_per_page=3), seed=0)
    assert bundle.in_channels == 1 and bundle.train_labels.tolist() == [0] * 6 + [1] * 6
    assert bundle.train[0][0].shape == (1, 32, 32) and bundle.info["test_patches"] == len(bundle.test)
    with pytest.raises(ConfigError, match="channels=3 needs whole images"):
        build_dataset(rf(tmp_path, patch_size=60, channels=3), seed=0)


def test_layout_errors(tmp_path: Path) -> None:
    make_tree(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(DataError, match="found '.*train' but not '.*test'"):
        build_dataset(rf(tmp_path), seed=0)
    make_tree(tmp_path / "test", {"a": 2, "c": 2})
    with pytest.raises(DataError, match="appear in both train and test \\(e.g. 'a'\\)"):
        build_dataset(rf(tmp_path), seed=0)
    with pytest.raises(ConfigError, match="not a regular expression"):
        build_dataset(rf(tmp_path, identity_pattern="(["), seed=0)
    with pytest.raises(DataError, match="csv '.*nope.csv' does not exist"):
        build_dataset(rf(tmp_path, csv="nope.csv"), seed=0)
    (tmp_path / "one").mkdir()
    make_tree(tmp_path / "one", {"solo": 4})
    with pytest.raises(DataError, match="training set has 0 identity|test set has"):
        build_dataset(rf(tmp_path / "one"), seed=0)
