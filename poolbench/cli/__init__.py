"""The ``poolbench`` command line: parse, call the library, render with rich. No ML code here."""

from __future__ import annotations

import sys

import typer

# Importing the command modules registers their commands on `app`.
from poolbench.cli import bench, check, listing, report, sweep, train, tune  # noqa: F401
from poolbench.cli.app import app, console_err
from poolbench.errors import PoolbenchError
from poolbench.text import terminal as escape  # strips control characters, escapes markup


def main() -> None:
    """Console-script entry point: user errors become one red line and exit code 2."""
    try:
        app()
    except PoolbenchError as exc:
        # A message quotes user values and file names: never let rich read them as markup.
        console_err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        sys.exit(130)


__all__ = ["app", "main", "typer"]
