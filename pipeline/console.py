"""Terminal output on stderr (status lines, progress bars, user errors), so stdout stays free for results."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.errors import UserError

console = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    """Items per second in the task's unit (tok/s, rows/s...)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")


def say(message: str) -> None:
    """One status line on stderr."""
    console.print(message)


@contextmanager
def progress_bar(description: str, total: float | None, unit: str = "tok") -> Iterator[Progress]:
    """A rich progress bar with rate and ETA; task id 0 is the bar. Silent when SAE_PIPE_QUIET=1."""
    disable = os.environ.get("SAE_PIPE_QUIET") == "1"
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}"),
        RateColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        refresh_per_second=2 if sys.stderr.isatty() else 0.2,
    )
    with progress:
        progress.add_task(description, total=total, unit=unit, status="")
        yield progress


class Stopwatch:
    """Wall-clock seconds since creation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start


def guarded(entry: Callable[[], object]) -> None:
    """Run ``entry``; a user error becomes one red line on stderr and a non-zero exit code."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # our rich bars report progress; library tqdm bars stay quiet
    try:
        entry()
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
