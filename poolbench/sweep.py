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
import contextlib
import itertools
import logging
import multiprocessing
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob, Override
from hydra.errors import OverrideParseException
from omegaconf import OmegaConf

from poolbench import config, plugins, records
from poolbench.config import compose, group_options, run_id
from poolbench.errors import ConfigError, PoolbenchError

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
        raise ConfigError(f"results_dir {results_dir} cannot be read ({exc.strerror or exc}); "
                          "choose another with results_dir=...") from None


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
    configs = config.iter_identified([full for full, _ in combinations])
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
        kept = [o for o in full if o.lstrip("+").split("=", 1)[0] != "results_dir"]
        planned[identifier] = PlannedRun(kept + extra, swept, identifier, run_dir, status, wall_time)
    configs.close()
    return list(planned.values())


# ------------------------------------------------------------------------------------------ one run


def run_one(overrides: list[str]) -> Outcome:
    """Compose and execute one run; never raises for a failed run (its record says why).

    An interruption (Ctrl-C, or SIGTERM where the run handles it) is not an outcome: it propagates,
    so that a SLURM task stopped for a requeue writes no result and is picked up again.
    """
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
        """A sweep's SLURM task. On the preemption/time-limit signal (``--signal=USR2@90``) submitit calls
        :meth:`checkpoint` and requeues the task; on ``scontrol requeue`` or preemption SLURM restarts
        it. Either way it runs again with ``trainer.resume=true`` and continues from the run's last
        checkpoint, which the training loop writes every epoch."""

        def __call__(self, overrides: list[str]) -> Outcome:
            if "SLURM_JOB_ID" in os.environ:
                _requeue_on_sigterm()
            return run_one(overrides)

    return RunJob()


def _requeue_on_sigterm() -> None:
    """In a SLURM task, SIGTERM decides between "SLURM is ending me" and "I am being warned".

    When SLURM is already ending the job (``scancel``, ``scontrol requeue``, preemption: the job is
    COMPLETING) the task exits without a result and SLURM's own decision stands: a requeued task
    comes back and resumes, a cancelled one stays cancelled. A SIGTERM to a task that is still
    RUNNING (a warning before a kill, ``scancel --signal=TERM``) does what submitit does on its
    time-limit signal: checkpoint the call, requeue the task, exit. (submitit itself only logs
    SIGTERM and lets the kill follow.)
    """
    import submitit

    requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue handler
    if not callable(requeue):
        return

    def preempted(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        job_id = submitit.JobEnvironment().job_id
        try:
            state = subprocess.run(
                ["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            state = "RUNNING"  # cannot tell: keep the run alive
        if state != "RUNNING":
            raise SystemExit(128 + signum)
        try:
            requeue(signum, frame)  # ends with sys.exit
        except subprocess.CalledProcessError:  # `scontrol requeue` refused: SLURM is already ending the job
            raise SystemExit(128 + signum) from None

    signal.signal(signal.SIGTERM, preempted)


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
            _record(state, run_one(_job_overrides(run, None, None)), fail_fast)
            notify(state)
        return state
    if executor == "local":
        pool: _Pool = _ProcessPool(jobs)
    else:
        pool = _submitit_pool(executor, jobs, planned[0].run_dir.parent / ".submitit", executor_params or {})
    try:
        _drive(state, todo, pool, fail_fast, notify)
    except KeyboardInterrupt:
        pool.interrupt([p for p in todo if p.run_id in state.running])
        raise
    finally:
        pool.close()
    return state


def _record(state: SweepState, outcome: Outcome, fail_fast: bool) -> None:
    state.finish(outcome)
    if outcome.status == "failed" and fail_fast:
        state.stopped = True


def mark_interrupted(run_dir: Path, reason: str) -> None:
    """Say ``interrupted`` in the record of a run whose process was stopped before it could (killed)."""
    try:
        with records.run_lock(run_dir):
            record = records.read_record(run_dir)
            if record is not None and record.get("status") == "running":
                record.update(status="interrupted", error=reason, finished_at=records.now())
                records.atomic_write_json(run_dir / records.RECORD, record)
    except (records.RunLockedError, ValueError, OSError):
        pass  # held by a live process, or unreadable: the next sweep's plan sees it as unfinished anyway


class _Pool:
    """Submit runs, report the finished ones. ``window`` runs at most are in flight."""

    window: int
    poll_s: float

    def submit(self, batch: list[tuple[int, PlannedRun]]) -> list[Any]:
        """Start these (slot, run) pairs; one handle each."""
        raise NotImplementedError

    def poll(self) -> dict[str, str]:
        """Once per loop: the scheduler's state of each submitted run (run id → PENDING, RUNNING, ...)."""
        return {}

    def finished(self, handle: Any, run: PlannedRun) -> Outcome | None:
        raise NotImplementedError

    def cancel_pending(self, handles: Sequence[Any]) -> None:
        """Cancel submitted runs that have not started (only a cluster queue holds such runs)."""

    def interrupt(self, in_flight: list[PlannedRun]) -> None:
        """The sweep is being stopped: stop what runs on this machine."""

    def close(self) -> None:
        return None


class _ProcessPool(_Pool):
    STOP_GRACE_S = 10.0  # for a worker to record its run interrupted after SIGTERM, before SIGKILL

    def __init__(self, jobs: int) -> None:
        self.window, self.poll_s = jobs, 0.2
        self.threads = default_threads(jobs)
        self.gpus = _cuda_devices()
        self._new_pool()

    def _new_pool(self) -> None:
        # spawn, not fork: torch's thread pools and CUDA do not survive a fork.
        context = multiprocessing.get_context("spawn")
        self.pool = concurrent.futures.ProcessPoolExecutor(
            max_workers=self.window, mp_context=context, initializer=die_with_parent, initargs=(os.getpid(),)
        )

    def submit(self, batch: list[tuple[int, PlannedRun]]) -> list[Any]:
        handles = []
        for slot, run in batch:
            # One GPU per job when several are visible (device=auto would put every job on cuda:0).
            device = f"cuda:{self.gpus[slot % len(self.gpus)]}" if len(self.gpus) > 1 else None
            handles.append((self.pool.submit(run_one, _job_overrides(run, self.threads, device)), self.pool))
        return handles

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

    def interrupt(self, in_flight: list[PlannedRun]) -> None:
        # The workers are not in the sweep's signal path when it gets SIGTERM (only Ctrl-C reaches the
        # whole process group): pass SIGTERM on, give them time to record their runs, then kill.
        # ProcessPoolExecutor has no public handle on its processes.
        workers = list(getattr(self.pool, "_processes", {}).values())
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        deadline = time.monotonic() + self.STOP_GRACE_S
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for run in in_flight:
            mark_interrupted(run.run_dir, "interrupted: the sweep was stopped (re-run it to resume)")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
ORPHAN_GRACE_S = 15.0  # after its parent died, for a worker to record its run interrupted (SIGTERM) before exiting


def die_with_parent(parent_pid: int) -> None:
    """Worker initializer: the worker ends when the sweep process dies, even by ``kill -9``.

    On Linux the kernel sends SIGTERM at the parent's death (``prctl(PR_SET_PDEATHSIG)``): a run in progress
    records itself ``interrupted``, an idle worker ends. Everywhere, a daemon thread also watches the
    parent's pid and exits the process ``ORPHAN_GRACE_S`` after it is gone (a worker that survived its
    SIGTERM). The resource tracker ends on its own once no process holds its pipe any more.
    """
    if os.getppid() != parent_pid:  # the parent died before this ran
        os._exit(143)
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent_pid:  # died between the first check and prctl
            os._exit(143)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        time.sleep(ORPHAN_GRACE_S)
        os._exit(143)

    threading.Thread(target=watch, name="poolbench-parent-watch", daemon=True).start()


def _cuda_devices() -> list[int]:
    import torch

    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def _submitit_pool(executor: str, jobs: int, folder: Path, params: dict[str, Any]) -> _Pool:
    import submitit

    try:
        auto = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if executor == "slurm" else None)
    except (RuntimeError, ValueError) as exc:
        raise PoolbenchError(f"submitit cannot use {executor}: {exc}") from None
    parameters = {"timeout_min": 240, "name": "poolbench", **params}
    if auto.cluster == "slurm":
        return _SlurmArrayPool(auto, jobs, folder, parameters)
    return _SubmititLocalPool(auto, jobs, folder, parameters)


class _SubmititPool(_Pool):
    """What submitit's SLURM and local executors share: parameters, quiet logging, outcomes from result files."""

    def __init__(self, executor: Any, jobs: int, folder: Path, parameters: dict[str, Any]) -> None:
        self.executor = executor
        self.log = _SweepLog(folder / "sweep.log")
        with self.log.capture():
            self.executor.update_parameters(**parameters)
        self.job = _submitit_job()

    def _overrides(self, run: PlannedRun) -> list[str]:
        return _job_overrides(run, self.threads, None)

    def _outcome(self, handle: Any, run: PlannedRun) -> Outcome:
        log = handle.paths.stderr
        try:
            with self.log.capture():
                outcome: Outcome = handle.result()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError: killed, timed out, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return Outcome(run.run_id, "failed", error=f"job {handle.job_id}: {first} (log: {log})")
        if outcome.status == "failed":
            outcome.error = f"{outcome.error} (log: {log})"
        return outcome

    def close(self) -> None:
        self.log.close()


class _SubmititLocalPool(_SubmititPool):
    def __init__(self, executor: Any, jobs: int, folder: Path, parameters: dict[str, Any]) -> None:
        super().__init__(executor, jobs, folder, parameters)
        cpus = parameters.get("cpus_per_task")
        self.threads = int(cpus) if cpus else default_threads(jobs)
        # The local executor starts every job it is given at once: feed it `jobs` at a time.
        self.window, self.poll_s = jobs, 0.5
        self.handles: list[Any] = []

    def submit(self, batch: list[tuple[int, PlannedRun]]) -> list[Any]:
        with self.log.capture():
            handles = [self.executor.submit(self.job, self._overrides(run)) for _, run in batch]
        self.handles.extend(handles)
        return handles

    def finished(self, handle: Any, run: PlannedRun) -> Outcome | None:
        with self.log.capture():
            if not handle.done():
                return None
        return self._outcome(handle, run)

    def interrupt(self, in_flight: list[PlannedRun]) -> None:
        # Its jobs are this machine's subprocesses: stop them as Ctrl-C would (the runs record it).
        with self.log.capture():
            for handle in self.handles:
                if not handle.done():
                    handle.cancel(check=False)


# squeue states of a task that will not run again (a requeued task goes back to PENDING).
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


class _SlurmArrayPool(_SubmititPool):
    """All the runs of a sweep as one SLURM job array, ``--jobs`` its ``%N`` throttle.

    Task states come from one ``squeue`` call per poll, not from submitit's per-job ``sacct`` calls
    (which need SLURM's accounting database and warn at every poll without it).
    """

    def __init__(self, executor: Any, jobs: int, folder: Path, parameters: dict[str, Any]) -> None:
        super().__init__(executor, jobs, folder, {**parameters, "slurm_array_parallelism": jobs})
        cpus = parameters.get("cpus_per_task")
        self.threads = int(cpus) if cpus else None
        self.window, self.poll_s = 10**9, 3.0
        self.states: dict[str, str] = {}  # task id (123_4) → squeue state
        self.unseen: dict[str, int] = {}  # task id → consecutive polls it was missing from squeue
        self.handles: dict[str, Any] = {}  # run id → job

    def submit(self, batch: list[tuple[int, PlannedRun]]) -> list[Any]:
        with self.log.capture(), self.executor.batch():
            handles = [self.executor.submit(self.job, self._overrides(run)) for _, run in batch]
        for handle, (_, run) in zip(handles, batch, strict=True):
            self.handles[run.run_id] = handle
        self.log.write(f"submitted {len(handles)} runs as job array {handles[0].job_id.split('_')[0]}")
        return handles

    def poll(self) -> dict[str, str]:
        arrays = sorted({h.job_id.split("_")[0] for h in self.handles.values()})
        if not arrays:
            return {}
        command = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", "--jobs", ",".join(arrays)]
        try:
            listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError) as exc:
            self.log.write(f"squeue failed ({exc}); task states not updated")
            return {key: self.states.get(h.job_id, "?") for key, h in self.handles.items()}
        self.states = dict(line.split("|", 1) for line in listing.splitlines() if "|" in line)
        for key, handle in self.handles.items():
            missing = handle.job_id not in self.states
            self.unseen[key] = self.unseen.get(key, 0) + 1 if missing else 0
        return {key: self.states.get(h.job_id, "ENDED") for key, h in self.handles.items()}

    def finished(self, handle: Any, run: PlannedRun) -> Outcome | None:
        if not handle.paths.result_pickle.exists():
            state = self.states.get(handle.job_id)
            # Gone from the queue twice in a row (MinJobAge passed), or ended: done, with a result or not.
            if not (state in ENDED or self.unseen.get(run.run_id, 0) >= 2):
                return None
            if not handle.paths.result_pickle.exists():
                self.handles.pop(run.run_id, None)
                return Outcome(
                    run.run_id,
                    "failed",
                    error=f"task {handle.job_id} ended {state or 'without a trace in squeue'} without a result "
                    f"(log: {handle.paths.stderr})",
                )
        self.handles.pop(run.run_id, None)
        return self._outcome(handle, run)

    def cancel_pending(self, handles: Sequence[Any]) -> None:
        pending = [h.job_id for h in handles if self.states.get(h.job_id) == "PENDING"]
        if pending:
            subprocess.run(["scancel", *pending], capture_output=True, timeout=60, check=False)

    def interrupt(self, in_flight: list[PlannedRun]) -> None:
        arrays = sorted({h.job_id.split("_")[0] for h in self.handles.values()})
        self.log.write(f"sweep stopped; job array(s) {', '.join(arrays)} left running")


class _SweepLog:
    """The sweep's log file: submitit's log messages and warnings go here, never to the live view."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("submitit")
        self.saved = (list(self.logger.handlers), self.logger.propagate)
        for handler in self.saved[0]:
            self.logger.removeHandler(handler)
        self.logger.addHandler(self.handler)
        self.logger.propagate = False

    def write(self, message: str) -> None:
        self.logger.warning(message)

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        for warning in caught:
            self.write(f"{warning.category.__name__}: {warning.message}")

    def close(self) -> None:
        self.logger.removeHandler(self.handler)
        self.handler.close()
        handlers, propagate = self.saved
        for handler in handlers:
            self.logger.addHandler(handler)
        self.logger.propagate = propagate


def _drive(
    state: SweepState, todo: list[PlannedRun], pool: _Pool, fail_fast: bool, notify: Callable[[SweepState], None]
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
                _record(state, outcome, fail_fast)
                changed = True
        if state.stopped and queue:  # --fail-fast: let started runs finish, start no more
            queue.clear()
            pool.cancel_pending([h for h, _ in in_flight.values()])
        if changed:
            notify(state)
        else:
            time.sleep(pool.poll_s)
