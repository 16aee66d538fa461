"""One training run: config → data → model + pooling → fit → evaluate → latency → run record.

:func:`execute` is what ``poolbench train`` and every sweep job call. Whatever happens, the run
directory ends with a ``result.json`` whose ``status`` says how the run ended.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from poolbench import records
from poolbench.config import config_hash, flatten, run_id
from poolbench.engine.policies import should_resume
from poolbench.environment import capture_env

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


def run_dir_of(cfg: DictConfig) -> Path:
    return Path(cfg.results_dir) / run_id(cfg)


def _identity_fields(cfg: DictConfig) -> dict[str, Any]:
    return {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "pooling": cfg.pooling.name,
        "local_pooling": cfg.local_pooling.name,
        "seed": cfg.seed,
        "experiment": cfg.choices.get("experiment"),
        "sweep_name": cfg.get("sweep_name"),
        **{f"choice.{k}": v for k, v in cfg.choices.items() if v is not None},
        **{f"cfg.{k}": v for k, v in flatten(cfg).items() if not k.startswith("choices.")},
    }


def _env_fields(env: dict[str, Any]) -> dict[str, Any]:
    keys = ("device", "device_name", "torch", "torchvision", "python", "git_commit", "num_threads", "hostname")
    return {f"env.{k}": env.get(k) for k in keys}


def execute(cfg: DictConfig, *, progress: Progress | None = None, log: Log | None = None) -> dict[str, Any]:
    """Run (or reuse, or resume) the run that ``cfg`` identifies and return its flat record."""
    log = log or _quiet
    results_dir = Path(cfg.results_dir)
    records.check_writable(results_dir)
    run_dir = run_dir_of(cfg)
    with records.run_lock(run_dir):
        try:
            existing = records.read_record(run_dir)
        except ValueError as exc:
            log(f"ignoring the unreadable old record: {exc}")
            existing = None
        if existing and existing["status"] == "completed" and not cfg.trainer.overwrite:
            log(f"run {run_dir.name} already completed; reusing its record (trainer.overwrite=true trains again)")
            return {**existing, "reused": True}
        resuming = should_resume(cfg.trainer.resume, run_dir / "checkpoint.pt")
        if not resuming:
            for stale in ("checkpoint.pt", "metrics.jsonl"):
                (run_dir / stale).unlink(missing_ok=True)
        return _train(cfg, run_dir, resuming, progress, log)


def _train(cfg: DictConfig, run_dir: Path, resuming: bool, progress: Progress | None, log: Log) -> dict[str, Any]:
    import torch

    from poolbench.data import build_dataset
    from poolbench.engine import NonFiniteLossError, evaluate, fit, measure_latency, seed_everything
    from poolbench.engine.policies import TASK_LOSS, resolve_device
    from poolbench.models import build_model

    started = time.perf_counter()
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    device = resolve_device(str(cfg.device))
    env = capture_env(str(device))
    records.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    records.atomic_write_json(run_dir / "env.json", env)
    record: dict[str, Any] = {
        **_identity_fields(cfg),
        **_env_fields(env),
        "status": "running",
        "started_at": records.now(),
        "resumed": resuming,
        "run_dir": str(run_dir),
    }
    records.atomic_write_json(run_dir / records.RECORD, record)
    try:
        data = build_dataset(cfg.dataset, seed=int(cfg.seed), progress=progress)
        seed_everything(int(cfg.seed))  # the model's initial weights depend on the seed alone
        model = build_model(
            cfg.model,
            cfg.pooling,
            cfg.local_pooling,
            in_channels=data.in_channels,
            input_size=data.input_size,
            num_classes=data.num_classes,
            task=data.task,
        )
        height, width = model.feature_map_size
        record.update(
            task=data.task,
            feature_map_h=height,
            feature_map_w=width,
            pool_out_features=model.pool_out_features,
            num_params=sum(p.numel() for p in model.parameters()),
            **{f"data.{k}": v for k, v in data.info.items()},
        )
        if height * width <= 4:
            message = (
                f"the final feature map is {height}x{width}: global pools barely differ on it; "
                "use a larger input, model.cifar_stem=true or model.last_stride=1"
            )
            warnings.warn(message, stacklevel=1)
            log(f"warning: {message}")
        summary = fit(
            model,
            data,
            cfg.trainer,
            device=device,
            seed=int(cfg.seed),
            run_dir=run_dir,
            pool_lr_mult=float(cfg.pooling.get("lr_mult", 1.0)),
            local_pool_lr_mult=float(cfg.local_pooling.get("lr_mult", 1.0)),
            progress=progress,
            log=log,
        )
        record.update({f"train.{k}": v for k, v in summary.items()})
        amp = str(cfg.trainer.amp)
        metrics = evaluate(
            model, data, device=device, batch_size=cfg.trainer.eval_batch_size, amp=amp, progress=progress
        )
        record.update(metrics)
        if cfg.trainer.latency.enabled:
            latency = measure_latency(
                model,
                input_shape=(data.in_channels, data.input_size, data.input_size),
                device=device,
                batch_size=cfg.trainer.latency.batch_size,
                warmup=cfg.trainer.latency.warmup,
                repeats=cfg.trainer.latency.repeats,
                amp=amp,
                train_loss=TASK_LOSS[data.task],
            )
            record.update({f"latency.{k}": v for k, v in latency.items()})
        record.update(
            {
                f"learned.{name}": p.detach().float().item()
                for name, p in model.pool.named_parameters()
                if p.numel() == 1
            }
        )
        record.update(status="completed")
    except NonFiniteLossError as exc:
        record.update(status="failed", error=str(exc), failed_epoch=exc.epoch)
        raise
    except KeyboardInterrupt:
        record.update(status="interrupted", error="interrupted by the user (Ctrl-C)")
        raise
    except Exception as exc:
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        record.update(finished_at=records.now(), wall_time_s=round(time.perf_counter() - started, 3))
        records.atomic_write_json(run_dir / records.RECORD, record)
    return record
