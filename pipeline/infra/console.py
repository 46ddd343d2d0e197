"""Terminal output on stderr (status lines, progress bars, user errors), so stdout stays free for results."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from pipeline.infra.errors import UserError

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


class Bar(Protocol):
    """What long loops report to: a rich Progress (task 0), or a LogProgress in non-terminal logs."""

    def advance(self, task_id: Any, advance: float = 1) -> None: ...

    def update(self, task_id: Any, *, advance: float | None = None, **fields: Any) -> None: ...


class LogProgress:
    """Progress for logs (DVC, CI, nohup): a plain line every ``interval`` seconds and one at the end."""

    def __init__(self, description: str, total: float | None, unit: str, interval: float = 30.0) -> None:
        self.description, self.total, self.unit, self.interval = description, total, unit, interval
        self.done, self.status = 0.0, ""
        self.clock, self.last = Stopwatch(), 0.0

    def advance(self, task_id: Any, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: Any, *, advance: float | None = None, **fields: Any) -> None:
        self.done += advance or 0
        self.status = str(fields.get("status") or self.status)
        if self.clock.seconds - self.last >= self.interval:
            self.line()

    def line(self) -> None:
        self.last = self.clock.seconds
        total = f" / {self.total:,.0f}" if self.total else ""
        rate = self.done / max(self.last, 1e-9)
        console.print(
            f"{self.description}: {self.done:,.0f}{total} {self.unit}, {rate:,.0f} {self.unit}/s, "
            f"{self.last:,.0f} s {self.status}".rstrip()
        )


@contextmanager
def progress_bar(description: str, total: float | None, unit: str = "tok") -> Iterator[Bar]:
    """A rich progress bar with rate and ETA (task id 0), or plain periodic lines when stderr is not a
    terminal; silent when SAE_PIPE_QUIET=1."""
    if os.environ.get("SAE_PIPE_QUIET") == "1" or not console.is_terminal:
        log = LogProgress(description, total, unit)
        yield log
        if os.environ.get("SAE_PIPE_QUIET") != "1":
            log.line()
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}"),
        RateColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=2,
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
    try:
        entry()
    except UserError as err:
        console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(err.exit_code)
