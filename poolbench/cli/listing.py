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
    words: list[str] = typer.Argument(
        None,
        help="pooling (global and local operators, the default), local, or groups (config options); "
        "plugins=[...] is taken as in train.",
        show_default=False,
    ),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """List pooling operators with formulas, parameters and references, or every config group's options."""
    from poolbench.errors import ConfigError

    overrides = [w for w in words or [] if w.lstrip("+").startswith("plugins=")]
    choices = [w for w in words or [] if w not in overrides]
    if len(choices) > 1 or (choices and choices[0] not in {w.value for w in What}):
        shown = " ".join(choices)
        raise ConfigError(f"unknown list '{shown}'. Valid choices: {', '.join(w.value for w in What)}, plugins=[...]")
    what = What(choices[0]) if choices else What.pooling
    use_plugins(plugin_specs, overrides)
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
    from poolbench.pooling.catalog import infos  # the built-ins without torch, unless a plugin loaded it

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
        for spec in infos(kind):
            width = (spec.width,) if kind == "global" else ()
            learnable = "yes" if spec.learnable else "no"
            name = escape(spec.name)
            cls = getattr(spec, "cls", None)  # None: a built-in as shipped (no torch loaded)
            if cls is not None and not cls.__module__.startswith("poolbench."):  # a plugin's: its file or package
                name += f"\n[dim]{escape(plugins.display_name(cls.__module__))}[/]"
            texts = (spec.formula, _format_params(spec.params), *width, learnable, spec.reference)
            table.add_row(name, *(escape(t) for t in texts))
        console.print(table)
