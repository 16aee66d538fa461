"""The ``poolbench`` command line: parse, call the library, render with rich. No ML code here."""

from __future__ import annotations

import sys

import typer

# Importing the command modules registers their commands on `app`.
from poolbench.cli import check, listing, train  # noqa: E402,F401,I001
from poolbench.cli.app import app, console_err
from poolbench.errors import PoolbenchError

for optional in ("sweep", "report", "bench"):
    try:
        __import__(f"poolbench.cli.{optional}")
    except ModuleNotFoundError as exc:  # a command whose module is not written yet is simply absent
        if exc.name != f"poolbench.cli.{optional}":
            raise


def main() -> None:
    """Console-script entry point: user errors become one red line and exit code 2."""
    try:
        app()
    except PoolbenchError as exc:
        console_err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "main", "typer"]
