"""The training state of one run and its checkpoint: written atomically after every epoch, read back on resume.

A checkpoint holds model, optimiser, scheduler and grad-scaler states, the epoch reached, the
per-epoch history, every random generator's state and how many times the run was resumed.
"""

from __future__ import annotations

import functools
import pickle
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import nn

from poolbench import files, records
from poolbench.errors import PoolbenchError, message_line
from poolbench.records import CHECKPOINT  # noqa: F401  (re-exported: engine code names it from here)


class CheckpointError(PoolbenchError):
    """A checkpoint that cannot be resumed from: truncated, not poolbench's, or of another model."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(
            f"cannot resume from {path}: {reason}; train this run again from scratch with trainer.overwrite=true"
        )


@dataclass
class TrainState:
    """Everything an epoch changes and a resume restores."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    epoch: int = 0  # epochs completed
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per completed epoch
    resume_count: int = 0  # how many times this run was resumed, carried across resumes

    def save(self, path: Path) -> None:
        """Checkpoint the state after an epoch (atomically: a kill leaves the previous checkpoint)."""
        checkpoint = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "rng": rng_state(),
            "history": self.history,
            "resume_count": self.resume_count,
        }
        files.atomic_write(path, functools.partial(_save, checkpoint))

    def restore(self, path: Path) -> None:
        """Continue from ``path``; anything unreadable or mismatched is a :class:`CheckpointError`."""
        try:
            with records.open_regular(path) as handle:  # a FIFO or a symlink to /dev/zero: refused, not read
                state = torch.load(handle, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
            raise CheckpointError(path, f"truncated or not a poolbench checkpoint ({message_line(exc)})") from None
        if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "rng", "history"} <= state.keys():
            raise CheckpointError(path, "not a poolbench checkpoint")
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(path, f"it does not match this model ({message_line(exc)})") from None
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            set_rng_state(state["rng"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(path, f"its training state does not fit this run ({message_line(exc)})") from None
        self.epoch, self.history = int(state["epoch"]), list(state["history"])
        self.resume_count = int(state.get("resume_count", 0)) + 1


class _WriteErrors:
    """A file handle that remembers the OSError of a failed write: torch.save reports a full disk as an
    unrelated RuntimeError ("unexpected pos ..."); the run must see the OSError(ENOSPC) behind it."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.error = handle, None

    def write(self, data: bytes) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


def _save(checkpoint: dict[str, Any], handle: BinaryIO) -> None:
    recording = _WriteErrors(handle)
    try:
        torch.save(checkpoint, recording)  # type: ignore[arg-type]
    except RuntimeError:
        if recording.error is not None:
            raise recording.error from None
        raise


def load_weights(model: nn.Module, path: Path) -> None:
    """Load only the model weights of a checkpoint (the trained model of a completed run)."""
    try:
        with records.open_regular(path) as handle:
            state = torch.load(handle, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError, TypeError) as exc:
        raise PoolbenchError(f"cannot load the trained model from {path} ({message_line(exc)})") from None




def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, key.numpy(), *rest))


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Whatever random numbers the block draws, the generators continue afterwards as if it had not run
    (evaluation during training must not change the training)."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)
