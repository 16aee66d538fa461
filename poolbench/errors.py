"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PoolbenchError(Exception):
    """An error caused by the user's input or environment, not by a bug in poolbench."""


class ConfigError(PoolbenchError, ValueError):
    """An invalid configuration: unknown option, mistyped key or out-of-range value."""


class DataError(PoolbenchError):
    """A dataset that cannot be read as configured (missing root, bad files, wrong layout)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM and most schedulers send before killing), handled like Ctrl-C: a run records
    ``interrupted`` and keeps its checkpoint, a sweep stops; the CLI exits 143 (128 + SIGTERM)."""


def unknown_choice(what: str, value: object, choices: Iterable[str]) -> str:
    """One line naming the bad value, the closest valid choice, and all valid choices."""
    options = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {what} '{value}'.{hint} Valid choices: {', '.join(options)}"


def message_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): one-line errors."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when there is none): one-line reasons."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
