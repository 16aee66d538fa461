"""``poolbench check``: run the operator contract on a registered or ``_target_`` operator."""

from __future__ import annotations

import time

import typer
from rich.markup import escape
from rich.table import Table

from poolbench.cli.app import EXTRA_ARGS, app, console, plugins_option, use_plugins

STYLE = {"pass": "[green]pass[/]", "fail": "[bold red]FAIL[/]", "skip": "[yellow]skip[/]"}


def _params(assignments: list[str]) -> dict[str, object]:
    """``key=value`` words, values typed as in config overrides (``lam=1e4`` is a float)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from poolbench.errors import ConfigError

    words = [a.lstrip("+") for a in assignments]
    for word in words:
        if "=" not in word:
            raise ConfigError(f"'{word}' is not a parameter: write key=value, e.g. p=3 or tau=0.5")
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=words)
    except OverrideParseException as exc:
        raise ConfigError(f"{str(exc).splitlines()[0]}. Parameters look like key=value, e.g. p=3") from None
    return {o.key_or_group: o.value() for o in parsed}


@app.command(context_settings=EXTRA_ARGS)
def check(
    operator: str = typer.Argument(..., help="A registered operator (see `poolbench list`) or a class path."),
    params: list[str] = typer.Argument(
        None, help="Operator parameters key=value, and plugins=[mod,./file.py] to load.", show_default=False
    ),
    local: bool = typer.Option(False, "--local", help="Check the local pool of that name (default: auto-detect)."),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """Check that a pooling operator honours the contract every built-in passes (exit 1 when one fails).

    Output shape and out_features, dtype kept for fp16/bf16, finite outputs and gradients on 1x1, zero,
    negative and ±1e4 maps, float64 gradcheck, batch independence, eval determinism, parameters that
    learn, CUDA = CPU when a GPU is present. E.g. `poolbench check gem p=4`,
    `poolbench check mypkg.pools.MyPool tau=0.5 plugins=[./my_pools.py]`.
    """
    from poolbench import plugins
    from poolbench.check import check as run_checks
    from poolbench.check import operator_node

    values = _params(params or [])
    extra = values.pop("plugins", None) or []
    plugins.load_process_plugins()
    use_plugins([*(plugin_specs or []), *(str(spec) for spec in (extra if isinstance(extra, list) else [extra]))])
    started = time.perf_counter()
    node, kind = operator_node(operator, values, "local" if local else None)
    results = run_checks(operator, values, kind=kind)
    seconds = time.perf_counter() - started

    shown = ", ".join(f"{k}={v}" for k, v in values.items())
    table = Table(title=escape(f"{operator}{f' ({shown})' if shown else ''}: {kind} pooling contract"))
    table.add_column("check", style="bold", no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("detail")
    for result in results:
        table.add_row(escape(result.name), STYLE[result.status], escape(result.detail))
    console.print(table)
    counts = {status: sum(r.status == status for r in results) for status in STYLE}
    console.print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in {seconds:.1f} s")
    if counts["fail"]:
        raise typer.Exit(1)
