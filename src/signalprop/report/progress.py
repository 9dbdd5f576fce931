"""Progress for long work that library code drives through a tiny protocol:
a rich bar with the time left on a terminal, plain progress lines otherwise
(a log file or CI output shows how far a run is instead of staying empty)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

LINE_INTERVAL_S = 10.0  # without a terminal: one progress line at most this often (and at the end)
WINDOW_S = 60.0  # the time left is estimated from the pace over about this long


class Bar:
    """``bar.start(total, description)``, ``bar.advance(n=1, description=None)``.
    Library code receives one of these (or None) and never prints."""

    def __init__(self, progress: Progress) -> None:
        self._p = progress
        self._task: Any = None

    def start(self, total: int, description: str = "") -> None:
        if self._task is not None:
            self._p.remove_task(self._task)
        self._task = self._p.add_task(escape(description), total=total)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._task is None:
            return
        if description:
            self._p.update(self._task, advance=n, description=escape(description))
        else:
            self._p.update(self._task, advance=n)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class LineBar:
    """The same protocol as :class:`Bar`, printing a line such as
    ``depth: 40/120 (33%), 1m20s elapsed, about 2m40s left`` every
    ``interval`` seconds and when the work completes.

    The time left is the work left at the pace of the last ``window``
    seconds, measured between printed lines: the first line has none (the
    time before it includes set-up, a first slow step, other work), and a
    machine that slows down or speeds up is followed within a window."""

    def __init__(self, console: Console, interval: float = LINE_INTERVAL_S, window: float = WINDOW_S) -> None:
        self.console = console
        self.interval = interval
        self.window = window
        self.total = 0
        self.done = 0
        self.description = ""
        self._t0 = self._last = time.monotonic()
        self._marks: list[tuple[float, int]] = []  # (time, units done) at each printed line

    def start(self, total: int, description: str = "") -> None:
        self.total, self.done, self.description = max(int(total), 0), 0, description
        self._t0 = self._last = time.monotonic()
        self._marks = []
        self.console.print(f"{escape(description)}: started, {self.total} units of work", highlight=False)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        if description:
            self.description = description
        now = time.monotonic()
        finished = self.total and self.done >= self.total
        if now - self._last < self.interval and not finished:
            return
        self._last = now
        elapsed = now - self._t0
        self._marks = [m for m in self._marks if now - m[0] <= self.window] or self._marks[-1:]
        line = f"{escape(self.description)}: {self.done}/{self.total}"
        if self.total:
            line += f" ({self.done / self.total:.0%}), {_clock(elapsed)} elapsed"
            left = self._time_left(now)
            if 0 < self.done < self.total and left is not None:
                line += f", about {_clock(left)} left"
        self._marks.append((now, self.done))
        self.console.print(line, highlight=False)

    def _time_left(self, now: float) -> float | None:
        if not self._marks:
            return None
        t, done = self._marks[0]
        if self.done <= done or now <= t:
            return None
        return (self.total - self.done) * (now - t) / (self.done - done)


@contextmanager
def progress_bar(console: Console | None = None) -> Iterator[Bar | LineBar]:
    console = console or Console()
    if not console.is_terminal:
        yield LineBar(console)
        return
    cols = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("left"), TimeRemainingColumn())
    with Progress(*cols, console=console, transient=False) as p:
        yield Bar(p)
