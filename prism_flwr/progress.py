"""Periodic progress lines for waits longer than a few seconds (data, classifier, evaluation).

A line, not a redrawn bar: Flower's ``--stream`` and log files show lines, not carriage returns.
``Progress`` prints at most one line every ``every`` seconds, and nothing at all for work that ends
sooner (no noise for the fast case); ``close`` then reports the total time once a line was shown.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def eta_text(done: float, total: float, elapsed: float) -> str:
    """'12 s elapsed, about 30 s left' (the rate so far extrapolated); no estimate before any progress."""
    text = f"{elapsed:.0f} s elapsed"
    if 0 < done < total:
        text += f", about {elapsed * (total - done) / done:.0f} s left"
    return text


class Progress:
    def __init__(
        self,
        what: str,
        total: float,
        unit: str = "",
        every: float = 5.0,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit, self.every = what, total, unit, every
        self.stream = stream
        self.clock = clock
        self.start = self.last = clock()
        self.shown = False

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stdout, flush=True)

    def update(self, done: float, note: str = "") -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last, self.shown = now, True
        share = f" ({100 * done / self.total:.0f} %)" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        self._print(
            f"{self.what}: {done:g}/{self.total:g}{unit}{share}{', ' + note if note else ''}, "
            f"{eta_text(done, self.total, now - self.start)}"
        )

    def close(self, note: str = "") -> None:
        if self.shown:
            self._print(
                f"{self.what}: done in {self.clock() - self.start:.0f} s{', ' + note if note else ''}"
            )
