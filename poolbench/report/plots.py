"""Figures of a report: Pareto front, means with intervals, training curves and the critical-difference diagram.

Conventions for every figure: human labels with units (:func:`metric_label`), operator names as
given, one colour per operator across all figures (:func:`colours`), no empty panel, no panel for a
metric whose operator means differ by less than the noise (:func:`varies`) unless one of its
comparisons is significant after Holm, means as dots with intervals (never truncated bars), 8-pt text on panels about
3.3 inches wide (a paper's single column), PNG and PDF. Each file carries the report's provenance
in its metadata, and a confounded report says so on the figure itself.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poolbench import records
from poolbench import text as esc
from poolbench.report import stats
from poolbench.report.columns import column_label, context_labels, present, safe_text, treatment_labels
from poolbench.report.comparison import quality_metrics
from poolbench.report.core import Report

PANEL_W, PANEL_H = 3.3, 2.3  # inches: one panel fits a paper's single column
FONT = 8
METRICS_FILE = records.METRICS
# Human name (with unit) per record field; anything else is shown by its field name.
METRIC_LABELS = {
    "mAP": "mAP",
    "top1": "top-1 retrieval accuracy",
    "acc@1": "accuracy (top-1)",
    "acc@5": "accuracy (top-5)",
    "latency.infer_image_ms": "inference latency (ms / image)",
    "latency.infer_batch_ms": "inference latency (ms / batch)",
    "latency.train_step_ms": "training step (ms / batch)",
    "latency.pool_fwd_ms": "pooling forward (ms)",
    "latency.pool_fwdbwd_ms": "pooling forward + backward (ms)",
    "latency.peak_mem_mb": "peak memory (MB)",
    "wall_time_s": "wall time (s)",
    "loss": "training loss",
    "lr": "learning rate",
    "seconds": "epoch time (s)",
    "learned.lam": "learned λ (DGMP)",
    "learned.p": "learned p (GeM)",
    "learned.r": "learned r (LSE)",
    "learned.a": "learned mixing a",
    "cost.flops_per_image": "FLOPs / image",
    "cost.params": "parameters",
}
NOISE_FLOOR = 0.01  # relative: differences below 1% of the value are not worth a panel
SIGNIFICANCE = 0.05  # a panel with a comparison below this Holm-adjusted p is always drawn


def metric_label(metric: str) -> str:
    """``latency.infer_image_ms`` → ``inference latency (ms / image)``; soft@k, hard@k and eval.* spelt out."""
    if metric in METRIC_LABELS:
        return METRIC_LABELS[metric]
    if metric.startswith("eval."):
        return f"held-out {metric_label(metric[5:])}"
    if metric.startswith("val."):  # the validation split (dataset.val_share)
        return f"validation {metric_label(metric[4:])}"
    if metric.startswith(("soft@", "hard@")):
        return f"{metric[:4]} top-{metric[5:]}"
    if metric.startswith("learned."):
        return f"learned {metric[8:]}"
    return metric


def axis_label(metric: str) -> str:
    return metric_label(metric) + ("" if stats.higher_is_better(metric) else ", lower is better")


def colours(report: Report) -> dict[str, Any]:
    """One colour per operator (treatment label), the same in every figure of the report."""
    import matplotlib

    operators = report.operators
    cmap = matplotlib.colormaps["tab10" if len(operators) <= 10 else "tab20"]
    return {op: cmap(i % cmap.N) for i, op in enumerate(operators)}


def varies(means: Sequence[float], spreads: Sequence[float]) -> bool:
    """Whether operator means differ by more than the noise: the typical seed std (or interval
    half-width) of one operator, and at least 1% of the value."""
    means_arr = np.asarray([m for m in means if present(m)], dtype=float)
    if len(means_arr) < 2:
        return len(means_arr) == 1
    spread_arr = np.asarray([s for s in spreads if present(s)], dtype=float)
    noise = max(float(np.median(spread_arr)) if len(spread_arr) else 0.0, NOISE_FLOOR * abs(means_arr.mean()))
    return float(means_arr.max() - means_arr.min()) > noise


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": FONT,
            "axes.titlesize": FONT,
            "axes.labelsize": FONT,
            "xtick.labelsize": FONT - 1,
            "ytick.labelsize": FONT - 1,
            "legend.fontsize": FONT - 1,
            "pdf.fonttype": 42,  # embed TrueType: text stays text in the PDF
            "text.parse_math": False,  # labels come from records: a name with $...$ is text, never mathtext
        }
    )
    return plt


def _save(fig: Any, report: Report, out_dir: Path, stem: str) -> list[Path]:
    """PNG and PDF, with the provenance in their metadata and any confounding warning on the figure."""
    _plain_texts(fig)
    header = [safe_text(line) for line in report.provenance()]
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"
    fig.savefig(png, dpi=200, metadata={"Software": "poolbench report", "Description": "\n".join(header)})
    fig.savefig(pdf, metadata={"Creator": "poolbench report", "Subject": " | ".join(header)})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [png, pdf]


def _grid(plt: Any, panels: int, ncols: int) -> tuple[Any, list[Any]]:
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(PANEL_W * ncols, PANEL_H * nrows + 0.5), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.remove()  # fewer panels than grid cells: no empty frame
    return fig, flat[:panels]


def _legend(fig: Any, palette: dict[str, Any], operators: Sequence[str], kind: str = "o") -> None:
    import matplotlib.lines as mlines
    import matplotlib.patches as mpatches

    handles = [
        mpatches.Patch(color=palette[op], label=op)
        if kind == "patch"
        else mlines.Line2D([], [], color=palette[op], marker=kind, linestyle="-" if kind == "" else "", label=op)
        for op in operators
    ]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 5), frameon=False, bbox_to_anchor=(0.5, 1))


def _plain_texts(fig: Any) -> None:
    """Every text of the figure (labels, ticks, legends, titles: names from records) made one printable line
    per label line: control characters shown as escapes (``text.parse_math`` off keeps ``$`` literal)."""
    import matplotlib.text

    for artist in fig.findobj(matplotlib.text.Text):
        label = artist.get_text()
        shown = "\n".join(esc.plain(part) for part in label.split("\n"))
        if shown != label:
            artist.set_text(shown)


def _finish(fig: Any, report: Report, caption: str, *, legend: bool = True) -> None:
    """Caption under the panels, any confounding warning in red under it, legend room above; tight layout.

    The figure grows by the height of the warning so that the panels keep their size.
    """
    _plain_texts(fig)
    # characters per line of (FONT - 1) pt text; DejaVu Sans averages ~0.6 em per character
    width_chars = int(0.95 * fig.get_figwidth() * 72 / (0.6 * (FONT - 1)))
    warning = [
        line for w in report.warnings if w.startswith("CONFOUNDED") for line in textwrap.wrap(safe_text(w), width_chars)
    ]
    caption = "\n".join(line for part in caption.split("\n") for line in textwrap.wrap(part, width_chars - 8))
    line_height = (FONT + 2) / 72
    warning_height = line_height * len(warning) + (0.05 if warning else 0.0)
    fig.set_figheight(fig.get_figheight() + warning_height)
    height = fig.get_figheight()
    if warning:
        fig.text(0.01, 0.02 / height, "\n".join(warning), color="#b00000", fontsize=FONT - 1, va="bottom")
    fig.text(0.5, (warning_height + 0.03) / height, caption, ha="center", va="bottom")
    bottom = (warning_height + 0.1 + line_height * (caption.count("\n") + 1)) / height
    fig.tight_layout(rect=(0, bottom, 1, 1 - (0.3 if legend else 0.0) / height))


def _figure_contexts(report: Report) -> list[str]:
    """The keys that split figures into panels: the comparison's context (confounded keys leave it when
    confounded operators are compared anyway, and then each figure carries the warning)."""
    confounded = report.design.confounded if report.design is not None and report.allow_confounded else {}
    return [k for k in report.keys if not k.startswith(("choice.pooling", "cfg.pooling.")) and k not in confounded]


def _single_context(report: Report) -> str:
    """The title of a report's only context: its dataset and model."""
    return " / ".join(str(report.runs[c].iloc[0]) for c in ("dataset", "model") if c in report.runs)


def _context_parts(report: Report, summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    summary = summary.copy()
    if "choice.pooling" not in summary.columns and "choice.pooling" in report.runs.columns:
        summary["choice.pooling"] = report.runs["choice.pooling"].iloc[0]  # one operator: not a grouping key
    context_keys = _figure_contexts(report)
    summary["_context"] = context_labels(summary, context_keys)
    summary["_operator"] = treatment_labels(summary, report.keys)
    fallback = _single_context(report)
    return [(name or fallback, part) for name, part in summary.groupby("_context", sort=True)]


def _latency_metric(report: Report) -> str | None:
    """The latency on the Pareto plot, whether or not it was chosen as a table metric."""
    for metric in ("latency.infer_image_ms", *report.metrics):
        if metric.startswith("latency.") and metric in report.runs and report.runs[metric].notna().any():
            return metric
    return None


def _x_error(row: pd.Series, metric: str) -> Any:
    """Side-by-side interval when there is one (asymmetric), else the seed std."""
    low, high = row.get(f"{metric}.ci_low"), row.get(f"{metric}.ci_high")
    if low is not None and present(low) and present(high):
        return [[row[f"{metric}.mean"] - low], [high - row[f"{metric}.mean"]]]
    return np.nan_to_num(row[f"{metric}.std"])


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Points not beaten by a faster-or-equal one with a higher-or-equal score (lower x, higher y better)."""
    ordered = points.sort_values([x, y], ascending=[True, False])
    best = ordered[y].cummax().shift(fill_value=-math.inf)
    return ordered[ordered[y] > best]


def plot_pareto(report: Report, out_dir: Path) -> list[Path]:
    """Quality vs inference latency per context, mean ± std (or side-by-side interval), front drawn."""
    latency = _latency_metric(report)
    quality = quality_metrics(report.metrics)
    if latency is None or not quality:
        return []
    metrics = [*quality, latency]
    parts = []
    for name, part in _context_parts(report, summarize_for(report, metrics)):
        metric = next((m for m in quality if part[f"{m}.mean"].notna().any()), None)
        part = part.dropna(subset=[f"{latency}.mean"] + ([f"{metric}.mean"] if metric else []))
        if metric is not None and len(part):
            parts.append((name, metric, part))
    if not parts:
        return []
    plt = _pyplot()
    palette = colours(report)
    fig, axes = _grid(plt, len(parts), 2)
    shown: list[str] = []
    for ax, (name, metric, part) in zip(axes, parts, strict=True):
        x, y = f"{latency}.mean", f"{metric}.mean"
        front = pareto_front(part, x, y)
        if len(front) > 1:
            ax.step(front[x], front[y], where="post", color="black", linewidth=1.0, zorder=1, label="Pareto front")
        for _, row in part.iterrows():
            operator = row["_operator"]
            shown.append(operator)
            on_front = row.name in front.index
            ax.errorbar(
                row[x],
                row[y],
                xerr=_x_error(row, latency),
                yerr=np.nan_to_num(row[f"{metric}.std"]),
                fmt="o",
                markersize=6 if on_front else 4,
                markeredgecolor="black" if on_front else "none",
                capsize=2,
                color=palette[operator],
                zorder=2,
            )
        ax.set_title(name)
        ax.set_xlabel(axis_label(latency))
        ax.set_ylabel(metric_label(metric))
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    _legend(fig, palette, sorted(set(shown)))
    interval = (
        "; latency bars: 95% interval of the side-by-side measurement where it exists"
        if "side_by_side" in report.latency_source.get(latency, "")
        else ""
    )
    _finish(fig, report, f"mean ± std over seeds{interval}; black line and outlined points: Pareto front")
    return _save(fig, report, out_dir, "pareto")


def summarize_for(report: Report, metrics: Sequence[str]) -> pd.DataFrame:
    from poolbench.report.core import summarize

    recorded = [m for m in dict.fromkeys(metrics) if m in report.runs.columns]
    return summarize(report.runs, recorded, report.keys)


def _significant(report: Report, metric: str, context: str, fallback: str) -> bool:
    """Whether a comparison of this panel is significant after Holm (primary sign-flip p < 0.05)."""
    rows = report.comparison
    if rows.empty or "p_perm_holm" not in rows.columns:
        return False
    names = rows["context"].map(lambda c: c or fallback)
    chosen = rows[(rows["metric"] == metric) & (names == context)]
    return bool((chosen["p_perm_holm"] < SIGNIFICANCE).any())


def mean_panels(report: Report) -> tuple[list[tuple[str, str, pd.DataFrame]], list[str]]:
    """The (metric, context, rows) panels worth drawing, and one note per panel left out.

    A panel is left out only when no comparison in it is significant after Holm *and* its operators'
    means differ by less than the noise (:func:`varies`).
    """
    panels, omitted = [], []
    fallback = _single_context(report)
    for name, rows in _context_parts(report, report.summary):
        for metric in report.metrics:
            part = rows[rows[f"{metric}.mean"].notna()]
            if part["_operator"].nunique() < 2:  # nothing to compare in this context
                continue
            spreads = part[f"{metric}.std"]
            if f"{metric}.ci_low" in part.columns:  # side by side: its interval is the noise, not the (zero) std
                half_widths = (part[f"{metric}.ci_high"] - part[f"{metric}.ci_low"]) / 2
                spreads = half_widths.where(half_widths.notna(), spreads)
            spreads = spreads.tolist()
            if _significant(report, metric, name, fallback) or varies(part[f"{metric}.mean"].tolist(), spreads):
                panels.append((metric, name, part))
            else:
                omitted.append(f"{metric_label(metric)} on {name}")
    return panels, omitted


def mean_intervals(part: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Below/above error lengths: the 95% t-interval of the mean over seeds, the side-by-side interval
    of a single interleaved measurement, and nothing for one measurement without an interval."""
    from scipy import stats as scipy_stats

    means = part[f"{metric}.mean"].to_numpy(float)
    std = part[f"{metric}.std"].to_numpy(float)
    n = part[f"{metric}.n"].to_numpy(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        half = np.where(n >= 2, scipy_stats.t.ppf(0.975, np.maximum(n - 1, 1)) * std / np.sqrt(n), np.nan)
    half = np.nan_to_num(half)  # one measurement (n = 1 or a side-by-side copy): no spread drawn
    below, above = half.copy(), half.copy()
    if f"{metric}.ci_low" in part.columns:  # a side-by-side measurement: its interval
        lows, highs = part[f"{metric}.ci_low"].to_numpy(float), part[f"{metric}.ci_high"].to_numpy(float)
        has = ~np.isnan(lows) & ~np.isnan(highs)
        below[has], above[has] = (means - lows)[has], (highs - means)[has]
    return below, above


def plot_means(report: Report, out_dir: Path) -> list[Path]:
    """One panel per (metric, context): each operator's mean as a dot with its 95% interval.

    Dots, not bars: a bar's length reads as the value, so a bar chart of accuracy must start at 0,
    where the differences vanish; a zoomed bar axis exaggerates them.
    """
    panels, omitted = mean_panels(report)
    if omitted:
        report.notes.append(
            "means.png leaves out (no comparison significant after Holm, no difference beyond the seed noise): "
            + "; ".join(omitted)
        )
    if not panels:
        return []
    plt = _pyplot()
    palette = colours(report)
    contexts = len({name for _, name, _ in panels})
    fig, axes = _grid(plt, len(panels), min(contexts, 2) if contexts > 1 else 2)
    for ax, (metric, name, part) in zip(axes, panels, strict=True):
        operators = list(part["_operator"])
        means = part[f"{metric}.mean"].to_numpy(float)
        below, above = mean_intervals(part, metric)
        for i, operator in enumerate(operators):
            ax.errorbar(
                i, means[i], yerr=[[below[i]], [above[i]]], fmt="o", capsize=3, markersize=5, color=palette[operator]
            )
        ax.set_xticks(range(len(operators)), operators, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(operators) - 0.4)
        ax.margins(y=0.15)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(name + ("" if stats.higher_is_better(metric) else " (lower is better)"))
        ax.grid(axis="y", alpha=0.3)
    interval = any("side_by_side" in source for source in report.latency_source.values())
    caption = "dot: mean over seeds; line: 95% t-interval of the mean (none for a single measurement)" + (
        "; side-by-side latency: its 95% interval" if interval else ""
    )
    _finish(fig, report, caption, legend=False)
    return _save(fig, report, out_dir, "means")


def read_curves(report: Report) -> pd.DataFrame:
    """Per-epoch rows of every run's metrics.jsonl with its operator and context (malformed lines skipped)."""
    context_keys = _figure_contexts(report)
    rows = []
    runs = report.runs
    operators = treatment_labels(runs, report.keys)
    contexts = context_labels(runs, context_keys)
    folders = runs["run_dir"] if "run_dir" in runs.columns else pd.Series([None] * len(runs))
    for run_id, run_dir, operator, context in zip(runs["run_id"], folders, operators, contexts, strict=True):
        folder = report.run_dirs.get(run_id, Path(str(run_dir)))
        try:
            lines = records.read_metrics(folder, root=report.results_dir)
        except (OSError, ValueError) as exc:  # a FIFO, a symlink to /dev/zero, too large: its curve is left out
            report.notes.append(f"{records.first_line(exc)}: no curve for run {run_id}")
            continue
        for row in lines:
            if not isinstance(row.get("epoch"), int):
                continue
            values = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
            rows.append(
                {
                    **values,
                    "_run": run_id,
                    "_operator": operator,
                    "_context": context,
                }
            )
    return pd.DataFrame(rows)


def curve_quantities(curves: pd.DataFrame) -> list[str]:
    """loss, lr, every learned.<name>, every eval.<metric> — those present."""
    columns = set(curves.columns)
    learned = sorted(c for c in columns if c.startswith("learned."))
    held_out = sorted(c for c in columns if c.startswith(("val.", "eval.")))
    return [c for c in ("loss", "lr") if c in columns] + learned + held_out


def plot_curves(report: Report, out_dir: Path) -> list[Path]:
    """Per-epoch loss, lr, learned pooling parameters and held-out metrics: mean ± std band over seeds."""
    curves = read_curves(report)
    if curves.empty:
        report.notes.append(f"no {METRICS_FILE} found next to the records: no curves.png")
        return []
    panels = []
    for quantity in curve_quantities(curves):
        for context, part in curves.groupby("_context", sort=True):
            part = part.dropna(subset=[quantity])
            if not part.empty:
                panels.append((quantity, context, part))
    plt = _pyplot()
    palette = colours(report)
    contexts = curves["_context"].nunique()
    fig, axes = _grid(plt, len(panels), contexts if 1 < contexts <= 3 else 2)
    for ax, (quantity, context, part) in zip(axes, panels, strict=True):
        per_operator = {op: runs_of.groupby("epoch")[quantity] for op, runs_of in part.groupby("_operator", sort=True)}
        means = {op: g.mean() for op, g in per_operator.items()}
        first = next(iter(means.values()))
        if len(means) > 1 and all(m.index.equals(first.index) and np.allclose(m, first) for m in means.values()):
            # the same for every operator (e.g. the schedule): one black line, not overdrawn colours
            std = part.groupby("epoch")[quantity].std(ddof=1).fillna(0.0)
            ax.plot(first.index, first.to_numpy(), marker="o", markersize=3, color="black")
            ax.fill_between(first.index, (first - std).to_numpy(), (first + std).to_numpy(), color="black", alpha=0.1)
            ax.text(0.98, 0.95, "same for all operators", transform=ax.transAxes, ha="right", va="top", color="grey")
            per_operator = {}
        for operator, by_epoch in per_operator.items():
            mean, std = by_epoch.mean(), by_epoch.std(ddof=1).fillna(0.0)
            colour = palette.get(operator, "black")
            ax.plot(mean.index, mean.to_numpy(), marker="o", markersize=3, color=colour, label=operator)
            ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=colour, alpha=0.2)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric_label(quantity))
        ax.set_title(context or _single_context(report))
        ax.grid(alpha=0.3)
        if curves["epoch"].max() <= 12:
            ax.set_xticks(sorted(part["epoch"].unique()))
    _legend(fig, palette, sorted(curves["_operator"].unique()), kind="")
    _finish(fig, report, f"per epoch, from {METRICS_FILE}: mean ± std band over seeds")
    return _save(fig, report, out_dir, "curves")


def plot_cd_diagram(report: Report, out_dir: Path) -> list[Path]:
    """Critical-difference diagram (Demšar 2006): average ranks, bars join operators the Nemenyi test
    does not separate (α = 0.05). Needs ≥ 5 contexts and ≥ 3 operators."""
    ranking = report.ranking
    if ranking is None or ranking["nemenyi"] is None or not ranking.get("cd_diagram"):
        return []  # fewer than stats.CD_MIN_CONTEXTS contexts: the report's lines say why there is none
    import scikit_posthocs

    plt = _pyplot()
    operators = list(ranking["average_ranks"].index)
    fig, ax = plt.subplots(figsize=(PANEL_W * 2, 1.4 + 0.3 * len(operators)))
    palette = colours(report)
    scikit_posthocs.critical_difference_diagram(
        ranking["average_ranks"], ranking["nemenyi"], ax=ax, color_palette={op: palette[op] for op in operators}
    )
    metrics = ", ".join(f"{m} ({c})" for c, m in ranking["metric_of"].items())
    _finish(
        fig,
        report,
        f"average rank (1 = best) over {len(ranking['scores'])} contexts by {metrics}; Friedman p = "
        f"{ranking['friedman_p']:.2g}\nhorizontal bars join operators the Nemenyi test does not separate (α = 0.05)",
        legend=False,
    )
    return _save(fig, report, out_dir, "cd_diagram")


PLOTS: tuple[Callable[[Report, Path], list[Path]], ...] = (plot_pareto, plot_means, plot_curves, plot_cd_diagram)


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    """Every figure the report's data supports, as PNG and PDF."""
    return [path for plot in PLOTS for path in plot(report, out_dir)]


__all__ = ["column_label", "metric_label", "write_plots"]
