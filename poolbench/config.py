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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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

from poolbench import plugins, schema
from poolbench.errors import ConfigError, unknown_choice
from poolbench.grammar import check_device, override_key
from poolbench.schema import Range, Required

# Groups whose options are typed schemas (poolbench.schema); the others are checked by their owners.
SCHEMA_GROUPS = ("dataset", "model", "augment", "trainer")
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
    # Modules or .py files registering pooling operators, imported before composing, e.g.
    # plugins=[mypkg.mypools,./my_pools.py] (also POOLBENCH_PLUGINS); recorded with their sha256.
    plugins: list[str] = field(default_factory=list)

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
    "trainer.logger",
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
    "plugins": [],
    "augment.name": "none",
    "choices.augment": "none",
    "trainer.eval_every": None,
    # icdar17 became a preset of retrieval_folder: its new keys at the values that read ICDAR17 as before.
    "dataset.csv": None,
    "dataset.identity_pattern": r"^([^-]+)-",
    "dataset.test_identities": 0.5,
    "dataset.identity_split_seed": 0,
    "dataset.channels": None,
    # The validation split (issue 18) and the knowing filters of small identities/classes: off = as before.
    "dataset.val_share": 0.0,
    "dataset.val_dir": "val",
    "dataset.min_per_identity": None,
    "dataset.min_per_class": None,
}
# Group nodes whose extra keys are operator parameters, checked by the operator itself.
OPEN_GROUPS = ("pooling", "local_pooling")
# The root of the config tree, conf/config.yaml: its defaults list names every group's default option.
ROOT_CONFIG = "config"


def conf_dir() -> Path:
    """The folder holding ``config.yaml``: packaged copy first, then the checkout's ``conf/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / f"{ROOT_CONFIG}.yaml").is_file():
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
    from poolbench.pooling import catalog

    _import_schema_owners()
    store = ConfigStore.instance()
    # What the nodes are made from: storing them costs ~1 s (OmegaConf builds every node), so they are
    # stored again only when an operator or option was (un)registered since, or the store was emptied.
    sources = (
        tuple((kind, spec) for kind in ("global", "local") for spec in catalog.infos(kind)),
        tuple((group, name, opt) for group in schema.groups() for name, opt in schema.options(group).items()),
    )  # the objects themselves (held, compared by value), not their ids, which a new object may reuse
    global _STORED
    if _STORED is not None and _STORED[0] == sources and _STORED[1] is store and "poolbench_base.yaml" in store.repo:
        return
    _AUTO_RECIPE.clear()  # the options changed: a recipe may have too
    for group, kind in (("pooling", "global"), ("local_pooling", "local")):
        store.repo[group] = {}  # exactly the registered operators (a test may have unregistered one)
        for spec in catalog.infos(kind):
            store.store(group=group, name=spec.name, node=spec.config_node())
        geometry = {"kernel_size": None, "stride": None} if kind == "local" else {}
        custom = {"name": catalog.CUSTOM, "_target_": "???", **geometry, "lr_mult": 1}  # pooling.from_config reads it
        store.store(group=group, name=catalog.CUSTOM, node=custom)
    store.store(group="local_pooling", name="none", node={"name": "none"})
    from poolbench.data.augment import AUTO_AUGMENT

    store.store(group="augment", name=AUTO_AUGMENT, node={"name": AUTO_AUGMENT})
    for group in schema.groups():
        for name, opt in schema.options(group).items():
            store.store(group=group, name=name, node=opt.node())
    store.store(name="poolbench_base", node=schema.defaults(RunSettings))
    _STORED = sources, store


# (what the generated nodes were made from, the ConfigStore they went to): see _store_generated_nodes
_STORED: tuple[Any, ConfigStore] | None = None


def _import_schema_owners() -> None:
    """Import the modules that register config schemas (their import registers the options)."""
    import poolbench.data.schemas  # noqa: F401
    import poolbench.engine.settings  # noqa: F401
    import poolbench.models.settings  # noqa: F401


def compose(overrides: Sequence[str] = (), *, validate: bool = True) -> DictConfig:
    """Compose ``config.yaml`` with Hydra overrides; raise ConfigError on any problem.

    The chosen option of every group is stored under ``cfg.choices`` (e.g. ``choices.pooling``).
    """
    overrides = list(overrides)
    reject_foreign(overrides)
    _reject_sweeps(overrides)
    cfg = compose_raw(overrides)
    if validate:
        validate_config(cfg)
    plugins.record(cfg, fingerprint=validate)  # unvalidated (a report's defaults): no `_target_` is imported
    return cfg


# augment=auto's recipe, by the overrides that decide it (see _auto_key): a sweep over operators composes
# each combination once instead of twice (composing is most of the cost of planning a grid).
_AUTO_RECIPE: dict[tuple[str, ...], str] = {}
# Groups whose options carry no defaults list (generated or schema nodes): they cannot change which
# dataset or augment option a composition chooses.
_LEAF_GROUPS = ("pooling", "local_pooling", "model", "trainer")


def _auto_key(overrides: Sequence[str]) -> tuple[str, ...]:
    return tuple(o for o in overrides if override_key(o) not in _LEAF_GROUPS)


def _plain_auto_recipe(overrides: Sequence[str]) -> str | None:
    """augment=auto's recipe where the overrides make the dataset choice plain to see without composing
    (``dataset=<option>`` or config.yaml's default; no experiment preset, nothing else touching augment,
    nothing Hydra routes elsewhere); None: compose and find out."""
    from poolbench.data.augment import AUTO_AUGMENT, default_augment

    dataset = None
    for text in overrides:
        key, _, value = text.partition("=")
        if key.startswith(("+", "~")) or "@" in key or key == "experiment" or key.startswith("augment."):
            return None
        if key == "augment" and value != AUTO_AUGMENT:
            return None
        if key == "dataset":
            if dataset is not None:
                return None
            dataset = value
    if dataset is None:
        dataset = _default_choices().get("dataset")
    if dataset not in schema.options("dataset") or _default_choices().get("augment") != AUTO_AUGMENT:
        return None  # (an unknown dataset: composing names it, with the valid choices)
    return default_augment(dataset)


@functools.cache
def _default_choices() -> dict[str, str]:
    """config.yaml's defaults list as ``{group: option}`` (its plain ``group: option`` entries)."""
    defaults = OmegaConf.load(conf_dir() / f"{ROOT_CONFIG}.yaml").get("defaults", [])
    return {k: v for entry in defaults if isinstance(entry, DictConfig) for k, v in entry.items()}


def _with_recipe(overrides: Sequence[str], recipe: str) -> list[str]:
    return [*(o for o in overrides if override_key(o) != "augment"), f"augment={recipe}"]


def compose_raw(overrides: list[str]) -> DictConfig:
    plugins.prepare(overrides)  # their operators must be config options before Hydra composes
    _check_experiment(overrides)
    _store_generated_nodes()
    recipe = _AUTO_RECIPE.get(_auto_key(overrides)) or _plain_auto_recipe(overrides)
    if recipe is not None:  # known to choose augment=auto: compose the recipe directly, as below
        overrides = _with_recipe(overrides, recipe)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir())):
            cfg = hydra_compose(ROOT_CONFIG, overrides=overrides, return_hydra_config=True)
    except MissingConfigException as exc:
        raise ConfigError(_missing_option_message(str(exc))) from None
    except OverrideParseException as exc:
        raise ConfigError(parse_error_message(exc)) from None
    except HydraException as exc:
        raise ConfigError(composition_message(exc)) from None
    finally:
        GlobalHydra.instance().clear()
    choices = {g: cfg.hydra.runtime.choices.get(g) for g in GROUPS}
    from poolbench.data.augment import AUTO_AUGMENT, default_augment  # augment=auto: its one definition

    if choices["augment"] == AUTO_AUGMENT:
        # The dataset's own recipe, composed like an explicit augment=<recipe>: the same training is
        # the same run, and the record names the recipe that ran.
        recipe = default_augment(choices["dataset"])
        _AUTO_RECIPE[_auto_key(overrides)] = recipe
        return compose_raw(_with_recipe(overrides, recipe))
    with struct_lifted(cfg):
        del cfg["hydra"]
        cfg.choices = choices
    return cfg


class struct_lifted:
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
        raise ConfigError(parse_error_message(exc)) from None
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(
                f"'{override.input_line}' is a sweep; `poolbench train` runs one config. Use `poolbench sweep`"
            )


def reject_foreign(overrides: list[str]) -> None:
    """Command-line flags that reached the overrides, and Hydra's own settings, which poolbench does not
    use (the compose API has no output directories or launchers): refused instead of ignored."""
    for override in overrides:
        if override.startswith("-"):
            raise ConfigError(
                f"unknown option '{override.split('=', 1)[0]}'; overrides look like key=value (see --help)"
            )
        key = override_key(override)
        if key == "hydra" or key.startswith(("hydra.", "hydra/")):
            raise ConfigError(
                f"'{override}': poolbench does not use Hydra's own settings; runs go to results_dir=..., "
                "sweeps are run by `poolbench sweep`"
            )


def parse_error_message(exc: OverrideParseException) -> str:
    return f"{str(exc).splitlines()[0]}. Overrides look like key=value, +new.key=value or ~key"


def is_group_override(override: str) -> bool:
    key = override_key(override)
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


def composition_message(exc: HydraException) -> str:
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
    out: dict[str, Any] = {}
    _collect_leaves(node, prefix, out)
    return out


def _collect_leaves(node: Any, prefix: str, out: dict[str, Any]) -> None:
    # Plain dicts first: a sweep's plan flattens every run, and an ABC isinstance check costs 10x more.
    if type(node) is dict or isinstance(node, DictConfig | Mapping):
        for key in node:
            _collect_leaves(node[key], f"{prefix}{key}.", out)
    elif isinstance(node, ListConfig):
        out[prefix[:-1]] = list(node)
    else:
        out[prefix[:-1]] = node


def flatten(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Resolved config as ``{'trainer.epochs': 4, ...}``. Here and in :func:`identity`,
    :func:`config_hash` and :func:`run_id`, ``cfg`` is a config or its resolved values (plain
    containers, as ``OmegaConf.to_container(cfg, resolve=True)`` gives them)."""
    return _leaves(_resolved(cfg))


def _resolved(cfg: DictConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg  # type: ignore[return-value]


def validate_config(cfg: DictConfig, *, checked: set[str] | None = None) -> dict[str, Any]:
    """Check a composed config: the root keys and every group against its schema (types, ranges,
    choices, unknown and removed keys), the model's architecture, and the operators by constructing them.

    Returns the resolved config as plain containers (what :func:`flatten` reads). ``checked`` (a set
    kept across many configs, e.g. a sweep's runs) remembers the group contents that passed: a group
    whose resolved content was checked before is not checked again (every check reads only its group).
    """
    try:
        root = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"cannot resolve {key or 'the config'}: {str(exc).splitlines()[0]}") from None
    return validate_values(root, checked)  # type: ignore[arg-type]


def validate_values(root: dict[str, Any], checked: set[str] | None = None) -> dict[str, Any]:
    """:func:`validate_config` on a config's resolved values; returns them."""
    own = {k: v for k, v in root.items() if k not in (*GROUPS, "choices", *PRESET_KEYS)}
    schema.check(own, RunSettings, "")
    check_device(root["device"])
    seen = checked if checked is not None else set()
    for group in SCHEMA_GROUPS:
        choice = root["choices"].get(group)
        opt = schema.options(group).get(choice)
        if opt is None or _seen(seen, ("schema", group, choice), root[group]):
            continue
        node = root[group] if not opt.meta.get("open") else {
            k: v for k, v in root[group].items() if k in schema.defaults(opt.schema)
        }  # an open option's other keys are its factory's arguments (models.custom)
        schema.check(node, opt.schema, group, label=f"{group}={choice}")
        fixed = opt.node().get("name")
        if fixed is not None and root[group].get("name") != fixed:
            raise ConfigError(f"{group}.name is set by the option; choose another option with {group}=<name>")
    if not _seen(seen, ("model",), root["model"]):
        _validate_model(root["model"])
    if not _seen(seen, ("pooling",), [root[group] for group in OPEN_GROUPS]):
        _validate_pooling(root)
    return root


def _seen(seen: set[str], what: tuple[Any, ...], content: Any) -> bool:
    """Whether ``content`` (resolved, plain) passed the check ``what`` before; remember it as passed
    (a check that then fails raises, and the caller stops)."""
    if schema.collecting_missing():
        return False  # unset required keys pass inside the block: nothing learnt for outside it
    key = json.dumps([what, content], sort_keys=True, default=repr)
    if key in seen:
        return True
    seen.add(key)
    return False


def _validate_model(model_node: Mapping[str, Any]) -> None:
    """An architecture the backbone library does not know (``model.arch``), found without building."""
    from poolbench.models import settings

    settings.check(model_node)


def _validate_pooling(root: Mapping[str, Any]) -> None:
    """The operators, built as their nodes say; a built-in one exactly as declared is known to build
    without importing torch (poolbench.pooling.catalog), anything else is built for its own errors."""
    from poolbench import pooling
    from poolbench.pooling import catalog

    for group in OPEN_GROUPS:
        lr_mult = root[group].get("lr_mult", 1.0)
        if not isinstance(lr_mult, int | float) or lr_mult < 0:
            raise ConfigError(f"{group}.lr_mult must be a number >= 0, got {lr_mult!r}")
    if not catalog.valid_as_declared(root["pooling"], "global"):
        pooling.from_config(root["pooling"], "global")
    local = root["local_pooling"]
    if local.get("name") != "none" and not catalog.valid_as_declared(local, "local"):
        pooling.from_config(local, "local")


def identity(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The part of the resolved config that determines a run's results."""
    flat = flatten(cfg)
    return {
        k: v
        for k, v in sorted(flat.items())
        if not k.startswith(NON_IDENTITY_KEYS) and not (k in IDENTITY_NEUTRAL and IDENTITY_NEUTRAL[k] == v)
    }


def config_hash(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Stable 12-hex-digit fingerprint of :func:`identity`."""
    blob = json.dumps(identity(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def run_id(cfg: DictConfig | Mapping[str, Any]) -> str:
    """Readable, deterministic and collision-free run id: same config, same id. Every part is reduced
    to letters, digits, '.', '_' and '+', so no value can make it a path."""
    from poolbench.models.settings import backbone_name
    from poolbench.pooling.catalog import operator_name

    values = _resolved(cfg)
    parts = (
        operator_name(values["pooling"]),
        backbone_name(values["model"]),
        values["dataset"]["name"],
        f"s{values['seed']}",
    )
    return "-".join(_path_safe(str(p)) for p in parts) + "-" + config_hash(values)


def _path_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+]+", "_", text).strip("._") or "_"


def run_dir(cfg: DictConfig) -> Path:
    """``<results_dir>/<run id>``, checked to lie inside results_dir."""
    results = Path(str(cfg.results_dir))
    path = results / run_id(cfg)
    if path.resolve().parent != results.resolve():
        raise ConfigError(f"run directory {path} would lie outside results_dir={results}")
    return path
