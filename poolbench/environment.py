"""What makes two runs comparable: versions, device, threads, git commit, command line."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit(start: Path | None = None) -> str | None:
    """The commit of the checkout poolbench runs from (with ``+dirty``), or None outside git."""
    where = start or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=where,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def capture_env(device: str) -> dict[str, Any]:
    """Versions, device, threads, git commit and command line: what makes two runs comparable."""
    import torch
    import torchvision

    import poolbench

    env: dict[str, Any] = {
        "poolbench": poolbench.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "num_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "device": device,
        "device_name": device_name(device),
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
    }
    return env


def device_name(device: object) -> str:
    """The GPU's name for a CUDA device (``"cuda:1"`` or a ``torch.device``), else the CPU's model: the one
    form records use (``env.device_name``, ``latency.device_name``); the thread count is ``env.num_threads``."""
    text = str(device)
    if text.startswith("cuda"):
        import torch  # only for a CUDA device: this module stays importable without torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.device(text))
    return cpu_model()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, as set by taskset, cgroups or SLURM), not the machine's."""
    with contextlib.suppress(AttributeError, OSError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() is empty on most Linux systems)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "cpu"
