"""``poolbench bench``: time pooling operators (default) or backbone × pooling models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import typer
from rich.table import Table

from poolbench.cli.app import app, console, console_err, plugins_option, use_plugins
from poolbench.text import terminal as escape  # strips control characters, escapes markup


def _format(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _label(row: dict[str, object]) -> str:
    if row["section"] == "model":
        return str(row["name"])
    return str(row["name"]) if row["section"] in ("global", "baseline") else f"local {row['name']}"


def results_tables(rows: Sequence[dict[str, object]], caption: str) -> list[Table]:
    """One table per input shape (operator mode) or per backbone (model mode)."""
    groups: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        key = f"{row['model']} · input {row['shape']}" if row["section"] == "model" else f"input {row['shape']}"
        groups.setdefault(key, []).append(row)
    tables = []
    for title, group in groups.items():
        table = Table(title=escape(f"{title} · {caption}"), title_justify="left")
        labels = (
            *("op", "pass", "median ± IQR ms", "n", "images/s", "× avg [95% CI]"),
            *("× reference", "peak MiB", "GB/s (% copy)"),
        )
        for label in (*labels, "GFLOP", "params", "note"):
            numeric = label not in ("op", "pass", "note")
            table.add_column(label, justify="right" if numeric else "left", overflow="fold")
        for row in group:
            median, iqr = row["median_ms"], row["iqr_ms"]
            timing = f"{_format(median)} ± {_format(iqr)}" if median is not None else "-"
            bandwidth, copy = row["bandwidth_gb_s"], row["copy_bandwidth_gb_s"]
            if isinstance(bandwidth, float) and isinstance(copy, float) and row["name"] != "copy":
                bandwidth_text = f"{bandwidth:.3g} ({100 * bandwidth / copy:.0f}%)"
            else:
                bandwidth_text = _format(bandwidth)
            flops = row["flops"]
            cells = (
                _label(row),
                str(row["pass"]),
                timing,
                str(row["samples"]),
                _format(row["images_per_s"]),
                _ratio(row["ratio_to_avg"], row.get("ratio_to_avg_ci")),
                _format(row["ratio_to_reference"]),
                _format(row["peak_mem_mb"]),
                bandwidth_text,
                _format(flops / 1e9) if isinstance(flops, int) else "-",
                _format(row["params"]),
                str(row["note"]),
            )
            table.add_row(*(escape(cell) for cell in cells))  # notes carry exception text, names come from users
        tables.append(table)
    return tables


def _ratio(value: object, ci: object) -> str:
    """``1.31 [1.22–1.40]``: the median per-round ratio and its 95% interval over interleaved rounds."""
    if not isinstance(ci, list | tuple) or len(ci) != 2 or not all(isinstance(v, float) for v in ci):
        return _format(value)
    return f"{_format(value)} [{_format(ci[0])}–{_format(ci[1])}]"


def side_by_side_table(document: dict[str, object]) -> Table:
    """The rows of side_by_side.json: medians with 95% intervals over rounds, ratio to the baseline."""
    baseline = document.get("baseline")
    table = Table(title=escape(f"side by side · baseline {baseline or '-'}"), title_justify="left")
    labels = ("model", "pooling", "local", "input", "infer ms/img [95% CI]", f"× {baseline or 'baseline'} [95% CI]")
    for label in (*labels, "train step ms [95% CI]", "pool fwd ms", "pool fwd+bwd ms", "peak MiB", "GFLOP/img", "runs"):
        table.add_column(escape(label), justify="left" if label in labels[:4] else "right", overflow="fold")

    def with_ci(value: object, ci: object) -> str:
        if not isinstance(value, float):
            return "-"
        return f"{_format(value)} [{_format(ci[0])}, {_format(ci[1])}]" if isinstance(ci, list) else _format(value)

    for row in document["rows"]:  # type: ignore[union-attr]
        flops = row["flops_per_image"]
        cells = (
            row["model"],
            row["pooling"],
            row["local_pooling"],
            row["input"],
            with_ci(row["infer_image_ms"], row["infer_image_ms_ci"]),
            with_ci(row["ratio_infer"], row["ratio_infer_ci"]),
            with_ci(row["train_step_ms"], row["train_step_ms_ci"]),
            _format(row["pool_fwd_ms"]),
            _format(row["pool_fwdbwd_ms"]),
            _format(row["peak_mem_mb"]),
            _format(flops / 1e9) if isinstance(flops, int) else "-",
            str(len(row["run_ids"])),
        )
        table.add_row(*(escape(str(cell)) for cell in cells))  # record fields are not ours: never markup
    return table


def _split(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@app.command()
def bench(
    ops: str = typer.Option(None, "--ops", help="Comma-separated operators (default: all), e.g. avg,max,dgmp."),
    local: bool = typer.Option(False, "--local", help="Only local (downsampling) operators."),
    global_only: bool = typer.Option(False, "--global", help="Only global operators."),
    shape: list[str] = typer.Option(
        None, "--shape", help="Input B,C,H,W (repeatable). Default: 32,2048,7,7 32,2048,24,24 64,128,8,8."
    ),
    quick: bool = typer.Option(False, "--quick", help="Small shapes, few repeats: a smoke run in seconds."),
    forward_only: bool = typer.Option(False, "--forward-only", help="Skip forward+backward."),
    models: str = typer.Option(None, "--models", help="Model mode: backbones, e.g. smallcnn,resnet18."),
    pooling: str = typer.Option("avg,dgmp", "--pooling", help="Model mode: global poolings (avg is always added)."),
    input_size: int = typer.Option(64, "--input-size", help="Model mode: input H = W."),
    in_channels: int = typer.Option(1, "--in-channels", help="Model mode: input channels."),
    batch: str = typer.Option("16x4", "--batch", help="Model mode: P×K batch (writers x patches per writer)."),
    last_stride: int = typer.Option(None, "--last-stride", help="Model mode: model.last_stride (1 = DGMP paper)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when present), cpu, cuda or cuda:<i>."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32 or bf16 (operator mode)."),
    threads: int = typer.Option(None, "--threads", help="torch CPU threads (default: torch's; always recorded)."),
    warmup: int = typer.Option(None, "--warmup", help="Warm-up calls per variant (default 3; --quick 1)."),
    repeats: int = typer.Option(
        None, "--repeats", help="Timed rounds (one call of every variant each; default 20, --quick 5, --runs 10)."
    ),
    budget: float = typer.Option(
        None, "--budget", help="Seconds per variant after which it stops at 3 samples (default 2; --quick 0.3)."
    ),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory pass."),
    runs: Path = typer.Option(
        None,
        "--runs",
        help="Side-by-side mode: rebuild every distinct configuration of the completed runs in this results "
        "folder, time them interleaved and write <folder>/side_by_side.json.",
    ),
    baseline: str = typer.Option(None, "--baseline", help="Side-by-side mode: pooling the ratios refer to, e.g. avg."),
    out: Path = typer.Option(Path("results/bench"), "--out", help="Folder for the CSV and JSON results."),
    save: bool = typer.Option(True, "--save/--no-save", help="Write CSV + JSON."),
    plugin_specs: list[str] = plugins_option(),
) -> None:
    """Time pooling operators (forward, forward+backward), whole models (inference, train step), or
    the configurations of finished runs side by side (--runs).

    Medians and IQRs over interleaved rounds after warm-up, peak memory, images/s, the ratio to avg
    and to the reference formulation in the same run, forward flops and parameters, and for
    avg/max/sum the achieved bandwidth next to a tensor copy's.
    """
    import json

    from poolbench import bench as lib
    from poolbench import side_by_side as timing
    from poolbench.errors import ConfigError

    def note(message: str) -> None:
        console_err.print(f"[dim]{escape(message)}[/]", highlight=False)

    use_plugins(plugin_specs)  # the only plugin code --runs may import (with the recorded sha256)
    if runs is not None:
        lib.BenchSettings.make(device="cpu", threads=threads, warmup=warmup, repeats=repeats)  # validates them
        path = timing.side_by_side(
            runs,
            baseline=baseline,
            progress=note,
            rounds=repeats or timing.SIDE_BY_SIDE_ROUNDS,
            warmup=warmup if warmup is not None else 2,
        )
        console.print(side_by_side_table(json.loads(path.read_text())))
        console.print(f"wrote {escape(str(path))}", highlight=False)
        return
    if baseline is not None:
        raise ConfigError("--baseline applies to --runs only (operator and model mode always compare with avg)")
    settings = lib.BenchSettings.make(
        device=device,
        dtype=dtype,
        threads=threads,
        quick=quick,
        warmup=warmup,
        repeats=repeats,
        budget_s=budget,
        memory=not no_memory,
    )
    if local and global_only:
        raise ConfigError("--local and --global exclude each other (neither = both kinds)")
    # Every input is validated before any warning is printed or any work starts.
    if models:
        writers, per_writer = lib.parse_batch(batch)
        for option, value in (("--input-size", input_size), ("--in-channels", in_channels)):
            if value < 1:
                raise ConfigError(f"{option} must be >= 1, got {value}")
        if last_stride is not None and last_stride not in (1, 2):
            raise ConfigError(f"--last-stride must be 1 or 2, got {last_stride}")
        lib.check_fits((writers * per_writer, in_channels, input_size, input_size), settings)
    else:
        kinds = ["local"] if local else ["global"] if global_only else ["global", "local"]
        operators = lib.select_operators(_split(ops), kinds)
        shapes = (
            [lib.parse_shape(s) for s in shape] if shape else list(lib.QUICK_SHAPES if quick else lib.DEFAULT_SHAPES)
        )
        for one in shapes:
            lib.check_fits(one, settings, what="shape")
    if save:
        lib.check_out_dir(out)
    warnings = lib.timing_warnings(settings.device)
    if warnings:
        console_err.print(f"warning: timings may be unreliable: {escape('; '.join(warnings))}", highlight=False)

    if models:
        rows = lib.bench_models(
            _split(models),
            _split(pooling),
            settings,
            input_size=input_size,
            in_channels=in_channels,
            writers=writers,
            per_writer=per_writer,
            model_overrides={"last_stride": last_stride} if last_stride is not None else None,
            progress=note,
        )
    else:
        rows = lib.bench_operators(operators, shapes, settings, backward=not forward_only, progress=note)
    records = [lib.row_dict(row) for row in rows]
    caption = f"{settings.device} · {dtype} · {settings.threads} threads" + (" · UNRELIABLE TIMING" if warnings else "")
    for table in results_tables(records, caption):
        console.print(table)
    if save:
        csv_path, json_path = lib.write_results(rows, lib.environment(settings, warnings), out)
        console.print(f"wrote {escape(str(csv_path))} and {escape(str(json_path))}", highlight=False)
