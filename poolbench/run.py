"""One training run: config → data → model + pooling → fit → evaluate → latency → run record.

:func:`execute` is what ``poolbench train`` and every sweep job call. A config or data error found
while building the dataset and model writes nothing; from then on, whatever happens, the run
directory ends with a ``result.json`` whose ``status`` says how the run ended.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from poolbench import files, provenance, records
from poolbench.config import config_hash, flatten, run_id
from poolbench.config import run_dir as run_dir_of
from poolbench.environment import capture_env
from poolbench.errors import PoolbenchError, Terminated
from poolbench.records import CHECKPOINT

if TYPE_CHECKING:
    import torch

    from poolbench.data.base import DataBundle
    from poolbench.models import PoolNet

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]


class DiskFullError(PoolbenchError):
    """The disk of the results folder filled up during a run."""


def _quiet(_: str) -> None:
    return None


def _identity_fields(cfg: DictConfig) -> dict[str, Any]:
    from poolbench.models import backbone_name
    from poolbench.pooling import operator_name

    return {
        "run_id": run_id(cfg),
        "config_hash": config_hash(cfg),
        "dataset": cfg.dataset.name,
        "model": backbone_name(cfg.model),
        "pooling": operator_name(cfg.pooling),
        "local_pooling": operator_name(cfg.local_pooling),
        "seed": cfg.seed,
        "experiment": cfg.choices.get("experiment"),
        "sweep_name": cfg.get("sweep_name"),
        **{f"choice.{k}": v for k, v in cfg.choices.items() if v is not None},
        **{f"cfg.{k}": v for k, v in flatten(cfg).items() if not k.startswith("choices.")},
        **provenance.record_fields(cfg),  # what reports need of its parts without importing their code
    }


def _env_fields(env: dict[str, Any]) -> dict[str, Any]:
    keys = ("device", "device_name", "torch", "torchvision", "python", "git_commit", "num_threads", "hostname")
    return {f"env.{k}": env.get(k) for k in keys}


@dataclass
class Built:
    """What a run trains: built (and checked) before anything is written."""

    device: torch.device
    data: DataBundle
    model: PoolNet


def execute(
    cfg: DictConfig, *, progress: Progress | None = None, log: Log | None = None, return_model: bool = False
) -> dict[str, Any] | tuple[dict[str, Any], PoolNet]:
    """Run (or reuse, or resume) the run that ``cfg`` identifies and return its flat record
    (``(record, trained model)`` with ``return_model``).

    Order: results folder writable → completed record reused (unless ``trainer.overwrite``) → dataset
    and model built (an error here writes nothing) → run lock → train → record. An overwrite of a
    completed run trains in ``.staging/<run-id>/`` and replaces the completed run only once it completed.
    """
    log = log or _quiet
    records.check_writable(Path(cfg.results_dir))
    run_dir = run_dir_of(cfg)
    overwrite = bool(cfg.trainer.overwrite)
    built: Built | None = None
    with _sigterm_as_interrupt():
        reusable = None if overwrite else _completed_record(run_dir, log)  # checked again under the lock
        if reusable is None:
            built = _build(cfg, progress)
            with records.run_lock(run_dir):
                records.recover(run_dir)
                completed = _completed_record(run_dir, log)
                if completed is None or overwrite:
                    records.check_run_dir(run_dir)  # a planted symlink in its place would make the run write elsewhere
                    if completed is None:
                        from poolbench.engine.policies import should_resume

                        resuming = should_resume(cfg.trainer.resume, run_dir / CHECKPOINT, overwrite=overwrite)
                        record = _train(cfg, run_dir, built, resuming, progress, log, run_dir=run_dir)
                    else:  # replacing a completed run: from scratch in its staging folder, swapped in once completed
                        with _staged(run_dir) as staged:
                            record = _train(cfg, staged, built, False, progress, log, run_dir=run_dir)
                    return (record, built.model) if return_model else record
                reusable = completed
        log(f"run {run_dir.name} already completed; reusing its record (trainer.overwrite=true trains again)")
        if records.has_staged(run_dir):  # left by a killed overwrite run, unless one is live
            with contextlib.suppress(records.RunLockedError), records.run_lock(run_dir):
                records.recover(run_dir)
        record = {**reusable, "reused": True}
        if not return_model:
            return record
        from poolbench.engine.checkpoint import load_weights

        built = built or _build(cfg, progress)
        load_weights(built.model, run_dir / CHECKPOINT)
        return record, built.model


def _completed_record(run_dir: Path, log: Log) -> dict[str, Any] | None:
    try:
        existing = records.read_record(run_dir)
    except ValueError as exc:
        log(f"ignoring the unreadable old record: {exc}")
        return None
    return existing if existing and existing["status"] == "completed" else None


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn the first SIGTERM into :class:`Terminated` (Python's own handling would kill the process
    before the record says so). Only where nobody else handles SIGTERM: inside a SLURM task of a sweep,
    the sweep's handler decides between SLURM's requeue and submitit's checkpoint. Only the main thread
    can install signal handlers."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) not in (
        signal.SIG_DFL,
        None,
    ):
        yield
        return
    raised = False

    def handler(signum: int, frame: object) -> None:
        nonlocal raised
        if not raised:  # a second SIGTERM must not interrupt the writing of the record
            raised = True
            raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build(cfg: DictConfig, progress: Progress | None) -> Built:
    """Device, dataset and model of the run, every config and data error raised before anything is written."""
    import torch

    from poolbench.data import build_dataset
    from poolbench.engine import seed_everything
    from poolbench.engine.policies import resolve_device
    from poolbench.engine.settings import TrainerSettings
    from poolbench.engine.tracking import require_logger
    from poolbench.models import build_model

    require_logger(TrainerSettings.from_mapping(cfg.trainer).logger)
    if cfg.trainer.num_threads is not None:
        torch.set_num_threads(int(cfg.trainer.num_threads))
    device = resolve_device(str(cfg.device))
    data = build_dataset(cfg.dataset, seed=int(cfg.seed), augment=cfg.augment, progress=progress)
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
    return Built(device, data, model)


@contextmanager
def _staged(run_dir: Path) -> Iterator[Path]:
    """The staging folder of ``run_dir``: swapped in for the run folder when the block completes, discarded
    when it raises (an overwrite always starts from scratch: nothing to resume)."""
    staged = records.staging_dir(run_dir)
    try:
        yield staged
    except BaseException:
        records.discard_staged(run_dir)
        raise
    records.replace_run_dir(staged, run_dir)


def _train(
    cfg: DictConfig, work_dir: Path, built: Built, resuming: bool, progress: Progress | None, log: Log, *,
    run_dir: Path,
) -> dict[str, Any]:
    """Write config, environment and a ``running`` record into ``work_dir``, fit, evaluate and measure,
    and write the final record however that ends (completed, failed with why, or interrupted)."""
    started = time.perf_counter()
    env = capture_env(str(built.device))
    record: dict[str, Any] = {
        **_identity_fields(cfg),
        **_env_fields(env),
        "status": "running",
        "started_at": records.now(),
        "resumed": resuming,
        "run_dir": str(run_dir),
        **_model_fields(built),
    }
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        records.atomic_write_text(work_dir / records.CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        records.atomic_write_json(work_dir / records.ENV, env)
        records.atomic_write_json(work_dir / records.RECORD, record)
        record.update(_fit_evaluate_measure(cfg, work_dir, built, resuming, progress, log))
        record.update(status="completed")
    except KeyboardInterrupt as exc:
        reason = "terminated by SIGTERM" if isinstance(exc, Terminated) else "interrupted by the user (Ctrl-C)"
        record.update(status="interrupted", error=reason)
        raise
    except Exception as exc:
        record.update(_failure(exc, run_dir))
        if files.is_disk_full(exc):
            raise DiskFullError(f"{record['error']}; free some space, then resume with trainer.resume=true") from None
        raise
    finally:
        record.update(finished_at=records.now(), wall_time_s=round(time.perf_counter() - started, 3))
        try:
            records.atomic_write_json(work_dir / records.RECORD, record)
        except OSError as exc:  # the disk may still be full: the record stays `running`
            log(f"could not write the run record: {exc}")
    return record


def _failure(exc: Exception, run_dir: Path) -> dict[str, Any]:
    from poolbench.engine import NonFiniteLossError

    if isinstance(exc, NonFiniteLossError):
        return {"status": "failed", "error": str(exc), "failed_epoch": exc.epoch}
    if files.is_disk_full(exc):
        where = f" writing {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
        return {"status": "failed", "error": f"disk full in {run_dir.parent}{where} ({exc.strerror})"}
    if isinstance(exc, PoolbenchError):
        return {"status": "failed", "error": str(exc)}
    return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}


def _model_fields(built: Built) -> dict[str, Any]:
    height, width = built.model.feature_map_size
    return {
        "task": built.data.task,
        "feature_map_h": height,
        "feature_map_w": width,
        "pool_out_features": built.model.pool_out_features,
        "num_params": sum(p.numel() for p in built.model.parameters()),
        # What the side-by-side latency pass needs to rebuild the model without the data.
        "in_channels": built.data.in_channels,
        "input_size": built.data.input_size,
        "num_classes": built.data.num_classes,
        **{f"data.{k}": v for k, v in built.data.info.items()},
        **({"data.notes": " | ".join(built.data.notes)} if built.data.notes else {}),
    }


def _fit_evaluate_measure(
    cfg: DictConfig, work_dir: Path, built: Built, resuming: bool, progress: Progress | None, log: Log
) -> dict[str, Any]:
    """fit → evaluate (test, and validation when there is one) → latency and cost: the fields they record."""
    from poolbench.engine import evaluate, fit, measure_cost, measure_latency
    from poolbench.engine.policies import TASK_LOSS, lr_mults
    from poolbench.engine.tracking import learned_fields

    device, data, model = built.device, built.data, built.model
    from poolbench.models import small_map_warning

    message = small_map_warning(cfg.model, model.feature_map_size, cfg.dataset)
    if message:  # once, through the command's console (a Python warning would print it a second time)
        log(f"warning: {message}")
    for note in data.notes:  # what the data builder wants the user to see (single-image identities, ...)
        log(f"warning: {note}")
    summary = fit(
        model,
        data,
        cfg.trainer,
        device=device,
        seed=int(cfg.seed),
        run_dir=work_dir,
        **lr_mults(cfg.pooling, cfg.local_pooling),
        resume=resuming,
        progress=progress,
        log=log,
    )
    fields: dict[str, Any] = {"resume_count": summary.pop("resume_count")}
    fields.update({f"train.{k}": v for k, v in summary.items()})
    amp = str(cfg.trainer.amp)
    # The test split is evaluated once, here, at the end; the validation split (selection: val.mAP /
    # val.acc@1) beside it, under val.<metric>.
    fields.update(evaluate(model, data, device=device, batch_size=cfg.trainer.eval_batch_size, amp=amp,
                           progress=progress))
    if data.val is not None:
        val = evaluate(model, data, device=device, batch_size=cfg.trainer.eval_batch_size, amp=amp,
                       progress=progress, split="val")
        fields.update({f"val.{k}": v for k, v in val.items()})
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
        fields.update({f"latency.{k}": v for k, v in latency.items()})
        if latency.get("timing_warning"):
            log(f"warning: timings may be unreliable: {latency['timing_warning']}")
    input_shape = (data.in_channels, data.input_size, data.input_size)
    fields.update({f"cost.{k}": v for k, v in measure_cost(model, input_shape, device=device).items()})
    fields.update(learned_fields(model))
    return fields
