"""What users type that several layers parse: override keys and device names, each defined once.

Imports nothing of poolbench but its errors (no torch, no Hydra, no config), so the config, plugins,
sweep and tune layers, the engine and the command line can all read the same definition.
"""

from __future__ import annotations

import re

from poolbench.errors import ConfigError

# device=...: the engine resolves these (auto: CUDA when present); the config refuses anything else.
DEVICES = ("auto", "cpu", "cuda", "cuda:<index>")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def override_key(override: str) -> str:
    """The config key an override sets, adds (``+``) or deletes (``~``): ``+trainer.lr=0.1`` -> ``trainer.lr``."""
    return override.lstrip("+~").split("=", 1)[0]


def check_device(device: object) -> str:
    """``device`` as text when it is one of :data:`DEVICES`, else a one-line ConfigError naming them."""
    text = str(device)
    if not _DEVICE.fullmatch(text):
        raise ConfigError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {text!r}")
    return text
