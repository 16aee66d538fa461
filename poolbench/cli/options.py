"""Typer options that more than one command takes, defined once.

``sweep`` and ``tune`` both start runs through :mod:`poolbench.executors`: :func:`execution_options`
gives both the same ``--jobs``, ``--executor`` and submitit/SLURM resource options, checks them the same
way (one line, exit 2, before anything is composed or printed) and hands the command one
:class:`Execution`. (``--plugins``, which every command takes, is ``app.plugins_option``.)
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import typer

from poolbench.errors import ConfigError

Command = TypeVar("Command", bound=Callable[..., Any])


class Executor(str, Enum):
    local = "local"
    submitit = "submitit"
    slurm = "slurm"


@dataclass(frozen=True)
class Execution:
    """How a command's runs execute: at most ``jobs`` at once, on ``executor`` (local, submitit, slurm),
    with submitit's ``params`` (time limit, resources, every ``--slurm-param``)."""

    jobs: int
    executor: str
    params: dict[str, Any]


def overrides_argument(text: str) -> Any:
    """The ``KEY=VALUE ...`` argument of a command that composes configs, with that command's help ``text``."""
    return typer.Argument(None, help=text, show_default=False)


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# In --help order. Typer reads these as if each command had declared them.
_OPTIONS = (
    _option("jobs", int, typer.Option(1, "--jobs", "-j", help="Runs at once (threads per run = cores // jobs).")),
    _option(
        "executor",
        Executor,
        typer.Option(
            Executor.local,
            "--executor",
            "-e",
            help="local: this machine (a process pool when --jobs > 1); submitit: submitit (SLURM when sbatch "
            "is available, else its local executor); slurm: submitit's SLURM executor.",
        ),
    ),
    _option(
        "timeout_min", int, typer.Option(240, "--timeout-min", help="submitit/SLURM: time limit per run (minutes).")
    ),
    _option("slurm_partition", str, typer.Option(None, "--slurm-partition", help="SLURM partition.")),
    _option("gpus_per_node", int, typer.Option(None, "--gpus-per-node", help="submitit/SLURM: GPUs per run.")),
    _option("cpus_per_task", int, typer.Option(None, "--cpus-per-task", help="submitit/SLURM: CPU cores per run.")),
    _option("mem_gb", float, typer.Option(None, "--mem-gb", help="submitit/SLURM: memory per run (GB).")),
    _option(
        "slurm_param",
        list[str],
        typer.Option(None, "--slurm-param", help="Any other submitit parameter, e.g. slurm_account=proj (repeatable)."),
    ),
)
# The least value each number may take (None: not set, submitit's default).
_LOWEST = {"jobs": 1, "timeout_min": 1, "gpus_per_node": 0, "cpus_per_task": 1}


def execution_options(command: Command) -> Command:
    """Give ``command`` the options of :data:`_OPTIONS` in place of its ``execution: Execution`` parameter."""
    signature = inspect.signature(command)
    parameters = list(signature.parameters.values())
    at = next(i for i, p in enumerate(parameters) if p.name == "execution")
    parameters[at : at + 1] = [option.replace(kind=parameters[at].kind) for option in _OPTIONS]

    @functools.wraps(command)
    def with_execution(*args: Any, **kwargs: Any) -> Any:
        given = {p.name: kwargs.pop(p.name) for p in _OPTIONS}
        return command(*args, execution=execution(**given), **kwargs)

    with_execution.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    # Typer resolves the command's own (string) annotations; the options above carry real types.
    with_execution.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "execution"}
    return with_execution  # type: ignore[return-value]


def execution(
    *,
    jobs: int = 1,
    executor: Executor | str = Executor.local,
    timeout_min: int = 240,
    slurm_param: list[str] | None = None,
    **resources: float | int | str | None,
) -> Execution:
    """The options checked (one line naming the option and its bound) and submitit's parameters built:
    the time limit, every ``--slurm-param key=value`` and the resources the user set (None: not set)."""
    for name, value in {"jobs": jobs, "timeout_min": timeout_min, **resources}.items():
        option = "--" + name.replace("_", "-")
        if value is None or name == "slurm_partition":
            continue
        if name == "mem_gb":
            if not value > 0 or value == float("inf"):  # type: ignore[operator]
                raise ConfigError(f"{option} must be a number of GB > 0, got {value}")
        elif value < _LOWEST[name]:  # type: ignore[operator]
            raise ConfigError(f"{option} must be >= {_LOWEST[name]}, got {value}")
    params: dict[str, Any] = {"timeout_min": timeout_min, **_slurm_params(slurm_param or [])}
    params.update({key: value for key, value in resources.items() if value is not None})
    return Execution(jobs=jobs, executor=Executor(executor).value, params=params)


def _slurm_params(options: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for option in options:
        import yaml

        key, sep, value = option.partition("=")
        if not sep or not key:
            raise ConfigError(f"--slurm-param takes key=value (e.g. slurm_account=proj), got '{option}'")
        params[key.strip()] = yaml.safe_load(value)
    return params


# What a command's ``execution`` parameter defaults to (its options' defaults); the decorator replaces it.
DEFAULT_EXECUTION = execution()
