"""``poolbench list``: what can be configured."""

from __future__ import annotations

from enum import Enum

import typer
from rich.table import Table

from poolbench.cli.app import app, console


class What(str, Enum):
    pooling = "pooling"
    local = "local"
    groups = "groups"


def _format_params(params: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items()) or "-"


@app.command("list")
def list_(
    what: What = typer.Argument(What.pooling, help="pooling (global and local operators) or groups (config options)."),
) -> None:
    """List pooling operators with formulas, parameters and references, or every config group's options."""
    if what == What.groups:
        from poolbench.config import GROUPS, group_options

        table = Table(title="config groups (choose with group=option)")
        table.add_column("group", style="bold")
        table.add_column("options")
        for group in GROUPS:
            table.add_row(group, ", ".join(group_options(group)) or "-")
        console.print(table)
        return
    from poolbench.pooling import specs

    kinds = ("global", "local") if what == What.pooling else ("local",)
    table = Table(title="pooling operators", show_lines=False)
    for column in ("name", "kind", "formula", "parameters (defaults)", "output width", "learnable", "reference"):
        table.add_column(column, overflow="fold")
    for kind in kinds:
        for spec in specs(kind):
            width = "C (H', W' downsampled)" if kind == "local" else spec.width
            table.add_row(
                f"[bold]{spec.name}[/]",
                kind,
                spec.formula,
                _format_params(spec.params),
                width,
                "yes" if spec.learnable else "no",
                spec.reference,
            )
    console.print(table)
