"""``poolbench report``: aggregate run records into tables, paired comparisons, files, plots and HTML."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from poolbench.cli.app import app, console, console_err, plugins_option, use_plugins
from poolbench.text import plain
from poolbench.text import terminal as escape  # strips control characters, escapes markup

if TYPE_CHECKING:
    import pandas as pd

    from poolbench.report import Report


@app.command()
def report(
    results_dir: Path = typer.Argument(Path("results/runs"), help="Folder searched (recursively) for result.json."),
    metric: list[str] = typer.Option(
        None, "--metric", "-m", help="Metric column (repeatable), e.g. mAP, acc@1, latency.infer_image_ms."
    ),
    baseline: str = typer.Option(
        None, "--baseline", "-b", help="Pooling choice to compare every other one against (paired over seeds)."
    ),
    where: list[str] = typer.Option(
        None, "--where", "-w", help="Keep runs with key=value (or key=v1,v2), e.g. dataset=synthwriters. Repeatable."
    ),
    out: Path = typer.Option(
        None, "--out", "-o", help="Output folder, replaced by this report's files (default: <RESULTS_DIR>/../report)."
    ),
    formats: str = typer.Option(
        None, "--format", "-f", help="Comma-separated: csv, md, tex, parquet (needs pyarrow) (default: all available)."
    ),
    plots: bool = typer.Option(
        True, "--plots/--no-plots", help="Write pareto, means, curves and cd_diagram (PNG + PDF)."
    ),
    html: bool = typer.Option(False, "--html", help="Also write report.html: one self-contained page to share."),
    allow_confounded: bool = typer.Option(
        False, "--allow-confounded", help="Compare operators even when another key differs with them (warned)."
    ),
    contexts: str = typer.Option(
        None,
        "--contexts",
        help="Comma-separated keys whose values are independent data sets for the rank tests "
        "(default: dataset,model); other varying keys stay groups inside a context.",
    ),
    mre: float = typer.Option(
        None, "--mre", help="Minimally relevant effect (metric units, e.g. 0.01): seeds needed to detect it."
    ),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """Mean ± std over seeds per configuration, paired tests against a baseline, ranks, files, plots, HTML."""
    from poolbench import report as reporting

    use_plugins(plugin_specs)  # not needed for records that keep their parts (part.*), only for older ones
    chosen_formats = reporting.parse_formats(formats)
    destination = out or results_dir.parent / "report"
    reporting.check_destination(destination)  # before anything is printed or computed
    result = reporting.build(
        results_dir,
        metrics=metric or (),
        baseline=baseline,
        where=where or (),
        allow_confounded=allow_confounded,
        contexts=contexts.split(",") if contexts else (),
        mre=mre,
    )
    if result.skipped:
        console_err.print(f"[yellow]skipped {len(result.skipped)} record(s):[/]")
        for line in result.skipped:
            console_err.print(f"  {plain(line)}", highlight=False, markup=False)
    if result.dropped:
        console_err.print(f"[yellow]left out of the statistics ({len(result.dropped)}):[/]")
        for line in result.dropped:
            console_err.print(f"  {plain(line)}", highlight=False, markup=False)
    for line in result.warnings:
        console_err.print(f"[bold yellow]warning:[/] {escape(line)}", highlight=False)
    console.print(_table(reporting.display_summary(result), _title(result), numeric_from=len(result.keys)))
    if result.baseline is not None:
        if result.comparison.empty and result.design is not None and result.design.confounded:
            console.print("nothing compared: the operators are confounded with other keys (see the warnings)")
        elif result.comparison.empty:
            console.print(
                f"no run shares a seed and configuration with a '{escape(result.baseline)}' run: nothing to compare"
            )
        else:
            console.print(
                f"paired comparisons against {escape(result.baseline)}: sign-flip permutation p (primary), t-test "
                f"and Wilcoxon p, each with its Holm-adjusted value over the {result.family_size} comparisons",
                highlight=False,
            )
        for line in result.comparison_lines:
            console.print(plain(line), highlight=False, markup=False)
    if result.ranking is not None:
        for line in reporting.ranking_lines(result.ranking):
            console.print(plain(line), highlight=False, markup=False)
    for line in result.side_by_side:
        console.print(plain(line), highlight=False, markup=False)
    for metric_name, source in result.latency_source.items():
        console.print(f"[dim]{escape(metric_name)} from {escape(source)}[/]", highlight=False)
    writers = [partial(reporting.write_tables, formats=chosen_formats)]
    if plots:
        writers.append(reporting.write_plots)
    if html:
        writers.append(reporting.write_html)
    written = reporting.write_report(result, destination, writers)
    for note in result.notes:
        console.print(f"[dim]note: {escape(note)}[/]", highlight=False)
    names = ", ".join(p.name for p in written)
    console.print(
        f"[dim]wrote {len(written)} files to {escape(reporting.safe_text(str(destination)))}: {escape(names)}[/]"
    )


def _title(result: Report) -> str:
    from poolbench.report import column_label

    grouped = ", ".join(column_label(k) for k in result.keys) or "nothing (one configuration)"
    return escape(f"{len(result.runs)} completed runs, mean ± std over seeds, grouped by {grouped}")


def _table(frame: pd.DataFrame, title: str, numeric_from: int) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(frame.columns):
        table.add_column(escape(str(column)), justify="right" if i >= numeric_from else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(escape(str(v)) for v in row))
    return table
