"""``poolbench tune``: one Optuna study per treatment with the same budget, then fresh seeds on test."""

from __future__ import annotations

import signal
from typing import Any

import typer
from rich.markup import escape

from poolbench.cli.app import EXTRA_ARGS, app, console, console_err
from poolbench.cli.options import DEFAULT_EXECUTION, Execution, execution_options, overrides_argument
from poolbench.errors import Terminated


@app.command(context_settings=EXTRA_ARGS)
@execution_options
def tune(
    overrides: list[str] = overrides_argument(
        "Treatments, search space and fixed overrides: pooling=avg,max,gem,dgmp "
        "'trainer.lr=tag(log, interval(1e-4, 1e-1))' 'trainer.optimizer=choice(adam,sgd)' dataset=digits"
    ),
    treatment: str = typer.Option("pooling", "--treatment", help="The axis whose values get one study each."),
    trials: int = typer.Option(16, "--trials", min=1, help="Trials per treatment (the same budget for every one)."),
    seeds: int = typer.Option(5, "--seeds", min=1, help="Fresh seeds for each treatment's best configuration."),
    sampler: str = typer.Option("tpe", "--sampler", help="tpe (default) or qmc (scrambled Sobol), both seeded."),
    sampler_seed: int = typer.Option(0, "--sampler-seed", min=0, help="Seed of every study's sampler."),
    name: str = typer.Option(None, "--name", help="Folder <results_dir>/tune/<name> (default: from the protocol)."),
    storage: str = typer.Option(
        None, "--storage", help="Any SQLAlchemy URL, e.g. postgresql://user@host/db (default: SQLite in the folder)."
    ),
    execution: Execution = DEFAULT_EXECUTION,  # --jobs, --executor, submitit/SLURM: see cli/options.py
    no_final: bool = typer.Option(False, "--no-final", help="Tune only; leave the final seeds for a later call."),
) -> None:
    """Tune every treatment with the same sampler, seed and trial budget on the validation split, then
    retrain each best configuration with fresh seeds and evaluate it on test. Re-run to resume."""
    from poolbench import sweep as sweeping
    from poolbench import tune as tuning

    spec = tuning.plan(
        overrides or [],
        treatment=treatment,
        trials=trials,
        seeds=seeds,
        sampler=sampler,
        sampler_seed=sampler_seed,
        name=name,
        storage=storage,
    )
    params = execution.params

    def say(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    tuner = tuning.Tuner(spec, jobs=execution.jobs, executor=execution.executor, executor_params=params, log=say)
    tuner.open()
    _describe(spec)

    def terminated(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        state = tuner.run()
        results = tuner.results()
        tuning.write_protocol(spec, results)
        _print_best(spec, results)
        incomplete = [t for t, r in results.items() if r["finished"] < spec.trials or "best" not in r]
        if state.unfinished or incomplete:
            for line in state.unfinished:
                console_err.print(f"  unfinished: {escape(line)}", highlight=False)
            for t in incomplete:
                r = results[t]
                why = "no trial completed" if "best" not in r else f"{r['finished']} of {spec.trials} trials finished"
                console_err.print(f"[red]{escape(t)}[/]: {why}", highlight=False)
            console_err.print("[yellow]tuning is not complete[/]: re-run the same command to resume; no final stage")
            raise typer.Exit(1)
        if no_final:
            console.print(f"tuning complete; run the same command without --no-final for the {seeds} final seeds")
            return
        planned = tuning.final_plan(spec, results)
        console.print(
            f"final stage: {len(planned)} runs ({len(spec.treatments)} best configurations × seeds "
            f"{', '.join(map(str, spec.final_seeds))}), evaluated on test",
            highlight=False,
        )
        sweep_state = sweeping.run_sweep(
            planned,
            jobs=execution.jobs,
            executor=execution.executor,
            executor_params={"name": f"tune.{spec.name}.final"[:100], **params},
            on_change=_final_printer(),
        )
        for treatment_name, run_ids in tuning.final_run_ids(planned, spec).items():
            if treatment_name in results:
                results[treatment_name]["final_run_ids"] = run_ids
        tuning.write_protocol(spec, results)
    except KeyboardInterrupt as exc:
        how = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        console_err.print(f"[yellow]{how}[/]: re-run the same command to resume every study")
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if sweep_state.failed or sweep_state.elsewhere:
        for outcome in sweep_state.failed:
            console_err.print(f"  {outcome.run_id}: {outcome.error}", highlight=False, markup=False, soft_wrap=True)
        if sweep_state.elsewhere:
            console_err.print(f"{len(sweep_state.elsewhere)} final run(s) are running in another process")
        raise typer.Exit(1)
    baseline = spec.treatments[0]
    console.print(
        f"done. Compare on test: poolbench report {spec.final_dir} --baseline {baseline}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _describe(spec: Any) -> None:
    space = "  ".join(p.text for p in spec.params)
    console.print(
        f"tune {spec.name}: {len(spec.treatments)} studies ({spec.treatment_key}={','.join(spec.treatments)}) × "
        f"{spec.trials} trials, sampler {spec.sampler} (seed {spec.sampler_seed}), no pruning; space: {space}; "
        f"selected on validation by {', '.join(sorted(set(spec.metrics.values())))}; folder {spec.folder}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _print_best(spec: Any, results: dict[str, Any]) -> None:
    for treatment_name, result in results.items():
        best = result.get("best")
        if best is None:
            continue
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items())
        console.print(
            f"best {treatment_name}: {result['metric']} {best['value']:.4f} (trial {best['trial']} of "
            f"{result['finished']}; {result['failed']} failed)  {params}",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )


def _final_printer() -> Any:
    printed = {"done": 0, "failed": 0}

    def on_change(state: Any) -> None:
        for kind, outcomes in (("done", state.done), ("failed", state.failed)):
            for outcome in outcomes[printed[kind] :]:
                mark = "✓" if kind == "done" else "✗"
                tail = "" if kind == "done" else f": {outcome.error}"
                console.print(f"{mark} {outcome.run_id}{tail}", highlight=False, markup=False, soft_wrap=True)
            printed[kind] = len(outcomes)

    return on_change

