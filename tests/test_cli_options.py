"""The options several commands share are one definition: the same flags, defaults and checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer.main

from poolbench.cli import app
from poolbench.cli.options import DEFAULT_EXECUTION, Execution, Executor, execution
from poolbench.errors import ConfigError

SHARED = {
    "jobs", "executor", "timeout_min", "slurm_partition", "gpus_per_node", "cpus_per_task", "mem_gb", "slurm_param"
}


def _params(command: str) -> dict[str, Any]:
    group: Any = typer.main.get_command(app)  # typer's click group
    return {p.name: p for p in group.commands[command].params if p.name}


def test_sweep_and_tune_take_the_same_execution_options() -> None:
    sweep, tune = _params("sweep"), _params("tune")
    assert set(sweep) >= SHARED and set(tune) >= SHARED and "execution" not in {*sweep, *tune}
    for name in SHARED:
        assert sweep[name].opts == tune[name].opts and sweep[name].default == tune[name].default, name
        assert sweep[name].help == tune[name].help, name  # type: ignore[attr-defined]


def test_execution_builds_submitit_parameters() -> None:
    built = execution(jobs=2, executor="slurm", timeout_min=30, slurm_param=["slurm_account=proj", "nodes=2"],
                      mem_gb=4.5, gpus_per_node=None, slurm_partition="gpu")
    assert built == Execution(
        jobs=2,
        executor="slurm",
        params={"timeout_min": 30, "slurm_account": "proj", "nodes": 2, "mem_gb": 4.5, "slurm_partition": "gpu"},
    )
    assert Execution(jobs=1, executor="local", params={"timeout_min": 240}) == DEFAULT_EXECUTION


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"jobs": 0}, "--jobs must be >= 1, got 0"),
        ({"timeout_min": 0}, "--timeout-min must be >= 1, got 0"),
        ({"gpus_per_node": -1}, "--gpus-per-node must be >= 0, got -1"),
        ({"cpus_per_task": 0}, "--cpus-per-task must be >= 1, got 0"),
        ({"mem_gb": float("inf")}, "--mem-gb must be a number of GB > 0, got inf"),
        ({"slurm_param": ["=x"]}, "--slurm-param takes key=value"),
    ],
)
def test_execution_refuses_bad_values(given: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        execution(**given)  # type: ignore[arg-type]


def test_every_executor_choice_names_one_pool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from poolbench import executors

    asked: list[tuple[str, int, Path, dict[str, Any]]] = []
    monkeypatch.setattr(executors, "submitit_pool", lambda *args: asked.append(args) or "submitit pool")
    for choice in Executor:
        pool = executors.pool_for(choice.value, 2, tmp_path, {"timeout_min": 5})
        if choice is Executor.local:
            assert isinstance(pool, executors.ProcessPool) and pool.window == 2
            pool.close()
        else:
            assert pool == "submitit pool" and asked[-1] == (choice.value, 2, tmp_path, {"timeout_min": 5})
