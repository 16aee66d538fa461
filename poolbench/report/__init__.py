"""``poolbench report``: loading, design, comparison and statistics (core builds the report from them),
tables, figures, HTML, atomic output."""

from poolbench.report.columns import column_label, context_label, safe_text, treatment_label
from poolbench.report.comparison import compare, ranking_lines
from poolbench.report.core import (
    DEFAULT_METRICS,
    Report,
    build,
    choose_metrics,
    environment_warnings,
    metric_columns,
    summarize,
)
from poolbench.report.design import Design, context_columns, design, group_keys, one_run_per_seed
from poolbench.report.html import write_html
from poolbench.report.loading import load, read_records
from poolbench.report.output import MANIFEST, check_destination, write_report
from poolbench.report.plots import metric_label, write_plots
from poolbench.report.tables import (
    available_formats,
    display_comparison,
    display_ranking,
    display_summary,
    format_mean_std,
    latex_escape,
    parse_formats,
    to_latex,
    to_markdown,
    write_tables,
)

__all__ = [
    "DEFAULT_METRICS", "MANIFEST", "Design", "Report", "available_formats", "build", "check_destination",
    "choose_metrics", "compare", "context_columns", "context_label", "design", "display_comparison",
    "display_ranking", "display_summary", "environment_warnings", "format_mean_std", "group_keys", "column_label",
    "latex_escape", "load", "metric_columns", "metric_label", "one_run_per_seed", "parse_formats",
    "ranking_lines", "read_records", "safe_text", "summarize", "to_latex", "to_markdown",
    "treatment_label", "write_html", "write_plots", "write_report", "write_tables",
]  # fmt: skip
