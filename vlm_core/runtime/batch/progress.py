"""A batch run's progress on stderr: lines done of the total, errors, generated tokens/s and the time left.

On a terminal one line is redrawn (at most 10 times a second); otherwise (a log file, CI) a line is printed
each time another tenth of the work is done, so logs stay short.

    [##########----------] 10/20 lines  1 error  48.2 tok/s  ETA 0:00:31
"""
from __future__ import annotations

import sys
import time

WIDTH = 20


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Counts answers as they complete and draws the bar.

    Args:
        total: request lines this run answers (lines resumed from an earlier run are not counted).
        stream: where to draw (default stderr); `enabled=False` draws nothing.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.stream, self.enabled = total, stream or sys.stderr, enabled
        self.done = self.errors = self.tokens = 0
        self.started = time.monotonic()
        self._drawn_at = 0.0
        self._tenth, self._printed = -1, -1
        self._tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, tokens: int, error: bool) -> None:
        """One more line answered, with the tokens its answer generated."""
        self.done += 1
        self.errors += bool(error)
        self.tokens += tokens
        self.draw()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        filled = WIDTH * self.done // self.total if self.total else WIDTH
        eta = elapsed / self.done * (self.total - self.done) if self.done else None
        errors = f"  {self.errors} error{'s' if self.errors != 1 else ''}" if self.errors else ""
        return (f"[{'#' * filled}{'-' * (WIDTH - filled)}] {self.done}/{self.total} lines{errors}  "
                f"{self.tokens / elapsed:.1f} tok/s  ETA {_clock(eta) if eta is not None else '?'}")

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self._tty:
            if final or now - self._drawn_at >= 0.1 or self.done == self.total:
                self._drawn_at = now
                self.stream.write("\r" + self.line() + ("\n" if final else ""))
                self.stream.flush()
            return
        tenth = 10 * self.done // self.total if self.total else 10
        if tenth > self._tenth or (final and self._printed != self.done):
            self._tenth, self._printed = tenth, self.done
            self.stream.write(self.line() + "\n")
            self.stream.flush()
