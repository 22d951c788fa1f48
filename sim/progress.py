"""Progress for the long simulator commands (`pbft sweep`, `pbft fuzz`), drawn by rich on
stderr, and only when stderr is a terminal: piped or redirected output stays clean."""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class TerminalProgress:
    """A rich progress bar if `stream` is a terminal, nothing otherwise.

    Use as a context manager; `sweep_step` and `fuzz_step` match the progress callbacks of
    `sim.sweep.sweep` and `sim.fuzz.fuzz`."""

    def __init__(self, description: str, total: float, stream: TextIO | None = None) -> None:
        stream = stream if stream is not None else sys.stderr
        self.enabled = stream.isatty()
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        if self.enabled:
            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("failing {task.fields[failing]}"),
                TimeElapsedColumn(),
                console=Console(file=stream),
                transient=False,
            )
            self._task = self._progress.add_task(description, total=total, failing=0)

    def __enter__(self) -> TerminalProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def stop(self) -> None:
        """Stop drawing (idempotent): what is written after it gets lines of its own."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def sweep_step(self, done: int, total: int, failures: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=done, total=total, failing=failures)

    def fuzz_step(self, runs: int, failures: int, elapsed_s: float) -> None:
        """Fuzzing is bounded by time: the bar is seconds of the budget, runs in the text."""
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=min(elapsed_s, self._progress.tasks[0].total or elapsed_s),
                failing=failures,
                description=f"fuzz: {runs} runs",
            )
