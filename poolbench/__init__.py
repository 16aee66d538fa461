"""poolbench: benchmark and compare pooling operators in CNNs.

The Python API mirrors the CLI, for notebooks and scripts::

    import poolbench

    record = poolbench.train(["pooling=dgmp", "trainer.epochs=2"])      # like `poolbench train ...`
    record, model = poolbench.train(["pooling=gem"], return_model=True)  # and keep the trained model

    cfg = poolbench.compose(["pooling=lse", "dataset=digits"])          # compose and validate only
    cfg.trainer.epochs = 1
    record = poolbench.execute(cfg)                                     # run a composed config

``poolbench.pooling`` is the operator library (``create``, ``create_local``, ``register``).
Importing poolbench itself is cheap: torch is loaded by the first call that needs it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:
    from omegaconf import DictConfig


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose and validate a run config from Hydra overrides (``poolbench train --cfg``)."""
    from poolbench.config import compose as compose_config

    return compose_config(list(overrides))


def execute(cfg: DictConfig, **options: Any) -> Any:
    """Run (or reuse, or resume) the run a composed config identifies; returns its flat record
    (``return_model=True``: ``(record, model)``). Options are those of :func:`poolbench.run.execute`."""
    from poolbench.run import execute as execute_run

    return execute_run(cfg, **options)


def train(overrides: Sequence[str] = (), *, return_model: bool = False, **options: Any) -> Any:
    """``poolbench train OVERRIDES`` as a function: the run's record, or ``(record, model)``."""
    cfg = compose(overrides)
    if return_model:
        options["return_model"] = True
    return execute(cfg, **options)


__all__ = ["__version__", "compose", "execute", "train"]
