"""A rich progress bar that library code can drive through a tiny protocol."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)


class Bar:
    """``bar.start(total, description)``, ``bar.advance(n=1, description=None)``.
    Library code receives one of these (or None) and never prints."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._task: Any = None

    def start(self, total: int, description: str = "") -> None:
        if self._task is not None:
            self._p.remove_task(self._task)
        self._task = self._p.add_task(description, total=total)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._task is None:
            return
        self._p.update(self._task, advance=n, **({"description": description} if description else {}))


@contextmanager
def progress_bar(console: Console | None = None) -> Iterator[Bar]:
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*cols, console=console, transient=False) as p:
        yield Bar(p)
