"""synthwriters: determinism, split structure, patches, cache and option errors (small sizes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from poolbench.config import compose
from poolbench.data import build_dataset, dataset_names
from poolbench.data.synthwriters import SynthWritersConfig, generate, generation_params
from poolbench.errors import ConfigError


def small_cfg(cache_dir: Path, **overrides: object) -> dict:
    cfg = {"name": "synthwriters", "task": "retrieval", "page_size": 96, "patch_size": 32, "train_writers": 3,
           "train_pages_per_writer": 3, "test_writers": 4, "test_pages_per_writer": 2,
           "train_patches_per_page": 5, "cache_dir": str(cache_dir)}
    cfg.update(overrides)
    return cfg


def test_names_and_unknown_dataset() -> None:
    assert "synthwriters" in dataset_names() and "icdar17" in dataset_names()
    with pytest.raises(ConfigError, match="Did you mean 'synthwriters'"):
        build_dataset({"name": "synthwriter"}, seed=0)


def test_bundle_structure(tmp_path: Path) -> None:
    calls: list[tuple[str, int, int]] = []
    bundle = build_dataset(small_cfg(tmp_path), seed=0, progress=lambda *a: calls.append(a))
    assert bundle.task == "retrieval" and bundle.in_channels == 1 and bundle.input_size == 32
    assert bundle.num_classes == 3
    assert len(bundle.train) == 3 * 3 * 5
    assert bundle.train_labels.tolist() == [w for w in range(3) for _ in range(3 * 5)]
    # Test writers: 4 writers x 2 pages, none of them a training writer.
    assert bundle.page_writers is not None
    assert bundle.page_writers.bincount().tolist()[3:] == [2, 2, 2, 2]
    assert not set(bundle.page_writers.tolist()) & set(bundle.train_labels.tolist())
    patch, writer = bundle.train[7]
    assert patch.shape == (1, 32, 32) and patch.dtype == torch.float32 and writer == 0
    assert float(patch.min()) >= 0.0 and float(patch.max()) <= 1.0
    # Every test page contributes tiles (96 // 32 = 3 -> up to 9 per page) and page indices cover all pages.
    pages_seen = {bundle.test[i][1] for i in range(len(bundle.test))}
    assert pages_seen == set(range(8)) and len(bundle.test) <= 8 * 9
    assert calls and calls[-1][1] == calls[-1][2] == 3 * 3 + 4 * 2
    assert bundle.info["cache_hit"] is False


def test_same_seed_same_pages_and_cache_reuse(tmp_path: Path) -> None:
    params = generation_params(SynthWritersConfig(**small_cfg(tmp_path)), seed=3)
    first, second = generate(params), generate(params)
    assert torch.equal(first["pages"], second["pages"])
    other = generate(params | {"seed": 4})
    assert not torch.equal(first["pages"], other["pages"])

    cold = build_dataset(small_cfg(tmp_path), seed=3)
    warm = build_dataset(small_cfg(tmp_path), seed=3)
    assert warm.info["cache_hit"] is True and warm.info["cache_path"] == cold.info["cache_path"]
    assert all(torch.equal(a, b) for a, b in zip(cold.test.pages, warm.test.pages, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(cold.test.pages, first["pages"][9:], strict=True))
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_generation_seed_overrides_run_seed(tmp_path: Path) -> None:
    a = build_dataset(small_cfg(tmp_path, generation_seed=7), seed=0)
    b = build_dataset(small_cfg(tmp_path, generation_seed=7), seed=1)
    assert a.info["cache_path"] == b.info["cache_path"]


def test_pages_do_not_depend_on_the_number_of_writers(tmp_path: Path) -> None:
    base = generation_params(SynthWritersConfig(**small_cfg(tmp_path), fonts=["scripts"], difficulty=0.5), seed=0)
    fewer = generate(base | {"test_writers": 2})
    more = generate(base)
    assert torch.equal(fewer["pages"], more["pages"][: len(fewer["pages"])])


def test_difficulty_changes_writer_spread(tmp_path: Path) -> None:
    easy = generate(generation_params(SynthWritersConfig(**small_cfg(tmp_path, fonts=["scripts"], difficulty=0.0)), 0))
    hard = generate(generation_params(SynthWritersConfig(**small_cfg(tmp_path, fonts=["scripts"], difficulty=1.0)), 0))
    # Ink coverage varies between writers (scale, pen, spacing); less so when writers are alike.
    def writer_spread(data: dict) -> float:
        ink = (data["pages"] > 128).float().mean(dim=(1, 2))
        return float(torch.stack([ink[data["writers"] == w].mean() for w in data["writers"].unique()]).std())
    assert writer_spread(hard) < writer_spread(easy)


def test_training_crops_follow_torch_seed(tmp_path: Path) -> None:
    bundle = build_dataset(small_cfg(tmp_path), seed=0)
    torch.manual_seed(11)
    first = bundle.train[0][0]
    torch.manual_seed(11)
    assert torch.equal(first, bundle.train[0][0])


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"difficulty": 1.5}, ConfigError, "difficulty"),
        ({"generation_seed": "abc"}, ConfigError, "generation_seed"),
        ({"test_pages_per_writer": 1}, ConfigError, "test_pages_per_writer"),
        ({"test_writers": 1}, ConfigError, "test_writers must be an integer >= 2"),
        ({"fonts": ["scrips"]}, ConfigError, "Did you mean 'scripts'"),
        ({"patch_sise": 3}, ConfigError, "patch_size"),
        ({"patch_size": 128}, ConfigError, "larger than dataset.page_size"),
        ({"page_size": 33}, ConfigError, "page_size must be an integer >= 48"),
        ({"task": "classification"}, ConfigError, "retrieval"),
    ],
)
def test_bad_options(tmp_path: Path, overrides: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_dataset(small_cfg(tmp_path, **overrides), seed=0)


def test_unwritable_cache_still_builds(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.warns(UserWarning, match="could not cache"):
        bundle = build_dataset(small_cfg(blocker / "cache"), seed=0)
    assert len(bundle.test) > 0


@pytest.mark.slow
def test_default_config_builds(tmp_path: Path) -> None:
    cfg = compose([f"dataset.cache_dir={tmp_path}"])
    bundle = build_dataset(cfg.dataset, seed=0, augment=cfg.augment)
    assert bundle.info["train_pages"] == 40 * 3 and bundle.info["test_pages"] == 100 * 5
    assert bundle.train.transform is None  # augment=auto is none for synthwriters: training unchanged


def test_fonts_as_count(tmp_path: Path) -> None:
    bundle = build_dataset(small_cfg(tmp_path, fonts=3), seed=0)
    assert bundle.info["fonts"] == "scripts,cursive,scriptc"
    with pytest.raises(ConfigError, match="fonts"):
        build_dataset(small_cfg(tmp_path, fonts=0), seed=0)
