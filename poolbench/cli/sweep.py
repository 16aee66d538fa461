"""``poolbench sweep``: a resumable grid of train runs with a live view."""

from __future__ import annotations

import math
import signal
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from poolbench.cli.app import EXTRA_ARGS, app, console, console_err, plugins_option, use_plugins
from poolbench.cli.options import DEFAULT_EXECUTION, Execution, execution_options, overrides_argument
from poolbench.errors import PoolbenchError, Terminated
from poolbench.grammar import override_key
from poolbench.text import plain
from poolbench.text import terminal as escape  # strips control characters, escapes markup

if TYPE_CHECKING:
    from poolbench.sweep import Outcome, PlannedRun, SweepState

STATUS_STYLE = {
    "new": "cyan",
    "completed": "green",
    "unfinished": "yellow",
    "stale": "yellow",
    "failed": "red",
    "elsewhere": "magenta",
    "overwrite": "cyan",
}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class LiveView:
    """Rendered by rich at every refresh, so elapsed times and the ETA tick between events."""

    def __init__(self, state: SweepState, title: str) -> None:
        self.state = state
        self.title = title

    def __rich__(self) -> RenderableType:
        state = self.state
        total = len(state.plan)
        finished = len(state.done) + state.skipped + len(state.failed) + len(state.elsewhere)
        running = sum(state.tasks.get(run_id, "RUNNING") == "RUNNING" for run_id in state.running)
        counts = Text.assemble(
            (f"{self.title}: ", "bold"),
            (f"done {len(state.done)}", "green"),
            " · ",
            (f"running {running}", "cyan"),
            " · ",
            (f"failed {len(state.failed)}", "red" if state.failed else ""),
            " · ",
            (f"skipped {state.skipped}", "dim"),
            " · ",
            *((f"elsewhere {len(state.elsewhere)}", "magenta"), " · ") if state.elsewhere else (),
            f"left {state.left}",
            " · ",
            (f"ETA {_duration(state.eta_s()) if state.left or state.running else '0s'}", "bold"),
            f" · elapsed {_duration(time.monotonic() - state.started)}",
        )
        parts: list[RenderableType] = [counts, ProgressBar(total=max(total, 1), completed=finished, width=60)]
        if state.tasks:  # a SLURM job array: what the scheduler says about each submitted run
            counts_by_state = Counter(state.tasks.values())
            parts.append(
                Text("  array tasks: " + " · ".join(f"{n} {s.lower()}" for s, n in sorted(counts_by_state.items())))
            )
        now = time.monotonic()
        for run_id, started in list(state.running.items()):
            task = state.tasks.get(run_id)
            if task is not None and task != "RUNNING":
                continue  # queued: counted above, not listed one by one
            parts.append(Text(f"  ▶ {run_id}  {_duration(now - started)}", style="cyan"))
        return Group(*parts)


# A --dry-run lists every run up to this many; a larger plan prints its first runs and a summary (--list: all).
LIST_LIMIT = 50


def _plan_table(planned: list[PlannedRun], limit: int | None = None) -> Table:
    shown = planned if limit is None else planned[:limit]
    title = f"{len(planned)} runs" + (f" (the first {len(shown)})" if len(shown) < len(planned) else "")
    table = Table(title=title, title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("run id", no_wrap=True)
    for column in ("swept overrides", "status", "action"):
        table.add_column(column)
    for i, run in enumerate(shown, 1):
        style = STATUS_STYLE[run.status]
        table.add_row(str(i), escape(run.run_id), escape(" ".join(run.swept)), f"[{style}]{run.status}[/]", run.action)
    return table


def _plan_summary(planned: list[PlannedRun]) -> list[str]:
    """A large plan in a few lines: runs per status and per action, and the values of each swept key."""
    statuses = Counter(run.status for run in planned)
    actions = Counter(run.action for run in planned)
    axes: dict[str, dict[str, None]] = {}
    for run in planned:
        for override in run.swept:
            key, _, value = override.partition("=")
            axes.setdefault(key, {})[value] = None
    lines = [
        "status: " + ", ".join(f"{n} {status}" for status, n in statuses.most_common()),
        "action: " + ", ".join(f"{n} {action}" for action, n in actions.most_common()),
    ]
    for key, values in axes.items():
        shown = list(values)
        more = f", … ({len(shown)} values)" if len(shown) > 8 else ""
        lines.append(f"{key}: {', '.join(shown[:8])}{more}")
    return lines


def _summary(state: SweepState) -> str:
    parts = [
        f"{len(state.done)} completed",
        f"{state.skipped} skipped (already completed)",
        f"{len(state.failed)} failed",
    ]
    if state.elsewhere:
        parts.append(f"{len(state.elsewhere)} running elsewhere (left to their process)")
    if state.left:
        parts.append(f"{state.left} not started")
    return ", ".join(parts)


@app.command(context_settings=EXTRA_ARGS)
@execution_options
def sweep(
    overrides: list[str] = overrides_argument(
        "Hydra overrides and sweeps: pooling=avg,max,dgmp seed=range(0,3) model=glob(resnet*) experiment=quick"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="List the runs and what would happen; run nothing."),
    list_all: bool = typer.Option(
        False, "--list", help=f"With --dry-run: list every run (default: a summary beyond {LIST_LIMIT} runs)."
    ),
    execution: Execution = DEFAULT_EXECUTION,  # --jobs, --executor and the submitit/SLURM resources: see cli/options.py
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Start no new run after the first failure."),
    name: str = typer.Option(None, "--name", help="Recorded as sweep_name (default: the experiment's name)."),
    side_by_side: bool = typer.Option(
        True,
        "--side-by-side/--no-side-by-side",
        help="After a sweep on this machine, time its configurations side by side in one process "
        "(side_by_side.json, used by poolbench report); on SLURM run `poolbench bench --runs` on a compute node.",
    ),
    seeds_for: float = typer.Option(
        None, "--seeds-for", help="Effect to detect (metric units): seeds per configuration from the pilot runs."
    ),
    run_seeds: bool = typer.Option(False, "--run-seeds", help="With --seeds-for: run the proposed seeds."),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """Run a grid of train runs; re-running skips completed runs and resumes interrupted ones."""
    from poolbench import sweep as sweeping

    arguments = use_plugins(plugin_specs, overrides or [])
    experiments = [o.split("=", 1)[1] for o in arguments if "=" in o and override_key(o) == "experiment"]
    sweep_name = name or (experiments[0] if len(experiments) == 1 and "," not in experiments[0] else None)
    with console_err.status("composing the grid's configs…"):
        planned = sweeping.plan(arguments, name=sweep_name)
    if seeds_for is not None or run_seeds:
        planned = _seeds_for(seeds_for, run_seeds, arguments, planned, sweep_name)
        if not planned:
            return
    if dry_run:
        large = len(planned) > LIST_LIMIT and not list_all
        console.print(_plan_table(planned, limit=LIST_LIMIT if large else None))
        if large:
            console.print(f"… {len(planned) - LIST_LIMIT} more runs (--list prints every run)", highlight=False)
            for line in _plan_summary(planned):
                console.print(line, highlight=False, markup=False)
        to_run = sum(p.status in sweeping.TO_RUN for p in planned)
        console.print(f"{to_run} of {len(planned)} runs would start; nothing was run (--dry-run)")
        return
    # The SLURM job name: the sweep's name, checked by plan() to be plain characters.
    params: dict[str, Any] = {"name": sweep_name or "poolbench", **execution.params}

    state_box: list[SweepState] = []
    view: LiveView | None = None
    printed = {"done": 0, "failed": 0}  # both lists only grow: print what is new (a sweep may hold 10,000 runs)

    def on_change(state: SweepState) -> None:
        nonlocal view
        if not state_box:
            state_box.append(state)
            view = LiveView(state, sweep_name or "sweep")
            live.update(view)
        for kind, outcomes in (("done", state.done), ("failed", state.failed)):
            for outcome in outcomes[printed[kind] :]:
                _print_outcome(outcome)
            printed[kind] = len(outcomes)

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop at a time: the cleanup must not be cut short
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    with Live(console=console, refresh_per_second=2, transient=False) as live:
        try:
            state = sweeping.run_sweep(
                planned,
                jobs=execution.jobs,
                executor=execution.executor,
                fail_fast=fail_fast,
                executor_params=params,
                on_change=on_change,
            )
        except KeyboardInterrupt as exc:
            live.stop()
            summary = _summary(state_box[0]) if state_box else "nothing finished"
            how = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
            queued = execution.executor != "local"
            left = "; on SLURM, tasks already submitted keep running (scancel stops them)" if queued else ""
            console_err.print(f"[yellow]{how}[/]: {summary}; re-run the same command to resume{left}")
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
        finally:
            signal.signal(signal.SIGTERM, previous)
    if not console.is_terminal:  # rich leaves a non-terminal's last line open
        console.line()
    console.print(_summary(state))
    if side_by_side and execution.executor == "local":
        _time_side_by_side(planned)
    if state.failed:
        console_err.print(f"[red]{len(state.failed)} run(s) failed[/] (their result.json says why):")
        for outcome in state.failed:
            console_err.print(plain(f"  {outcome.run_id}: {outcome.error}"), highlight=False, markup=False)
        raise typer.Exit(1)


def _seeds_for(
    delta: float | None, run: bool, arguments: list[str], planned: list[PlannedRun], name: str | None
) -> list[PlannedRun]:
    """Print the seed count the pilot runs call for; with ``run``, the plan with that many seeds."""
    from poolbench import sweep as sweeping
    from poolbench.report.power import propose_seeds, with_seeds

    if delta is None:
        raise PoolbenchError("--run-seeds needs --seeds-for DELTA (the effect the seeds must detect)")
    proposal = propose_seeds([p.run_dir for p in planned], delta)
    for line in proposal.lines():
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if not run:
        console.print("nothing was run (add --run-seeds to run them)", highlight=False)
        return []
    if not math.isfinite(proposal.seeds):
        raise PoolbenchError(f"detecting Δ = {delta:g} is not feasible at this noise; nothing was run")
    return sweeping.plan(with_seeds(arguments, int(proposal.seeds)), name=name)


def _time_side_by_side(planned: list[PlannedRun]) -> None:
    """Latency of the sweep's configurations measured interleaved in one process, so the report's cost
    columns do not depend on when each run happened to finish (``poolbench bench --runs`` does the same)."""
    from poolbench import records
    from poolbench.side_by_side import side_by_side

    by_folder: dict[Path, list[str]] = {}
    poolings: dict[Path, set[str]] = {}
    for run in planned:
        try:
            record = records.read_record(run.run_dir)
        except ValueError:
            continue
        if record and record.get("status") == "completed":
            by_folder.setdefault(run.run_dir.parent, []).append(run.run_id)
            poolings.setdefault(run.run_dir.parent, set()).add(str(record.get("pooling")))
    for folder, run_ids in by_folder.items():
        baseline = "avg" if "avg" in poolings[folder] else None
        try:
            with console_err.status("timing the sweep's configurations side by side…"):
                path = side_by_side(folder, run_ids, baseline=baseline)
        except PoolbenchError as exc:
            console_err.print(f"side-by-side latency skipped: {escape(str(exc))}", highlight=False)
            continue
        console.print(f"side-by-side latency of {len(run_ids)} runs: {escape(str(path))}", highlight=False)


def _print_outcome(outcome: Outcome) -> None:
    if outcome.status == "completed":
        console.print(f"[green]✓[/] {outcome.run_id}  {_duration(outcome.wall_time_s)}", highlight=False)
    else:
        console.print(f"[red]✗[/] {escape(outcome.run_id)}: {escape(str(outcome.error))}", highlight=False)
