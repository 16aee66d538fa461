"""How a sweep's runs execute: one run in this process (:func:`run_one`), a local spawn process pool,
submitit (its local executor or SLURM) and one SLURM job array polled with ``squeue``, with SIGTERM
handled as a requeue in a SLURM task. What to run is decided by :mod:`poolbench.sweep` (the grid and
the plan); a new executor is one :class:`Pool` subclass here and its name in ``sweep.EXECUTORS``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolbench import records
from poolbench.config import compose, run_id
from poolbench.environment import usable_cores
from poolbench.errors import PoolbenchError, message_line
from poolbench.grammar import override_key

if TYPE_CHECKING:
    from poolbench.sweep import PlannedRun


@dataclass
class Outcome:
    run_id: str
    status: str  # completed | reused | failed | elsewhere
    wall_time_s: float | None = None
    error: str | None = None


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


def default_threads(jobs: int) -> int:
    """torch threads per job so that ``jobs`` parallel runs share this machine's cores."""
    return max(1, usable_cores() // jobs)


def job_overrides(run: PlannedRun, threads: int | None, device: str | None) -> list[str]:
    extra = [] if run.status == "failed" else ["trainer.resume=true"]  # a failed run starts over
    keys = {override_key(o) for o in run.overrides}
    if threads is not None and "trainer.num_threads" not in keys:
        extra.append(f"trainer.num_threads={threads}")
    if device is not None and "device" not in keys:
        extra.append(f"device={device}")
    return [*run.overrides, *extra]


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


class Pool:
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


class ProcessPool(Pool):
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
            handles.append((self.pool.submit(run_one, job_overrides(run, self.threads, device)), self.pool))
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


def pool_for(executor: str, jobs: int, folder: Path, params: dict[str, Any]) -> Pool:
    """The pool an ``--executor`` name means (``jobs`` runs at once): ``local`` a process pool on this
    machine, ``submitit``/``slurm`` submitit's executors with ``params`` (their files under ``folder``).
    A local ``--jobs 1`` runs in the caller's process instead, without a pool."""
    if executor == "local":
        return ProcessPool(jobs)
    return submitit_pool(executor, jobs, folder, params)


def submitit_pool(executor: str, jobs: int, folder: Path, params: dict[str, Any]) -> Pool:
    import submitit

    try:
        auto = submitit.AutoExecutor(folder=folder / "%j", cluster="slurm" if executor == "slurm" else None)
    except (RuntimeError, ValueError) as exc:
        raise PoolbenchError(f"submitit cannot use {executor}: {exc}") from None
    parameters = {"timeout_min": 240, "name": "poolbench", **params}
    if auto.cluster == "slurm":
        return _SlurmArrayPool(auto, jobs, folder, parameters)
    return _SubmititLocalPool(auto, jobs, folder, parameters)


class _SubmititPool(Pool):
    """What submitit's SLURM and local executors share: parameters, quiet logging, outcomes from result files."""

    def __init__(self, executor: Any, jobs: int, folder: Path, parameters: dict[str, Any]) -> None:
        self.executor = executor
        self.log = _SweepLog(folder / "sweep.log")
        with self.log.capture():
            self.executor.update_parameters(**parameters)
        self.job = _submitit_job()

    def _overrides(self, run: PlannedRun) -> list[str]:
        return job_overrides(run, self.threads, None)

    def _outcome(self, handle: Any, run: PlannedRun) -> Outcome:
        log = handle.paths.stderr
        try:
            with self.log.capture():
                outcome: Outcome = handle.result()
        except Exception as exc:  # submitit's FailedJobError / UncompletedJobError: killed, timed out, ...
            first = message_line(exc)
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
