"""icdar17 (a preset of retrieval_folder) on tiny generated folders in the Historical-WI layout, including
every error case. tests/test_cli.py reuses make_layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from poolbench.data import build_dataset
from poolbench.data.pages import edge_mask, tile_positions
from poolbench.errors import ConfigError, DataError


def write_page(path: Path, seed: int, size: tuple[int, int] = (240, 200)) -> None:
    """A white page with dark random strokes in its upper part (the lower part stays blank)."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = rng.integers(0, size[0]), rng.integers(0, size[1] // 2)
        draw.line([(x, y), (x + rng.integers(-15, 15), y + rng.integers(-15, 15))], fill=0, width=2)
    image.save(path)


def make_layout(root: Path, train: dict[int, int], test: dict[int, int], suffix: str = ".png") -> Path:
    for split, writers in (("train", train), ("test", test)):
        (root / split).mkdir(parents=True, exist_ok=True)
        for writer, pages in writers.items():
            for page in range(pages):
                write_page(root / split / f"{writer}-IMG_{page}{suffix}", seed=writer * 10 + page)
    return root


def cfg(root: Path, **overrides: object) -> dict:
    return {"name": "icdar17", "task": "retrieval", "root": str(root), "page_scale": 1.0, "patch_size": 60,
            "input_size": 32, "train_patches_per_page": 4, **overrides}


def test_reads_layout(tmp_path: Path) -> None:
    root = make_layout(tmp_path, train={1001: 3, 1002: 3}, test={7: 2, 8: 3})
    bundle = build_dataset(cfg(root), seed=0)
    assert bundle.task == "retrieval" and bundle.num_classes == 2 and bundle.input_size == 32
    assert bundle.train_labels.tolist() == [0] * 12 + [1] * 12
    # Identities are numbered: training ones 0..n-1, test ones after them (here 7 -> 2, 8 -> 3).
    assert bundle.page_writers is not None and bundle.page_writers.tolist() == [2, 2, 3, 3, 3]
    patch, label = bundle.train[13]
    assert patch.shape == (1, 32, 32) and label == 1
    # Pages are inverted: ink bright. Only the upper half has strokes, so blank lower tiles are dropped.
    assert float(bundle.test.pages[0].float().mean()) < 128
    assert 0 < len(bundle.test) < 5 * (200 // 60) * (240 // 60)
    assert {page for page, _, _ in bundle.test.items} == set(range(5))
    assert all(y < 100 for _, y, _ in bundle.test.items)


def test_jpg_and_tif_are_read(tmp_path: Path) -> None:
    make_layout(tmp_path, train={1: 3, 4: 3}, test={2: 2}, suffix=".jpg")
    make_layout(tmp_path, train={}, test={3: 2}, suffix=".tif")
    bundle = build_dataset(cfg(tmp_path), seed=0)
    assert bundle.page_writers is not None and bundle.page_writers.tolist() == [2, 2, 3, 3]


def test_page_scale_shrinks_pages(tmp_path: Path) -> None:
    make_layout(tmp_path, train={1: 3, 4: 3}, test={2: 2, 3: 2})
    bundle = build_dataset(cfg(tmp_path, page_scale=0.5, patch_size=50), seed=0)
    assert bundle.test.pages[0].shape == (100, 120)


def test_edge_filter_and_fallback_tile() -> None:
    page = torch.zeros(64, 64, dtype=torch.uint8)
    page[10:20, 10:12] = 255
    edges = edge_mask(page)
    assert edges[10:20, 9:13].any() and not edges[40:, 40:].any()
    assert tile_positions(edges, 32, min_content=0.01) == [(0, 0)]
    # No tile passes: the fullest one is kept so the page still gets a descriptor.
    assert tile_positions(edges, 32, min_content=0.9) == [(0, 0)]


@pytest.mark.parametrize(
    ("setup", "match"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "train").mkdir(parents=True) or (root / "test").mkdir(), "no images \\(.png"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 1, 3: 2}), "single image \\(e.g. '2'\\)"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 3}), "test set has 1 writer/identity"),
        (lambda root: make_layout(root, {1: 3}, {2: 3, 3: 2}), "training set has 1 identity"),
        (lambda root: make_layout(root, {1: 3, 2: 3}, {2: 2, 4: 2}), "both train and test"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 2, 3: 2}) and write_page(root / "test" / "IMG_9.png", 0),
         "'IMG_9.png' in .* does not match identity_pattern"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 2, 3: 2})
         and write_page(root / "test" / "2-small.png", 0, (40, 40)), "smaller than the patch size 60"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 2, 3: 2})
         and (root / "train" / "1-broken.png").write_bytes(b"junk"), "cannot read image .*1-broken.png"),
        (lambda root: make_layout(root, {1: 3, 4: 3}, {2: 2, 3: 2})
         and (root / "test" / "2-link.png").symlink_to(root / "gone.png"), "2-link.png' is a broken symlink"),
    ],
    ids=["missing-root", "empty-folders", "single-image-identity", "one-test-identity", "one-train-identity",
         "shared-writer", "bad-name", "too-small", "corrupt-image", "broken-symlink"],
)
def test_errors(tmp_path: Path, setup, match: str) -> None:
    root = tmp_path / "icdar"
    setup(root)
    with pytest.raises(DataError, match=match):
        build_dataset(cfg(root), seed=0)


def test_root_required() -> None:
    with pytest.raises(ConfigError, match="dataset.root is required"):
        build_dataset({"name": "icdar17"}, seed=0)


def test_icdar17_accepts_non_numeric_writer_ids(tmp_path: Path) -> None:
    make_named(tmp_path / "train", {"alice": 3, "bob": 3}, size=(120, 100))
    make_named(tmp_path / "test", {"carol": 2, "dave": 2}, size=(120, 100))
    bundle = build_dataset(cfg(tmp_path), seed=0)
    assert bundle.num_classes == 2 and bundle.page_writers.tolist() == [2, 2, 3, 3]


def make_named(folder: Path, identities: dict[str, int], size: tuple[int, int] = (48, 40)) -> None:
    """Flat folder of <identity>-<i>.png (small RGB images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, (identity, count) in enumerate(identities.items()):
        for i in range(count):
            rgb = np.random.default_rng(n * 100 + i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(rgb).save(folder / f"{identity}-{i}.png")
