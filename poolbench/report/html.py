"""``report.html``: one self-contained page (figures inline as base64) to share a report.

Everything taken from records or the file system is HTML-escaped; the page loads nothing from
anywhere (no scripts, no external styles or fonts).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from poolbench import records
from poolbench import text as esc
from poolbench.config import GROUPS, NON_IDENTITY_KEYS
from poolbench.report.columns import SEED_KEY, column_label, present
from poolbench.report.comparison import ranking_lines
from poolbench.report.core import Report
from poolbench.report.tables import comparison_caption, display_comparison, display_ranking, display_summary

PAGE = "report.html"
FIGURES = ("pareto", "means", "curves", "cd_diagram")
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f2f2f2; }
.warning { background: #fdecea; border-left: 4px solid #b00000; padding: 0.5em 1em; margin: 0.3em 0; }
.note { color: #555; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
"""


def _e(value: Any) -> str:
    return esc.html(value)


def _table(frame: pd.DataFrame) -> str:
    shown = frame.map(lambda v: esc.plain(v) if isinstance(v, str) else v).rename(columns=esc.plain)
    return shown.to_html(index=False, escape=True, border=0, na_rep="-")  # controls shown, HTML escaped


def _override(key: str, value: Any) -> str:
    if hasattr(value, "item"):  # a numpy scalar from the DataFrame
        value = value.item()
    text = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
    if isinstance(value, str) and value.startswith("["):  # a list stored as JSON text in the frame
        text = value
    if isinstance(value, float) and value.is_integer():
        text = repr(value)
    return f"{key}={text}"


@functools.lru_cache(maxsize=64)
def _defaults(choices: tuple[str, ...]) -> dict[str, Any] | None:
    from poolbench.config import compose, flatten

    try:
        return flatten(compose(list(choices), validate=False))
    except Exception:  # noqa: BLE001  (an option that no longer exists: no command can be rebuilt)
        return None


def recorded_command(run: pd.Series, seeds: list[Any]) -> str | None:
    """The run's own ``rerun`` overrides (written while its plugins were loaded, so exact without
    importing them), shell-quoted, with the seeds; None for a record without them."""
    import shlex

    from poolbench.provenance import RERUN

    try:
        overrides = json.loads(run[RERUN]) if isinstance(run.get(RERUN), str) else None
    except ValueError:
        return None
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        return None
    words = [*overrides, f"seed={','.join(str(s) for s in seeds)}"]
    return "poolbench sweep " + " ".join(shlex.quote(w) for w in words)


def reproduce_command(run: pd.Series, seeds: list[Any]) -> str:
    """``poolbench sweep pooling=dgmp dataset=digits trainer.epochs=3 seed=0,1,2``: the group choices plus
    every identity key that differs from what those choices compose to."""
    recorded = recorded_command(run, seeds)
    if recorded is not None:
        return recorded
    choices = tuple(
        f"{g}={run[f'choice.{g}']}"
        for g in GROUPS
        if g != "experiment" and f"choice.{g}" in run.index and isinstance(run[f"choice.{g}"], str)
    )
    defaults = _defaults(choices)
    if defaults is None:
        return f"(cannot rebuild: {' '.join(choices)} does not compose with this poolbench)"
    overrides = list(choices)
    for column, value in run.items():
        key = str(column)[4:]
        if not str(column).startswith("cfg.") or key == SEED_KEY or key.startswith(NON_IDENTITY_KEYS):
            continue
        if not present(value):
            continue
        default = defaults.get(key, "<absent>")
        default_text = json.dumps(default) if isinstance(default, list) else default
        same = default_text == value or (
            isinstance(default, int | float) and isinstance(value, int | float) and math.isclose(default, value)
        )
        if not same:
            overrides.append(("+" if default == "<absent>" else "") + _override(key, value))
    return "poolbench sweep " + " ".join(overrides) + f" seed={','.join(str(s) for s in seeds)}"


def commands(report: Report) -> list[str]:
    """One ``poolbench sweep`` command per configuration of the summary (its seeds included)."""
    lines = []
    groups = report.runs.groupby(report.keys, dropna=False, sort=False) if report.keys else [(None, report.runs)]
    for _, group in groups:
        seeds = sorted(group[SEED_KEY].unique().tolist())
        lines.append(reproduce_command(group.iloc[0], seeds))
    return lines


def recorded_commands(report: Report) -> list[str]:
    """The distinct command lines stored in the runs' env.json."""
    found: dict[str, None] = {}
    for run_id, run_dir in zip(report.runs["run_id"], report.runs["run_dir"], strict=True):
        try:
            folder = report.run_dirs.get(run_id, Path(str(run_dir)))
            env = records.read_env(folder, root=report.results_dir)
        except (OSError, ValueError):
            continue
        if isinstance(env, dict) and isinstance(env.get("command"), str):
            found[env["command"]] = None
    return list(found)


def environment(report: Report) -> pd.DataFrame:
    columns = [c for c in report.runs.columns if c.startswith("env.")]
    rows = []
    for column in columns:
        counts = report.runs[column].fillna("unknown").astype(str).value_counts()
        spread = "; ".join(f"{v} ({n})" for v, n in counts.items())
        rows.append({"field": column_label(column)[4:], "values (runs)": spread})
    return pd.DataFrame(rows)


def _image(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<h3>{_e(title)}</h3>\n<img alt="{_e(title)}" src="data:image/png;base64,{data}">'


def write_html(report: Report, out_dir: Path) -> list[Path]:
    """report.html from the report and the PNG figures already written to ``out_dir``."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<link rel="icon" href="data:,">',
        f"<title>poolbench report: {_e(report.results_dir)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>poolbench report: {_e(report.results_dir)}</h1>",
        "<ul>" + "".join(f"<li>{_e(line)}</li>" for line in report.provenance() if not line.startswith("WARNING")),
        "</ul>",
    ]
    if report.warnings:
        parts.append("<h2>Warnings</h2>")
        parts += [f'<div class="warning">{_e(w)}</div>' for w in report.warnings]
    if report.dropped:
        parts.append(f"<h2>Left out of the statistics ({len(report.dropped)})</h2><ul>")
        parts += [f"<li>{_e(line)}</li>" for line in report.dropped]
        parts.append("</ul>")
    if report.skipped:
        parts.append(f"<h2>Skipped records ({len(report.skipped)})</h2><ul>")
        parts += [f"<li>{_e(line)}</li>" for line in report.skipped]
        parts.append("</ul>")
    parts += ["<h2>Summary</h2>", '<p class="note">mean ± std over seeds (n runs)</p>', _table(display_summary(report))]
    if report.baseline is not None:
        parts.append(f"<h2>Paired comparison against {_e(report.baseline)}</h2>")
        if report.comparison.empty:
            parts.append("<p>No run shares a seed and configuration with a baseline run: nothing compared.</p>")
        else:
            parts.append(f'<p class="note">{_e(comparison_caption(report))}</p>')
            parts.append(_table(display_comparison(report)))
    if report.ranking is not None:
        parts.append("<h2>Ranks across contexts</h2>")
        parts += [f"<p>{_e(line)}</p>" for line in ranking_lines(report.ranking)]
        parts.append(_table(display_ranking(report.ranking)))
    if report.side_by_side:
        parts.append("<h2>Latency measured side by side</h2><ul>")
        parts += [f"<li>{_e(line)}</li>" for line in report.side_by_side]
        parts.append("</ul>")
    figures = [(out_dir / f"{stem}.png") for stem in FIGURES if (out_dir / f"{stem}.png").is_file()]
    if figures:
        parts.append("<h2>Figures</h2>")
        parts += [_image(path, path.stem.replace("_", " ")) for path in figures]
    if report.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in report.notes) + "</ul>")
    parts += ["<h2>Environment of the runs</h2>", _table(environment(report))]
    parts.append("<h2>Commands that reproduce the runs</h2>")
    parts.append("<pre>" + _e("\n".join(commands(report))) + "</pre>")
    recorded = recorded_commands(report)
    if recorded:
        parts.append("<h3>Command lines recorded in env.json</h3><pre>" + _e("\n".join(recorded)) + "</pre>")
    parts.append("</body></html>")
    path = out_dir / PAGE
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return [path]
