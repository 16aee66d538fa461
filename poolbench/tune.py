"""``poolbench tune``: the same tuning budget for every treatment (operator), then fresh seeds on test.

One Optuna study per treatment (each value of the treatment axis, ``pooling`` by default), all with
the same sampler, sampler seed and number of trials. Every trial is an ordinary poolbench run (run id,
record, lock, resume) in ``<tune dir>/trials/``, scored on the validation split (``val.mAP`` for
retrieval, ``val.acc@1`` for classification); the study only maps trial numbers to run ids, so the
run record stays the single truth. Each treatment's best configuration is then retrained with
``--seeds`` fresh seeds (disjoint from the tuning seed) in ``<tune dir>/final/`` and evaluated on test.

Layout of ``<results_dir>/tune/<name>/``::

    protocol.json    what was tuned and how (search space, sampler, budget, selection, seeds) and,
                     once known, each treatment's trials, best configuration and final runs
    study.db         the Optuna studies (SQLite), unless --storage names another database
    trials/<run-id>/ one ordinary run per trial (sweep_name tune.<name>.trials)
    final/<run-id>/  the best configurations with the final seeds (sweep_name tune.<name>.final)

Kill and resume: a trial stores its run id (user attribute ``run_id``) and its owner (host:pid,
with a heartbeat). A ``tune`` started again tells the studies what finished runs recorded, and takes
over the RUNNING trials whose owner is gone (dead pid on this host, stale heartbeat elsewhere, run
lock free): the same trial, the same parameters, its run resumed from its checkpoint. A trial number
is a place in the budget: trials numbered ``--trials`` or higher (two workers asking at once) are
failed at once and never count.

Search-space grammar is Hydra's (the grammar of hydra-optuna-sweeper), read by Hydra's own override
parser: ``interval(a,b)``, ``tag(log, interval(a,b))``, ``tag(int, interval(a,b))``, ``choice(a,b)``
or ``a,b``, ``range(a,b[,step])`` (b excluded, as everywhere in Hydra and poolbench sweep).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from poolbench import config, executors, files, planner, plugins, records, sweep
from poolbench.errors import ConfigError, PoolbenchError
from poolbench.grammar import override_key

if TYPE_CHECKING:
    import optuna

TREATMENT = "pooling"
SAMPLERS = ("tpe", "qmc")
SELECTION_METRIC = {"retrieval": "val.mAP", "classification": "val.acc@1"}
VAL_SHARE_KEY = "dataset.val_share"
DEFAULT_VAL_SHARE = 0.2  # tune always selects on a validation split; this share when none is given
TUNE_DIR = "tune"
PROTOCOL = "protocol.json"
STUDY_DB = "study.db"
TRIALS = "trials"
FINAL = "final"
FORMAT = 1
# Keys that are not hyperparameters: where/how a run executes, or what tune itself decides.
NOT_TUNABLE = ("seed", *config.NON_IDENTITY_KEYS, VAL_SHARE_KEY)
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0  # a trial whose owner (on another host) has not been heard of for this long is taken over
GRAMMAR = "key=interval(a,b), key=tag(log, interval(a,b)), key=choice(a,b,...) or key=range(a,b)"


# ------------------------------------------------------------------------------------------ the space


@dataclass(frozen=True)
class Param:
    """One dimension of the search space, as written on the command line."""

    key: str
    kind: str  # float | int | categorical
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()
    text: str = ""

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "categorical":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def values_to_check(self) -> list[Any]:
        """The values whose configs are validated before anything runs (bounds, every choice)."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "override": self.text, "kind": self.kind}
        if self.kind == "categorical":
            out["choices"] = list(self.choices)
        else:
            out.update(low=self.low, high=self.high, log=self.log, step=self.step)
        return out

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.key, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.key, float(self.low), float(self.high), step=self.step, log=self.log)


def _param(override: Override) -> Param:
    """An Optuna dimension from a Hydra sweep override (hydra-optuna-sweeper's mapping, with Hydra's range)."""
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    key, text, value = override.key_or_group, override.input_line or "", override.value()
    if isinstance(value, IntervalSweep):
        unknown = set(value.tags) - {"log", "int"}
        if unknown:
            raise ConfigError(
                f"'{text}': unknown tag {sorted(unknown)[0]!r}; interval takes tag(log, ...), tag(int, ...)"
            )
        low, high = value.start, value.end
        if low is None or high is None or not all(math.isfinite(v) for v in (low, high)):
            raise ConfigError(f"'{text}': an interval needs two finite bounds")
        if low >= high:
            raise ConfigError(f"'{text}': the lower bound {low:g} is not below the upper bound {high:g}")
        if "log" in value.tags and low <= 0:
            raise ConfigError(f"'{text}': a log interval needs a lower bound > 0, got {low:g}")
        if "int" in value.tags:
            if int(low) != low or int(high) != high:
                raise ConfigError(f"'{text}': tag(int, ...) needs whole bounds")
            return Param(key, "int", int(low), int(high), "log" in value.tags, 1, text=text)
        return Param(key, "float", float(low), float(high), "log" in value.tags, text=text)
    if isinstance(value, RangeSweep):
        if value.shuffle:
            raise ConfigError(f"'{text}': shuffle() means nothing to a sampler; write range(a,b) or choice(...)")
        start, stop, step = value.start, value.stop, value.step
        values = list(override.sweep_iterator())
        if not values:
            raise ConfigError(f"'{text}': the range is empty")
        if len(values) == 1:
            raise ConfigError(f"'{text}': the range holds one value; a fixed value is key={values[0]}")
        if all(isinstance(v, int) for v in (start, stop, step)):
            return Param(key, "int", int(values[0]), int(values[-1]), False, int(step), text=text)
        return Param(key, "float", float(values[0]), float(values[-1]), False, float(step), text=text)
    if isinstance(value, ChoiceSweep):
        choices = tuple(override.sweep_iterator())
        if len(set(map(repr, choices))) != len(choices):
            raise ConfigError(f"'{text}': a choice is listed twice")
        for choice in choices:
            if not isinstance(choice, str | int | float | bool) and choice is not None:
                raise ConfigError(f"'{text}': choices must be plain values, got {choice!r}")
        return Param(key, "categorical", choices=choices, text=text)
    raise ConfigError(f"'{text}' is not a search space; use {GRAMMAR}")


def _override_value(value: Any) -> str:
    """A sampled value as Hydra override text that reads back as the same value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    keyword = text.lower() in ("true", "false", "null", "nan", "inf")
    plain = re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", text) and not keyword
    return text if plain else sweep._quoted(text)


def _parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides=list(overrides))
    except OverrideParseException as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{first}. A search space looks like {GRAMMAR}") from None


# ------------------------------------------------------------------------------------------ the spec


@dataclass
class Spec:
    """A tuning protocol, checked: what ``poolbench tune`` will do, before anything is written."""

    name: str
    treatment_key: str
    treatments: list[str]
    params: list[Param]
    applies: dict[str, list[str]]  # treatment -> keys of the space that exist in its config
    fixed: list[str]  # every run's overrides besides the treatment, the space, the seed and the folders
    trials: int
    sampler: str
    sampler_seed: int
    tuning_seed: int
    final_seeds: list[int]
    metrics: dict[str, str]  # treatment -> selection metric
    results_dir: Path
    storage: str | None  # None: SQLite in the tune folder
    fingerprint: str = ""

    @property
    def folder(self) -> Path:
        return self.results_dir / TUNE_DIR / self.name

    @property
    def trials_dir(self) -> Path:
        return self.folder / TRIALS

    @property
    def final_dir(self) -> Path:
        return self.folder / FINAL

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.folder / STUDY_DB).resolve()}"

    def study_name(self, treatment: str) -> str:
        return f"{self.name}.{treatment}"

    def treatment_override(self, treatment: str) -> str:
        return f"{self.treatment_key}={_override_value(treatment)}"

    def space_of(self, treatment: str) -> list[Param]:
        return [p for p in self.params if p.key in self.applies[treatment]]

    def protocol(self) -> dict[str, Any]:
        """What ``protocol.json`` states (and what a resumed or second worker must agree with)."""
        return {
            "format": FORMAT,
            "name": self.name,
            "treatment_key": self.treatment_key,
            "treatments": self.treatments,
            "space": [{**p.describe(), "treatments": [t for t in self.treatments if p.key in self.applies[t]]}
                      for p in self.params],
            "fixed_overrides": self.fixed,
            "sampler": sampler_description(self.sampler, self.sampler_seed),
            "trials_per_treatment": self.trials,
            "pruning": "none",
            "selection": {
                "metric": self.metrics,
                "split": "validation",
                "direction": "maximize",
                "best": "highest value among the completed trials; ties go to the lower trial number",
            },
            "tuning_seed": self.tuning_seed,
            "final_seeds": self.final_seeds,
            "storage": mask_url(self.storage_url) if self.storage else f"sqlite:///{STUDY_DB} (in this folder)",
            "studies": {t: self.study_name(t) for t in self.treatments},
            "folders": {"trials": TRIALS, "final": FINAL},
            "sweep_names": {"trials": f"tune.{self.name}.trials", "final": f"tune.{self.name}.final"},
            "fingerprint": self.fingerprint,
        }


def sampler_description(kind: str, seed: int) -> dict[str, Any]:
    if kind == "tpe":
        return {
            "name": "tpe",
            "class": "optuna.samplers.TPESampler (optuna's defaults: 10 random startup trials, independent)",
            "seed": seed,
            "seeding": "trial k of every study samples with seed SeedSequence([seed, k]), so a resumed "
            "study and every treatment draw the same startup points",
        }
    return {
        "name": "qmc",
        "class": "optuna.samplers.QMCSampler (scrambled Sobol; the first trial is random and fixes the space)",
        "seed": seed,
    }


def mask_url(url: str) -> str:
    """A storage URL without its password (the protocol and messages are shared)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001  (not a URL at all: show nothing of it that could be a secret)
        return re.sub(r"//[^@/]*@", "//***@", url)


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def plan(
    overrides: Sequence[str],
    *,
    treatment: str = TREATMENT,
    trials: int = 16,
    seeds: int = 5,
    sampler: str = "tpe",
    sampler_seed: int = 0,
    name: str | None = None,
    storage: str | None = None,
) -> Spec:
    """Parse and check a ``poolbench tune`` command: every config the studies can sample is composed
    and validated at its bounds (every choice of a categorical) before anything is written."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler '{sampler}'. Valid choices: {', '.join(SAMPLERS)}")
    if trials < 1:
        raise ConfigError(f"--trials must be >= 1, got {trials}")
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if sampler_seed < 0:
        raise ConfigError(f"--sampler-seed must be >= 0, got {sampler_seed}")
    if name is not None:
        sweep.check_name(name)
    overrides = list(overrides)
    config.reject_foreign(overrides)
    plugins.prepare(overrides)
    treatments: list[str] | None = None
    params: list[Param] = []
    fixed: list[str] = []
    tuning_seed = 0
    for override in _parse(overrides):
        key = override.key_or_group
        if key == "experiment" and override.is_sweep_override():
            raise ConfigError(f"'{override.input_line}': tune one experiment at a time")
        if key == treatment:
            if treatments is not None:
                raise ConfigError(f"the treatment axis {treatment} is given twice")
            if override.is_interval_sweep() or override.is_range_sweep():
                raise ConfigError(f"'{override.input_line}': the treatments are a list, e.g. {treatment}=avg,max")
            treatments = sweep._values(override) if override.is_sweep_override() else [str(override.value())]
            if len(set(treatments)) != len(treatments):
                raise ConfigError(f"'{override.input_line}': a treatment is listed twice")
        elif override.is_sweep_override():
            if key.startswith(NOT_TUNABLE) or override.is_add() or override.is_delete():
                why = "tune decides it" if key.startswith(("seed", VAL_SHARE_KEY)) else "it does not change a run"
                raise ConfigError(
                    f"'{override.input_line}': {key} cannot be tuned ({why}); the space takes existing keys"
                )
            if any(p.key == key for p in params):
                raise ConfigError(f"{key} appears twice in the search space")
            params.append(_param(override))
        elif key == "seed":
            tuning_seed = int(override.value())  # type: ignore[arg-type]
        else:
            fixed.append(override.input_line or "")
    if treatments is None:
        raise ConfigError(
            f"no treatments: give the values to compare, e.g. {treatment}=avg,max,gem,dgmp "
            "(--treatment picks another axis)"
        )
    if not params:
        raise ConfigError(f"empty search space: give at least one dimension, e.g. {GRAMMAR}")
    if tuning_seed < 0:
        raise ConfigError(f"seed must be >= 0, got {tuning_seed}")
    keys = {override_key(o) for o in fixed}
    if VAL_SHARE_KEY not in keys:
        fixed.append(f"{VAL_SHARE_KEY}={DEFAULT_VAL_SHARE}")  # tune always selects on a validation split
    bases: dict[str, Any] = {}
    for value in treatments:
        base = [*fixed, f"{treatment}={_override_value(value)}", f"seed={tuning_seed}"]
        try:
            bases[value] = config.compose(base)
        except ConfigError as exc:
            raise ConfigError(f"{treatment}={value}: {exc}") from None
    applies: dict[str, list[str]] = {}
    for value, cfg in bases.items():
        share = OmegaConf.select(cfg, VAL_SHARE_KEY, default=None)
        if share is not None and not share > 0:
            raise ConfigError(f"tune selects on a validation split: {VAL_SHARE_KEY} must be > 0, got {share}")
        applies[value] = [p.key for p in params if p.key in config.GROUPS or _exists(cfg, p.key)]
    for param in params:
        if not any(param.key in keys for keys in applies.values()):
            raise ConfigError(
                f"unknown config key '{param.key}' in the search space ('{param.text}'); "
                "`poolbench train --cfg` lists the keys"
            )
    _check_values(treatment, treatments, params, applies, fixed, tuning_seed)
    results_dir = Path(str(next(iter(bases.values())).results_dir))
    metrics = {t: SELECTION_METRIC[_task(cfg)] for t, cfg in bases.items()}
    spec = Spec(
        name=name or "",
        treatment_key=treatment,
        treatments=treatments,
        params=params,
        applies=applies,
        fixed=fixed,
        trials=trials,
        sampler=sampler,
        sampler_seed=sampler_seed,
        tuning_seed=tuning_seed,
        final_seeds=[tuning_seed + 1 + i for i in range(seeds)],
        metrics=metrics,
        results_dir=results_dir,
        storage=storage,
    )
    studies = spec.protocol()
    for volatile in ("name", "storage", "studies", "sweep_names", "fingerprint", "final_seeds"):
        studies.pop(volatile)
    if spec.name == "":
        spec.name = f"tune-{_fingerprint(studies)[:8]}"
    spec.fingerprint = _fingerprint({**studies, "name": spec.name})
    return spec


def _exists(cfg: Any, key: str) -> bool:
    sentinel = object()
    return OmegaConf.select(cfg, key, default=sentinel, throw_on_missing=False) is not sentinel


def _task(cfg: Any) -> str:
    return "retrieval" if cfg.dataset.get("task") == "retrieval" else "classification"


def _check_values(
    key: str, treatments: list[str], params: list[Param], applies: dict[str, list[str]], fixed: list[str], seed: int
) -> None:
    """Compose every treatment with each dimension at its bounds (each choice), so that no trial can
    meet a config error (``trainer.lr must be > 0``) after the studies started."""
    sets, labels = [], []
    for value in treatments:
        base = [*fixed, f"{key}={_override_value(value)}", f"seed={seed}"]
        for param in params:
            if param.key not in applies[value]:
                continue
            for candidate in param.values_to_check():
                sets.append([*base, f"{param.key}={_override_value(candidate)}"])
                labels.append(f"{key}={value}, {param.key}={_override_value(candidate)} (from '{param.text}')")
    composed = planner.iter_composed(sets)
    for label in labels:
        try:
            next(composed)
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from None
    composed.close()


# ------------------------------------------------------------------------------------------ storage


def open_storage(url: str) -> Any:
    """Optuna's RDB storage at ``url`` (any SQLAlchemy URL); one line when it does not answer."""
    import optuna
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise PoolbenchError(
            f"--storage {shown!r} is not a database URL (e.g. sqlite:///study.db, postgresql://user@host/db)"
        ) from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}  # several workers share the file: wait for its lock
        database = parsed.database
        if database and database != ":memory:" and not Path(database).parent.is_dir():
            raise PoolbenchError(f"storage {shown}: folder {Path(database).parent} does not exist")
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # a host that does not answer: fail in 10 s
        engine_kwargs["pool_pre_ping"] = True
        if parsed.drivername == "postgresql":  # psycopg 3 (a dependency), whichever SQLAlchemy defaults to
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except ImportError:  # optuna turns SQLAlchemy's missing driver into an ImportError
        hint = " (pip install 'psycopg[binary]')" if parsed.get_backend_name() == "postgresql" else ""
        raise PoolbenchError(
            f"storage {shown}: the {parsed.drivername} database driver is not installed{hint}"
        ) from None
    except Exception as exc:  # noqa: BLE001  (SQLAlchemy/driver errors: the server does not answer, bad database)
        first = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise PoolbenchError(f"storage {shown} does not answer: {first}") from None


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def trial_seed(sampler_seed: int, number: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([sampler_seed, number]).generate_state(1)[0])


def make_sampler(kind: str, seed: int, number: int | None = None) -> Any:
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed if number is None else trial_seed(seed, number))
    return optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False)


# ------------------------------------------------------------------------------------------ the protocol file


def read_protocol(folder: Path) -> dict[str, Any] | None:
    path = folder / PROTOCOL
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PoolbenchError(f"{path}: unreadable ({exc}); move the folder away or use another --name") from None
    if not isinstance(data, dict):
        raise PoolbenchError(f"{path}: not a poolbench tune protocol")
    return data


def check_resumable(spec: Spec) -> dict[str, Any] | None:
    """The folder's protocol when it is this tune's (a resume or a second worker); an error when another
    tune already used the name. Reads only."""
    existing = read_protocol(spec.folder)
    if existing is None:
        return None
    recorded_seeds = existing.get("final_seeds") or []
    # More --seeds extends the final stage (the tuning is untouched); fewer would drop finished final runs.
    more_seeds = spec.final_seeds[: len(recorded_seeds)] == recorded_seeds
    if existing.get("fingerprint") != spec.fingerprint or not more_seeds:
        mine = spec.protocol()
        differs = sorted(k for k in mine if k not in ("fingerprint", "storage") and existing.get(k) != mine[k])
        raise ConfigError(
            f"tune '{spec.name}' in {spec.folder} was started with another protocol "
            f"(differs in: {', '.join(differs) or 'its fingerprint'}); resume it with the same command, "
            "or choose another --name"
        )
    if existing.get("storage") != spec.protocol()["storage"]:
        raise ConfigError(
            f"tune '{spec.name}' keeps its studies in {existing.get('storage')}; give the same --storage to resume it"
        )
    return existing


def write_protocol(spec: Spec, results: dict[str, Any] | None = None) -> None:
    previous = read_protocol(spec.folder) or {}
    data = {**spec.protocol(), "created": previous.get("created", records.now())}
    data["results"] = results if results is not None else previous.get("results", {})
    files.atomic_write_json(spec.folder / PROTOCOL, data)


# ------------------------------------------------------------------------------------------ trials


@dataclass
class TrialRun:
    """A trial in flight: its study, number and optuna id, and the run it is."""

    treatment: str
    number: int
    trial_id: int
    run: sweep.PlannedRun
    handle: Any = None


@dataclass
class TuneState:
    """What the tuning stage did (per treatment), for the CLI's lines and protocol.json."""

    told: dict[str, int] = field(default_factory=dict)
    adopted: int = 0
    unfinished: list[str] = field(default_factory=list)


Log = Callable[[str], None]


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Tuner:
    """Drives one study per treatment until each holds ``trials`` finished trials."""

    def __init__(
        self,
        spec: Spec,
        *,
        jobs: int = 1,
        executor: str = "local",
        executor_params: dict[str, Any] | None = None,
        log: Log | None = None,
        stale_after_s: float = STALE_AFTER_S,
    ) -> None:
        self.spec = spec
        self.jobs = jobs
        self.executor = executor
        self.executor_params = executor_params or {}
        self.log = log or (lambda _: None)
        self.stale_after_s = stale_after_s
        self.storage: Any = None
        self.studies: dict[str, optuna.Study] = {}
        self.in_flight: dict[tuple[str, int], TrialRun] = {}
        self.waiting: dict[tuple[str, int], TrialRun] = {}  # their run is held by another process
        self.state = TuneState()
        self.given_up: set[tuple[str, int]] = set()  # released by this process after their run did not end
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ---- setup

    def open(self) -> None:
        """Storage, then the studies: loaded when they exist (their fingerprint checked), else created."""
        import optuna

        _quiet_optuna()
        spec = self.spec
        if spec.storage is not None:
            self.storage = open_storage(spec.storage)  # before anything is written: a URL that does not answer
        check_resumable(spec)
        records.check_writable(spec.results_dir)
        created_folder = not spec.folder.exists()
        spec.folder.mkdir(parents=True, exist_ok=True)
        try:
            if self.storage is None:
                self.storage = open_storage(spec.storage_url)
            existing = {s.study_name: s for s in optuna.get_all_study_summaries(self.storage, include_best_trial=False)}
            for treatment in spec.treatments:
                found = existing.get(spec.study_name(treatment))
                if found is not None and found.user_attrs.get("poolbench.fingerprint") != spec.fingerprint:
                    raise ConfigError(
                        f"study '{spec.study_name(treatment)}' in {mask_url(spec.storage_url)} belongs to another "
                        "tune (another protocol); choose another --name"
                    )
        except BaseException:
            if created_folder:
                import shutil

                shutil.rmtree(spec.folder, ignore_errors=True)
            raise
        for treatment in spec.treatments:
            study = optuna.create_study(
                storage=self.storage,
                study_name=spec.study_name(treatment),
                direction="maximize",
                sampler=make_sampler(spec.sampler, spec.sampler_seed),
                load_if_exists=True,
            )
            attrs = study.user_attrs
            if "poolbench.fingerprint" not in attrs:
                study.set_user_attr("poolbench.fingerprint", spec.fingerprint)
                study.set_user_attr("poolbench.treatment", treatment)
                study.set_user_attr("poolbench.trials", spec.trials)
                study.set_user_attr("poolbench.metric", spec.metrics[treatment])
            self.studies[treatment] = study
        write_protocol(spec)

    # ---- the run of a trial

    def _run_of(self, treatment: str, params: dict[str, Any]) -> sweep.PlannedRun:
        spec = self.spec
        swept = [f"{k}={_override_value(params[k])}" for k in sorted(params)]
        overrides = [
            *spec.fixed,
            spec.treatment_override(treatment),
            *swept,
            f"seed={spec.tuning_seed}",
            f"results_dir={sweep._quoted(str(spec.trials_dir.resolve()))}",
            f"sweep_name=tune.{spec.name}.trials",
        ]
        cfg = planner.compose_many([overrides])[0]  # the planner's fast path (checked at plan time)
        run_id = config.run_id(cfg)
        run_dir = spec.trials_dir.resolve() / run_id
        status, _ = sweep.run_status(run_dir)
        return sweep.PlannedRun(overrides, swept, run_id, run_dir, status)

    def _start(self, study: optuna.Study, treatment: str, trial: Any) -> TrialRun | None:
        """Sample (or reuse) the trial's parameters, map it to its run, and settle it at once when that
        run already finished; else return it to be executed."""
        spec = self.spec
        number = trial.number
        self.storage.set_trial_user_attr(trial._trial_id, "owner", _me())
        self.storage.set_trial_user_attr(trial._trial_id, "heartbeat", time.time())
        if spec.sampler == "tpe":
            study.sampler = make_sampler("tpe", spec.sampler_seed, number)
        params = {p.key: p.suggest(trial) for p in spec.space_of(treatment)}
        run = self._run_of(treatment, params)
        self.storage.set_trial_user_attr(trial._trial_id, "run_id", run.run_id)
        entry = TrialRun(treatment, number, trial._trial_id, run)
        if self._settle(entry):
            return None
        return entry

    def _settle(self, entry: TrialRun) -> bool:
        """Tell the study what the trial's run recorded, when it recorded an end; whether it did."""
        try:
            record = records.read_record(entry.run.run_dir)
        except ValueError:
            record = None
        if record is None or record.get("status") not in ("completed", "failed"):
            return False
        if record["status"] == "completed" and records.is_locked(entry.run.run_dir):
            return False  # completed, but an overwrite may be replacing it: wait
        self._tell(entry, record)
        return True

    def _tell(self, entry: TrialRun, record: dict[str, Any] | None, error: str | None = None) -> None:
        from optuna.trial import TrialState

        study = self.studies[entry.treatment]
        metric = self.spec.metrics[entry.treatment]
        value = record.get(metric) if record and record.get("status") == "completed" else None
        if value is not None and not (isinstance(value, int | float) and math.isfinite(value)):
            value = None
        if value is None:
            reason = error or (record or {}).get("error") or (
                f"the record has no {metric} (no validation split?)" if record else "the run left no record"
            )
            self.storage.set_trial_user_attr(entry.trial_id, "error", str(reason)[:500])
            study.tell(entry.number, state=TrialState.FAIL, skip_if_finished=True)
            self.log(f"{entry.treatment} trial {entry.number}: failed ({reason}) [{entry.run.run_id}]")
        else:
            self.storage.set_trial_user_attr(entry.trial_id, "metric", metric)
            study.tell(entry.number, float(value), skip_if_finished=True)
            self.log(
                f"{entry.treatment} trial {entry.number}: {metric} {value:.4f}  {' '.join(entry.run.swept)}  "
                f"[{entry.run.run_id}]"
            )
        self.state.told[entry.treatment] = self.state.told.get(entry.treatment, 0) + 1

    # ---- asking, adopting

    def _ask(self, treatment: str) -> TrialRun | None | bool:
        """A new trial of ``treatment`` (its entry, or None when it settled at once); False when its budget is spent."""
        from optuna.trial import TrialState

        study = self.studies[treatment]
        if len(study.get_trials(deepcopy=False)) >= self.spec.trials:
            return False
        trial = study.ask()
        if trial.number >= self.spec.trials:  # another worker asked at the same moment: not part of the budget
            self.storage.set_trial_user_attr(trial._trial_id, "over_budget", True)
            study.tell(trial, state=TrialState.FAIL)
            return False
        return self._start(study, treatment, trial)

    def _orphans(self, treatment: str) -> list[Any]:
        """RUNNING trials of the budget that nobody works on any more."""
        from optuna.trial import TrialState

        study = self.studies[treatment]
        now = time.time()
        host, me = socket.gethostname(), os.getpid()
        found = []
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if frozen.number >= self.spec.trials or (treatment, frozen.number) in self.in_flight:
                continue
            if (treatment, frozen.number) in self.waiting or (treatment, frozen.number) in self.given_up:
                continue
            attrs = frozen.user_attrs
            run_id = attrs.get("run_id")
            if run_id and records.is_locked(self.spec.trials_dir.resolve() / str(run_id)):
                continue  # its run is training right now
            owner = str(attrs.get("owner") or "")
            beat = float(attrs.get("heartbeat") or (frozen.datetime_start.timestamp() if frozen.datetime_start else 0))
            owner_host, _, pid = owner.rpartition(":")
            if not owner:
                gone = now - beat > 60  # asked but never claimed (killed right after asking), or released
            elif owner_host == host and pid.isdigit():
                gone = int(pid) == me or not _pid_alive(int(pid))
            else:
                gone = now - beat > self.stale_after_s
            if gone:
                found.append(frozen)
        return found

    def _adopt(self, treatment: str, frozen: Any) -> TrialRun | None:
        """Take over a RUNNING trial left by a dead worker: the same trial number and parameters."""
        import optuna

        study = self.studies[treatment]
        self.state.adopted += 1
        self.log(f"{treatment} trial {frozen.number}: taken over from {frozen.user_attrs.get('owner') or 'nobody'}")
        return self._start(study, treatment, optuna.trial.Trial(study, frozen._trial_id))

    # ---- the loop

    def run(self) -> TuneState:
        pool = self._pool()
        beat = threading.Thread(target=self._heartbeats, daemon=True)
        beat.start()
        treatments = list(self.spec.treatments)
        spent: set[str] = set()
        turn = 0
        last_orphan_check = 0.0
        try:
            while True:
                # Completed ones first: they free slots.
                pool.poll()
                for key, entry in list(self.in_flight.items()):
                    outcome = pool.finished(entry.handle, entry.run)
                    if outcome is None:
                        continue
                    with self._lock:
                        del self.in_flight[key]
                    self._finish(entry, outcome)
                for key, entry in list(self.waiting.items()):
                    if self._settle(entry):
                        del self.waiting[key]
                    elif not records.is_locked(entry.run.run_dir):  # its holder stopped without an end
                        del self.waiting[key]
                        self._submit(pool, entry)
                # Adopt what dead workers left, at start and then now and then.
                if time.monotonic() - last_orphan_check > 10 or last_orphan_check == 0.0:
                    last_orphan_check = time.monotonic()
                    for treatment in treatments:
                        for frozen in self._orphans(treatment):
                            if len(self.in_flight) >= self.jobs:
                                break
                            entry = self._adopt(treatment, frozen)
                            if entry is not None:
                                self._submit(pool, entry)
                # New trials, round robin over the treatments, so budgets grow alike.
                while len(self.in_flight) < self.jobs and len(spent) < len(treatments):
                    treatment = treatments[turn % len(treatments)]
                    turn += 1
                    if treatment in spent:
                        continue
                    entry = self._ask(treatment)
                    if entry is False:
                        spent.add(treatment)
                    elif entry is not None:
                        self._submit(pool, entry)
                idle = not self.in_flight and not self.waiting and len(spent) == len(treatments)
                if idle and not self._running_elsewhere():
                    break
                time.sleep(pool.poll_s if (self.in_flight or self.waiting) else 2.0)
        except KeyboardInterrupt:
            pool.interrupt([e.run for e in self.in_flight.values()])
            self._release(list(self.in_flight.values()))
            raise
        finally:
            self._stop.set()
            pool.close()
        return self.state

    def _running_elsewhere(self) -> bool:
        """Whether some trial of the budget is still RUNNING (another live worker has it)."""
        from optuna.trial import TrialState

        return any(
            t.number < self.spec.trials and (treatment, t.number) not in self.given_up
            for treatment, study in self.studies.items()
            for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        )

    def _submit(self, pool: Any, entry: TrialRun) -> None:
        if entry.run.status == "elsewhere":
            self.waiting[(entry.treatment, entry.number)] = entry
            return
        with self._lock:
            self.in_flight[(entry.treatment, entry.number)] = entry
        entry.handle = pool.submit([(len(self.in_flight) - 1, entry.run)])[0]

    def _finish(self, entry: TrialRun, outcome: sweep.Outcome) -> None:
        if outcome.status == "elsewhere":
            self.waiting[(entry.treatment, entry.number)] = entry
            return
        if self._settle(entry):
            return
        # No end in the record: the worker died or the job vanished. The trial stays RUNNING, released,
        # and the next `tune` (or another worker) takes it over and resumes its run.
        self._release([entry])
        self.given_up.add((entry.treatment, entry.number))
        self.state.unfinished.append(f"{entry.treatment} trial {entry.number} ({entry.run.run_id}): {outcome.error}")
        self.log(f"{entry.treatment} trial {entry.number}: did not finish ({outcome.error}); re-run tune to resume it")

    def _release(self, entries: list[TrialRun]) -> None:
        for entry in entries:
            with contextlib.suppress(Exception):
                self.storage.set_trial_user_attr(entry.trial_id, "owner", "")
                self.storage.set_trial_user_attr(entry.trial_id, "heartbeat", 0.0)

    def _heartbeats(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                entries = list(self.in_flight.values())
            for entry in entries:
                with contextlib.suppress(Exception):
                    self.storage.set_trial_user_attr(entry.trial_id, "heartbeat", time.time())

    def _pool(self) -> Any:
        if self.executor == "local" and self.jobs == 1:
            return _InlinePool()
        params = {"name": f"tune.{self.spec.name}"[:100], **self.executor_params}
        return executors.pool_for(self.executor, self.jobs, self.spec.folder / ".submitit", params)

    # ---- results

    def results(self) -> dict[str, Any]:
        """Per treatment: finished/complete/failed trials of the budget and the best configuration."""
        from optuna.trial import TrialState

        out: dict[str, Any] = {}
        for treatment, study in self.studies.items():
            trials = [t for t in study.get_trials(deepcopy=False) if t.number < self.spec.trials]
            complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
            failed = [t for t in trials if t.state == TrialState.FAIL]
            entry: dict[str, Any] = {
                "budget": self.spec.trials,
                "finished": len(complete) + len(failed),
                "complete": len(complete),
                "failed": len(failed),
                "running": sum(t.state == TrialState.RUNNING for t in trials),
                "metric": self.spec.metrics[treatment],
                "trials": [
                    {
                        "number": t.number,
                        "state": t.state.name,
                        "value": t.value,
                        "params": t.params,
                        "run_id": t.user_attrs.get("run_id"),
                        **({"error": t.user_attrs["error"]} if "error" in t.user_attrs else {}),
                    }
                    for t in sorted(trials, key=lambda t: t.number)
                ],
            }
            if complete:
                best = max(complete, key=lambda t: (t.value, -t.number))
                entry["best"] = {
                    "trial": best.number,
                    "value": best.value,
                    "params": {k: best.params[k] for k in sorted(best.params)},
                    "run_id": best.user_attrs.get("run_id"),
                }
            out[treatment] = entry
        return out


class _InlinePool(executors.Pool):
    """``--jobs 1`` on this machine: the run executes in this process when submitted."""

    window, poll_s = 1, 0.0

    def submit(self, batch: list[tuple[int, sweep.PlannedRun]]) -> list[Any]:
        from poolbench.executors import job_overrides, run_one

        return [run_one(job_overrides(run, None, None)) for _, run in batch]

    def finished(self, handle: Any, run: sweep.PlannedRun) -> sweep.Outcome | None:
        return handle


# ------------------------------------------------------------------------------------------ final stage


def final_plan(spec: Spec, results: dict[str, Any]) -> list[sweep.PlannedRun]:
    """Each treatment's best configuration with the final seeds, as an ordinary sweep plan."""
    planned: list[sweep.PlannedRun] = []
    for treatment in spec.treatments:
        best = results.get(treatment, {}).get("best")
        if best is None:
            continue
        grid = [
            *spec.fixed,
            spec.treatment_override(treatment),
            *(f"{k}={_override_value(v)}" for k, v in sorted(best["params"].items())),
            f"seed={','.join(map(str, spec.final_seeds))}",
            f"results_dir={sweep._quoted(str(spec.final_dir.resolve()))}",
        ]
        planned += sweep.plan(grid, name=f"tune.{spec.name}.final")
    return planned


def final_run_ids(planned: list[sweep.PlannedRun], spec: Spec) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {t: [] for t in spec.treatments}
    prefix = {t: spec.treatment_override(t) for t in spec.treatments}
    for run in planned:
        for treatment, override in prefix.items():
            if override in run.overrides:
                out[treatment].append(run.run_id)
                break
    return out
