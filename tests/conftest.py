"""Helpers shared by every test module."""

from __future__ import annotations

import os
import random
import shutil
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from filelock import FileLock


@pytest.fixture(autouse=True)
def seeded_random_state(request: pytest.FixtureRequest) -> None:
    """Every test starts from a random state of its own name: its random inputs are the same on every run,
    whichever xdist worker runs it and whatever ran before it (unseeded, a tolerance that holds for most
    draws fails now and then in CI). POOLBENCH_TEST_SEED=N draws other inputs, to look for such tests."""
    import torch  # the tests' process loads torch anyway; only the poolbench commands under test must not

    seed = zlib.crc32(f"{os.environ.get('POOLBENCH_TEST_SEED', '0')}:{request.node.nodeid}".encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch) -> Callable[..., int]:
    """Run ``poolbench <args>`` in-process through the console-script entry point; return its exit code."""

    def run(*args: str) -> int:
        from poolbench.cli import main

        monkeypatch.setattr(sys, "argv", ["poolbench", *args])
        try:
            main()
        except SystemExit as exit_info:
            return int(exit_info.code or 0)
        return 0

    return run


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Sequence[str], Path], Path]:
    """``copy_of(overrides, into)``: a real run of ``overrides`` trained once per test session and copied into
    the folder ``into``; returns the copy's run folder.

    Every pytest-xdist worker is a session of its own: the runs are trained in a folder that all workers of
    this pytest invocation share (beside their own temporary folders), under a lock, so that a configuration
    is trained once however many modules and workers ask for it. Callers get a copy to change at will.
    """
    # Under xdist each worker's basetemp is <session>/popen-gwN; with -n 0 the basetemp is the session's own.
    session = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        session = session.parent
    shared = session / "trained-runs"

    def copy_of(overrides: Sequence[str], into: Path) -> Path:
        from poolbench import records
        from poolbench.config import compose, run_dir
        from poolbench.run import execute

        cfg = compose([*overrides, f"results_dir={shared}"])
        source = run_dir(cfg)
        with FileLock(f"{shared}.lock"):  # a second worker waits, then finds the run completed
            if (records.read_record(source) or {}).get("status") != "completed":
                execute(cfg)
        into.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copytree(source, into / source.name, symlinks=True))

    return copy_of
