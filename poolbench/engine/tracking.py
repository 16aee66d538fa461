"""Where training progress goes: ``metrics.jsonl`` (always) and TensorBoard (``trainer.logger=tensorboard``).

Row of ``metrics.jsonl`` per epoch: ``epoch`` (from 1), ``loss`` (mean over the epoch), ``lr`` (at its
start), ``seconds``, ``steps``, ``learned.<name>`` for every learnable scalar of the global pool and
``learned.local.<name>`` of the local pools (natural units, :func:`poolbench.pooling.learned_scalars`),
and, on the epochs where ``trainer.eval_every`` evaluates, ``val.<metric>`` on the validation split
(``dataset.val_share``) or, without one, ``eval.<metric>`` on the test split.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from poolbench import files, pooling
from poolbench.errors import ConfigError
from poolbench.records import METRICS
from poolbench.records import TENSORBOARD as TENSORBOARD_DIR

LOGGERS = ("none", "tensorboard")


def require_logger(logger: str) -> None:
    """Fail before anything is written when the configured logger's package is missing."""
    if logger == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ModuleNotFoundError:
            raise ConfigError(
                "trainer.logger=tensorboard needs the tensorboard package: pip install poolbench[tb]"
            ) from None


def learned_fields(model: nn.Module) -> dict[str, float]:
    """``learned.<name>`` of the global pool and ``learned.local.<name>`` of the local pools, natural units.

    With several local pools carrying learnable scalars, each is numbered in forward order:
    ``learned.local.<k>.<name>`` (k from 1)."""
    fields = {f"learned.{name}": value for name, value in pooling.learned_scalars(model.pool).items()}
    local = [pooling.learned_scalars(m) for m in model.modules() if isinstance(m, pooling.LocalPool)]
    local = [values for values in local if values]
    for k, values in enumerate(local, start=1):
        prefix = "learned.local." if len(local) == 1 else f"learned.local.{k}."
        fields.update({prefix + name: value for name, value in values.items()})
    return fields


class EpochLog:
    """Appends the per-epoch rows to ``metrics.jsonl`` and, when enabled, the per-step and per-epoch
    scalars to a TensorBoard event file under ``<run_dir>/tb/``."""

    def __init__(self, run_dir: Path, history: Sequence[dict[str, Any]], logger: str, *, resumed: bool) -> None:
        self.metrics_path = run_dir / METRICS
        # Rewritten from the checkpoint's history: a crash between checkpoint and append must not
        # leave a missing or duplicated line.
        files.atomic_write_text(self.metrics_path, "".join(json.dumps(row) + "\n" for row in history))
        self.writer = None
        if logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            folder = run_dir / TENSORBOARD_DIR
            if not resumed:
                shutil.rmtree(folder, ignore_errors=True)
            self.writer = SummaryWriter(log_dir=str(folder))

    @property
    def per_step(self) -> bool:
        """Whether :meth:`epoch_done` wants the per-step losses (reading them back costs a device sync)."""
        return self.writer is not None

    def epoch_done(self, row: dict[str, Any], first_step: int, losses: Sequence[float], lrs: Sequence[float]) -> None:
        """Record a checkpointed epoch; ``losses``/``lrs`` are its per-step values, ``first_step`` the
        global number of its first step (from 0)."""
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is None:
            return
        for i, (loss, lr) in enumerate(zip(losses, lrs, strict=True)):
            self.writer.add_scalar("step/loss", loss, first_step + i)
            self.writer.add_scalar("step/lr", lr, first_step + i)
        epoch = row["epoch"]
        for key, value in row.items():
            if key not in ("epoch", "steps") and isinstance(value, int | float):
                group = "epoch" if "." not in key else key.split(".", 1)[0]
                name = key if group == "epoch" else key.split(".", 1)[1]
                self.writer.add_scalar(f"{group}/{name}", value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
