"""Composition of the real configs, validation errors, and run identity."""

from __future__ import annotations

import pytest

from poolbench.config import (
    GROUPS,
    compose,
    conf_dir,
    config_hash,
    default_augment,
    group_options,
    identity,
    run_id,
)
from poolbench.errors import ConfigError


def test_default_config_composes_and_records_choices() -> None:
    cfg = compose()
    assert cfg.choices.pooling == "avg"
    assert cfg.choices.dataset == "synthwriters"
    assert cfg.pooling.name == "avg"
    assert (conf_dir() / "config.yaml").is_file()


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in GROUPS if g not in ("trainer", "experiment") for o in group_options(g)],
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}"])
    # augment=auto composes the dataset's own recipe and records that one.
    expected = default_augment(cfg.choices.dataset) if (group, option) == ("augment", "auto") else option
    assert cfg.choices[group] == expected


@pytest.mark.parametrize("option", group_options("experiment"))
def test_every_experiment_preset_composes(option: str) -> None:
    assert compose([f"experiment={option}"]).choices.experiment == option


def test_run_identity_is_deterministic_and_ignores_bookkeeping() -> None:
    base = compose(["seed=3"])
    assert run_id(base) == run_id(compose(["seed=3"]))
    assert config_hash(base) == config_hash(compose(["seed=3", "results_dir=/elsewhere", "trainer.resume=true"]))
    assert config_hash(base) != config_hash(compose(["seed=4"]))
    assert config_hash(base) != config_hash(compose(["seed=3", "trainer.lr=0.01"]))
    assert run_id(base).startswith("avg-")
    assert "results_dir" not in identity(base)


def test_override_grammar_add_and_delete() -> None:
    cfg = compose(["pooling=gem", "pooling.p=4", "++trainer.epochs=2"])
    assert cfg.pooling.p == 4 and cfg.trainer.epochs == 2
    assert "p" not in compose(["pooling=gem", "~pooling.p"]).pooling


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["pooling=dgmpp"], "Did you mean 'dgmp'?"),
        (["model=resnet51"], "unknown model option 'resnet51'"),
        (["dataset=foo"], "unknown dataset option 'foo'"),
        (["experiment=nope"], "unknown experiment 'nope'"),
        (["trainer.epochs=abc"], "trainer.epochs must be of type int"),
        (["trainer.epochs=0"], "trainer.epochs must be an integer >= 1"),
        (["trainer.lr=-1"], "trainer.lr must be > 0"),
        (["trainer.optimizer=adamm"], "Did you mean 'adam'?"),
        (["trainer.epochz=3"], "unknown config key 'trainer.epochz'"),
        (["+trainer.foo=3"], "unknown config key 'trainer.foo'"),
        (["~trainer.latency"], "is required"),
        (["pooling=gem", "pooling.p=-1"], "pooling=gem"),
        (["pooling=dgmp", "pooling.lam=0"], "pooling=dgmp"),
        (["pooling=gem", "+pooling.q=1"], "unknown parameter 'q'"),
        (["local_pooling=max", "local_pooling.kernel_size=0"], "kernel_size"),
        (["seed=range(0,3)"], "poolbench sweep"),
        (["pooling.p=="], "Error parsing override"),
        (["device=gpu"], "device must be"),
    ],
)
def test_bad_input_is_one_clear_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
