"""The report's tables as text (console, Markdown, booktabs LaTeX) and as files (CSV, Parquet).

Every exported table starts with the report's provenance (results folder, filters, metrics, grouping,
warnings): ``# `` comment lines in CSV (read back with ``pandas.read_csv(path, comment="#")``; text
cells are quoted so a ``#`` inside one is safe), plain lines above a Markdown table, ``%`` lines and
the caption in LaTeX, and the Parquet file's metadata.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from poolbench import text as esc
from poolbench.errors import PoolbenchError, unknown_choice
from poolbench.report.columns import column_label, present
from poolbench.report.comparison import TOO_FEW, format_p, ranking_lines, sign_flip_kind, too_few
from poolbench.report.core import FORMATS, Report
from poolbench.report.power import MAX_SEEDS
from poolbench.report.stats import DECIDE_MIN_N, P_DESCRIPTIONS


def format_mean_std(mean: float, std: float, n: int | None = None, *, latex: bool = False) -> str:
    """``0.712 ± 0.013 (3)``; decimals follow the magnitude (3 below 10, 2 below 100, else 1)."""
    if math.isnan(mean):
        return "-"
    decimals = _decimals(mean)
    plus_minus = r" \pm " if latex else " ± "
    text = f"{mean:.{decimals}f}" + ("" if math.isnan(std) else f"{plus_minus}{std:.{decimals}f}")
    if latex:
        text = f"${text}$"
    return text + (f" ({n})" if n is not None else "")


def _decimals(value: float) -> int:
    magnitude = abs(value)
    return 3 if magnitude < 10 else 2 if magnitude < 100 else 1


def format_interval(mean: float, low: float, high: float) -> str:
    """``0.657 [0.650, 0.664]``: a side-by-side measurement with its 95% interval."""
    d = _decimals(mean)
    return f"{mean:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def display_summary(report: Report, *, latex: bool = False) -> pd.DataFrame:
    """The summary with one ``mean ± std`` text cell per metric, as shown and exported to md/tex.

    A latency taken from side_by_side.json shows its interval instead: ``value [low, high]``.
    """
    columns: dict[str, list[str]] = {column_label(k): [_cell(v) for v in report.summary[k]] for k in report.keys}
    columns["n"] = [str(n) for n in report.summary["n"]]
    for metric in report.metrics:
        means, stds, counts = (report.summary[f"{metric}.{s}"] for s in ("mean", "std", "n"))
        all_n = report.summary["n"]
        cells = [
            format_mean_std(m, s, None if c == n else int(c), latex=latex)
            for m, s, c, n in zip(means, stds, counts, all_n, strict=True)
        ]
        if f"{metric}.ci_low" in report.summary.columns:
            lows, highs = report.summary[f"{metric}.ci_low"], report.summary[f"{metric}.ci_high"]
            cells = [
                format_interval(m, lo, hi) if present(lo) and present(hi) and present(m) else cell
                for cell, m, lo, hi in zip(cells, means, lows, highs, strict=True)
            ]
        columns[metric] = cells
    return pd.DataFrame(columns)


def _num(value: float, fmt: str = "+.3g") -> str:
    if not present(value) or math.isnan(value):
        return "n/a"
    return "none" if math.isinf(value) else f"{value:{fmt}}"


def _count(value: float) -> str:
    if not present(value) or math.isnan(value):
        return "n/a"
    return f">{MAX_SEEDS}" if math.isinf(value) else str(int(value))


def display_comparison(report: Report) -> pd.DataFrame:
    """The comparison as shown and exported to md/tex/html: every p-value beside its Holm-adjusted value."""
    rows = []
    with_context = report.comparison["context"].astype(bool).any()
    for row in report.comparison.to_dict("records"):
        ci = "" if math.isnan(row["ci95"]) else f" ± {row['ci95']:.3g}"
        few = too_few(row)
        needed = row.get("n_needed", math.nan)
        rows.append(
            {
                **({"context": row["context"]} if with_context else {}),
                "pooling": row["pooling"],
                "vs": row["baseline"],
                "metric": row["metric"] + ("" if row["higher_is_better"] else " (lower is better)"),
                "Δ mean ± 95% CI": f"{row['mean_delta']:+.3g}{ci}",
                "p (sign-flip)": format_p(row["p_perm"]),
                "p Holm": format_p(row["p_perm_holm"]),
                "sign-flip p is": sign_flip_kind(row),
                "p (t-test)": format_p(row["p_ttest"]),
                "t-test Holm": format_p(row["p_ttest_holm"]),
                "p (Wilcoxon)": format_p(row["p_wilcoxon"]),
                "Wilcoxon Holm": format_p(row["p_wilcoxon_holm"]),
                "d_z": _num(row["effect_dz"], "+.2g") + (" (few seeds)" if few and present(row["effect_dz"]) else ""),
                "P(better)": f"{row['p_improve']:.2f}" + (" (few seeds)" if few else ""),
                "n": str(row["n"]),
                "MDE": _num(row.get("mde", math.nan), ".3g"),
                "n needed": _count(needed),
                "note": TOO_FEW if few else "",
                **({"confounded by": row["confounded_by"]} if report.allow_confounded else {}),
            }
        )
    return pd.DataFrame(rows)


def comparison_caption(report: Report) -> str:
    """What every number of the comparison table is (the same text in md, tex and html)."""
    from poolbench.report.power import POWER, family_alpha

    target = f"Δ = {report.mre:g} (--mre)" if report.mre is not None else "the observed Δ"
    return (
        f"Paired differences against {report.baseline} over matching seeds (one run per configuration and seed). "
        f"Δ mean ± 95% t-interval (none where every Δ is equal). p (sign-flip): {P_DESCRIPTIONS['p_perm']}; "
        f"p (t-test): {P_DESCRIPTIONS['p_ttest']}; p (Wilcoxon): {P_DESCRIPTIONS['p_wilcoxon']}; each beside its "
        f"Holm-adjusted value over the {report.family_size} comparisons. d_z = mean Δ / sd Δ (from 3 pairs); "
        f"P(better): share of seeds improved. MDE: smallest true Δ detected with {POWER:.0%} power at the "
        f"current n and alpha = 0.05 / {report.family_size} = {family_alpha(report.family_size):.3g} (Holm's strictest "
        f"step; statsmodels TTestPower; 'none' where the sign-flip test cannot reach that alpha); n needed: pairs "
        f"to detect {target} likewise. Below {DECIDE_MIN_N} pairs a comparison cannot decide."
    )


def display_ranking(ranking: dict[str, Any]) -> pd.DataFrame:
    """Operators by average rank, with their rank in each context."""
    ranks = ranking["ranks"]
    table = pd.DataFrame({"pooling": list(ranking["average_ranks"].index)})
    table["average rank"] = [f"{r:.2f}" for r in ranking["average_ranks"]]
    for context in ranks.index:
        metric = ranking["metric_of"][context]
        table[f"{context} ({metric})"] = [f"{ranks.loc[context, op]:.1f}" for op in table["pooling"]]
    return table


def _cell(value: Any) -> str:
    return "-" if not present(value) else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    escape = esc.markdown  # cells and headers come from records: data, never Markdown

    lines = ["| " + " | ".join(escape(c) for c in table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


latex_escape = esc.latex  # every special character literal: no \input or \write18 from a record


def to_latex(table: pd.DataFrame, caption: str, comments: Sequence[str] = ()) -> str:
    """A booktabs table; cells already in math mode (``$...$``) are kept as they are."""

    math_cell = esc.latex_cell  # only poolbench's own $number \pm number$ stays math

    spec = "l" * len(table.columns)
    lines = [f"% {latex_escape(line)}" for line in comments]
    lines += [
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


def _csv(frame: pd.DataFrame, path: Path, header: Sequence[str]) -> None:
    comments = "".join(f"# {esc.plain(line)}\n" for line in header)  # one line each, whatever a record holds
    text = comments + frame.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)
    path.write_text(text, encoding="utf-8")


def _markdown(frame: pd.DataFrame, path: Path, header: Sequence[str], caption: str) -> None:
    lines = [f"**{esc.markdown(line)}**" if line.startswith("WARNING") else esc.markdown(line) for line in header]
    body = "  \n".join(lines) + "\n\n" + esc.markdown(caption) + "\n\n" + to_markdown(frame)
    path.write_text(body, encoding="utf-8")


def write_tables(report: Report, out_dir: Path, formats: Sequence[str]) -> list[Path]:
    """summary.*, comparison.* (with a baseline), ranking.* (several contexts) and runs.csv / runs.parquet."""
    out_dir.mkdir(parents=True, exist_ok=True)
    header = report.provenance()
    warned = "" if not report.warnings else " WARNING: " + " ".join(report.warnings)
    written: list[Path] = []
    tables: list[tuple[str, pd.DataFrame, pd.DataFrame, pd.DataFrame, str]] = [
        (
            "summary",
            report.summary.rename(columns={k: column_label(k) for k in report.keys}),
            display_summary(report),
            display_summary(report, latex=True),
            f"Mean ± std over seeds (n runs) of {', '.join(report.metrics)}",
        )
    ]
    if not report.comparison.empty:
        shown = display_comparison(report)
        caption = comparison_caption(report)
        tables.append(("comparison", report.comparison, shown, shown, caption))
    if report.ranking is not None:
        shown = display_ranking(report.ranking)
        caveats = [line for line in ranking_lines(report.ranking) if line.startswith(("within", "no critical"))]
        caption = " ".join(["Rank of each operator per context (1 = best) and average rank.", *caveats])
        tables.append(("ranking", shown, shown, shown, caption))
    for name, raw, shown, shown_tex, caption in tables:
        if "csv" in formats:
            _csv(raw, out_dir / f"{name}.csv", header)
            written.append(out_dir / f"{name}.csv")
        if "md" in formats:
            _markdown(shown, out_dir / f"{name}.md", header, caption)
            written.append(out_dir / f"{name}.md")
        if "tex" in formats:
            (out_dir / f"{name}.tex").write_text(to_latex(shown_tex, caption + warned, header), encoding="utf-8")
            written.append(out_dir / f"{name}.tex")
    if "csv" in formats:
        _csv(report.runs, out_dir / "runs.csv", header)
        written.append(out_dir / "runs.csv")
    if "parquet" in formats:
        frame = report.runs.copy()
        frame.attrs = {"poolbench_report": json.dumps(header)}
        frame.to_parquet(out_dir / "runs.parquet", index=False)
        written.append(out_dir / "runs.parquet")
    return written
