#!/usr/bin/env python
"""Arrange CLaMM'16/'17 archives into the layout poolbench's ``clamm`` dataset reads.

Download the archives yourself (e.g. the CLaMM'16 training set ``CLaMM_Training_Data_Set`` with
``@CLaMM-filelist.csv``, or ICDAR2017 CLaMM with ``@ICDAR2017_CLaMM_Training.csv``), then::

    python scripts/prepare_clamm.py --train <train.zip> --test <test.zip> --out data/clamm \\
        [--train-labels NAME_OR_PATH] [--test-labels NAME_OR_PATH]

Resulting layout (folders inside the archives are flattened)::

    data/clamm/train/*.tif + one label file   FILENAME;SCRIPT_TYPE;...  (';'-separated)
    data/clamm/test/*.tif  + one label file

A label file is the single .csv in the archive, or the one named by --*-labels: either a file name
inside the archive or a path on disk (the test ground truth often comes separately). The script
prints the dataset overrides to use. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import zipfile
from pathlib import Path

KEPT_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".csv")


def extract_flat(archive: Path, target: Path) -> tuple[int, list[str]]:
    """Copy images and .csv files of ``archive`` into ``target`` (flat); returns image count, csv names."""
    target.mkdir(parents=True, exist_ok=True)
    images, tables = 0, []
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            name = Path(member.filename).name  # flattening also keeps members from escaping target
            if member.is_dir() or "__MACOSX" in member.filename or not name.lower().endswith(KEPT_SUFFIXES):
                continue
            with bundle.open(member) as source, (target / name).open("wb") as destination:
                shutil.copyfileobj(source, destination)
            if name.lower().endswith(".csv"):
                tables.append(name)
            else:
                images += 1
    return images, sorted(tables)


def choose_labels(split: str, folder: Path, tables: list[str], requested: str | None) -> str:
    """The label file name inside ``folder``; a path on disk is copied there first."""
    if requested:
        path = Path(requested)
        if path.exists():
            shutil.copyfile(path, folder / path.name)
            return path.name
        if (folder / requested).exists():
            return requested
        raise SystemExit(f"error: --{split}-labels '{requested}' is neither a file nor a .csv in the {split} archive")
    if len(tables) != 1:
        found = ", ".join(tables) or "none"
        raise SystemExit(f"error: {split} archive has {len(tables)} .csv files ({found}); pick one with "
                         f"--{split}-labels")
    return tables[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training archive (.zip)")
    parser.add_argument("--test", type=Path, required=True, help="test archive (.zip)")
    parser.add_argument("--out", type=Path, default=Path("data/clamm"), help="output root (default data/clamm)")
    parser.add_argument("--train-labels", help="label .csv: a name inside the train archive or a path")
    parser.add_argument("--test-labels", help="label .csv: a name inside the test archive or a path")
    args = parser.parse_args(argv)
    overrides = ["dataset=clamm"]
    for split, archive, requested in (("train", args.train, args.train_labels), ("test", args.test, args.test_labels)):
        if not zipfile.is_zipfile(archive):
            print(f"error: {archive} is not a readable zip archive", file=sys.stderr)
            return 2
        folder = args.out / split
        images, tables = extract_flat(archive, folder)
        if images == 0:
            print(f"error: no images in {archive}", file=sys.stderr)
            return 2
        labels = choose_labels(split, folder, tables, requested)
        print(f"{split}: {images} images, labels {folder / labels}")
        overrides += [f"dataset.{split}_images={folder}", f"dataset.{split}_csv={labels}"]
    print("use: poolbench train " + " ".join(shlex.quote(o) for o in overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
