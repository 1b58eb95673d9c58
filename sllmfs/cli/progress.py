"""Where command output goes, and one progress bar style for every long command.

``out`` (stdout) carries data: tables, summaries, what a script pipes into grep. ``console``
(stderr) carries logs and progress. Off a terminal neither wraps at 80 columns.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


def _console(*, stderr: bool) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    # a pipe or file gets whole lines: rich would otherwise wrap (and truncate tables) at 80 columns
    width = None if stream.isatty() else 100_000
    return Console(stderr=stderr, markup=False, highlight=False, width=width, soft_wrap=width is not None)


out = _console(stderr=False)
console = _console(stderr=True)


@contextmanager
def byte_bar(label: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield an ``advance(nbytes, total=None)`` callback (a total learnt later is passed along);
    the bar hides itself off a terminal."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        TimeRemainingColumn(), console=console, disable=not sys.stderr.isatty(), transient=False,
    ) as bar:
        task = bar.add_task(label, total=total)

        def advance(nbytes: int, total: int | None = None) -> None:
            bar.update(task, advance=nbytes, total=total)

        yield advance


def human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"
