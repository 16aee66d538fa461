"""``poolbench list``: what can be configured."""

from __future__ import annotations

from enum import Enum

import typer
from rich.markup import escape
from rich.table import Table

from poolbench.cli.app import app, console, plugins_option, use_plugins


class What(str, Enum):
    pooling = "pooling"
    local = "local"
    groups = "groups"


def _format_params(params: dict[str, object]) -> str:
    shown = (f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return ", ".join(shown) or "-"


@app.command("list")
def list_(
    what: What = typer.Argument(What.pooling, help="pooling (global and local operators) or groups (config options)."),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """List pooling operators with formulas, parameters and references, or every config group's options."""
    use_plugins(plugin_specs)
    if what == What.groups:
        from poolbench.config import GROUPS, group_options

        table = Table(title="config groups (choose with group=option)")
        table.add_column("group", style="bold")
        table.add_column("options")
        for group in GROUPS:
            table.add_row(group, ", ".join(group_options(group)) or "-")
        console.print(table)
        return
    from poolbench import plugins
    from poolbench.pooling import specs

    kinds = ("global", "local") if what == What.pooling else ("local",)
    for kind in kinds:
        shape = "(B, C, H, W) -> (B, F)" if kind == "global" else "(B, C, H, W) -> (B, C, H', W')"
        table = Table(title=f"{kind} pooling {shape}", title_justify="left", expand=True)
        table.add_column("name", style="bold", no_wrap=True)
        table.add_column("formula", ratio=3)
        table.add_column("params", ratio=2)
        if kind == "global":
            table.add_column("F", no_wrap=True)
        table.add_column("learn", no_wrap=True)
        table.add_column("reference", ratio=3)
        for spec in specs(kind):
            width = (spec.width,) if kind == "global" else ()
            learnable = "yes" if spec.learnable else "no"
            name = escape(spec.name)
            if not spec.cls.__module__.startswith("poolbench."):  # a plugin's: its file or package
                name += f"\n[dim]{escape(plugins.display_name(spec.cls.__module__))}[/]"
            texts = (spec.formula, _format_params(spec.params), *width, learnable, spec.reference)
            table.add_row(name, *(escape(t) for t in texts))
        console.print(table)
