"""Resumable grids of training runs, executed in-process, in a local process pool, or through submitit.

A sweep is a list of ordinary ``train`` runs. Each one is identified by the hash of its resolved
config (:func:`poolbench.config.run_id`), so a sweep can be re-run at any time: completed runs are
skipped, unfinished ones resume from their checkpoint, failed ones are retried, and runs that
another live process holds the lock of are left to it. Nothing here schedules jobs: a process pool
runs them on this machine, submitit runs them on SLURM (or on this machine with its local executor).

Grid syntax is Hydra's: ``pooling=avg,max,dgmp``, ``seed=range(0,3)``, ``model=glob(resnet*)``.
An experiment preset may hold a ``grid:`` mapping of override key to sweep string; command-line
overrides of the same keys replace the preset's.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import os
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

from poolbench import records
from poolbench.config import compose, group_options, run_id
from poolbench.errors import ConfigError, PoolbenchError

# Plan status of a run → what the sweep does with it.
ACTIONS = {
    "new": "run",
    "completed": "skip",
    "unfinished": "resume",
    "failed": "retry",
    "elsewhere": "leave (running elsewhere)",
    "overwrite": "train again (trainer.overwrite=true)",
}
TO_RUN = ("new", "unfinished", "failed", "overwrite")
EXECUTORS = ("local", "submitit", "slurm")


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


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | reused | failed | elsewhere
    wall_time_s: float | None = None
    error: str | None = None


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
            if key.lstrip("+~") in cli_keys:  # the command line wins
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
    except ValueError:
        record = {"status": "corrupt"}
    if record is not None and record["status"] == "completed":
        return ("overwrite" if overwrite else "completed"), record.get("wall_time_s")
    if not run_dir.is_dir():
        return "new", None
    if records.is_locked(run_dir):
        return "elsewhere", None
    if record is None:
        return ("unfinished" if (run_dir / "checkpoint.pt").is_file() else "new"), None
    return ("failed" if record["status"] == "failed" else "unfinished"), None


def _quoted(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def plan(overrides: Sequence[str], *, name: str | None = None) -> list[PlannedRun]:
    """Compose every run of the grid (so a bad override fails before anything starts) and check its state.

    Runs that resolve to the same config (same run id) are planned once.
    """
    planned: dict[str, PlannedRun] = {}
    for full, swept in expand(overrides):
        try:
            cfg = compose(full)
        except ConfigError as exc:
            raise ConfigError(f"{' '.join(swept)}: {exc}" if swept else str(exc)) from None
        identifier = run_id(cfg)
        if identifier in planned:
            continue
        results_dir = Path(cfg.results_dir).resolve()
        # Absolute, so that jobs started from another working directory (submitit, SLURM) write the same place.
        extra = [f"results_dir={_quoted(str(results_dir))}"]
        if name is not None and cfg.get("sweep_name") is None:
            extra.append(f"sweep_name={_quoted(name)}")
        status, wall_time = run_status(results_dir / identifier, overwrite=bool(cfg.trainer.overwrite))
        kept = [o for o in full if o.lstrip("+").split("=", 1)[0] != "results_dir"]
        planned[identifier] = PlannedRun(kept + extra, swept, identifier, results_dir / identifier, status, wall_time)
    return list(planned.values())


# ------------------------------------------------------------------------------------------ one run


def run_one(overrides: list[str]) -> Outcome:
    """Compose and execute one run; never raises for a failed run (its record says why)."""
    from poolbench import run as run_module

    cfg = compose(overrides)
    identifier = run_id(cfg)
    try:
        record = run_module.execute(cfg)
    except records.RunLockedError as exc:
        return Outcome(identifier, "elsewhere", error=str(exc))
    except Exception as exc:
        return Outcome(identifier, "failed", error=f"{type(exc).__name__}: {exc}")
    status = "reused" if record.get("reused") else str(record["status"])
    return Outcome(identifier, status, record.get("wall_time_s"), record.get("error"))


def _submitit_job() -> Callable[[list[str]], Outcome]:
    import submitit

    class RunJob(submitit.helpers.Checkpointable):
        """On SLURM preemption or timeout submitit requeues the job, which then resumes from its checkpoint."""

        def __call__(self, overrides: list[str]) -> Outcome:
            return run_one(overrides)

    return RunJob()


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


def default_threads(jobs: int) -> int:
    """torch threads per job so that ``jobs`` parallel runs share this machine's cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // jobs)


def _job_overrides(run: PlannedRun, threads: int | None, device: str | None) -> list[str]:
    extra = [] if run.status == "failed" else ["trainer.resume=true"]  # a failed run starts over
    keys = {o.lstrip("+~").split("=", 1)[0] for o in run.overrides}
    if threads is not None and "trainer.num_threads" not in keys:
        extra.append(f"trainer.num_threads={threads}")
    if device is not None and "device" not in keys:
        extra.append(f"device={device}")
    return [*run.overrides, *extra]


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
    ``slurm``. ``executor_params`` go to submitit's ``update_parameters`` (timeout_min,
    gpus_per_node, slurm_partition, ...).
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
            _record(state, run_one(_job_overrides(run, None, None)), fail_fast)
            notify(state)
        return state
    if executor == "local":
        pool: _Pool = _ProcessPool(jobs)
    else:
        pool = _SubmititPool(executor, jobs, planned[0].run_dir.parent / ".submitit", executor_params or {})
    try:
        _drive(state, todo, pool, fail_fast, notify)
    finally:
        pool.close()
    return state


def _record(state: SweepState, outcome: Outcome, fail_fast: bool) -> None:
    state.finish(outcome)
    if outcome.status == "failed" and fail_fast:
        state.stopped = True


class _Pool:
    """Submit runs, report the finished ones. ``window`` runs at most are in flight."""

    window: int
    poll_s: float

    def submit(self, run: PlannedRun, slot: int) -> Any: ...

    def finished(self, handle: Any, run: PlannedRun) -> Outcome | None: ...

    def cancel_pending(self, handles: Sequence[Any]) -> None:
        """Cancel submitted runs that have not started (only a cluster queue holds such runs)."""

    def close(self) -> None: ...


class _ProcessPool(_Pool):
    def __init__(self, jobs: int) -> None:
        self.window, self.poll_s = jobs, 0.2
        self.threads = default_threads(jobs)
        self.gpus = _cuda_devices()
        self._new_pool()

    def _new_pool(self) -> None:
        # spawn, not fork: torch's thread pools and CUDA do not survive a fork.
        context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(max_workers=self.window, mp_context=context)

    def submit(self, run: PlannedRun, slot: int) -> tuple[concurrent.futures.Future[Outcome], Any]:
        # One GPU per job when several are visible (device=auto would put every job on cuda:0).
        device = f"cuda:{self.gpus[slot % len(self.gpus)]}" if len(self.gpus) > 1 else None
        return self.pool.submit(run_one, _job_overrides(run, self.threads, device)), self.pool

    def finished(self, handle: tuple[concurrent.futures.Future[Outcome], Any], run: PlannedRun) -> Outcome | None:
        future, pool = handle
        if not future.done():
            return None
        try:
            return future.result()
        except concurrent.futures.process.BrokenProcessPool:
            # A worker died (killed, out of memory): every run in flight fails with it; their records say
            # "running" and resume next time. Later runs get a fresh pool.
            if pool is self.pool:
                self.pool.shutdown(wait=False, cancel_futures=True)
                self._new_pool()
            return Outcome(run.run_id, "failed", error="its worker process died (killed or out of memory?)")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _cuda_devices() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


class _SubmititPool(_Pool):
    def __init__(self, executor: str, jobs: int, folder: Path, params: dict[str, Any]) -> None:
        import submitit

        try:
            self.executor = submitit.AutoExecutor(
                folder=folder / "%j", cluster="slurm" if executor == "slurm" else None
            )
        except (RuntimeError, ValueError) as exc:
            raise PoolbenchError(f"submitit cannot use {executor}: {exc}") from None
        self.local = self.executor.cluster != "slurm"
        parameters = {"timeout_min": 240, "name": "poolbench", **params}
        if not self.local and jobs > 1:
            parameters["slurm_array_parallelism"] = jobs
        self.executor.update_parameters(**parameters)
        cpus = parameters.get("cpus_per_task")
        self.threads = int(cpus) if cpus else default_threads(jobs) if self.local else None
        # The local executor starts every job it is given at once: feed it `jobs` at a time.
        self.window = jobs if self.local else 10**9
        self.poll_s = 0.5 if self.local else 10.0
        self.job = _submitit_job()

    def submit(self, run: PlannedRun, slot: int) -> Any:
        return self.executor.submit(self.job, _job_overrides(run, self.threads, None))

    def finished(self, handle: Any, run: PlannedRun) -> Outcome | None:
        if not handle.done():
            return None
        try:
            return handle.result()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError: killed, timed out, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Outcome(run.run_id, "failed", error=f"job {handle.job_id}: {first} (log: {handle.paths.stderr})")

    def cancel_pending(self, handles: Sequence[Any]) -> None:
        for handle in handles:
            if not self.local and handle.state == "PENDING":
                handle.cancel(check=False)

    def close(self) -> None:
        return None


def _drive(
    state: SweepState, todo: list[PlannedRun], pool: _Pool, fail_fast: bool, notify: Callable[[SweepState], None]
) -> None:
    queue = list(todo)
    in_flight: dict[int, tuple[Any, PlannedRun]] = {}  # slot → (handle, run)
    while queue or in_flight:
        free = [s for s in range(min(pool.window, len(todo))) if s not in in_flight]
        while queue and free and not state.stopped:
            run = queue.pop(0)
            slot = free.pop(0)
            in_flight[slot] = (pool.submit(run, slot), run)
            state.start(run)
            notify(state)
        changed = False
        for slot, (handle, run) in list(in_flight.items()):
            outcome = pool.finished(handle, run)
            if outcome is not None:
                del in_flight[slot]
                _record(state, outcome, fail_fast)
                changed = True
        if state.stopped and queue:  # --fail-fast: let started runs finish, start no more
            queue.clear()
            pool.cancel_pending([h for h, _ in in_flight.values()])
        if changed:
            notify(state)
        else:
            time.sleep(pool.poll_s)
