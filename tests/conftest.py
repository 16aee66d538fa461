"""Helpers shared by every test module."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


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
