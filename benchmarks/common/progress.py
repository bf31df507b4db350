"""A small progress bar with ETA for long benchmark runs (on stderr, no dependencies).

On a terminal it redraws one line in place; into a file or pipe (CI logs,
`nohup`) it writes a plain line at most every `log_every_s` seconds, so a log
does not fill with carriage returns.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

_WIDTH = 24


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """`advance()` after each item; `close()` at the end. The ETA is the mean time per item so far."""

    def __init__(self, total: int, label: str, *, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, log_every_s: float = 10.0) -> None:
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._start = clock()
        self._last_log = -float("inf")
        self._logged_done = -1  # what the last plain line showed: the closing line is not repeated
        self._log_every_s = log_every_s
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())

    def line(self) -> str:
        fraction = self.done / self.total if self.total else 1.0
        filled = round(_WIDTH * fraction)
        elapsed = self._clock() - self._start
        if self.done:
            per_item = elapsed / self.done
            eta = f"ETA {format_duration(per_item * (self.total - self.done))}, {per_item:.1f} s/sample"
        else:
            eta = "ETA --:--"
        return (f"{self.label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {self.done}/{self.total} "
                f"{100 * fraction:3.0f}% {format_duration(elapsed)} elapsed, {eta}")

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw(final=self.done >= self.total)

    def close(self) -> None:
        self._draw(final=True)
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()

    def _draw(self, *, final: bool) -> None:
        now = self._clock()
        if self._tty:
            self._stream.write("\r" + self.line())
        elif self.done != self._logged_done and (final or now - self._last_log >= self._log_every_s):
            self._stream.write(self.line() + "\n")
            self._last_log, self._logged_done = now, self.done
        else:
            return
        self._stream.flush()
