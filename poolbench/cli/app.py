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
console = Console()
console_err = Console(stderr=True)
OVERRIDES_HELP = "Hydra overrides, e.g. pooling=dgmp model=resnet18 trainer.epochs=5 (see `poolbench train --cfg`)."
EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}


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
