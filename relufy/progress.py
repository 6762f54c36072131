"""Progress bars for long work (rich), on stderr so that stdout stays clean for --json."""

from __future__ import annotations

import contextlib

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

console = Console(stderr=True)


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
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
