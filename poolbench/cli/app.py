"""The Typer application object and the shared consoles."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="poolbench",
    help="Benchmark pooling operators (DGMP, GeM, LSE, SoftPool, ...) in CNNs: train, sweep, report, bench.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# soft_wrap: a line naming a path, a run id or a rerun command stays one line (copyable, greppable); the
# terminal wraps it for display. Tables keep their own layout.
console = Console(soft_wrap=True)
console_err = Console(stderr=True, soft_wrap=True)
OVERRIDES_HELP = "Hydra overrides, e.g. pooling=dgmp model=resnet18 trainer.epochs=5 (see `poolbench train --cfg`)."
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
PLUGINS_HELP = (
    "Plugins: modules or .py files registering operators or backbones, comma-separated or repeated "
    "(--plugins ./my_pools.py). Every command takes it; in train/sweep/check it is plugins=[...]. Code a "
    "results folder names is imported only when given here, with the recorded sha256 (bench --runs)."
)


def plugins_option() -> typer.models.OptionInfo:
    """The ``--plugins`` option every command takes."""
    return typer.Option(None, "--plugins", help=PLUGINS_HELP, show_default=False)


def use_plugins(values: list[str] | None, overrides: list[str] | None = None) -> list[str]:
    """Import the plugins named by ``--plugins`` (as named by the user: trusted to rebuild runs) and,
    for the commands that compose configs, fold them into the overrides as one ``plugins=[...]``."""
    from poolbench import plugins

    specs = plugins.parse_cli(values)
    given = plugins.requested(overrides or [])
    plugins.name([*given, *specs])  # plugins=[...] on a command line is named by the user too
    if overrides is None or not specs:
        return list(overrides or [])
    from poolbench.grammar import override_key

    kept = [o for o in overrides if override_key(o) != plugins.CONFIG_KEY]
    merged = list(dict.fromkeys([*given, *specs]))
    return [*kept, f"{plugins.CONFIG_KEY}=[{','.join(merged)}]"]


def _version(value: bool) -> None:
    if value:
        import poolbench

        console.print(f"poolbench {poolbench.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print poolbench's version and exit.", callback=_version, is_eager=True
    ),
) -> None:
    """Benchmark pooling operators (DGMP, GeM, LSE, SoftPool, ...) in CNNs: train, sweep, report, bench."""
