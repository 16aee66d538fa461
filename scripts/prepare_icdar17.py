#!/usr/bin/env python
"""Arrange the ICDAR 2017 Historical-WI archives into the layout poolbench's ``icdar17`` dataset reads.

Download the training and test archives yourself (Zenodo record 1324999; binarised or colour
version), then::

    python scripts/prepare_icdar17.py --train <training.zip> --test <test.zip> --out data/icdar17

Resulting layout (folders inside the archives are flattened; only page images whose names start with
the writer id, ``^(\\d+)-``, and end in png/jpg/jpeg/tif/tiff are kept)::

    data/icdar17/train/1001-IMG_MAX_116403.jpg ...   394 writers x 3 pages
    data/icdar17/test/<id>-<...>.jpg ...             720 writers x 5 pages

It prints the overrides to use, e.g. ``dataset=icdar17 dataset.root=data/icdar17``. Nothing is
downloaded; existing files in the output folders are left alone (same name: overwritten).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import sys
import zipfile
from pathlib import Path

WRITER_PAGE = re.compile(r"^\d+-.*\.(png|jpe?g|tiff?)$", re.IGNORECASE)


def extract_pages(archive: Path, target: Path) -> int:
    """Copy every writer page image of ``archive`` into ``target`` (flat); returns how many."""
    target.mkdir(parents=True, exist_ok=True)
    count = 0
    with zipfile.ZipFile(archive) as bundle:
        for member in bundle.infolist():
            name = Path(member.filename).name  # flattening also keeps members from escaping target
            if member.is_dir() or "__MACOSX" in member.filename or not WRITER_PAGE.match(name):
                continue
            with bundle.open(member) as source, (target / name).open("wb") as destination:
                shutil.copyfileobj(source, destination)
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=Path, required=True, help="training archive (.zip)")
    parser.add_argument("--test", type=Path, required=True, help="test archive (.zip)")
    parser.add_argument("--out", type=Path, default=Path("data/icdar17"), help="output root (default data/icdar17)")
    args = parser.parse_args(argv)
    counts = {}
    for split, archive in (("train", args.train), ("test", args.test)):
        if not zipfile.is_zipfile(archive):
            print(f"error: {archive} is not a readable zip archive", file=sys.stderr)
            return 2
        counts[split] = extract_pages(archive, args.out / split)
        if counts[split] == 0:
            print(f"error: no page images named '<writer>-....(png|jpg|tif)' in {archive}", file=sys.stderr)
            return 2
    print(f"{counts['train']} training and {counts['test']} test pages in {args.out}")
    print(f"use: poolbench train dataset=icdar17 {shlex.quote(f'dataset.root={args.out}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
