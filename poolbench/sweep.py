"""Resumable grids of training runs, executed in-process, in a local process pool, or through submitit.

A sweep is a list of ordinary ``train`` runs. Each one is identified by the hash of its resolved
config (:func:`poolbench.config.run_id`), so a sweep can be re-run at any time: completed runs are
skipped, unfinished ones resume from their checkpoint, failed ones are retried, and runs that
another live process holds the lock of are left to it. Nothing here schedules jobs: a process pool
runs them on this machine, submitit runs them on SLURM (or on this machine with its local executor).
This module plans (grid, expansion, plan) and drives a sweep; the executors are :mod:`poolbench.executors`.

Grid syntax is Hydra's: ``pooling=avg,max,dgmp``, ``seed=range(0,3)``, ``model=glob(resnet*)``.
An experiment preset may hold a ``grid:`` mapping of override key to sweep string; command-line
overrides of the same keys replace the preset's.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from poolbench import planner, plugins, records
from poolbench.config import compose, group_options
from poolbench.errors import ConfigError, PoolbenchError

# What executes the runs; Outcome, run_one, mark_interrupted and default_threads are part of this module's API too.
from poolbench.executors import (  # noqa: F401
    Outcome,
    Pool,
    default_threads,
    job_overrides,
    mark_interrupted,
    pool_for,
    run_one,
)
from poolbench.grammar import override_key

# Plan status of a run → what the sweep does with it.
ACTIONS = {
    "new": "run",
    "completed": "skip",
    "unfinished": "resume",
    "stale": "resume (its record says running, but no live process holds its lock: it died)",
    "failed": "retry",
    "elsewhere": "leave (running elsewhere)",
    "overwrite": "train again (trainer.overwrite=true)",
}
TO_RUN = ("new", "unfinished", "stale", "failed", "overwrite")
EXECUTORS = ("local", "submitit", "slurm")
# Names that become path components or job names: no separators, no leading dot, no markup.
SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")


@dataclass
class PlannedRun:
    overrides: list[str]  # everything needed to compose this run's config
    swept: list[str]  # the grid values that distinguish it from its siblings
    run_id: str
    run_dir: Path
    status: str  # a key of ACTIONS
    wall_time_s: float | None = None  # of the completed record, for the ETA

    @property
    def action(self) -> str:
        return ACTIONS[self.status]


# ------------------------------------------------------------------------------------------ the grid


def _parse(overrides: Sequence[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(overrides=list(overrides))
    except OverrideParseException as exc:
        first = str(exc).splitlines()[0]
        raise ConfigError(f"{first}. Sweeps look like key=a,b,c or key=range(0,3) or group=glob(*)") from None


def preset_grid(experiment: str) -> dict[str, Any]:
    """The ``grid:`` of an experiment preset: ``{override key: sweep string or list of override sets}``."""
    cfg = compose([f"experiment={experiment}"], validate=False)
    grid = cfg.get("grid")
    if grid is None:
        return {}
    entries = OmegaConf.to_container(grid, resolve=False)
    if not isinstance(entries, dict):
        raise ConfigError(f"experiment={experiment}: `grid` must map override keys to sweeps, e.g. pooling: avg,max")
    return {str(k): v for k, v in entries.items()}


def _preset_axis(key: str, value: Any) -> list[list[str]] | str:
    """A list whose items hold ``=`` is an axis of override sets (``"pooling=dgmp pooling.lam=5000"``),
    for per-operator settings a product grid cannot express; anything else is a sweep string."""
    if isinstance(value, list) and any("=" in str(item) for item in value):
        bundles = [shlex.split(str(item)) for item in value]
        for override in _parse([o for bundle in bundles for o in bundle]):
            if override.is_sweep_override():
                raise ConfigError(f"grid.{key}: '{override.input_line}' is a sweep inside an override set")
        return bundles
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _values(override: Override) -> list[str]:
    key = override.key_or_group
    if override.is_interval_sweep():
        raise ConfigError(f"'{override.input_line}': interval sweeps need an optimiser; a grid takes a,b,c or range()")
    value = override.value()
    if isinstance(value, Glob):
        if not group_options(key):
            raise ConfigError(f"'{override.input_line}': glob() selects options of a config group; {key} is none")
        matched = value.filter(group_options(key))
        if not matched:
            raise ConfigError(f"'{override.input_line}' matches no option; options: {', '.join(group_options(key))}")
        return matched
    return list(override.sweep_string_iterator())


def expand(overrides: Sequence[str]) -> list[tuple[list[str], list[str]]]:
    """Every combination of the sweep as ``(all overrides, swept overrides)``, in Hydra's product order.

    ``experiment=a,b`` expands each preset's own grid; the command line replaces a preset's grid keys.
    """
    plugins.prepare(overrides)  # a plugin's operators are options that glob(*) must see
    parsed = _parse(overrides)
    experiments: list[str | None] = [None]
    rest = []
    for override in parsed:
        if override.key_or_group == "experiment":
            experiments = _values(override) if override.is_sweep_override() else [str(override.value())]
        else:
            rest.append(override)
    cli_keys = {o.key_or_group for o in rest}
    combinations = []
    for experiment in experiments:
        fixed = [f"experiment={experiment}"] if experiment else []
        axes: list[list[list[str]]] = []
        parsed: list[Override | list[list[str]]] = list(rest)
        for key, value in reversed((preset_grid(experiment) if experiment else {}).items()):
            if override_key(key) in cli_keys:  # the command line wins
                continue
            axis = _preset_axis(key, value)
            parsed.insert(0, axis if isinstance(axis, list) else _parse([f"{key}={axis}"])[0])
        for override in parsed:
            if isinstance(override, list):
                axes.append(override)
            elif override.is_sweep_override():
                axes.append([[f"{override.get_key_element()}={v}"] for v in _values(override)])
            else:
                fixed.append(override.input_line or "")
        for combination in itertools.product(*axes):
            swept = [o for bundle in combination for o in bundle]
            combinations.append((fixed + swept, swept))
    return combinations


# ------------------------------------------------------------------------------------------ the plan


def run_status(run_dir: Path, overwrite: bool = False) -> tuple[str, float | None]:
    """Plan status of a run directory and, when completed, its wall time."""
    try:
        record = records.read_record(run_dir)
    except (ValueError, OSError):  # corrupt, not a regular file, or a folder we may not enter
        record = {"status": "corrupt"}
    if record is not None and record["status"] == "completed":
        return ("overwrite" if overwrite else "completed"), record.get("wall_time_s")
    if records.is_locked(run_dir):  # the lock lives beside the run dir, which may not exist yet
        return "elsewhere", None
    if not run_dir.is_dir():
        return "new", None
    if record is None:
        return ("unfinished" if (run_dir / records.CHECKPOINT).is_file() else "new"), None
    if record["status"] == "running":  # not locked (checked above): the process that wrote it is dead
        return "stale", None
    return ("failed" if record["status"] == "failed" else "unfinished"), None


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def check_name(name: str) -> str:
    """A sweep name is recorded and names SLURM jobs: plain characters only, so it can never act as a path."""
    if not SAFE_NAME.fullmatch(name):
        raise ConfigError(
            f"sweep name {name!r} is not allowed: use 1-100 letters, digits, '.', '_' or '-' (not starting with '.')"
        )
    return name


def _listing(results_dir: Path) -> set[str]:
    """Names in a results folder (empty when it does not exist yet); one line when it cannot be read."""
    try:
        return set(os.listdir(results_dir))
    except (FileNotFoundError, NotADirectoryError):
        if os.path.lexists(results_dir) and not results_dir.is_dir():
            raise ConfigError(f"results_dir {results_dir} is a file, not a folder") from None
        return set()
    except OSError as exc:
        raise ConfigError(
            f"results_dir {results_dir} cannot be read ({exc.strerror or exc}); choose another with results_dir=..."
        ) from None


def plan(overrides: Sequence[str], *, name: str | None = None) -> list[PlannedRun]:
    """Compose every run of the grid (so a bad override fails before anything starts) and check its state.

    Runs that resolve to the same config (same run id) are planned once. A run's status costs one
    listing of its results folder plus a record read for the runs that exist.
    """
    if name is not None:
        check_name(name)
    combinations = expand(overrides)
    planned: dict[str, PlannedRun] = {}
    listings: dict[Path, set[str]] = {}
    configs = planner.iter_identified([full for full, _ in combinations])
    for full, swept in combinations:
        try:
            cfg, identifier = next(configs)  # cfg: the run's resolved values
        except ConfigError as exc:
            raise ConfigError(f"{' '.join(swept)}: {exc}" if swept else str(exc)) from None
        if identifier in planned:
            continue
        results_dir = Path(cfg["results_dir"]).resolve()  # one syscall per path component: cheap
        if results_dir not in listings:
            listings[results_dir] = _listing(results_dir)
        run_dir = results_dir / identifier  # run ids are plain folder names (config.run_id)
        # Absolute, so that jobs started from another working directory (submitit, SLURM) write the same place.
        extra = [f"results_dir={_quoted(str(results_dir))}"]
        if name is not None and cfg.get("sweep_name") is None:
            extra.append(f"sweep_name={_quoted(name)}")
        overwrite = bool(cfg["trainer"]["overwrite"])
        listed = listings[results_dir]
        known = identifier in listed or records.lock_path(run_dir).name in listed  # one listdir, not 10,000 stats
        status, wall_time = run_status(run_dir, overwrite) if known else ("new", None)
        kept = [o for o in full if override_key(o) != "results_dir"]
        planned[identifier] = PlannedRun(kept + extra, swept, identifier, run_dir, status, wall_time)
    configs.close()
    return list(planned.values())


# ------------------------------------------------------------------------------------------ the sweep


@dataclass
class SweepState:
    """Counts for the live view and the final summary."""

    plan: list[PlannedRun]
    parallel: int = 1
    done: list[Outcome] = field(default_factory=list)
    failed: list[Outcome] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    running: dict[str, float] = field(default_factory=dict)  # run id → start (monotonic)
    tasks: dict[str, str] = field(default_factory=dict)  # run id → its scheduler state (SLURM arrays)
    started: float = field(default_factory=time.monotonic)
    stopped: bool = False  # --fail-fast tripped

    def __post_init__(self) -> None:
        self.skipped = sum(p.status == "completed" for p in self.plan)
        self.elsewhere = [p.run_id for p in self.plan if p.status == "elsewhere"]
        self.left = sum(p.status in TO_RUN for p in self.plan)
        self._prior = [p.wall_time_s for p in self.plan if p.wall_time_s]

    def start(self, run: PlannedRun) -> None:
        self.left -= 1
        self.running[run.run_id] = time.monotonic()

    def finish(self, outcome: Outcome) -> None:
        self.running.pop(outcome.run_id, None)
        if outcome.status == "completed":
            self.done.append(outcome)
        elif outcome.status == "reused":  # another sweep completed it meanwhile
            self.skipped += 1
        elif outcome.status == "elsewhere":
            self.elsewhere.append(outcome.run_id)
        else:
            self.failed.append(outcome)

    def eta_s(self) -> float | None:
        """Remaining work at the mean wall time of finished runs, spread over the parallel slots."""
        times = [o.wall_time_s for o in self.done if o.wall_time_s] or self._prior
        if not times:
            return None
        mean = sum(times) / len(times)
        now = time.monotonic()
        remaining = self.left * mean + sum(max(0.0, mean - (now - t)) for t in self.running.values())
        slots = max(self.parallel, len(self.running))  # on SLURM more may run than --jobs
        return remaining / max(1, min(slots, self.left + len(self.running)))


def run_sweep(
    planned: list[PlannedRun],
    *,
    jobs: int = 1,
    executor: str = "local",
    fail_fast: bool = False,
    executor_params: dict[str, Any] | None = None,
    on_change: Callable[[SweepState], None] | None = None,
) -> SweepState:
    """Execute the runs the plan marks to run; returns the final state (failures included, never raised).

    ``executor``: ``local`` (in this process when ``jobs == 1``, else a spawn process pool),
    ``submitit`` (submitit's AutoExecutor: SLURM when available, else its local executor) or
    ``slurm``. On SLURM the runs are one job array with ``jobs`` tasks at most running at once.
    ``executor_params`` go to submitit's ``update_parameters`` (timeout_min, gpus_per_node,
    slurm_partition, ...). An interruption (KeyboardInterrupt, :class:`Terminated`) stops this
    machine's workers, marks their runs interrupted and propagates; a SLURM array keeps running.
    """
    if executor not in EXECUTORS:
        raise PoolbenchError(f"unknown executor '{executor}'. Valid choices: {', '.join(EXECUTORS)}")
    if jobs < 1:
        raise PoolbenchError(f"--jobs must be >= 1, got {jobs}")
    state = SweepState(planned, parallel=jobs)
    todo = [p for p in planned if p.status in TO_RUN]
    notify = on_change or (lambda _: None)
    notify(state)
    if not todo:
        return state
    if executor == "local" and jobs == 1:
        for run in todo:
            if state.stopped:
                break
            state.start(run)
            notify(state)
            _count_outcome(state, run_one(job_overrides(run, None, None)), fail_fast)
            notify(state)
        return state
    pool = pool_for(executor, jobs, planned[0].run_dir.parent / ".submitit", executor_params or {})
    try:
        _drive(state, todo, pool, fail_fast, notify)
    except KeyboardInterrupt:
        pool.interrupt([p for p in todo if p.run_id in state.running])
        raise
    finally:
        pool.close()
    return state


def _count_outcome(state: SweepState, outcome: Outcome, fail_fast: bool) -> None:
    state.finish(outcome)
    if outcome.status == "failed" and fail_fast:
        state.stopped = True


def _drive(
    state: SweepState, todo: list[PlannedRun], pool: Pool, fail_fast: bool, notify: Callable[[SweepState], None]
) -> None:
    queue = list(todo)
    in_flight: dict[int, tuple[Any, PlannedRun]] = {}  # slot → (handle, run)
    while queue or in_flight:
        free = [s for s in range(min(pool.window, len(todo))) if s not in in_flight]
        batch = []
        while queue and free and not state.stopped:
            batch.append((free.pop(0), queue.pop(0)))
        if batch:
            for (slot, run), handle in zip(batch, pool.submit(batch), strict=True):
                in_flight[slot] = (handle, run)
                state.start(run)
            notify(state)
        tasks = pool.poll()
        changed = tasks != state.tasks
        state.tasks = tasks
        for slot, (handle, run) in list(in_flight.items()):
            outcome = pool.finished(handle, run)
            if outcome is not None:
                del in_flight[slot]
                state.tasks.pop(run.run_id, None)
                _count_outcome(state, outcome, fail_fast)
                changed = True
        if state.stopped and queue:  # --fail-fast: let started runs finish, start no more
            queue.clear()
            pool.cancel_pending([h for h, _ in in_flight.values()])
        if changed:
            notify(state)
        else:
            time.sleep(pool.poll_s)
