"""Every experiment preset in conf/experiment runs end to end on CPU: sweep → train → evaluate → record → report.

Each preset keeps its own model, loss, optimiser, schedule and pooling grid; only the budget shrinks
(one seed, one epoch of one or two steps, tiny inputs), pretrained weights are off (nothing may be
downloaded) and its dataset is replaced by small generated data in the same layout as the real one.
A new preset is picked up from the folder; a preset on a dataset without a generator here fails
and says so.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from poolbench import records, sweep
from poolbench.config import compose, group_options

pytestmark = pytest.mark.slow

BUDGET = [
    "trainer.epochs=1",
    "trainer.steps_per_epoch=2",
    "trainer.eval_batch_size=16",
    "trainer.latency.batch_size=4",  # a triplet train step needs >= 3
    "trainer.latency.warmup=0",
    "trainer.latency.repeats=1",
    "trainer.num_threads=1",
    "device=cpu",
]


def _page(path: Path, seed: int, size: tuple[int, int]) -> None:
    """A white page with dark strokes whose slant and length depend on ``seed``: a 'hand'."""
    rng = np.random.default_rng(seed)
    image = Image.new("L", size, 255)
    draw = ImageDraw.Draw(image)
    for _ in range(80):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        dx, dy = int(rng.integers(-12, 12)), int(rng.integers(-12, 12))
        draw.line([(x, y), (x + dx, y + dy)], fill=0, width=2)
    image.save(path)


def _icdar17(root: Path) -> list[str]:
    """ICDAR17 Historical-WI layout: flat train/ and test/ folders of pages named <writer>-<n>.png."""
    for split, writers, pages in (("train", range(1001, 1004), 3), ("test", range(1, 4), 2)):
        (root / split).mkdir(parents=True)
        for writer in writers:
            for page in range(pages):
                _page(root / split / f"{writer}-{page}.png", seed=writer * 10 + page, size=(160, 140))
    return [
        f"dataset.root={root}",
        "dataset.page_scale=1.0",
        "dataset.patch_size=64",
        "dataset.input_size=64",  # ResNet-50: a 2x2 final feature map
        "dataset.train_patches_per_page=4",
        "trainer.writers_per_batch=3",
        "trainer.patches_per_writer=2",
    ]


def _clamm(root: Path) -> list[str]:
    """CLaMM layout: per split a folder of .tif pages and a ';'-separated label file (FILENAME;SCRIPT_TYPE;...)."""
    scripts = ("Caroline", "Uncial", "Textualis")
    for split, per_class in (("train", 3), ("test", 2)):
        (root / split).mkdir(parents=True)
        rows = ["FILENAME;SCRIPT_TYPE;DATE_TYPE"]
        for label, script in enumerate(scripts):
            for page in range(per_class):
                name = f"{split}_{script}_{page}.tif"
                _page(root / split / name, seed=100 * label + page + (50 if split == "test" else 0), size=(90, 70))
                rows.append(f"{name};{script};1")
        (root / split / "labels.csv").write_text("\n".join(rows) + "\n")
    return [
        f"dataset.train_images={root / 'train'}",
        f"dataset.test_images={root / 'test'}",
        "dataset.short_side=48",
        "dataset.input_size=48",
        "trainer.batch_size=4",
    ]


def _synthwriters(root: Path) -> list[str]:
    return [
        "dataset.page_size=96",
        "dataset.patch_size=32",
        "dataset.train_writers=4",
        "dataset.test_writers=4",
        "dataset.test_pages_per_writer=2",
        "dataset.train_patches_per_page=4",
        f"dataset.cache_dir={root}",
        "trainer.writers_per_batch=4",
        "trainer.patches_per_writer=2",
    ]


# dataset name → writes small data in that dataset's layout under a folder, returns the overrides to read it
GENERATED: dict[str, Callable[[Path], list[str]]] = {
    "icdar17": _icdar17,
    "clamm": _clamm,
    "synthwriters": _synthwriters,
}


@pytest.mark.parametrize("preset", group_options("experiment"))
def test_preset_runs_end_to_end(
    preset: str, tmp_path: Path, run_cli: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = compose([f"experiment={preset}"], validate=False)
    dataset = str(cfg.dataset.name)
    assert dataset in GENERATED, f"experiment={preset} uses dataset {dataset}: add a generator of its layout here"
    data = GENERATED[dataset](tmp_path / "data")
    no_download = ["model.pretrained=false"] if "pretrained" in cfg.model else []
    results = tmp_path / "runs"
    overrides = [f"experiment={preset}", "seed=0", *BUDGET, *data, *no_download, f"results_dir={results}"]

    planned = sweep.plan(overrides)
    assert len(planned) >= 2  # the preset's operator grid, one seed
    assert run_cli("sweep", *overrides) == 0, capsys.readouterr()

    found = [records.read_record(p.run_dir) for p in planned]
    assert all(r is not None and r["status"] == "completed" for r in found), found
    assert {r["experiment"] for r in found if r} == {preset}
    assert {r["dataset"] for r in found if r} == {dataset}
    metric = "mAP" if cfg.dataset.task == "retrieval" else "acc@1"
    assert all(0.0 <= r[metric] <= 1.0 for r in found if r)
    assert all(r["latency.infer_image_ms"] > 0 for r in found if r)

    capsys.readouterr()
    assert run_cli("report", str(results), "--baseline", "avg", "--metric", metric, "--no-plots") == 0
    report_dir = results.parent / "report"
    assert {p.name for p in report_dir.iterdir()} >= {"runs.csv"}
    summary = (report_dir / "runs.csv").read_text()
    assert all(p.run_id in summary for p in planned)
    json.dumps(found)  # records are plain JSON values
