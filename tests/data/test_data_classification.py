"""Classification loaders on tiny generated files: digits, fashion_mnist (IDX), cifar (pickles),
imagefolder and clamm, with their error cases and the hardening against untrusted files."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from poolbench.data import build_dataset
from poolbench.errors import ConfigError, DataError


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def assert_standardised(bundle) -> None:
    images = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))])
    assert abs(float(images.mean())) < 1e-3
    assert abs(float(images.std()) - 1) < 0.05


# --- digits ---------------------------------------------------------------------------------------

def test_digits_split_is_stratified_and_fixed() -> None:
    a = build_dataset({"name": "digits", "task": "classification"}, seed=0)
    b = build_dataset({"name": "digits", "task": "classification"}, seed=5)
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 450
    assert a.num_classes == 10 and a.in_channels == 1 and a.input_size == 32
    assert torch.equal(a.train_labels, b.train_labels)  # the split does not follow the run seed
    counts = a.train_labels.bincount().float()
    assert float(counts.max() / counts.min()) < 1.1
    image, label = a.test[0]
    assert image.shape == (1, 32, 32) and 0 <= label < 10
    assert_standardised(a)


def test_digits_native_size() -> None:
    bundle = build_dataset({"name": "digits", "image_size": None}, seed=0)
    assert bundle.input_size == 8


# --- fashion_mnist --------------------------------------------------------------------------------

def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def make_fashion(root: Path, compress: bool = True, n_train: int = 20, n_test: int = 10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                  compress)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", (np.arange(n) % 10).astype(np.uint8), compress)
    return root


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_reads_idx(tmp_path: Path, compress: bool) -> None:
    root = make_fashion(tmp_path / "fm", compress)
    bundle = build_dataset({"name": "fashion_mnist", "root": str(root), "image_size": None}, seed=0)
    assert len(bundle.train) == 20 and len(bundle.test) == 10 and bundle.input_size == 28
    assert bundle.train_labels.tolist() == [i % 10 for i in range(20)]
    assert build_dataset({"name": "fashion_mnist", "root": str(root)}, seed=0).input_size == 32


def test_fashion_mnist_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_dataset({"name": "fashion_mnist", "root": str(tmp_path / "none")}, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        build_dataset({"name": "fashion_mnist", "root": str(tmp_path / "empty")}, seed=0)
    root = make_fashion(tmp_path / "bad", compress=False)
    path = root / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        build_dataset({"name": "fashion_mnist", "root": str(root)}, seed=0)
    path.write_bytes(b"\x00\x01\x02")
    with pytest.raises(DataError, match="bad magic"):
        build_dataset({"name": "fashion_mnist", "root": str(root)}, seed=0)


# --- cifar ----------------------------------------------------------------------------------------

def write_cifar(root: Path, name: str) -> Path:
    rng = np.random.default_rng(0)
    if name == "cifar10":
        folder, files, key = root / "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], \
            b"labels"
    else:
        folder, files, key = root / "cifar-100-python", ["train", "test"], b"fine_labels"
    folder.mkdir(parents=True)
    for index, file in enumerate(files):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), key: [index % 10, 1, 2, 3]}
        with (folder / file).open("wb") as handle:
            pickle.dump(batch, handle)
    return root


@pytest.mark.parametrize(("name", "train_size", "classes"), [("cifar10", 20, 10), ("cifar100", 4, 100)])
def test_cifar_reads_pickles(tmp_path: Path, name: str, train_size: int, classes: int) -> None:
    root = write_cifar(tmp_path, name)
    bundle = build_dataset({"name": name, "root": str(root)}, seed=0)
    assert len(bundle.train) == train_size and len(bundle.test) == 4
    assert bundle.num_classes == classes and bundle.in_channels == 3 and bundle.input_size == 32
    assert bundle.train[0][0].shape == (3, 32, 32)


def test_cifar_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="dataset.root is required"):
        build_dataset({"name": "cifar10"}, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cifar-10-batches-py/test_batch"):
        build_dataset({"name": "cifar10", "root": str(tmp_path / "empty")}, seed=0)
    root = write_cifar(tmp_path / "broken", "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3"):
        build_dataset({"name": "cifar10", "root": str(root)}, seed=0)


# --- imagefolder ----------------------------------------------------------------------------------

def test_imagefolder_train_test_folders_rgb(tmp_path: Path) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(n):
                write_image(tmp_path / split / cls / f"{i}.png", i, mode="RGB")
    bundle = build_dataset({"name": "imagefolder", "root": str(tmp_path), "channels": 3, "image_size": 16}, seed=0)
    assert bundle.num_classes == 2 and bundle.in_channels == 3 and bundle.input_size == 16
    assert len(bundle.train) == 6 and len(bundle.test) == 4
    assert bundle.info["classes"] == "cat,dog"
    assert bundle.test[3][1] == 1


def test_imagefolder_split_one_tree(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        for i in range(5):
            write_image(tmp_path / cls / f"{i}.jpg", i)
    bundle = build_dataset({"name": "imagefolder", "root": str(tmp_path), "test_fraction": 0.4}, seed=0)
    assert len(bundle.train) == 6 and len(bundle.test) == 4
    assert bundle.train[0][0].shape == (1, 64, 64)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "missing")}, seed=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "empty")}, seed=0)
    (tmp_path / "noimages" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "noimages")}, seed=0)
    write_image(tmp_path / "corrupt" / "a" / "0.png", 0)
    (tmp_path / "corrupt" / "a" / "1.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "corrupt")}, seed=0)
    with pytest.raises(ConfigError, match="unknown dataset.channels '2'"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path), "channels": 2}, seed=0)


# --- clamm ----------------------------------------------------------------------------------------

def make_clamm(folder: Path, rows: list[tuple[str, str]], header: bool = True) -> Path:
    for index, (name, _) in enumerate(rows):
        write_image(folder / name, index, size=(80, 60))
    lines = (["FILENAME;SCRIPT_TYPE;DATE"] if header else []) + [f"{n};{label};1450" for n, label in rows]
    (folder / "@labels.csv").write_text("\n".join(lines) + "\n")
    return folder


def clamm_cfg(root: Path, **overrides: object) -> dict:
    return {"name": "clamm", "train_images": str(root / "train"), "test_images": str(root / "test"),
            "short_side": 40, "input_size": 32, **overrides}


def test_clamm_reads_csv_and_tifs(tmp_path: Path) -> None:
    make_clamm(tmp_path / "train", [("a.tif", "Caroline"), ("b.tif", "Uncial"), ("c.tif", "Caroline")])
    make_clamm(tmp_path / "test", [("d.tif", "Uncial"), ("e.tif", "Caroline")], header=False)
    bundle = build_dataset(clamm_cfg(tmp_path), seed=0)
    assert bundle.num_classes == 2 and bundle.info["classes"] == "Caroline,Uncial"
    assert bundle.train_labels.tolist() == [0, 1, 0]
    image, label = bundle.test[0]
    assert image.shape == (1, 32, 32) and label == 1
    assert bundle.train.pages[0].shape == (40, 53)  # short side scaled to 40


def test_clamm_errors(tmp_path: Path) -> None:
    make_clamm(tmp_path / "train", [("a.tif", "Caroline"), ("b.tif", "Uncial")])
    make_clamm(tmp_path / "test", [("d.tif", "Gothic")])
    with pytest.raises(DataError, match="label 'Gothic'"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    (tmp_path / "test" / "@labels.csv").write_text("FILENAME;SCRIPT_TYPE\nmissing.tif;Uncial\n")
    with pytest.raises(DataError, match="'missing.tif' is listed"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    (tmp_path / "test" / "@labels.csv").write_text("d.tif\n")
    with pytest.raises(DataError, match="fewer than 2"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    (tmp_path / "test" / "other.csv").write_text("")
    with pytest.raises(DataError, match="expected one .csv"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(clamm_cfg(tmp_path / "nowhere"), seed=0)
    with pytest.raises(ConfigError, match="unknown config key 'dataset.lable_column' for dataset=clamm"):
        build_dataset(clamm_cfg(tmp_path, lable_column=2), seed=0)


def test_clamm_label_files_that_are_not_text(tmp_path: Path) -> None:
    make_clamm(tmp_path / "train", [("a.tif", "Caroline"), ("b.tif", "Uncial")])
    make_clamm(tmp_path / "test", [("d.tif", "Uncial")])
    label_file = tmp_path / "test" / "@labels.csv"
    label_file.write_bytes(b"FILENAME;SCRIPT\nd.tif;Unc\xe9ial\n")  # latin-1, not UTF-8
    with pytest.raises(DataError, match="@labels.csv' is not UTF-8"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    label_file.write_bytes(b'd.tif;"Unc"ial\n')  # a broken quote
    with pytest.raises(DataError, match="cannot read .*@labels.csv"):
        build_dataset(clamm_cfg(tmp_path), seed=0)
    label_file.write_text("FILENAME\n")  # a header with too few columns, then nothing
    with pytest.raises(DataError, match="no rows"):
        build_dataset(clamm_cfg(tmp_path), seed=0)


def test_clamm_document_augment_crops_the_page(tmp_path: Path) -> None:
    make_clamm(tmp_path / "train", [("a.tif", "Caroline"), ("b.tif", "Uncial")])
    make_clamm(tmp_path / "test", [("d.tif", "Uncial")])
    bundle = build_dataset(clamm_cfg(tmp_path), seed=0, augment={"name": "auto"})
    assert bundle.train.transform is not None and bundle.test.transform is None
    torch.manual_seed(0)
    image, _ = bundle.train[0]
    assert image.shape == (1, 32, 32)


# --- untrusted files --------------------------------------------------------------------------------

class Payload:
    """Unpickling this would create ``target`` (a stand-in for arbitrary code)."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_crafted_cifar_batch_cannot_run_code(tmp_path: Path) -> None:
    root = write_cifar(tmp_path / "cifar", "cifar10")
    target = tmp_path / "pwned"
    batch = {b"data": np.zeros((4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3], b"x": Payload(target)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = root / "cifar-10-batches-py" / "data_batch_2"
        path.write_bytes(pickle.dumps(batch, protocol=protocol))
        with pytest.raises(DataError) as info:
            build_dataset({"name": "cifar10", "root": str(root)}, seed=0)
        assert "data_batch_2" in str(info.value) and "which a CIFAR batch never contains" in str(info.value)
        assert "\n" not in str(info.value)
        assert not target.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batches_in_every_pickle_protocol_are_read(tmp_path: Path, protocol: int) -> None:
    root = tmp_path / "cifar"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for file in ("train", "test"):
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"fine_labels": [0, 1, 2, 3],
                 b"filenames": [b"a.png"] * 4, b"batch_label": "training batch", b"coarse": np.int64(3)}
        (folder / file).write_bytes(pickle.dumps(batch, protocol=protocol))
    bundle = build_dataset({"name": "cifar100", "root": str(root)}, seed=0)
    assert len(bundle.train) == 4 and bundle.num_classes == 100


def test_one_class_training_set_is_refused(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "train" / "only" / f"{i}.png", i)
        write_image(tmp_path / "test" / "only" / f"{i}.png", i)
    with pytest.raises(DataError, match="single class"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for cls in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.png", i, size=(12, 12))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 144 pixels: Pillow only warns (and decodes)
    with pytest.raises(DataError, match="a/0.png' has more pixels than Pillow's decompression-bomb limit"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # beyond twice the limit: Pillow raises
    with pytest.raises(DataError, match="decompression-bomb limit"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)


@pytest.mark.parametrize("kind", ["broken", "loop"])
def test_bad_symlinks_among_images_are_errors(tmp_path: Path, kind: str) -> None:
    for cls in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.png", i)
    link = tmp_path / "b" / "9.png"
    if kind == "broken":
        link.symlink_to(tmp_path / "nowhere.png")
    else:
        link.symlink_to(tmp_path / "b" / "8.png")
        (tmp_path / "b" / "8.png").symlink_to(link)
    with pytest.raises(DataError, match="[89].png' is a (broken symlink|symlink loop)"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)


def test_non_utf8_file_names(tmp_path: Path) -> None:
    import os

    for cls in ("a", "b"):
        for i in range(3):
            write_image(tmp_path / cls / f"{i}.png", i)
    odd = os.fsdecode(b"caf\xe9.png")  # latin-1 bytes: not a valid UTF-8 name
    write_image(tmp_path / "a" / odd, 7)
    bundle = build_dataset({"name": "imagefolder", "root": str(tmp_path), "test_fraction": 0.25}, seed=0)
    assert len(bundle.train) + len(bundle.test) == 7
    (tmp_path / "a" / odd).write_bytes(b"junk")
    with pytest.raises(DataError) as info:
        build_dataset({"name": "imagefolder", "root": str(tmp_path)}, seed=0)
    message = str(info.value)
    assert "caf\\xe9.png" in message
    message.encode("utf-8")  # printable: no lone surrogates
