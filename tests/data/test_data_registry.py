"""Every registered dataset option and augment recipe, driven by the registry (a new entry is tested by
being registered): schema shape, composition, required keys, default recipe, and seeded augmentation."""

from __future__ import annotations

import dataclasses
from typing import get_args, get_type_hints

import pytest
import torch
from torch.utils.data import DataLoader

from poolbench import schema
from poolbench.config import compose
from poolbench.data import augment_transform, build_dataset, dataset_names
from poolbench.errors import ConfigError
from poolbench.schema import Required

DATASETS = sorted(schema.options("dataset"))
RECIPES = sorted(schema.options("augment"))
# Retrieval sets whose training crops are drawn at random keep a fixed-length epoch (60 P x K batches).
RANDOM_CROP_EPOCHS = {"synthwriters": 60, "icdar17": 60}


def required_keys(option: schema.Option) -> list[str]:
    hints = get_type_hints(option.schema, include_extras=True)
    return [f.name for f in dataclasses.fields(option.schema)
            if any(isinstance(m, Required) for m in getattr(hints[f.name], "__metadata__", ()))]


def test_names_come_from_the_registry() -> None:
    assert dataset_names() == DATASETS
    assert {"synthwriters", "icdar17", "retrieval_folder", "digits", "clamm"} <= set(DATASETS)
    assert {"none", "cifar", "imagenet", "document"} <= set(RECIPES)


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_option_shape(name: str) -> None:
    option = schema.options("dataset")[name]
    node = option.node()
    assert node["name"] == name
    task = get_args(get_type_hints(option.schema)["task"])
    assert task in (("retrieval",), ("classification",)) and node["task"] == task[0]
    expected = RANDOM_CROP_EPOCHS.get(name)  # classification: one epoch = one pass (null)
    assert node["steps_per_epoch"] == expected
    assert option.meta["augment"] in RECIPES and callable(option.meta["build"])


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_option_composes_with_its_recipe(name: str) -> None:
    option = schema.options("dataset")[name]
    required = required_keys(option)
    if required:  # `poolbench train --cfg` already names what is missing
        with pytest.raises(ConfigError, match=f"dataset.{required[0]} is required"):
            compose([f"dataset={name}"])
    cfg = compose([f"dataset={name}", *(f"dataset.{key}=/data" for key in required)])
    assert cfg.choices.augment == option.meta["augment"] and cfg.augment.name == option.meta["augment"]
    assert cfg.trainer.steps_per_epoch == option.node()["steps_per_epoch"]
    with pytest.raises(ConfigError, match=f"unknown config key 'dataset.bogus' for dataset={name}"):
        build_dataset({"name": name, "bogus": 1}, seed=0)
    other_task = "classification" if option.node()["task"] == "retrieval" else "retrieval"
    with pytest.raises(ConfigError, match="dataset.task"):
        build_dataset({"name": name, "task": other_task}, seed=0)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_recipe_keeps_size_and_follows_torch_seed(recipe: str, channels: int) -> None:
    transform = augment_transform({"name": recipe}, "digits")(24)
    image = torch.randint(0, 256, (channels, 24, 24), dtype=torch.uint8)
    if transform is None:
        assert recipe == "none"
        return
    torch.manual_seed(3)
    first = [transform(image) for _ in range(4)]
    torch.manual_seed(3)
    second = [transform(image) for _ in range(4)]
    assert all(out.shape == image.shape and out.dtype == torch.uint8 for out in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(first[0], out) for out in first[1:])  # it does change the image


def test_recipe_values_are_validated() -> None:
    with pytest.raises(ConfigError, match="augment.padding must be an integer >= 0"):
        augment_transform({"name": "cifar", "padding": -1}, "digits")
    with pytest.raises(ConfigError, match="min_scale/min_ratio must not exceed"):
        augment_transform({"name": "imagenet", "min_scale": 0.9, "max_scale": 0.5}, "digits")(32)
    with pytest.raises(ConfigError, match="unknown augment option 'cifra'"):
        augment_transform({"name": "cifra"}, "digits")
    assert augment_transform({"name": "auto"}, "clamm")(32) is not None  # auto = the dataset's recipe


def batches(dataset, workers: int, seed: int) -> list[torch.Tensor]:
    """Two epochs the way the engine draws them: global RNG and loader generator re-seeded per epoch."""
    generator = torch.Generator()
    loader = DataLoader(dataset, batch_size=16, shuffle=True, num_workers=workers, generator=generator)
    out = []
    for epoch in range(2):
        torch.manual_seed(seed + epoch)
        generator.manual_seed(seed + epoch)
        out += [images for images, _ in loader]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_augmented_batches_are_reproducible(workers: int) -> None:
    """Resume is exact only if the same seeds give the same augmented batches, with or without workers."""
    data = build_dataset({"name": "digits", "image_size": 16}, seed=0, augment={"name": "cifar"})
    data.train.labels = data.train.labels[:64]  # a few batches are enough
    first, second = batches(data.train, workers, 5), batches(data.train, workers, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    plain = build_dataset({"name": "digits", "image_size": 16}, seed=0)
    plain.train.labels = plain.train.labels[:64]
    assert not all(torch.equal(a, b) for a, b in zip(first, batches(plain.train, workers, 5), strict=True))
    assert data.test.transform is None  # test items are never augmented


@pytest.mark.parametrize("name", DATASETS)
def test_cfg_prints_every_key_with_required_ones_shown_missing(
    name: str, run_cli, capsys: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    """`poolbench train --cfg dataset=NAME` shows the option's keys instead of stopping on a required one."""
    import yaml

    assert run_cli("train", "--cfg", f"dataset={name}") == 0
    out = capsys.readouterr().out
    shown = yaml.safe_load("\n".join(line for line in out.splitlines() if not line.startswith("#")))
    option = schema.options("dataset")[name]
    assert set(shown["dataset"]) == set(option.node())
    required = required_keys(option)
    assert all(shown["dataset"][key] == "???" for key in required)
    assert [line.split()[2] for line in out.splitlines() if line.startswith("# missing:")] == [
        f"dataset.{key}" for key in required]
    assert ("# run directory: (set the missing keys first)" in out) == bool(required)
