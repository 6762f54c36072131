"""Progress for long work, on stderr so that stdout stays clean for --json; tables printed whole.

On a terminal: rich progress bars. Elsewhere (logs, CI, ``2> file``): plain lines, one when a
task finishes and at most one every ``PLAIN_EVERY`` seconds while it runs, so a log shows what
happened without redrawn bars. Both offer the same ``add_task / advance / update`` calls.
Quiet (``relufy -q``, ``set_quiet``): neither, the same calls print nothing.

``show_table``: off a terminal rich lays tables out in 80 columns and cuts wide cells to "…",
which leaves a log of ``relufy bench`` unreadable; there a table gets its natural width instead.
"""

from __future__ import annotations

import contextlib
import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

console = Console(stderr=True)
PLAIN_EVERY = 30.0
_QUIET = False


def show_table(table, to: Console | None = None) -> None:
    """Print a rich ``table`` on ``to`` (default: stdout): fitted to the window on a terminal,
    at its natural width elsewhere (a log, a pipe, ``> file``) so that no cell is cut."""
    from rich.measure import Measurement

    to = to or Console()
    if not to.is_terminal:
        width = Measurement.get(to, to.options.update(max_width=1 << 16), table).maximum
        if width > to.width:
            to = Console(file=to.file, width=width, no_color=to.no_color, force_terminal=False)
    to.print(table)


def set_quiet(quiet: bool = True) -> None:
    """Show no progress from now on (``relufy -q``): no bars, no plain lines."""
    global _QUIET
    _QUIET = quiet


def is_quiet() -> bool:
    return _QUIET


class RateColumn(ProgressColumn):
    """Items per second, e.g. tokens/s."""

    def __init__(self, unit: str = "tok/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}" if speed else f"- {self.unit}", style="progress.data.speed")


def _amount(value: float, unit: str) -> str:
    if unit == "bytes":
        for size, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if value >= size:
                return f"{value / size:,.1f} {name}"
        return f"{value:,.0f} B"
    return f"{value:,.0f}"


class PlainProgress:
    """The calls of ``rich.progress.Progress`` that relufy uses, printed as plain log lines."""

    def __init__(self, unit: str = "", every: float = PLAIN_EVERY):
        self.unit, self.every = unit, every
        self.tasks: list[dict] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        now = time.monotonic()
        self.tasks.append(
            {
                "description": description,
                "total": total,
                "completed": completed,
                "start": now,
                "last": now,
                "base": completed,
                "done": False,
            }
        )
        return len(self.tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.tasks[task]["completed"] + advance)

    def update(
        self,
        task: int,
        description: str | None = None,
        completed: float | None = None,
        advance: float | None = None,
        line: bool = False,
        **_,
    ) -> None:
        """As ``rich.progress.Progress.update``; ``line``: print this update now (e.g. one line per
        layer), not only every ``every`` seconds."""
        t = self.tasks[task]
        if description is not None:
            t["description"] = description
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        now = time.monotonic()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished and not t["done"]:
            t["done"] = True
            self._line(t, now, final=True)
        elif not finished and (line or now - t["last"] >= self.every):
            t["last"] = now
            self._line(t, now, final=False)

    def _line(self, t: dict, now: float, final: bool) -> None:
        seconds = now - t["start"]
        done, total = t["completed"], t["total"]
        rate = (done - t["base"]) / seconds if seconds > 0 else 0.0
        unit = {"bytes": "/s", "tokens": " tok/s"}.get(self.unit, "/s")
        where = f"{_amount(done, self.unit)}" + (f" of {_amount(total, self.unit)}" if total else "")
        speed = f", {_amount(rate, self.unit)}{unit}" if rate >= 1 and self.unit else ""
        state = f"done in {seconds:,.1f} s" if final else f"{done / total:.0%}" if total else "running"
        console.print(f"{t['description']}: {state} ({where}{speed})", markup=False, highlight=False, soft_wrap=True)


class SilentProgress(PlainProgress):
    """The same calls, printing nothing (quiet)."""

    def _line(self, t: dict, now: float, final: bool) -> None:
        pass


def new_progress(*columns, unit: str = ""):
    """A started rich ``Progress`` with ``columns`` on a terminal, else a ``PlainProgress``; a
    ``SilentProgress`` when quiet."""
    if _QUIET:
        return SilentProgress(unit)
    if not console.is_terminal:
        return PlainProgress(unit)
    progress = Progress(*columns, console=console, transient=False)
    progress.start()
    return progress


@contextlib.contextmanager
def byte_progress(description: str, total: int):
    """Yields ``advance(nbytes)``."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    progress = new_progress(*columns, unit="bytes")
    try:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
    finally:
        progress.stop()


@contextlib.contextmanager
def token_progress():
    """A progress display for token counts with tokens/s; callers add their own tasks."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeRemainingColumn())
    progress = new_progress(*columns, unit="tokens")
    try:
        yield progress
    finally:
        progress.stop()
