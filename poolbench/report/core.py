"""The report: :class:`Report` and :func:`build`, which runs the jobs of the package in order, and the
aggregation over seeds (metrics, summary) the tables and figures read.

Library code: everything returns DataFrames or strings; ``poolbench report`` renders, and
:mod:`poolbench.report.output` writes the files. The jobs live in their own modules:
:mod:`~poolbench.report.loading` (records to a frame, side-by-side latencies),
:mod:`~poolbench.report.design` (grouping keys, confounders, one run per seed, rank contexts),
:mod:`~poolbench.report.comparison` (paired tests against a baseline, ranks) and
:mod:`~poolbench.report.columns` (column names and labels shared by all of them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from poolbench.errors import PoolbenchError, unknown_choice
from poolbench.report import protocol
from poolbench.report.columns import (
    NOT_METRICS,
    column_label,
    group_frames,
    is_numeric_column,
    safe_text,
    treatment_labels,
)
from poolbench.report.comparison import compare, comparison_line, rank_operators
from poolbench.report.design import Design, confounding_warnings, context_columns, design, one_run_per_seed
from poolbench.report.design import option_values as _option_values  # noqa: F401  (tests clear its cache here)
from poolbench.report.loading import (
    FROM_SIDE_BY_SIDE,
    PER_RUN_LATENCY,
    SIDE_BY_SIDE,
    SIDE_BY_SIDE_METRICS,
    load_runs,
    read_side_by_side,
    side_by_side_lines,
)

DEFAULT_METRICS = ("mAP", "top1", "acc@1", "acc@5", "latency.infer_image_ms", "latency.peak_mem_mb")
ENV_KEYS = ("env.torch", "env.device_name", "env.git_commit")
FORMATS = ("csv", "md", "tex", "parquet")
BOOKKEEPING = ("seed", "feature_map_h", "feature_map_w", "failed_epoch", "pool_out_features", "num_params")


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
    design: Design | None = None
    allow_confounded: bool = False
    results_dir: Path | None = None
    filters: list[str] = field(default_factory=list)
    latency_source: dict[str, str] = field(default_factory=dict)  # latency column -> where its figures come from
    ranking: dict[str, Any] | None = None  # see rank_operators
    notes: list[str] = field(default_factory=list)  # informational lines (not warnings)
    side_by_side: list[str] = field(default_factory=list)  # latency ratios from side_by_side.json
    run_dirs: dict[str, Path] = field(default_factory=dict)  # run_id -> its folder (for metrics.jsonl, env.json)
    dropped: list[str] = field(default_factory=list)  # duplicates and unpaired runs: named, never silently lost
    contexts: list[str] = field(default_factory=list)  # the keys whose values are independent data sets (ranks)
    mre: float | None = None  # the user's minimally relevant effect (--mre), for the needed seeds

    @property
    def comparison_lines(self) -> list[str]:
        return [comparison_line(row) for row in self.comparison.to_dict("records")]

    @property
    def family_size(self) -> int:
        """Number of comparisons the Holm adjustment of the primary (sign-flip) p-values runs over."""
        return int(self.comparison["p_perm"].notna().sum()) if not self.comparison.empty else 0

    @property
    def operators(self) -> list[str]:
        """Every treatment label of the report, sorted: the order colours are assigned in."""
        return sorted(set(treatment_labels(self.runs, self.keys)))

    def provenance(self) -> list[str]:
        """What produced this report (stated at the top of every exported file), warnings last."""
        lines = [
            f"poolbench report of {safe_text(str(self.results_dir))}: {len(self.runs)} completed runs",
            f"filters: {' '.join(f'--where {w}' for w in self.filters) or 'none'}",
            f"metrics: {', '.join(self.metrics)}",
            f"grouped by: {', '.join(column_label(k) for k in self.keys) or 'nothing (one configuration)'}",
        ]
        if self.baseline is not None:
            lines.append(
                f"baseline: {self.baseline}; {self.family_size} paired comparisons, every kind of p-value "
                "Holm-adjusted over all of them"
                + ("; confounded pairs compared (--allow-confounded)" if self.allow_confounded else "")
            )
        if self.dropped:
            lines.append(f"left out: {len(self.dropped)} duplicate or unpaired entries (listed in report.json)")
        lines += [f"latency source of {metric}: {source}" for metric, source in self.latency_source.items()]
        return lines + [f"WARNING: {w}" for w in self.warnings]


def metric_columns(frame: pd.DataFrame) -> list[str]:
    """Numeric record fields that can be aggregated."""
    return [
        c
        for c in frame.columns
        if not c.startswith(NOT_METRICS)
        and c not in BOOKKEEPING
        and not c.endswith((".ci_low", ".ci_high"))
        and is_numeric_column(frame[c])
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


def summarize(frame: pd.DataFrame, metrics: Sequence[str], keys: Sequence[str]) -> pd.DataFrame:
    """One row per group: key values, ``n`` runs, and ``<metric>.mean/.std/.n`` (std with ddof=1).

    A metric with a side-by-side interval (``<metric>.ci_low/.ci_high``) also gets those columns.
    """
    rows = []
    for values, group in group_frames(frame, list(keys)):
        row: dict[str, Any] = dict(zip(keys, values if keys else (), strict=True))
        row["n"] = len(group)
        for metric in metrics:
            column = group[metric].astype(float)
            row[f"{metric}.mean"] = column.mean()
            # a side-by-side figure is one measurement per configuration copied to its runs: no spread
            single = metric in SIDE_BY_SIDE_METRICS and bool(group.get(FROM_SIDE_BY_SIDE, pd.Series([False])).all())
            row[f"{metric}.std"] = math.nan if single else column.std(ddof=1)
            row[f"{metric}.n"] = int(column.count())
            for bound in ("ci_low", "ci_high"):
                if f"{metric}.{bound}" in group.columns:
                    row[f"{metric}.{bound}"] = group[f"{metric}.{bound}"].astype(float).mean()
        rows.append(row)
    return pd.DataFrame(rows)


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
    allow_confounded: bool = False,
    contexts: Sequence[str] = (),
    mre: float | None = None,
) -> Report:
    from poolbench.report.power import power_columns

    if mre is not None and not (math.isfinite(mre) and mre > 0):
        raise PoolbenchError(f"--mre takes a positive effect size in the metric's unit, got {mre}")
    frame, skipped, run_dirs = load_runs(results_dir, where)
    frame, tuning = protocol.prepare(frame, run_dirs)  # runs of poolbench tune (report/protocol.py)
    frame, latency_source, sbs_warnings, sbs_rows = read_side_by_side(results_dir, frame)
    rank_contexts = context_columns(frame, contexts)
    found = design(frame, baseline)
    frame, dropped = one_run_per_seed(frame, found.keys)
    chosen = choose_metrics(frame, metrics)
    report = Report(
        runs=frame,
        skipped=skipped,
        keys=found.keys,
        metrics=chosen,
        summary=summarize(frame, chosen, found.keys),
        baseline=baseline,
        warnings=confounding_warnings(found, allow=allow_confounded) + environment_warnings(frame) + sbs_warnings,
        design=found,
        allow_confounded=allow_confounded,
        results_dir=Path(results_dir),
        filters=list(where),
        latency_source={m: s for m, s in latency_source.items() if m in chosen or m == "latency.infer_image_ms"},
        run_dirs=run_dirs,
        dropped=dropped,
        contexts=rank_contexts,
        mre=mre,
    )
    if baseline is not None:
        side_by_side = [m for m, s in latency_source.items() if s != PER_RUN_LATENCY]
        comparison = compare(
            frame,
            chosen,
            found.keys,
            baseline,
            confounded=list(found.confounded) if allow_confounded else [],
            side_by_side=side_by_side,
            dropped=report.dropped,
        )
        report.comparison = comparison
        if not comparison.empty:
            report.comparison = power_columns(comparison, report.family_size, mre)
        report.notes += [
            f"{m}: where it comes from {SIDE_BY_SIDE}, one interleaved measurement per configuration, shown with "
            "its interval and not tested over seeds"
            for m in side_by_side
            if m in chosen
        ]
    report.ranking = rank_operators(report)
    report.side_by_side = side_by_side_lines(sbs_rows, frame, found.keys)
    protocol.attach(report, tuning)
    return report
