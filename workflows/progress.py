"""Progress on long work, for a person at a terminal and for a log file alike.

On a terminal one line is redrawn in place (at most a few times a second); into a
file or pipe a line is written every ``every_s`` seconds and at the end, so logs
stay short and nothing is lost.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``done`` of ``total`` items of some work, with the rate and the time left."""

    def __init__(self, what: str, total: int, unit: str = "", stream: TextIO | None = None,
                 every_s: float = 10.0) -> None:
        self.what, self.total, self.unit = what, max(0, int(total)), unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every_s = 0.25 if self.tty else every_s
        self.started = time.monotonic()
        self.done = 0
        self.note = ""
        self._shown = -float("inf")

    def update(self, done: int, note: str = "") -> None:
        """Set the count (and a short note, such as how many items were bad); redraw if due."""
        self.done, self.note = int(done), note
        now = time.monotonic()
        if now - self._shown >= self.every_s:
            self._show(now)

    def advance(self, by: int = 1, note: str = "") -> None:
        self.update(self.done + by, note or self.note)

    def close(self) -> None:
        """The final line (always shown)."""
        self._show(time.monotonic(), final=True)

    def line(self, now: float | None = None) -> str:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 and self.total else None
        unit = f" {self.unit}" if self.unit else ""
        eta = f", {_duration(left)} left" if left is not None and self.done < self.total else ""
        note = f", {self.note}" if self.note else ""
        return (f"{self.what}: {self.done:,}/{self.total:,}{unit} ({rate:,.0f}/s, {_duration(elapsed)}"
                f"{eta}){note}")

    def _show(self, now: float, final: bool = False) -> None:
        self._shown = now
        text = self.line(now)
        if self.tty:
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
