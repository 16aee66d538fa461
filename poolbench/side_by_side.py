"""Side-by-side latency of completed runs: every distinct configuration among them, rebuilt from its
checkpoint (:func:`poolbench.records.load_run`) and timed interleaved with all the others, written to
``<results_dir>/side_by_side.json`` (its schema: :mod:`poolbench.records`).

Used by ``poolbench bench --runs`` and at the end of a local ``poolbench sweep``. The timed functions are
those of every run's own latency (:func:`poolbench.engine.latency.timed_fns`), so the two measure alike;
only the interleaving differs: here all configurations share the rounds, so a load spike hits them alike.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from poolbench import records
from poolbench.engine.flops import measure_cost
from poolbench.engine.latency import (
    interleaved_samples,
    interval,
    median_iqr,
    paired_ratios,
    timing_warnings,
)
from poolbench.engine.memory import peak_memory_mb
from poolbench.engine.policies import build_optimizer, loss_name, lr_mults, resolve_device
from poolbench.errors import ConfigError, PoolbenchError, first_line, unknown_choice

SIDE_BY_SIDE = records.SIDE_BY_SIDE
SIDE_BY_SIDE_ROUNDS = 10
SIDE_BY_SIDE_SCHEMA = records.SIDE_BY_SIDE_SCHEMA


@dataclass
class TimedConfig:
    """One distinct configuration among the runs: the runs sharing it, what its rows say and its timed
    functions (:func:`~poolbench.engine.latency.timed_fns`)."""

    run_ids: list[str]
    pooling: str
    local_pooling: str
    model: str
    input: str  # BxCxHxW of the timing batch
    amp: str
    device: torch.device
    fns: dict[str, Callable[[], Any]]
    batch_size: int
    cost: dict[str, int]


def _completed_runs(results_dir: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[str]]:
    """(run folder, record) of every completed run under ``results_dir``, and one line per skipped record.

    The folder is where the record was found, never the record's own ``run_dir`` field (a record
    is untrusted text and may name any path).
    """
    found, problems = records.iter_records(results_dir)
    runs = []
    for record in found:
        if record.get("status") == "completed" and isinstance(record.get("run_id"), str):
            runs.append((Path(record["run_dir"]), record))
        elif isinstance(record.get("run_id"), str):
            problems.append(f"{record['run_id']} is {record.get('status_detail') or record['status']}")
    return runs, problems


def _config_key(cfg: Any, geometry: tuple[int, int, int], device: torch.device) -> str:
    """What makes two runs time alike: model, global and local pooling configs, input, batch, AMP, device.

    Learned values (DGMP's λ) are not part of it: runs differing only in seed share one timing,
    taken with the first run's checkpoint.
    """
    from omegaconf import OmegaConf

    parts = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "pooling": OmegaConf.to_container(cfg.pooling, resolve=True),
        "local_pooling": OmegaConf.to_container(cfg.local_pooling, resolve=True),
        "geometry": geometry,
        "batch": int(cfg.trainer.latency.batch_size),
        "amp": str(cfg.trainer.amp),
        "device": str(device),
    }
    return repr(sorted(parts.items()))


def _timed_config(
    run_ids: list[str],
    record: dict[str, Any],
    cfg: Any,
    net: nn.Module,
    device: torch.device,
    geometry: tuple[int, int, int],
) -> TimedConfig:
    """The timed functions of one configuration (inference, train step, pool forward and fwd+bwd) with the
    run's own optimiser, loss and margin (the trainer defaults where its config predates a key)."""
    from poolbench.engine.latency import timed_fns
    from poolbench.engine.policies import amp_dtype
    from poolbench.engine.settings import TrainerSettings

    in_channels, input_size, _ = geometry
    batch = int(cfg.trainer.latency.batch_size)
    amp = amp_dtype(str(cfg.trainer.amp), device)
    loss = loss_name(str(cfg.trainer.get("loss", "auto")), str(record["task"]))
    net = net.to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, in_channels, input_size, input_size, device=device, generator=generator)
    trainer = cfg.trainer

    def optimizer(trainee: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(
            trainee,
            optimizer=str(trainer.optimizer),
            lr=float(trainer.lr),
            weight_decay=float(trainer.weight_decay),
            momentum=float(trainer.get("momentum", TrainerSettings.momentum)),
            amsgrad=bool(trainer.get("amsgrad", TrainerSettings.amsgrad)),
            **lr_mults(cfg.pooling, cfg.local_pooling),
        )

    margin = float(trainer.get("margin", TrainerSettings.margin))
    fns = timed_fns(net, x, amp=amp, loss=loss, optimizer=optimizer, margin=margin)
    return TimedConfig(
        run_ids=run_ids,
        pooling=str(record["pooling"]),
        local_pooling=str(record.get("local_pooling", "none")),
        model=str(record["model"]),
        input="x".join(str(size) for size in x.shape),
        amp=str(cfg.trainer.amp),
        device=device,
        fns=fns,
        batch_size=batch,
        cost=measure_cost(net, x.shape[1:], device=device),
    )


def _collect(
    results_dir: Path, run_ids: Sequence[str] | None, note: Callable[[str], None]
) -> tuple[list[TimedConfig], list[dict[str, str]]]:
    """The distinct configurations of the chosen completed runs, rebuilt; and the runs skipped, with why."""
    runs, problems = _completed_runs(results_dir)
    skipped = [{"run_id": "-", "reason": problem} for problem in problems]
    for problem in problems:
        note(f"skipped: {problem}")
    if run_ids is not None:
        known = {record["run_id"] for _, record in runs}
        for run_id in run_ids:
            if run_id not in known:
                raise ConfigError(unknown_choice("completed run", run_id, sorted(known)))
        runs = [(d, r) for d, r in runs if r["run_id"] in set(run_ids)]
    groups: dict[str, tuple[list[str], Path, dict[str, Any], Any, nn.Module, torch.device, tuple]] = {}
    for run_dir, record in sorted(runs, key=lambda run: run[1]["run_id"]):
        try:
            loaded = records.load_run(run_dir, model=True, root=results_dir)
            cfg, net, geometry = loaded.config, loaded.model, loaded.geometry
            device = resolve_device(str(cfg.get("device", "auto")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, PoolbenchError) as exc:
            skipped.append({"run_id": record["run_id"], "reason": first_line(exc)})
            note(f"skipped {record['run_id']}: {first_line(exc)}")
            continue
        key = _config_key(cfg, geometry, device)
        if key in groups:
            groups[key][0].append(record["run_id"])
        else:
            groups[key] = ([record["run_id"]], run_dir, record, cfg, net, device, geometry)
    configs = []
    for ids, _, record, cfg, net, device, geometry in groups.values():
        try:
            configs.append(_timed_config(ids, record, cfg, net, device, geometry))
        except (ValueError, RuntimeError, ConfigError) as exc:
            skipped.extend({"run_id": run_id, "reason": first_line(exc)} for run_id in ids)
            note(f"skipped {', '.join(ids)}: {first_line(exc)}")
    return configs, skipped


def _baseline_of(config: TimedConfig, configs: Sequence[TimedConfig], baseline: str | None) -> int | None:
    """Index of the configuration that differs from ``config`` only in its global pooling, which is ``baseline``."""
    if baseline is None:
        return None

    def setting(c: TimedConfig) -> tuple:
        return c.model, c.local_pooling, c.input, c.amp, str(c.device)

    return next(
        (i for i, other in enumerate(configs) if other.pooling == baseline and setting(other) == setting(config)), None
    )


def side_by_side(
    results_dir: Path,
    run_ids: Sequence[str] | None = None,
    *,
    baseline: str | None = None,
    progress: Callable[[str], None] | None = None,
    rounds: int = SIDE_BY_SIDE_ROUNDS,
    warmup: int = 2,
) -> Path:
    """Time every distinct configuration of the completed runs under ``results_dir`` side by side.

    Each configuration (model, global and local pooling configs, input shape, latency batch size,
    AMP, device) is rebuilt from its first run's ``config.yaml`` and ``checkpoint.pt`` (so learned
    parameters such as DGMP's λ are the trained ones) and timed interleaved with all the others in
    ``rounds`` rounds: inference of one batch (reported per image), one train step (the run's
    optimiser, groups and loss), the global pool alone forward and forward+backward. Peak memory
    is that of one train step. Intervals are 95% bootstrap intervals of the median over rounds;
    ``ratio_infer`` is the median of per-round ratios to the ``baseline`` pooling's configuration
    with everything else equal (null without one). Writes ``<results_dir>/side_by_side.json``.
    """
    from poolbench.environment import capture_env
    from poolbench.files import atomic_write_json, json_safe

    note = progress or (lambda _: None)
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise ConfigError(f"results folder {results_dir} does not exist")
    if rounds < 1:
        raise ConfigError(f"rounds must be >= 1, got {rounds}")
    out_path = results_dir / SIDE_BY_SIDE
    if not os.access(results_dir, os.W_OK | os.X_OK) or (out_path.exists() and not out_path.is_file()):
        raise ConfigError(f"cannot write {out_path}")
    configs, skipped = _collect(results_dir, run_ids, note)
    if not configs:
        raise ConfigError(f"no completed run under {results_dir} could be rebuilt for timing")
    poolings = sorted({c.pooling for c in configs})
    if baseline is not None and baseline not in poolings:
        raise ConfigError(unknown_choice("baseline pooling", baseline, poolings))
    devices = sorted({c.device for c in configs}, key=str)
    warnings = [w for device in devices for w in timing_warnings(device)]
    for warning in warnings:
        note(f"warning: timings may be unreliable: {warning}")
    note(f"timing {len(configs)} configurations interleaved, {rounds} rounds")
    fns = {(index, name): fn for index, config in enumerate(configs) for name, fn in config.fns.items()}
    samples, errors = interleaved_samples(fns, warmup=warmup, rounds=rounds)
    rows = []
    for index, config in enumerate(configs):
        failed = [errors[(index, name)] for name in config.fns if (index, name) in errors]
        if failed:
            skipped.extend({"run_id": run_id, "reason": failed[0]} for run_id in config.run_ids)
            note(f"skipped {', '.join(config.run_ids)}: {failed[0]}")
            continue
        infer = [ms / config.batch_size for ms in samples[(index, "infer")]]
        train = samples[(index, "train")]
        base = _baseline_of(config, configs, baseline)
        ratio = ratio_ci = None
        if base is not None and not any((base, name) in errors for name in ("infer",)):
            ratio, ratio_ci = paired_ratios(samples[(index, "infer")], samples[(base, "infer")])
        backward = samples.get((index, "pool_fwdbwd"))
        rows.append(
            {
                "run_ids": config.run_ids,
                "pooling": config.pooling,
                "local_pooling": config.local_pooling,
                "model": config.model,
                "input": config.input,
                "batch_size": config.batch_size,
                "amp": config.amp,
                "device": str(config.device),
                "infer_image_ms": median_iqr(infer)[0],
                "infer_image_ms_ci": list(interval(infer)),
                "train_step_ms": median_iqr(train)[0],
                "train_step_ms_ci": list(interval(train)),
                "pool_fwd_ms": median_iqr(samples[(index, "pool_fwd")])[0],
                "pool_fwdbwd_ms": median_iqr(backward)[0] if backward else None,
                "peak_mem_mb": peak_memory_mb(config.fns["train"], config.device),
                "ratio_infer": ratio,
                "ratio_infer_ci": list(ratio_ci) if ratio_ci else None,
                "flops_per_image": config.cost["flops_per_image"],
                "pool_flops": config.cost["pool_flops"],
                "params": config.cost["params"],
                "rounds": len(train),
            }
        )
    env = capture_env(",".join(str(d) for d in devices))
    env.update(timing_warnings=warnings, rounds=rounds, warmup=warmup)
    document = {
        "schema": SIDE_BY_SIDE_SCHEMA,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "baseline": baseline,
        "rows": rows,
        "skipped": skipped,
    }
    atomic_write_json(out_path, json_safe(document))
    return out_path
