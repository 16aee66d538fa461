"""``poolbench report``: aggregate run records into tables, paired comparisons, files and plots."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from poolbench.cli.app import app, console, console_err

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
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: <RESULTS_DIR>/../report)."),
    formats: str = typer.Option(
        None, "--format", "-f", help="Comma-separated: csv, md, tex, parquet (needs pyarrow) (default: all available)."
    ),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="Write pareto.png and bars.png."),
) -> None:
    """Mean ± std over seeds per configuration, paired tests against a baseline, exported tables and plots."""
    from poolbench import report as reporting

    chosen_formats = reporting.parse_formats(formats)
    result = reporting.build(results_dir, metrics=metric or (), baseline=baseline, where=where or ())
    if result.skipped:
        console_err.print(f"[yellow]skipped {len(result.skipped)} record(s):[/]")
        for line in result.skipped:
            console_err.print(f"  {line}", highlight=False, markup=False)
    for line in result.warnings:
        console_err.print(f"[yellow]warning:[/] {line}", highlight=False)
    console.print(_table(reporting.display_summary(result), _title(result), numeric_from=len(result.keys)))
    if result.baseline is not None:
        if result.comparison.empty:
            console.print(f"no run shares a seed and configuration with a '{result.baseline}' run: nothing to compare")
        for line in result.comparison_lines:
            console.print(line, highlight=False)
    destination = out or results_dir.parent / "report"
    written = reporting.write_tables(result, destination, chosen_formats)
    if plots:
        written += reporting.write_plots(result, destination)
    console.print(f"[dim]wrote {len(written)} files to {destination}: {', '.join(p.name for p in written)}[/]")


def _title(result: Report) -> str:
    from poolbench.report import label

    grouped = ", ".join(label(k) for k in result.keys) or "nothing (one configuration)"
    return f"{len(result.runs)} completed runs, mean ± std over seeds, grouped by {grouped}"


def _table(frame: pd.DataFrame, title: str, numeric_from: int) -> Table:
    table = Table(title=title, title_justify="left")
    for i, column in enumerate(frame.columns):
        table.add_column(str(column), justify="right" if i >= numeric_from else "left")
    for row in frame.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    return table
