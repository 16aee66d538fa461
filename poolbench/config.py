"""Compose, validate and fingerprint run configurations.

Configs are composed with Hydra's compose API from ``conf/`` (the top-level folder in a checkout,
``poolbench/conf`` in an installed wheel). Every failure becomes a one-line
:class:`~poolbench.errors.ConfigError` naming the problem and the valid choices.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf

from poolbench import plugins
from poolbench.errors import ConfigError, unknown_choice

GROUPS = ("dataset", "model", "pooling", "local_pooling", "trainer", "experiment")
# Keys that change how a run is executed or stored, not what it computes: excluded from its identity.
NON_IDENTITY_KEYS = (
    "results_dir",
    "sweep_name",
    "device",
    "trainer.resume",
    "trainer.overwrite",
    "trainer.num_threads",
    "trainer.num_workers",
    "dataset.cache_dir",
    "grid",  # an experiment preset's sweep grid (poolbench sweep); each run's own values are in its config
    "choices.experiment",  # a preset is a bundle of values: the same values without it are the same run
)
# Keys added after poolbench 0.1, left out of a run's identity while they hold this value (the
# behaviour 0.1 had), so the runs of 0.1 keep their ids and are found again.
IDENTITY_NEUTRAL: dict[str, Any] = {
    "pooling.solver": "auto",
    "plugins": [],
}
# Group nodes whose extra keys are operator parameters, checked by the operator itself.
OPEN_GROUPS = ("pooling", "local_pooling")
CHOICES: dict[str, tuple[str, ...]] = {
    "trainer.loss": ("auto", "ce", "triplet"),
    "trainer.optimizer": ("adam", "adamw", "sgd"),
    "trainer.scheduler": ("cosine", "exponential", "none"),
    "trainer.amp": ("auto", "bf16", "fp16", "none"),
    "trainer.channels_last": ("auto", True, False),
}
POSITIVE_INTS = (
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.writers_per_batch",
    "trainer.patches_per_writer",
    "trainer.eval_batch_size",
    "trainer.latency.batch_size",
    "trainer.latency.repeats",
)
NON_NEGATIVE = ("trainer.weight_decay", "trainer.margin", "trainer.momentum", "trainer.latency.warmup")


def conf_dir() -> Path:
    """The folder holding ``config.yaml``: packaged copy first, then the checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find poolbench's configs (looked in {here / 'conf'} and {here.parent / 'conf'})")


def group_options(group: str) -> list[str]:
    """The option names of a config group, e.g. ``group_options('pooling')``: its yaml files and the
    nodes generated from the registries."""
    from poolbench.pooling import CUSTOM

    _store_generated_nodes()
    folder = conf_dir() / group
    files = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    try:
        generated = {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    except OSError:  # ConfigStore raises OSError for a group it does not hold
        generated = set()
    # `custom` takes a class path, not a choice: `pooling=glob(*)` means every registered operator.
    return sorted((files | generated) - {CUSTOM})


def _store_generated_nodes() -> None:
    """Put one node per registered operator into Hydra's ConfigStore (``pooling=<name>``,
    ``local_pooling=<name>``): an operator's registration is the only description of its config.
    Called before every composition, so operators registered since (plugins) are options too."""
    from poolbench import pooling

    store = ConfigStore.instance()
    for group, kind in (("pooling", "global"), ("local_pooling", "local")):
        store.repo[group] = {}  # exactly the registered operators (a test may have unregistered one)
        for spec in pooling.specs(kind):
            store.store(group=group, name=spec.name, node=spec.config_node())
        geometry = {"kernel_size": None, "stride": None} if kind == "local" else {}
        custom = {"name": pooling.CUSTOM, "_target_": "???", **geometry, "lr_mult": 1}  # pooling.from_config reads it
        store.store(group=group, name=pooling.CUSTOM, node=custom)
    store.store(group="local_pooling", name="none", node={"name": "none"})


def compose(overrides: Sequence[str] = (), *, validate: bool = True) -> DictConfig:
    """Compose ``config.yaml`` with Hydra overrides; raise ConfigError on any problem.

    The chosen option of every group is stored under ``cfg.choices`` (e.g. ``choices.pooling``).
    """
    overrides = list(overrides)
    _reject_sweeps(overrides)
    cfg = _compose_raw(overrides)
    if validate:
        validate_config(cfg, _reference(tuple(o for o in overrides if _is_group_override(o))))
    plugins.record(cfg)
    return cfg


@functools.lru_cache(maxsize=256)
def _reference(group_overrides: tuple[str, ...]) -> DictConfig:
    """The composed defaults of these group choices: the types and keys a config is checked against.

    Cached because a sweep validates many configs that share their group choices.
    """
    return _compose_raw(list(group_overrides))


def _compose_raw(overrides: list[str]) -> DictConfig:
    plugins.prepare(overrides)  # their operators must be config options before Hydra composes
    _check_experiment(overrides)
    _store_generated_nodes()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
            cfg = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option_message(str(exc))) from None
    except OverrideParseException as exc:
        raise ConfigError(_parse_error_message(exc)) from None
    except HydraException as exc:
        raise ConfigError(_composition_message(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    with _open(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    return cfg


class _open:
    """Temporarily lift OmegaConf's struct flag (Hydra sets it on composed configs)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


def _reject_sweeps(overrides: list[str]) -> None:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    except OverrideParseException as exc:
        raise ConfigError(_parse_error_message(exc)) from None
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(
                f"'{override.input_line}' is a sweep; `poolbench train` runs one config. Use `poolbench sweep`"
            )


def _parse_error_message(exc: OverrideParseException) -> str:
    return f"{str(exc).splitlines()[0]}. Overrides look like key=value, +new.key=value or ~key"


def _is_group_override(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key in GROUPS


def _check_experiment(overrides: list[str]) -> None:
    # `optional experiment` in the defaults list would silently ignore a misspelt preset.
    for override in overrides:
        key, _, value = override.lstrip("+").partition("=")
        if key == "experiment" and value not in group_options("experiment"):
            raise ConfigError(unknown_choice("experiment", value, group_options("experiment")))


def _missing_option_message(text: str) -> str:
    match = re.search(r"Could not find '([\w/]+)/([^']+)'", text)
    if match and match.group(1) in GROUPS:
        group, value = match.groups()
        return unknown_choice(f"{group} option", value, group_options(group))
    return text.splitlines()[0]


def _composition_message(exc: HydraException) -> str:
    text = str(exc)
    match = re.search(r"Could not override '([^']+)'", text)
    if match:
        key = match.group(1)
        parent, _, leaf = key.rpartition(".")
        return f"unknown config key '{key}' (to add a new key on purpose, write +{key}=...)" + (
            f"; keys under '{parent}' are listed by `poolbench train --cfg`" if parent else ""
        )
    return text.splitlines()[0]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, DictConfig | Mapping):
        out: dict[str, Any] = {}
        for key in node:
            out.update(_leaves(node[key], f"{prefix}{key}."))
        return out
    if isinstance(node, ListConfig):
        return {prefix[:-1]: list(node)}
    return {prefix[:-1]: node}


def flatten(cfg: DictConfig) -> dict[str, Any]:
    """Resolved config as ``{'trainer.epochs': 4, ...}``."""
    return _leaves(OmegaConf.to_container(cfg, resolve=True))


def _same_kind(value: Any, default: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    return isinstance(value, type(default))


def validate_config(cfg: DictConfig, reference: DictConfig) -> None:
    """Check types against the composed defaults, ranges, choices, and the operators' own rules."""
    actual, expected = flatten(cfg), flatten(reference)
    for key, default in expected.items():
        if key.startswith("choices."):
            continue
        if key.startswith(OPEN_GROUPS):  # operator parameters: typed by the operator (pooling.from_config)
            continue
        if key not in actual:
            raise ConfigError(f"config key '{key}' is required and cannot be removed")
        value = actual[key]
        if not _same_kind(value, default):
            kind = type(default).__name__
            raise ConfigError(f"{key} must be of type {kind} (like the default {default!r}), got {value!r}")
    for key in actual:
        if key not in expected and not key.startswith(OPEN_GROUPS + ("dataset.", "model.", "choices.")):
            raise ConfigError(f"unknown config key '{key}'")
    for key, options in CHOICES.items():
        if key in actual and actual[key] not in options:
            raise ConfigError(unknown_choice(key, actual[key], [str(o).lower() for o in options]))
    for key in POSITIVE_INTS:
        if key in actual and (not isinstance(actual[key], int) or actual[key] < 1):
            raise ConfigError(f"{key} must be an integer >= 1, got {actual[key]!r}")
    for key in NON_NEGATIVE:
        if key in actual and actual[key] is not None and actual[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {actual[key]!r}")
    steps = actual.get("trainer.steps_per_epoch")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ConfigError(f"trainer.steps_per_epoch must be null or an integer >= 1, got {steps!r}")
    if not isinstance(actual.get("trainer.lr"), int | float) or actual["trainer.lr"] <= 0:
        raise ConfigError(f"trainer.lr must be > 0, got {actual.get('trainer.lr')!r}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(cfg.device)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {cfg.device!r}")
    _validate_pooling(cfg)


def _validate_pooling(cfg: DictConfig) -> None:
    from poolbench import pooling

    for group in OPEN_GROUPS:
        lr_mult = cfg[group].get("lr_mult", 1.0)
        if not isinstance(lr_mult, int | float) or lr_mult < 0:
            raise ConfigError(f"{group}.lr_mult must be a number >= 0, got {lr_mult!r}")
    pooling.from_config(cfg.pooling, "global")
    if cfg.local_pooling.name != "none":
        pooling.from_config(cfg.local_pooling, "local")


def identity(cfg: DictConfig) -> dict[str, Any]:
    """The part of the resolved config that determines a run's results."""
    flat = flatten(cfg)
    return {
        k: v
        for k, v in sorted(flat.items())
        if not k.startswith(NON_IDENTITY_KEYS) and not (k in IDENTITY_NEUTRAL and IDENTITY_NEUTRAL[k] == v)
    }


def config_hash(cfg: DictConfig) -> str:
    """Stable 12-hex-digit fingerprint of :func:`identity`."""
    blob = json.dumps(identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def run_id(cfg: DictConfig) -> str:
    """Readable, deterministic and collision-free run id: same config, same id."""
    from poolbench import pooling

    parts = (pooling.label(cfg.pooling), cfg.model.name, cfg.dataset.name, f"s{cfg.seed}")
    return "-".join(str(p) for p in parts) + "-" + config_hash(cfg)


def override_keys(overrides: Iterable[str]) -> list[str]:
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]
