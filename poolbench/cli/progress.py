"""A rich progress display fed by the library's ``progress(description, done, total)`` callbacks."""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from poolbench.text import plain
from poolbench.text import terminal as escape  # strips control characters, escapes markup


class ProgressBars:
    """One bar per description; updates are throttled so the training loop does not pay for drawing."""

    def __init__(self, console: Console, *, enabled: bool = True, min_interval_s: float = 0.1) -> None:
        self.enabled = enabled
        self.min_interval_s = min_interval_s
        self._progress = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last_draw: dict[str, float] = {}

    def __call__(self, description: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        task = self._tasks.get(description)
        if task is None:
            task = self._tasks[description] = self._progress.add_task(escape(description), total=total)
        elif done < total and now - self._last_draw.get(description, 0.0) < self.min_interval_s:
            return
        self._last_draw[description] = now
        self._progress.update(task, completed=done, total=total)

    def log(self, message: str) -> None:
        # Log lines quote config values and paths: printed as they are, never as rich markup.
        self._progress.console.print(plain(message), highlight=False, markup=False)

    def __enter__(self) -> ProgressBars:
        self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()
