"""``poolbench train``: one run from composed config to run record."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from poolbench.cli.app import EXTRA_ARGS, OVERRIDES_HELP, app, console, console_err, plugins_option, use_plugins
from poolbench.cli.progress import ProgressBars
from poolbench.errors import Terminated
from poolbench.text import terminal as escape  # strips control characters, escapes markup

SUMMARY_KEYS = (
    ("mAP", "mAP"),
    ("top1", "Top-1"),
    ("soft@4", "soft Top-4"),
    ("hard@2", "hard Top-2"),
    ("acc@1", "accuracy top-1"),
    ("acc@5", "accuracy top-5"),
    ("val.mAP", "validation mAP"),  # the selection metrics (dataset.val_share)
    ("val.acc@1", "validation top-1"),
    ("latency.infer_image_ms", "inference ms / image"),
    ("latency.train_step_ms", "train step ms"),
    ("latency.pool_fwd_ms", "pool forward ms"),
    ("latency.pool_fwdbwd_ms", "pool fwd+bwd ms"),
    ("latency.peak_mem_mb", "peak memory MB"),
)


def summary_table(record: dict[str, Any]) -> Table:
    """The run's key figures; every cell is plain text (record values are never read as markup)."""
    table = Table(title=Text(f"run {record['run_id']}"), show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    rows = [("status", str(record["status"]) + (" (reused)" if record.get("reused") else ""))]
    rows.append(("pooling / model / data", f"{record['pooling']} / {record['model']} / {record['dataset']}"))
    if "feature_map_h" in record:
        rows.append(("final feature map", f"{record['feature_map_h']}x{record['feature_map_w']}"))
    for key, label in SUMMARY_KEYS:
        value = record.get(key)
        if isinstance(value, float):
            rows.append((label, f"{value:.4g}"))
    rows.append(("device", str(record.get("env.device_name"))))
    rows.append(("wall time", f"{record.get('wall_time_s', float('nan')):.1f} s"))
    rows.append(("run directory", str(record.get("run_dir"))))
    for label, value in rows:
        table.add_row(label, Text(value))
    return table


@app.command(context_settings=EXTRA_ARGS)
def train(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, show_default=False),
    cfg: bool = typer.Option(False, "--cfg", help="Print the resolved config and the run id, then exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars, only the summary."),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """Train one CNN with the configured pooling, evaluate it, time it, and write its run record."""
    from omegaconf import OmegaConf

    from poolbench.config import compose
    from poolbench.config import run_dir as run_dir_of

    overrides = use_plugins(plugin_specs, overrides or [])
    if cfg:  # the composed keys, required ones still unset shown as ??? (missing) rather than refused
        from poolbench.schema import collect_missing

        with collect_missing() as missing:
            config = compose(overrides)
        shown = OmegaConf.create(OmegaConf.to_container(config, resolve=True))
        for key, _ in missing:
            OmegaConf.update(shown, key, "???")
        # soft_wrap: YAML re-wrapped by the console would not parse
        console.print(OmegaConf.to_yaml(shown), highlight=False, markup=False, end="", soft_wrap=True)
        for key, hint in missing:
            console.print(f"# missing: {key} is required: {hint}", highlight=False, markup=False, soft_wrap=True)
        where = run_dir_of(config) if not missing else "(set the missing keys first)"
        console.print(f"# run directory: {where}", style="dim", highlight=False, markup=False, soft_wrap=True)
        return
    from poolbench.run import execute  # the training code: not loaded for --cfg

    config = compose(overrides)
    bars = ProgressBars(console, enabled=not quiet)
    try:
        with bars:
            record = execute(config, progress=bars, log=bars.log)
    except KeyboardInterrupt as exc:
        how = "stopped (SIGTERM)" if isinstance(exc, Terminated) else "interrupted"
        console_err.print(f"[yellow]{how}[/]: checkpoint and record kept in {escape(str(run_dir_of(config)))}")
        raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None
    console.print(summary_table(record))
