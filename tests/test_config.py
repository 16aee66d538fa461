"""Composition of the real configs, validation errors, and run identity."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from poolbench import schema
from poolbench.config import (
    GROUPS,
    compose,
    conf_dir,
    config_hash,
    group_options,
    identity,
    run_dir,
    run_id,
)
from poolbench.data.augment import default_augment
from poolbench.errors import ConfigError


def test_default_config_composes_and_records_choices() -> None:
    cfg = compose()
    assert cfg.choices.pooling == "avg"
    assert cfg.choices.dataset == "synthwriters"
    assert cfg.pooling.name == "avg"
    assert (conf_dir() / "config.yaml").is_file()


def required_values(group: str, option: str | None) -> list[str]:
    """Placeholder overrides for the keys an option's schema marks Required (e.g. dataset.root)."""
    opt = schema.options(group).get(str(option))
    placeholders = {"arch": "resnet18"}  # a value the library knows; a folder for the rest
    fields = schema.required_fields(opt.schema) if opt else []
    return [f"{group}.{name}={placeholders.get(name, '/data')}" for name in fields]


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in GROUPS if g not in ("trainer", "experiment") for o in group_options(g)],
)
def test_every_group_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose([f"{group}={option}", *required_values(group, option)])
    # augment=auto composes the dataset's own recipe and records that one.
    expected = default_augment(cfg.choices.dataset) if (group, option) == ("augment", "auto") else option
    assert cfg.choices[group] == expected


@pytest.mark.parametrize("option", group_options("experiment"))
def test_every_experiment_preset_composes(option: str) -> None:
    dataset = compose([f"experiment={option}"], validate=False).choices.dataset
    assert compose([f"experiment={option}", *required_values("dataset", dataset)]).choices.experiment == option


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
        # Ranges from the schemas: values that would run but mean nothing.
        (["trainer.grad_clip=-1"], "trainer.grad_clip must be null or > 0"),
        (["trainer.gamma=-5"], "trainer.gamma must be > 0"),
        (["trainer.lr=nan"], "trainer.lr must be a finite number"),
        (["trainer.lr=inf"], "trainer.lr must be a finite number"),
        (["trainer.num_threads=0"], "trainer.num_threads must be null or an integer >= 1"),
        (["trainer.num_workers=-1"], "trainer.num_workers must be an integer >= 0"),
        (["trainer.momentum=1.5"], "trainer.momentum must be >= 0 and < 1"),
        (["trainer.latency.repeats=0"], "trainer.latency.repeats must be an integer >= 1"),
        (["trainer.channels_last=maybe"], "unknown trainer.channels_last 'maybe'"),
        (["seed=-1"], "seed must be an integer >= 0"),
        (["seed=18446744073709551616"], "seed must be an integer >= 0"),
        (["+foo=1"], "unknown config key 'foo'"),
        (["~seed"], "'seed' is required"),
        # Hydra's own settings would be silently ignored by the compose API: refused instead.
        (["hydra.run.dir=/tmp/x"], "does not use Hydra's own settings"),
        (["+hydra.foo=1"], "does not use Hydra's own settings"),
        (["results_dir="], "results_dir must not be empty"),
        (["model=timm", "model.arch=''"], "model.arch must not be empty"),  # any Required value, not only one key
        # A command-line flag that reached the overrides (e.g. `poolbench train --plugin x`).
        (["--plugin"], "unknown option '--plugin'"),
    ],
)
def test_bad_input_is_one_clear_line(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


# Run ids of poolbench 0.1 for these overrides: the same config must keep finding its old runs.
RUN_IDS_0_1 = {
    (): "avg-smallcnn-synthwriters-s0-ea74eb229092",
    ("pooling=dgmp",): "dgmp-smallcnn-synthwriters-s0-b47ecf246884",
    ("model=resnet18", "pooling=gem"): "gem-resnet18-synthwriters-s0-3fdf756b91c8",
    ("local_pooling=softpool",): "avg-smallcnn-synthwriters-s0-f716c689b29f",
    ("experiment=quick",): "avg-smallcnn-synthwriters-s0-ea74eb229092",
}


@pytest.mark.parametrize("overrides", list(RUN_IDS_0_1))
def test_run_ids_of_unchanged_configs_are_stable(overrides: tuple[str, ...]) -> None:
    assert run_id(compose(list(overrides))) == RUN_IDS_0_1[overrides]


def test_run_directory_stays_inside_results_dir(tmp_path: Path) -> None:
    cfg = compose([f"results_dir={tmp_path}"])
    with open_dict(cfg):
        cfg.dataset.name = "/../../escape"
        cfg.model.name = "a/b"
    identifier = run_id(cfg)
    assert "/" not in identifier and ".." not in identifier
    assert run_dir(cfg).parent == tmp_path


def test_float_keys_accept_ints_in_any_notation() -> None:
    assert compose(["trainer.lr=1"]).trainer.lr == 1
    assert compose(["trainer.lr=1e-2"]).trainer.lr == pytest.approx(0.01)
    assert compose(["trainer.grad_clip=5"]).trainer.grad_clip == 5


def test_planner_values_and_run_ids_are_those_of_compose() -> None:
    """The planner's resolved values (the base's, patched per run) equal compose's, run ids included:
    plain values, a key another key interpolates, an overridden interpolation, an interpolated value,
    adds, repeated keys, and runs that fall back to the config."""
    from omegaconf import OmegaConf

    from poolbench.planner import iter_identified

    override_sets = [
        ["dataset=digits", "pooling=gem", "trainer.lr=0.03", "seed=2"],
        ["dataset=digits", "pooling=gem", "trainer.lr=0.1", "seed=2", "pooling.p=4"],
        ["pooling=dgmp", "dataset.steps_per_epoch=3"],  # trainer.steps_per_epoch reads it
        ["pooling=dgmp", "dataset.steps_per_epoch=3", "trainer.steps_per_epoch=7"],
        ["pooling=dgmp", "trainer.steps_per_epoch=null"],
        ["pooling=avg", "trainer.eval_batch_size=${trainer.batch_size}"],
        ["pooling=avg", "++trainer.lr=0.5", "seed=3"],
        ["pooling=avg", "trainer.epochs=2", "trainer.epochs=3"],
        ["pooling=gem", "trainer.latency={enabled: false, batch_size: 8, warmup: 1, repeats: 2}"],
        ["pooling=avg", "dataset.steps_per_epoch=3"],  # after the in-place edits of the earlier runs
        ["experiment=quick", "pooling=lse", "seed=1"],
    ]
    planned = [(dict(values), identifier) for values, identifier in iter_identified(override_sets)]
    for overrides, (values, identifier) in zip(override_sets, planned, strict=True):
        cfg = compose(overrides)
        assert identifier == run_id(cfg), overrides
        assert values == OmegaConf.to_container(cfg, resolve=True), overrides
    with pytest.raises(ConfigError, match="unknown config key 'trainer.nope'"):
        list(iter_identified([["pooling=avg"], ["pooling=avg", "trainer.nope=1"]]))
    with pytest.raises(ConfigError, match="trainer.lr must be > 0"):
        list(iter_identified([["trainer.lr=0.1"], ["trainer.lr=-1"]]))


def test_hydra_override_adapter() -> None:
    """poolbench's one use of a private Hydra API (planner.apply_value_overrides): fails loudly when a
    Hydra upgrade renames it or changes what it does, before a sweep plans wrong configs."""
    import inspect

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from poolbench.planner import apply_value_overrides

    assert list(inspect.signature(ConfigLoaderImpl._apply_overrides_to_config).parameters) == ["overrides", "cfg"]
    parse = OverridesParser.create().parse_overrides
    cfg = OmegaConf.create({"a": 1, "b": {"c": "x", "d": [1, 2]}, "e": 2})
    OmegaConf.set_struct(cfg, True)
    apply_value_overrides(parse(["a=5", "b.c=${a}", "+b.new=0.5", "++e=3", "~b.d", "++f=7"]), cfg)
    assert OmegaConf.to_container(cfg, resolve=True) == {"a": 5, "b": {"c": 5, "new": 0.5}, "e": 3, "f": 7}
    with pytest.raises(HydraException, match="Could not override 'b.nope'"):
        apply_value_overrides(parse(["b.nope=1"]), cfg)
    with pytest.raises(HydraException, match="Could not append to config. An item is already at 'a'"):
        apply_value_overrides(parse(["+a=1"]), cfg)


def test_an_operator_grid_composes_once_and_gets_what_compose_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner's base for ``pooling=X local_pooling=Y`` puts the operators' nodes into the
    composition without them (planner._swapped_operators): the same config, node for node, flags too."""
    from omegaconf import OmegaConf

    from poolbench import planner
    from poolbench.pooling import catalog

    options = [("pooling", i.name) for i in catalog.infos("global")] + [("pooling", "custom")]
    options += [("local_pooling", i.name) for i in catalog.infos("local")] + [("local_pooling", "none")]
    cases = [("dataset=digits", f"{group}={name}") for group, name in options]
    cases += [("local_pooling=lpnorm", "model=resnet18", "pooling=gem"), ("pooling=dgmp", "local_pooling=softpool")]
    composed = []
    real = planner.compose_raw
    monkeypatch.setattr(planner, "compose_raw", lambda overrides: composed.append(overrides) or real(overrides))
    planner._reference.cache_clear()
    for groups in cases:
        planned, truth = planner._reference(groups), real(list(groups))
        assert OmegaConf.to_yaml(planned) == OmegaConf.to_yaml(truth), groups
        for group in ("pooling", "local_pooling"):
            for flag in ("struct", "readonly"):
                assert planned[group]._get_flag(flag) == truth[group]._get_flag(flag), (groups, group, flag)
    assert len(composed) == 3, composed  # digits; smallcnn -> resnet18; synthwriters
    planner._reference.cache_clear()
    assert planner._swapped_operators(("experiment=quick", "pooling=gem")) is None  # a preset may set its keys
    assert planner._swapped_operators(("pooling=nope",)) is None  # composing names it, with the valid choices


@pytest.mark.parametrize("dataset", ["synthwriters", "digits", "cifar10", "imagefolder", "clamm", "icdar17"])
def test_auto_augment_known_before_composing_is_the_recipe_composed_explicitly(dataset: str) -> None:
    """augment=auto's recipe, taken from the overrides without a first composition (config._plain_auto_recipe),
    composes what naming the recipe does, choices included."""
    from omegaconf import OmegaConf

    from poolbench import config
    from poolbench.data.augment import default_augment

    recipe = default_augment(dataset)
    assert config._plain_auto_recipe([f"dataset={dataset}", "pooling=gem"]) == recipe
    auto = config.compose_raw([f"dataset={dataset}", "pooling=gem"])
    named = config.compose_raw([f"dataset={dataset}", "pooling=gem", f"augment={recipe}"])
    assert OmegaConf.to_yaml(auto) == OmegaConf.to_yaml(named)
    assert auto.choices.augment == recipe
    for unplain in (["+experiment=quick"], ["experiment=quick"], ["augment=none"], ["augment.hflip=0.1"]):
        assert config._plain_auto_recipe([f"dataset={dataset}", *unplain]) is None, unplain
