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


class EpochProgress:
    """Training's display: the epoch, its loss, validation accuracy, the best so far and the time left.

    Fed the latest epoch's metrics (as the job logs them to MLflow). On a terminal one line
    is redrawn in place; into a file or pipe each epoch gets its line.
    """

    def __init__(self, epochs: int, budget_s: float | None, stream: TextIO | None = None) -> None:
        self.epochs, self.budget_s = int(epochs), budget_s
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.shown_epoch: float | None = None
        self.started = time.time()
        self.shown_restore = self.started  # a restore logged before this display began is an earlier process's
        self.last = ""

    def line(self, row: dict) -> str:
        epoch = int(row["epoch"])
        elapsed = float(row.get("elapsed_seconds", 0.0))
        done = epoch + 1
        by_epochs = elapsed / done * max(0, self.epochs - done) if done else None
        left = by_epochs
        if self.budget_s is not None:
            left = max(0.0, self.budget_s - elapsed) if left is None else min(left, max(0.0, self.budget_s - elapsed))
        best = row.get("best_val_oneshot_accuracy")
        best_text = f", best {best:.2%} at epoch {int(row['best_epoch'])}" if best is not None and "best_epoch" in row \
            else ""
        limit = f"{_duration(self.budget_s)} budget" if self.budget_s is not None else f"{self.epochs} epochs"
        return (f"training: epoch {epoch} ({done}/{self.epochs}), loss {row['train_loss']:.4f}, "
                f"validation {row['val_oneshot_accuracy']:.2%}{best_text}, {_duration(elapsed)} elapsed, "
                f"{_duration(left or 0.0)} left of {limit}")

    def show(self, row: dict) -> None:
        if row.get("epoch") is None or "train_loss" not in row or "val_oneshot_accuracy" not in row:
            return
        if row["epoch"] == self.shown_epoch:
            return
        restored_at = row.get("restored_at")  # workflows.train.RESTORED_AT, RESTORED_FROM_EPOCH
        if restored_at is not None and restored_at > self.shown_restore and "restored_from_epoch" in row:
            self.shown_restore = restored_at
            self.stream.write(("\n" if self.tty and self.last else "") + "training: workers restarted from the "
                              f"checkpoint of epoch {int(row['restored_from_epoch'])}\n")
        self.shown_epoch, self.last = row["epoch"], self.line(row)
        self.stream.write(("\r\033[K" + self.last) if self.tty else self.last + "\n")
        self.stream.flush()

    def close(self, stop: str = "") -> None:
        if self.tty and self.last:
            self.stream.write("\n")
        if stop:
            self.stream.write(f"training stopped: {stop}\n")
        self.stream.flush()
