"""The tuning protocol behind runs made by ``poolbench tune``, stated by ``poolbench report``.

Tuned runs are ordinary runs whose ``sweep_name`` is ``tune.<name>.trials`` or ``tune.<name>.final``
and whose folder lies in ``<tune dir>/trials/`` or ``<tune dir>/final/``, beside the tune's
``protocol.json``. For such runs the report:

- states each protocol: treatments, search space, sampler and seed, trials per treatment, selection
  metric and split, the best configuration of each treatment and the final seeds (as notes);
- warns, like a confounder, when the compared treatments did not get the same tuning budget (a
  different ``--trials``, trials that never finished, or tunes with different protocols side by side),
  when tuned and untuned runs are mixed, and when tuning trials (selected on validation, one seed)
  are among the runs;
- treats the tuned keys of final runs as part of each treatment (renamed ``tuned.<key>``), so that an
  operator at its own tuned learning rate is compared with another at its own, paired by seed,
  instead of being reported as confounded with the learning rate.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

PROTOCOL = "protocol.json"  # poolbench.tune.PROTOCOL (not imported: tune pulls in the config machinery)
MAX_BYTES = 8 * 2**20
SWEEP_NAME = re.compile(r"tune\.(?P<name>[A-Za-z0-9_-][A-Za-z0-9._-]{0,99})\.(?P<stage>trials|final)")
GROUPS = ("dataset", "model", "pooling", "local_pooling", "augment", "trainer")


@dataclass
class Tuning:
    """What the runs of a report say about tuning (see the module docstring)."""

    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)  # protocol path -> its content
    trial_runs: int = 0
    final_runs: int = 0
    untuned_runs: int = 0
    renamed: dict[str, str] = field(default_factory=dict)  # cfg.<key> -> tuned.<key>
    problems: list[str] = field(default_factory=list)
    treatments_seen: dict[str, set[str]] = field(default_factory=dict)  # protocol path -> its treatments in the runs


def read(path: Path) -> dict[str, Any] | None:
    """A protocol file, or None when it is missing, not a regular file, too large or not one."""
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("treatments"), list):
        return None
    return data


def _column(key: str) -> str:
    return f"choice.{key}" if key in GROUPS else f"cfg.{key}"


def prepare(frame: pd.DataFrame, run_dirs: dict[str, Path]) -> tuple[pd.DataFrame, Tuning]:
    """Find the protocols of the tuned runs among ``frame`` and, when every run is a final run of a
    tune, rename the tuned keys ``cfg.<key>`` to ``tuned.<key>`` (part of the treatment, not a context)."""
    tuning = Tuning()
    if "sweep_name" not in frame.columns:
        tuning.untuned_runs = len(frame)
        return frame, tuning
    for row, (run_id, sweep_name) in enumerate(zip(frame["run_id"], frame["sweep_name"], strict=True)):
        match = SWEEP_NAME.fullmatch(str(sweep_name)) if isinstance(sweep_name, str) else None
        folder = run_dirs.get(run_id)
        if match is None or folder is None:
            tuning.untuned_runs += 1
            continue
        if match["stage"] == "trials":
            tuning.trial_runs += 1
        else:
            tuning.final_runs += 1
        path = Path(folder).parent.parent / PROTOCOL
        key = str(path)
        if key not in tuning.protocols:
            data = read(path)
            if data is None or data.get("name") != match["name"]:
                problem = f"the protocol of tune '{match['name']}' ({path}) is missing or unreadable"
                if problem not in tuning.problems:
                    tuning.problems.append(problem)
                continue
            tuning.protocols[key] = data
        column = _column(str(tuning.protocols[key].get("treatment_key", "pooling")))
        if column in frame.columns:
            tuning.treatments_seen.setdefault(key, set()).add(str(frame[column].iat[row]))
    if tuning.final_runs == len(frame) and tuning.protocols:
        keys = {str(p.get("key")) for data in tuning.protocols.values() for p in data.get("space", [])
                if isinstance(p, dict)}
        tuning.renamed = {f"cfg.{k}": f"tuned.{k}" for k in sorted(keys) if f"cfg.{k}" in frame.columns}
        if tuning.renamed:
            frame = frame.rename(columns=tuning.renamed)
    return frame, tuning


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _budgets(tuning: Tuning) -> dict[str, tuple[int | None, int | None]]:
    """Per compared treatment (named with its tune when several tunes are mixed): (trials asked for, finished)."""
    out: dict[str, tuple[int | None, int | None]] = {}
    several = len(tuning.protocols) > 1
    for path, data in tuning.protocols.items():
        results = data.get("results") if isinstance(data.get("results"), dict) else {}
        budget = data.get("trials_per_treatment")
        for treatment in sorted(tuning.treatments_seen.get(path, set())):
            result = results.get(treatment) if isinstance(results.get(treatment), dict) else {}
            finished = result.get("finished")
            name = f"{treatment} ({data.get('name')})" if several else treatment
            out[name] = (budget if isinstance(budget, int) else None, finished if isinstance(finished, int) else None)
    return out


def warnings(tuning: Tuning) -> list[str]:
    lines = list(tuning.problems)
    if tuning.trial_runs:
        names = sorted({str(d.get("name")) for d in tuning.protocols.values()})
        lines.append(
            f"{tuning.trial_runs} runs here are tuning trials ({', '.join(names) or 'poolbench tune'}): one seed each, "
            "chosen on the validation split; compare the final runs instead (poolbench report <tune folder>/final)"
        )
    if tuning.final_runs and tuning.untuned_runs:
        lines.append(
            f"UNEQUAL TUNING: {tuning.final_runs} runs were tuned by poolbench tune and {tuning.untuned_runs} "
            "were not; the untuned operators did not get the same tuning effort"
        )
    budgets = _budgets(tuning)
    asked = {b for b, _ in budgets.values()}
    finished = {f for _, f in budgets.values()}
    short = {t: (b, f) for t, (b, f) in budgets.items() if f is not None and b is not None and f < b}
    if len(asked) > 1 or len(finished) > 1 or short:
        spread = "; ".join(
            f"{t}: {'?' if f is None else f} of {'?' if b is None else b} trials" for t, (b, f) in budgets.items()
        )
        lines.append(
            f"UNEQUAL TUNING BUDGET: the compared treatments were not tuned alike ({spread}); a treatment tuned "
            "longer can look better for that reason alone"
        )
    protocols = list(tuning.protocols.values())
    if len(protocols) > 1:
        aspects = ("space", "sampler", "fixed_overrides", "selection", "final_seeds", "tuning_seed")
        differ = [a for a in aspects if any(p.get(a) != protocols[0].get(a) for p in protocols[1:])]
        if differ:
            lines.append(
                f"UNEQUAL TUNING: the runs come from {len(protocols)} tunes whose protocols differ in "
                f"{', '.join(differ)}"
            )
    return lines


def notes(tuning: Tuning) -> list[str]:
    """The protocol of each tune, in words."""
    lines = []
    for data in tuning.protocols.values():
        key = data.get("treatment_key", "pooling")
        space = []
        for param in data.get("space", []):
            if not isinstance(param, dict):
                continue
            scope = param.get("treatments")
            everywhere = not isinstance(scope, list) or set(scope) == set(data["treatments"])
            only = "" if everywhere else f" (only {', '.join(map(str, scope))})"
            space.append(f"{param.get('override')}{only}")
        sampler = data.get("sampler") if isinstance(data.get("sampler"), dict) else {}
        selection = data.get("selection") if isinstance(data.get("selection"), dict) else {}
        metrics = selection.get("metric") if isinstance(selection.get("metric"), dict) else {}
        seeds = data.get("final_seeds") or []
        fixed = [str(o) for o in data.get("fixed_overrides", [])]
        val_share = next((o.split("=", 1)[1] for o in fixed if o.startswith("dataset.val_share=")), "?")
        lines.append(
            f"tuning protocol (poolbench tune {data.get('name')}): {key} in "
            f"{{{', '.join(map(str, data['treatments']))}}}, "
            f"one study each; search space: {'; '.join(space) or '?'}; sampler {sampler.get('name', '?')} "
            f"(seed {sampler.get('seed', '?')}), {data.get('trials_per_treatment', '?')} trials per treatment, "
            f"no pruning; selection: highest {', '.join(sorted(set(map(str, metrics.values())))) or '?'} on the "
            f"validation split (dataset.val_share={val_share}), tuning seed {data.get('tuning_seed', '?')}; "
            f"final: best configuration per treatment with seeds {', '.join(map(str, seeds))}, evaluated on test"
        )
        results = data.get("results") if isinstance(data.get("results"), dict) else {}
        best_lines = []
        for treatment in data["treatments"]:
            result = results.get(treatment) if isinstance(results.get(treatment), dict) else {}
            best = result.get("best") if isinstance(result.get("best"), dict) else None
            if best is None:
                best_lines.append(f"{treatment}: no completed trial")
                continue
            params = best.get("params") if isinstance(best.get("params"), dict) else {}
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in params.items())
            best_lines.append(
                f"{treatment}: {shown} ({result.get('metric', '?')} {_fmt(best.get('value'))}, trial "
                f"{best.get('trial')}; {result.get('finished', '?')} trials finished, {result.get('failed', 0)} failed)"
            )
        if best_lines:
            lines.append(f"best configurations of {data.get('name')}: " + "; ".join(best_lines))
    return lines


def attach(report: Any, tuning: Tuning) -> None:
    """Add the protocol's warnings and notes to a built report."""
    report.warnings.extend(warnings(tuning))
    report.notes[:0] = notes(tuning)
