"""Aggregate run records into comparison tables, paired significance tests, exports and plots.

Library code: everything returns DataFrames, strings or written paths; ``poolbench report`` renders.

Records are grouped by the config keys that vary between runs (seeds and the keys that do not
change what a run computes excluded); a key that is fully determined by the keys already chosen
(e.g. ``pooling.lr_mult`` by the pooling choice) is left out so the table shows what was swept.
The paired comparison treats the pooling choice and its parameters as the *treatment* and every
other varying key as the *context*: runs pair up when their context and seed are equal.
"""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from poolbench import records
from poolbench.config import NON_IDENTITY_KEYS
from poolbench.errors import PoolbenchError, unknown_choice

DEFAULT_METRICS = ("mAP", "top1", "acc@1", "acc@5", "latency.infer_image_ms", "latency.peak_mem_mb")
ENV_KEYS = ("env.torch", "env.device_name", "env.git_commit")
FORMATS = ("csv", "md", "tex", "parquet")
POOLING_KEY = "choice.pooling"
SEED_KEY = "seed"
# Choice columns considered first, in table order; pooling last so operators sit side by side.
CHOICE_ORDER = ("choice.dataset", "choice.model", "choice.trainer", "choice.local_pooling", POOLING_KEY)
NOT_METRICS = ("cfg.", "choice.", "env.", "data.")
BOOKKEEPING = ("seed", "feature_map_h", "feature_map_w", "failed_epoch", "pool_out_features", "num_params")
# Smallest n at which a two-sided exact Wilcoxon signed-rank test can reach p < 0.05 (2/2^6).
WILCOXON_MIN_N = 6


@dataclass
class Report:
    """Everything ``poolbench report`` shows and writes."""

    runs: pd.DataFrame  # one row per completed run, every record field
    skipped: list[str]  # one line per broken or unfinished record
    keys: list[str]  # varying config columns the summary is grouped by
    metrics: list[str]
    summary: pd.DataFrame  # keys + <metric>.mean/.std/.n per group
    baseline: str | None = None
    comparison: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per (context, operator, metric)
    warnings: list[str] = field(default_factory=list)

    @property
    def comparison_lines(self) -> list[str]:
        return [_comparison_line(row) for row in self.comparison.to_dict("records")]


def label(column: str) -> str:
    """Display name of a record column: ``choice.pooling`` → ``pooling``, ``cfg.trainer.lr`` → ``trainer.lr``."""
    for prefix in ("choice.", "cfg."):
        if column.startswith(prefix):
            return column[len(prefix) :]
    return column


def load(results_dir: Path, where: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Completed runs under ``results_dir`` (filtered by ``key=value[,value...]``) and the skipped ones."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise PoolbenchError(
            f"results directory {results_dir} does not exist (run `poolbench sweep` or `poolbench train` first)"
        )
    found, skipped = records.iter_records(results_dir)
    if not found and not skipped:
        raise PoolbenchError(f"no run records (result.json) under {results_dir}")
    completed = []
    for record in found:
        if record["status"] == "completed":
            completed.append(record)
            continue
        error = f": {record['error']}" if record.get("error") else ""
        skipped.append(f"{record.get('run_id', record['run_dir'])} is {record['status']}{error}")
    if not completed:
        raise PoolbenchError(f"no completed runs under {results_dir} ({len(skipped)} unfinished or broken)")
    frame = pd.DataFrame.from_records(completed)
    for column in frame.columns:
        if frame[column].dtype == object:  # lists and dicts cannot be grouped or compared
            frame[column] = frame[column].map(lambda v: json.dumps(v) if isinstance(v, list | dict) else v)
    for condition in where:
        frame = _filter(frame, condition)
    if frame.empty:
        raise PoolbenchError(f"no completed run matches --where {' '.join(where)}")
    return frame.reset_index(drop=True), skipped


def _column(frame: pd.DataFrame, key: str, what: str) -> str:
    for candidate in (key, f"choice.{key}", f"cfg.{key}"):
        if candidate in frame.columns:
            return candidate
    options = [label(c) for c in frame.columns if not c.startswith(("env.", "data.", "train.", "latency."))]
    raise PoolbenchError(unknown_choice(what, key, sorted(set(options))))


def _matches(value: Any, wanted: str) -> bool:
    if str(value).lower() == wanted.lower():
        return True
    try:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isclose(value, float(wanted))
    except ValueError:
        return False


def _filter(frame: pd.DataFrame, condition: str) -> pd.DataFrame:
    key, sep, wanted = condition.partition("=")
    if not sep or not key:
        raise PoolbenchError(f"--where takes key=value (or key=v1,v2), got '{condition}'")
    column = _column(frame, key.strip(), "--where key")
    values = [v.strip() for v in wanted.split(",")]
    keep = frame[column].map(lambda v: any(_matches(v, w) for w in values))
    return frame[keep.astype(bool)]


def _is_identity_column(column: str) -> bool:
    if column == "choice.experiment":  # a preset's name; what it sets shows up in the cfg.* keys
        return False
    if column.startswith("cfg."):
        key = column[4:]
        return key != "seed" and not key.startswith(NON_IDENTITY_KEYS + ("grid",))
    return column.startswith("choice.")


def group_keys(frame: pd.DataFrame) -> list[str]:
    """The varying config columns, minus those determined by the ones chosen before them."""
    candidates = [c for c in CHOICE_ORDER if c in frame.columns]
    candidates += [c for c in frame.columns if c.startswith("choice.") and c not in candidates]
    candidates += sorted(c for c in frame.columns if c.startswith("cfg."))
    chosen: list[str] = []
    for column in candidates:
        if not _is_identity_column(column) or frame[column].nunique(dropna=False) < 2:
            continue
        if chosen and frame.groupby(chosen, dropna=False)[column].nunique(dropna=False).max() < 2:
            continue
        chosen.append(column)
    treatment = [c for c in chosen if _is_treatment(c)]
    return [c for c in chosen if c not in treatment] + treatment


def _is_treatment(column: str) -> bool:
    return column == POOLING_KEY or column.startswith("cfg.pooling.")


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric record fields that can be aggregated."""
    return [
        c
        for c in frame.columns
        if not c.startswith(NOT_METRICS)
        and c not in BOOKKEEPING
        and pd.api.types.is_numeric_dtype(frame[c])
        and not pd.api.types.is_bool_dtype(frame[c])
    ]


def choose_metrics(frame: pd.DataFrame, requested: Sequence[str] = ()) -> list[str]:
    available = metric_columns(frame)
    by_lower = {m.lower(): m for m in available}
    resolved = []
    for metric in requested:
        if metric not in available and metric.lower() not in by_lower:
            raise PoolbenchError(unknown_choice("metric", metric, available))
        resolved.append(metric if metric in available else by_lower[metric.lower()])
    if resolved:
        return list(dict.fromkeys(resolved))
    chosen = [m for m in DEFAULT_METRICS if m in available and frame[m].notna().any()]
    if not chosen:
        raise PoolbenchError(
            f"none of the default metrics is recorded; choose with --metric from: {', '.join(available)}"
        )
    return chosen


def _groups(frame: pd.DataFrame, keys: list[str]) -> Any:
    if not keys:
        return frame.groupby(np.zeros(len(frame), dtype=int))
    try:
        return frame.groupby(keys, dropna=False, sort=True)
    except TypeError:  # mixed types in a key column cannot be sorted
        return frame.groupby(keys, dropna=False, sort=False)


def summarize(frame: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """One row per group: key values, ``n`` runs, and ``<metric>.mean/.std/.n`` (std with ddof=1)."""
    rows = []
    for values, group in _groups(frame, list(keys)):
        row: dict[str, Any] = dict(zip(keys, values if keys else (), strict=True))
        row["n"] = len(group)
        for metric in metrics:
            column = group[metric].astype(float)
            row[f"{metric}.mean"] = column.mean()
            row[f"{metric}.std"] = column.std(ddof=1)
            row[f"{metric}.n"] = int(column.count())
        rows.append(row)
    return pd.DataFrame(rows)


def treatment_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    """``gem`` or, when pooling parameters were swept too, ``gem (p=3)``."""
    params = [
        f"{label(k)[len('pooling.') :]}={row[k]}" for k in keys if k.startswith("cfg.pooling.") and _present(row[k])
    ]
    name = str(row.get(POOLING_KEY, row.get("pooling", "?")))
    return f"{name} ({', '.join(params)})" if params else name


def _present(value: Any) -> bool:
    return not (isinstance(value, float) and math.isnan(value)) and value is not None


def context_label(row: dict[str, Any] | pd.Series, keys: Sequence[str]) -> str:
    parts = [str(row[k]) for k in keys if not _is_treatment(k) and _present(row[k])]
    return " / ".join(parts)


def compare(frame: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str], baseline: str) -> pd.DataFrame:
    """Paired differences (operator − baseline) over seeds shared within each context.

    Columns: context, pooling, baseline, metric, n, mean_delta, std_delta, ci95 (half-width of the
    t-interval), p_ttest (scipy.stats.ttest_rel), p_wilcoxon (n ≥ 6 only), per_seed, mean, baseline_mean.
    """
    from scipy import stats

    if POOLING_KEY not in frame.columns:
        raise PoolbenchError("records carry no pooling choice (choice.pooling); cannot compare operators")
    operators = sorted(frame[POOLING_KEY].dropna().astype(str).unique())
    if baseline not in operators:
        raise PoolbenchError(unknown_choice("baseline pooling", baseline, operators))
    treatment_keys = [k for k in keys if _is_treatment(k)]
    context_keys = [k for k in keys if not _is_treatment(k)]
    rows: list[dict[str, Any]] = []
    for _, context in _groups(frame, context_keys):
        base = context[context[POOLING_KEY] == baseline]
        if base.empty:
            continue
        if base[SEED_KEY].duplicated().any():
            raise PoolbenchError(
                f"baseline '{baseline}' has several variants per seed"
                f" in {context_label(base.iloc[0], keys) or 'the runs'}; "
                "narrow it down with --where pooling.<param>=<value>"
            )
        others = context[context[POOLING_KEY] != baseline]
        for _, treated in _groups(others, treatment_keys or [POOLING_KEY]):
            first = treated.iloc[0]
            for metric in metrics:
                pairs = treated[[SEED_KEY, metric]].merge(base[[SEED_KEY, metric]], on=SEED_KEY, suffixes=("", ".base"))
                pairs = pairs.dropna().sort_values(SEED_KEY)
                if pairs.empty:
                    continue
                values, base_values = pairs[metric].to_numpy(float), pairs[f"{metric}.base"].to_numpy(float)
                deltas = values - base_values
                n = len(deltas)
                std = float(np.std(deltas, ddof=1)) if n > 1 else math.nan
                with warnings.catch_warnings():  # constant differences: scipy warns and returns nan
                    warnings.simplefilter("ignore")
                    p_ttest = float(stats.ttest_rel(values, base_values).pvalue) if n > 1 else math.nan
                    p_wilcoxon = (
                        float(stats.wilcoxon(values, base_values).pvalue)
                        if n >= WILCOXON_MIN_N and np.any(deltas != 0)
                        else math.nan
                    )
                rows.append(
                    {
                        "context": context_label(first, keys),
                        "pooling": treatment_label(first, keys),
                        "baseline": baseline,
                        "metric": metric,
                        "n": n,
                        "mean_delta": float(deltas.mean()),
                        "std_delta": std,
                        "ci95": float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else math.nan,
                        "p_ttest": p_ttest,
                        "p_wilcoxon": p_wilcoxon,
                        "per_seed": " ".join(f"{s}:{d:+.4g}" for s, d in zip(pairs[SEED_KEY], deltas, strict=True)),
                        "mean": float(values.mean()),
                        "baseline_mean": float(base_values.mean()),
                    }
                )
    order = {m: i for i, m in enumerate(metrics)}
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["metric", "context", "pooling"], key=lambda c: c.map(order) if c.name == "metric" else c)


def _fmt_p(p: float) -> str:
    if math.isnan(p):
        return "n/a"
    return f"{p:.2g}" if p >= 0.001 else "< 0.001"


def _comparison_line(row: dict[str, Any]) -> str:
    """``dgmp vs avg: ΔmAP = +0.041 ± 0.012 (95% CI), p = 0.03, n = 3``."""
    where = f"[{row['context']}] " if row["context"] else ""
    ci = "n/a" if math.isnan(row["ci95"]) else f"{row['ci95']:.3g}"
    wilcoxon = "" if math.isnan(row["p_wilcoxon"]) else f", Wilcoxon p {_p_clause(row['p_wilcoxon'])}"
    return (
        f"{where}{row['pooling']} vs {row['baseline']}: Δ{row['metric']} = {row['mean_delta']:+.3g} ± {ci} (95% CI), "
        f"p {_p_clause(row['p_ttest'])}{wilcoxon}, n = {row['n']}"
    )


def _p_clause(p: float) -> str:
    text = _fmt_p(p)
    return text if text.startswith("<") else f"= {text}"


def environment_warnings(frame: pd.DataFrame) -> list[str]:
    """One line per environment field (torch version, device, git commit) on which the runs differ."""
    lines = []
    for column in ENV_KEYS:
        if column not in frame.columns:
            continue
        counts = frame[column].fillna("unknown").astype(str).value_counts()
        if len(counts) > 1:
            spread = ", ".join(f"{value} ({count} runs)" for value, count in counts.items())
            lines.append(f"compared runs differ in {column[4:]}: {spread}")
    return lines


def build(
    results_dir: Path,
    *,
    metrics: Sequence[str] = (),
    baseline: str | None = None,
    where: Sequence[str] = (),
) -> Report:
    frame, skipped = load(results_dir, where)
    keys = group_keys(frame)
    chosen = choose_metrics(frame, metrics)
    report = Report(
        runs=frame,
        skipped=skipped,
        keys=keys,
        metrics=chosen,
        summary=summarize(frame, chosen, keys),
        baseline=baseline,
        warnings=environment_warnings(frame),
    )
    if baseline is not None:
        report.comparison = compare(frame, chosen, keys, baseline)
    return report


# ----------------------------------------------------------------------------------------- formatting


def format_mean_std(mean: float, std: float, n: int | None = None, *, latex: bool = False) -> str:
    """``0.712 ± 0.013 (3)``; decimals follow the magnitude (3 below 10, 2 below 100, else 1)."""
    if math.isnan(mean):
        return "-"
    magnitude = abs(mean)
    decimals = 3 if magnitude < 10 else 2 if magnitude < 100 else 1
    plus_minus = r" \pm " if latex else " ± "
    text = f"{mean:.{decimals}f}" + ("" if math.isnan(std) else f"{plus_minus}{std:.{decimals}f}")
    if latex:
        text = f"${text}$"
    return text + (f" ({n})" if n is not None else "")


def display_summary(report: Report, *, latex: bool = False) -> pd.DataFrame:
    """The summary with one ``mean ± std`` text cell per metric, as shown and exported to md/tex."""
    columns: dict[str, list[str]] = {label(k): [_cell(v) for v in report.summary[k]] for k in report.keys}
    columns["n"] = [str(n) for n in report.summary["n"]]
    for metric in report.metrics:
        means, stds, counts = (report.summary[f"{metric}.{s}"] for s in ("mean", "std", "n"))
        all_n = report.summary["n"]
        columns[metric] = [
            format_mean_std(m, s, None if c == n else int(c), latex=latex)
            for m, s, c, n in zip(means, stds, counts, all_n, strict=True)
        ]
    return pd.DataFrame(columns)


def display_comparison(report: Report) -> pd.DataFrame:
    rows = []
    for row in report.comparison.to_dict("records"):
        ci = "" if math.isnan(row["ci95"]) else f" ± {row['ci95']:.3g}"
        rows.append(
            {
                **({"context": row["context"]} if report.comparison["context"].astype(bool).any() else {}),
                "pooling": row["pooling"],
                "vs": row["baseline"],
                "metric": row["metric"],
                "Δ mean ± 95% CI": f"{row['mean_delta']:+.3g}{ci}",
                "p (t-test)": _fmt_p(row["p_ttest"]),
                "p (Wilcoxon)": _fmt_p(row["p_wilcoxon"]),
                "n": str(row["n"]),
            }
        )
    return pd.DataFrame(rows)


def _cell(value: Any) -> str:
    return "-" if not _present(value) else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    def escape(cell: object) -> str:
        return str(cell).replace("|", r"\|")

    lines = ["| " + " | ".join(escape(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}
_LATEX_SPECIAL |= {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "$": r"\$", "Δ": r"$\Delta$", "±": r"$\pm$"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs table; cells already in math mode (``$...$``) are kept as they are."""

    def math_cell(value: object) -> str:
        text = str(value)
        if text.startswith("$"):
            math_part, _, rest = text[1:].partition("$")
            return f"${math_part}$" + latex_escape(rest)
        return latex_escape(text)

    spec = "l" * len(table.columns)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(caption)}}}",
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(latex_escape(str(c)) for c in table.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(math_cell(v) for v in row) + r" \\" for row in table.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- writing


def available_formats() -> list[str]:
    return [f for f in FORMATS if f != "parquet" or importlib.util.find_spec("pyarrow") is not None]


def parse_formats(text: str | Sequence[str] | None) -> list[str]:
    """``"csv,md"`` → ``["csv", "md"]``; None → every available format."""
    if text is None:
        return available_formats()
    items = [t.strip().lower() for part in ([text] if isinstance(text, str) else text) for t in part.split(",")]
    for item in items:
        if item not in FORMATS:
            raise PoolbenchError(unknown_choice("report format", item, FORMATS))
        if item not in available_formats():
            raise PoolbenchError(f"format {item} needs pyarrow, which is not installed (pip install pyarrow)")
    return list(dict.fromkeys(items))


def write_tables(report: Report, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """summary.*, comparison.* (with a baseline) and runs.csv / runs.parquet (one row per run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    tables: list[tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, str]] = [
        (
            "summary",
            report.summary.rename(columns={k: label(k) for k in report.keys}),
            display_summary(report),
            display_summary(report, latex=True),
            f"Mean ± std over seeds (n runs) of {', '.join(report.metrics)}",
        )
    ]
    if not report.comparison.empty:
        shown = display_comparison(report)
        caption = f"Paired differences against {report.baseline} over matching seeds (mean ± 95% CI, paired t-test)"
        tables.append(("comparison", report.comparison, shown, shown, caption))
    for name, raw, shown, shown_tex, caption in tables:
        if "csv" in formats:
            raw.to_csv(out_dir / f"{name}.csv", index=False)
            written.append(out_dir / f"{name}.csv")
        if "md" in formats:
            (out_dir / f"{name}.md").write_text(to_markdown(shown), encoding="utf-8")
            written.append(out_dir / f"{name}.md")
        if "tex" in formats:
            (out_dir / f"{name}.tex").write_text(to_latex(shown_tex, caption), encoding="utf-8")
            written.append(out_dir / f"{name}.tex")
    if "csv" in formats:
        report.runs.to_csv(out_dir / "runs.csv", index=False)
        written.append(out_dir / "runs.csv")
    if "parquet" in formats:
        report.runs.to_parquet(out_dir / "runs.parquet", index=False)
        written.append(out_dir / "runs.parquet")
    return written


# ------------------------------------------------------------------------------------------- plotting


def _latency_metric(report: Report) -> str | None:
    """The latency shown on the Pareto plot, whether or not it was chosen as a table metric."""
    for metric in ("latency.infer_image_ms", *report.metrics):
        if metric.startswith("latency.") and metric in report.runs and report.runs[metric].notna().any():
            return metric
    return None


def _quality_metrics(report: Report) -> list[str]:
    return [m for m in report.metrics if not m.startswith("latency.")]


def _contexts(report: Report, summary: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    summary = summary.copy()
    summary["_context"] = [context_label(row, report.keys) for _, row in summary.iterrows()]
    summary["_operator"] = [treatment_label(row, report.keys) for _, row in summary.iterrows()]
    fallback = " / ".join(str(report.runs[c].iloc[0]) for c in ("dataset", "model") if c in report.runs)
    return [(name or fallback, part) for name, part in summary.groupby("_context", sort=False)]


def plot_pareto(report: Report, path: Path) -> Path | None:
    """Quality metric vs latency, one point per operator with ±std bars, one panel per context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latency, quality = _latency_metric(report), _quality_metrics(report)
    if latency is None or not quality:
        return None
    metric = quality[0]
    contexts = _contexts(report, summarize(report.runs, [metric, latency], report.keys))
    columns = min(3, len(contexts))
    rows = math.ceil(len(contexts) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(7.0, 5.5 * columns), 4.4 * rows), squeeze=False)
    operators = sorted({op for _, part in contexts for op in part["_operator"]})
    colours = {op: plt.get_cmap("tab10" if len(operators) <= 10 else "tab20")(i) for i, op in enumerate(operators)}
    for ax, (name, part) in zip(axes.flat, contexts, strict=False):
        for _, row in part.iterrows():
            ax.errorbar(
                row[f"{latency}.mean"],
                row[f"{metric}.mean"],
                xerr=np.nan_to_num(row[f"{latency}.std"]),
                yerr=np.nan_to_num(row[f"{metric}.std"]),
                fmt="o",
                capsize=3,
                color=colours[row["_operator"]],
            )
            ax.annotate(
                row["_operator"],
                (row[f"{latency}.mean"], row[f"{metric}.mean"]),
                textcoords="offset points",
                xytext=(5, 5),
                fontsize=8,
            )
        front = part.sort_values(f"{latency}.mean")
        best = front[f"{metric}.mean"].cummax()
        front = front[front[f"{metric}.mean"] >= best]  # not beaten by a faster operator
        ax.plot(front[f"{latency}.mean"], front[f"{metric}.mean"], "--", color="grey", linewidth=1, zorder=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(f"{latency} (lower is better)")
        ax.set_ylabel(f"{metric} (higher is better)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(contexts) :]:
        ax.set_visible(False)
    fig.suptitle(f"{metric} vs {latency}\nmean ± std over seeds; dashed: Pareto front", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_bars(report: Report, path: Path) -> Path | None:
    """Grouped bars per context (backbone / dataset), one bar per operator, one panel per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report.metrics
    contexts = _contexts(report, report.summary)
    operators = list(dict.fromkeys(op for _, part in contexts for op in part["_operator"]))
    if not metrics or not operators:
        return None
    fig, axes = plt.subplots(
        len(metrics),
        1,
        figsize=(max(6.0, 1.2 + 0.5 * len(operators) * len(contexts)), 3.2 * len(metrics)),
        squeeze=False,
    )
    width = 0.8 / len(operators)
    cmap = plt.get_cmap("tab10" if len(operators) <= 10 else "tab20")
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        low, high = math.inf, -math.inf
        for i, operator in enumerate(operators):
            means, stds = [], []
            for _, part in contexts:
                match = part[part["_operator"] == operator]
                means.append(float(match[f"{metric}.mean"].iloc[0]) if len(match) else math.nan)
                stds.append(float(np.nan_to_num(match[f"{metric}.std"].iloc[0])) if len(match) else 0.0)
            x = np.arange(len(contexts)) + (i - (len(operators) - 1) / 2) * width
            ax.bar(x, means, width, yerr=stds, capsize=2, label=operator, color=cmap(i))
            finite = [(m - s, m + s) for m, s in zip(means, stds, strict=True) if not math.isnan(m)]
            if finite:
                low, high = min(low, *(f[0] for f in finite)), max(high, *(f[1] for f in finite))
        if math.isfinite(low) and high > low:
            # Differences between operators are small next to the values: zoom in, and say so.
            margin = 0.25 * (high - low)
            bottom = max(0.0, low - margin) if low >= 0 else low - margin
            ax.set_ylim(bottom, high + margin)
            if bottom > 0:
                ax.text(
                    0.005,
                    0.98,
                    f"axis starts at {bottom:.3g}",
                    transform=ax.transAxes,
                    fontsize=7,
                    va="top",
                    color="grey",
                )
        ax.set_xticks(np.arange(len(contexts)), [name for name, _ in contexts], fontsize=9)
        ax.set_ylabel(metric + (" (lower is better)" if metric.startswith("latency.") else ""))
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(
        ncol=min(len(operators), 6), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.02), frameon=False
    )
    fig.suptitle("mean ± std over seeds", y=0.998, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_plots(report: Report, out_dir: Path) -> list[Path]:
    written = [plot_pareto(report, out_dir / "pareto.png"), plot_bars(report, out_dir / "bars.png")]
    return [p for p in written if p is not None]
