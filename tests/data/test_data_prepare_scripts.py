"""scripts/prepare_icdar17.py and prepare_clamm.py on tiny fake archives, then loaded by the datasets."""

from __future__ import annotations

import importlib.util
import io
import zipfile
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image, ImageDraw

from poolbench.data import build_dataset

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def page_bytes(seed: int, fmt: str) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.new("L", (160, 140), 255)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.integers(0, 160), rng.integers(0, 140)
        draw.line([(x, y), (x + 9, y + rng.integers(-9, 9))], fill=0, width=2)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, data in members.items():
            bundle.writestr(name, data)
    return path


def test_prepare_icdar17(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pages = {f"icdar17-train/{w}-IMG_{p}.jpg": page_bytes(w * 3 + p, "JPEG") for w in (1001, 1002) for p in range(3)}
    train = write_zip(tmp_path / "train.zip", pages | {"icdar17-train/readme.txt": b"x"})
    test = write_zip(tmp_path / "test.zip", {f"test/sub/{w}-P{p}.png": page_bytes(w + p, "PNG")
                                             for w in (1, 2) for p in range(2)} | {"__MACOSX/._1-P0.png": b"junk"})
    out = tmp_path / "icdar"
    assert load_script("prepare_icdar17").main(["--train", str(train), "--test", str(test), "--out", str(out)]) == 0
    assert "dataset.root=" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "test").iterdir()) == ["1-P0.png", "1-P1.png", "2-P0.png", "2-P1.png"]
    assert len(list((out / "train").iterdir())) == 6
    bundle = build_dataset({"name": "icdar17", "root": str(out), "page_scale": 1.0, "patch_size": 64,
                            "input_size": 32, "train_patches_per_page": 2}, seed=0)
    assert bundle.num_classes == 2 and bundle.page_writers is not None and len(bundle.page_writers) == 4


def test_prepare_icdar17_rejects_archive_without_pages(tmp_path: Path) -> None:
    empty = write_zip(tmp_path / "empty.zip", {"notes.txt": b"x"})
    script = load_script("prepare_icdar17")
    assert script.main(["--train", str(empty), "--test", str(empty), "--out", str(tmp_path / "o")]) == 2
    (tmp_path / "plain.zip").write_text("not a zip")
    assert script.main(["--train", str(tmp_path / "plain.zip"), "--test", str(empty)]) == 2


def test_prepare_clamm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = "FILENAME;SCRIPT_TYPE;DATE\n"
    train_rows = "".join(f"t{i}.tif;{'Caroline' if i % 2 else 'Uncial'};1100\n" for i in range(4))
    train = write_zip(tmp_path / "train.zip", {f"CLaMM_Training_Data_Set/t{i}.tif": page_bytes(i, "TIFF")
                                               for i in range(4)}
                      | {"CLaMM_Training_Data_Set/@CLaMM-filelist.csv": (header + train_rows).encode()})
    test = write_zip(tmp_path / "test.zip", {f"CLaMM_task1/s{i}.tif": page_bytes(10 + i, "TIFF") for i in range(2)})
    labels = tmp_path / "ground_truth.csv"
    labels.write_text(header + "s0.tif;Uncial;1200\ns1.tif;Caroline;1300\n")
    out = tmp_path / "clamm"
    script = load_script("prepare_clamm")
    code = script.main(["--train", str(train), "--test", str(test), "--out", str(out), "--test-labels", str(labels)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "dataset.train_csv=@CLaMM-filelist.csv" in printed and "dataset.test_csv=ground_truth.csv" in printed
    bundle = build_dataset({"name": "clamm", "train_images": str(out / "train"), "test_images": str(out / "test"),
                            "train_csv": "@CLaMM-filelist.csv", "test_csv": "ground_truth.csv", "short_side": 64,
                            "input_size": 48}, seed=0)
    assert bundle.num_classes == 2 and len(bundle.train) == 4 and len(bundle.test) == 2


def test_prepare_clamm_needs_a_label_file(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "a.zip", {"x.tif": page_bytes(0, "TIFF")})
    with pytest.raises(SystemExit, match="--train-labels"):
        load_script("prepare_clamm").main(["--train", str(archive), "--test", str(archive),
                                           "--out", str(tmp_path / "o")])
