"""poolbench: benchmark and compare pooling operators in CNNs.

The Python API mirrors the CLI, for notebooks and scripts (see the README, "Python API")::

    import poolbench

    record = poolbench.train(["pooling=dgmp", "trainer.epochs=2"])      # like `poolbench train ...`
    record, model = poolbench.train(["pooling=gem"], return_model=True)  # and keep the trained model

    cfg = poolbench.compose(["pooling=lse", "dataset=digits"])          # compose and validate only
    cfg.trainer.epochs = 1
    record = poolbench.execute(cfg)                                     # run a composed config

    runs = poolbench.run_sweep(["pooling=avg,gem", "seed=0,1,2"])        # like `poolbench sweep ...`
    result = poolbench.results("results/runs", baseline="avg")          # like `poolbench report ...`
    result.runs, result.summary, result.comparison                      # pandas DataFrames

``poolbench.pooling`` is the operator library (``create``, ``create_local``, ``register``).
Importing poolbench itself is cheap: torch is loaded by the first call that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from pathlib import Path

    from omegaconf import DictConfig

    from poolbench.report.core import Report


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate a run config from Hydra overrides (``poolbench train --cfg``)."""
    from poolbench.config import compose as compose_config

    return compose_config(list(overrides))


def execute(cfg: DictConfig, **options: Any) -> Any:
    """Run (or reuse, or resume) the run a composed config identifies; returns its flat record
    (``return_model=True``: ``(record, model)``). Options are those of :func:`poolbench.run.execute`."""
    from poolbench.run import execute as execute_run

    return execute_run(cfg, **options)


def train(overrides: Sequence[str] = (), *, return_model: bool = False, **options: Any) -> Any:
    """``poolbench train OVERRIDES`` as a function: the run's record, or ``(record, model)``."""
    cfg = compose(overrides)
    if return_model:
        options["return_model"] = True
    return execute(cfg, **options)


def run_sweep(
    overrides: Sequence[str] = (),
    *,
    jobs: int = 1,
    executor: str = "local",
    name: str | None = None,
    dry_run: bool = False,
    fail_fast: bool = False,
) -> list[dict[str, Any]]:
    """``poolbench sweep OVERRIDES`` as a function (``poolbench.sweep`` is the module). No side-by-side
    timing (``poolbench bench --runs`` does that). One dict per planned run: ``run_id``, ``run_dir``,
    ``swept`` (its grid values) and ``status`` (completed, or failed with ``error``; with ``dry_run``
    the plan: new, completed, resume, ...)."""
    import importlib

    sweeping = importlib.import_module("poolbench.sweep")  # the module (this function's name is run_sweep)
    planned = sweeping.plan(list(overrides), name=name)
    rows = {p.run_id: {"run_id": p.run_id, "run_dir": p.run_dir, "swept": p.swept, "status": p.status} for p in planned}
    if dry_run:
        return list(rows.values())
    state = sweeping.run_sweep(planned, jobs=jobs, executor=executor, fail_fast=fail_fast)
    for outcome in [*state.done, *state.failed]:
        rows[outcome.run_id].update(status=outcome.status, error=outcome.error)
    return list(rows.values())


def results(
    results_dir: str | Path = "results/runs",
    *,
    baseline: str | None = None,
    metrics: Sequence[str] = (),
    where: Sequence[str] = (),
    allow_confounded: bool = False,
) -> Report:
    """``poolbench report RESULTS_DIR`` as data: the same grouping, statistics and tests, as DataFrames
    (``.runs`` one row per completed run, ``.summary`` mean/std/n per configuration, ``.comparison``
    the paired tests against ``baseline``), plus ``.keys`` (grouping columns), ``.skipped`` and
    ``.warnings``. Writes nothing (``poolbench.report.write_report`` writes the files)."""
    from pathlib import Path

    from poolbench.report.core import build

    return build(Path(results_dir), metrics=metrics, baseline=baseline, where=where, allow_confounded=allow_confounded)


__all__ = ["__version__", "compose", "execute", "results", "run_sweep", "train"]
