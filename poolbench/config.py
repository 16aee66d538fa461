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
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from poolbench import schema
from poolbench.errors import ConfigError, unknown_choice
from poolbench.schema import Range, Required

# Groups whose options are typed schemas (poolbench.schema); the others are checked by their owners.
SCHEMA_GROUPS = ("dataset", "model", "augment", "trainer")
# augment=auto (the default) stands for the dataset's own recipe (its option's meta "augment").
AUTO_AUGMENT = "auto"
# Root keys that only an experiment preset sets.
PRESET_KEYS = ("grid",)


@dataclass
class RunSettings:
    """The root keys of every run config."""

    seed: Annotated[int, Range(ge=0, le=2**63 - 1)] = 0
    # auto = cuda when available, else cpu; or cpu / cuda / cuda:1
    device: str = "auto"
    # Runs land in <results_dir>/<run-id>/ ; the run id is derived from the resolved config.
    results_dir: Annotated[str, Required("the folder that holds the run directories")] = "results/runs"
    # Set by `poolbench sweep`; recorded, never part of the run's identity.
    sweep_name: str | None = None

GROUPS = ("dataset", "model", "pooling", "local_pooling", "augment", "trainer", "experiment")
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
    # Only feeds the default of trainer.steps_per_epoch, whose resolved value is part of the identity.
    "dataset.steps_per_epoch",
    "grid",  # an experiment preset's sweep grid (poolbench sweep); each run's own values are in its config
    "choices.experiment",  # a preset is a bundle of values: the same values without it are the same run
)
# Keys added after poolbench 0.1, left out of a run's identity while they hold this value (the
# behaviour 0.1 had), so the runs of 0.1 keep their ids and are found again.
IDENTITY_NEUTRAL: dict[str, Any] = {
    "pooling.solver": "auto",
    "augment.name": "none",
    "choices.augment": "none",
}
# Group nodes whose extra keys are operator parameters, checked by the operator itself.
OPEN_GROUPS = ("pooling", "local_pooling")
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
    _store_generated_nodes()
    folder = conf_dir() / group
    files = {p.stem for p in folder.glob("*.yaml")} if folder.is_dir() else set()
    try:
        generated = {name.removesuffix(".yaml") for name in ConfigStore.instance().list(group)}
    except OSError:  # ConfigStore raises OSError for a group it does not hold
        generated = set()
    return sorted(files | generated)


def _store_generated_nodes() -> None:
    """Put one node per registered operator into Hydra's ConfigStore (``pooling=<name>``,
    ``local_pooling=<name>``): an operator's registration is the only description of its config.
    Called before every composition, so operators registered since (plugins) are options too."""
    from poolbench import pooling

    store = ConfigStore.instance()
    for group, kind in (("pooling", "global"), ("local_pooling", "local")):
        for spec in pooling.specs(kind):
            store.store(group=group, name=spec.name, node=spec.config_node())
    store.store(group="local_pooling", name="none", node={"name": "none"})
    store.store(group="augment", name=AUTO_AUGMENT, node={"name": AUTO_AUGMENT})
    store.store(group="augment", name="none", node={"name": "none"})
    _import_schema_owners()
    for group in schema.groups():
        for name, opt in schema.options(group).items():
            store.store(group=group, name=name, node=opt.node())
    store.store(name="poolbench_base", node=schema.defaults(RunSettings))


def _import_schema_owners() -> None:
    """Import the modules that register config schemas (their import registers the options)."""
    import poolbench.engine.settings  # noqa: F401
    import poolbench.models  # noqa: F401


def compose(overrides: Sequence[str] = (), *, validate: bool = True) -> DictConfig:
    """Compose ``config.yaml`` with Hydra overrides; raise ConfigError on any problem.

    The chosen option of every group is stored under ``cfg.choices`` (e.g. ``choices.pooling``).
    """
    overrides = list(overrides)
    _reject_foreign(overrides)
    _reject_sweeps(overrides)
    cfg = _compose_raw(overrides)
    if validate:
        validate_config(cfg, _reference(tuple(o for o in overrides if _is_group_override(o))))
    return cfg


@functools.lru_cache(maxsize=256)
def _reference(group_overrides: tuple[str, ...]) -> DictConfig:
    """The composed defaults of these group choices: the types and keys a config is checked against.

    Cached because a sweep validates many configs that share their group choices.
    """
    return _compose_raw(list(group_overrides))


def _compose_raw(overrides: list[str]) -> DictConfig:
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
    if choices["augment"] == AUTO_AUGMENT:
        # The dataset's own recipe, composed like an explicit augment=<recipe>: the same training is
        # the same run, and the record names the recipe that ran.
        kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != "augment"]
        return _compose_raw([*kept, f"augment={default_augment(choices['dataset'])}"])
    with _open(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    return cfg


def default_augment(dataset: str | None) -> str:
    """The augmentation recipe the literature uses for a dataset option (``augment=auto``)."""
    dataset_option = schema.options("dataset").get(str(dataset))
    recipe = dataset_option.meta.get("augment", "none") if dataset_option else "none"
    return recipe if recipe in group_options("augment") else "none"


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


def _reject_foreign(overrides: list[str]) -> None:
    """Command-line flags that reached the overrides, and Hydra's own settings, which poolbench does not
    use (the compose API has no output directories or launchers): refused instead of ignored."""
    for override in overrides:
        if override.startswith("-"):
            raise ConfigError(
                f"unknown option '{override.split('=', 1)[0]}'; overrides look like key=value (see --help)"
            )
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(
                f"'{override}': poolbench does not use Hydra's own settings; runs go to results_dir=..., "
                "sweeps are run by `poolbench sweep`"
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
    """Check a composed config: the root keys and every schema group against their schemas (types,
    ranges, choices, unknown and removed keys), other groups against their composed defaults, and the
    operators by constructing them."""
    try:
        root = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"cannot resolve {key or 'the config'}: {str(exc).splitlines()[0]}") from None
    own = {k: v for k, v in root.items() if k not in (*GROUPS, "choices", *PRESET_KEYS)}  # type: ignore[union-attr]
    schema.check(own, RunSettings, "")
    if not str(cfg.results_dir).strip():
        raise ConfigError("results_dir must not be empty (the folder that holds the run directories)")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(cfg.device)):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:<index>, got {cfg.device!r}")
    checked = []
    for group in SCHEMA_GROUPS:
        choice = cfg.choices.get(group)
        opt = schema.options(group).get(choice)
        if opt is None:
            continue
        checked.append(group)
        schema.check(root[group], opt.schema, group, label=f"{group}={choice}")  # type: ignore[index]
        fixed = opt.node().get("name")
        if fixed is not None and root[group].get("name") != fixed:  # type: ignore[index]
            raise ConfigError(f"{group}.name is set by the option; choose another option with {group}=<name>")
    _validate_against_reference(cfg, reference, skip=checked)
    _validate_pooling(cfg)


def _validate_against_reference(cfg: DictConfig, reference: DictConfig, skip: Sequence[str]) -> None:
    """Groups without a schema: keys and value types must match the option's composed defaults."""
    actual, expected = flatten(cfg), flatten(reference)
    skipped = tuple(f"{g}." for g in skip) + ("choices.",) + tuple(f"{g}." for g in OPEN_GROUPS)
    for key, default in expected.items():
        if key.startswith(skipped) or "." not in key:
            continue
        if key not in actual:
            raise ConfigError(f"config key '{key}' is required and cannot be removed")
        value = actual[key]
        if not _same_kind(value, default):
            kind = type(default).__name__
            raise ConfigError(f"{key} must be of type {kind} (like the default {default!r}), got {value!r}")


def pooling_params(node: DictConfig | Mapping) -> dict[str, Any]:
    """Operator parameters of a pooling/local_pooling node (everything but the bookkeeping keys)."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return {k: v for k, v in data.items() if k not in ("name", "lr_mult", "kernel_size", "stride")}


def _validate_pooling(cfg: DictConfig) -> None:
    from poolbench import pooling

    for group in OPEN_GROUPS:
        lr_mult = cfg[group].get("lr_mult", 1.0)
        if not isinstance(lr_mult, int | float) or lr_mult < 0:
            raise ConfigError(f"{group}.lr_mult must be a number >= 0, got {lr_mult!r}")
    try:
        pooling.create(cfg.pooling.name, **pooling_params(cfg.pooling))
    except ValueError as exc:
        raise ConfigError(f"pooling={cfg.choices.pooling}: {exc}") from None
    local = cfg.local_pooling
    if local.name == "none":
        return
    geometry = {k: local.get(k) for k in ("kernel_size", "stride") if local.get(k) is not None}
    try:
        pooling.create_local(local.name, **geometry, **pooling_params(local))
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"local_pooling={cfg.choices.local_pooling}: {exc}") from None


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
    """Readable, deterministic and collision-free run id: same config, same id. Every part is reduced
    to letters, digits, '.', '_' and '+', so no value can make it a path."""
    parts = (cfg.pooling.name, cfg.model.name, cfg.dataset.name, f"s{cfg.seed}")
    return "-".join(_path_safe(str(p)) for p in parts) + "-" + config_hash(cfg)


def _path_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]+", "_", text).strip("._") or "_"


def run_dir(cfg: DictConfig) -> Path:
    """``<results_dir>/<run id>``, checked to lie inside results_dir."""
    results = Path(str(cfg.results_dir))
    path = results / run_id(cfg)
    if path.resolve().parent != results.resolve():
        raise ConfigError(f"run directory {path} would lie outside results_dir={results}")
    return path


def override_keys(overrides: Iterable[str]) -> list[str]:
    return [o.lstrip("+~").split("=", 1)[0] for o in overrides]
