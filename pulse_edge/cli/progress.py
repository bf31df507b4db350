"""What long commands tell the user on stderr while they work: log lines, a stage line, hashing bars (tqdm).

pulse-edge's modules log each stage of a long job at INFO (`log.info("building the decoder graph ...")`).
`Console` is the one handler of the `pulse_edge` logger:

- default: warnings as lines; on a terminal, inside `stage_progress()`, one line showing the current stage
  and the time spent on it (a pipe or a file gets no such line);
- `-v`: every INFO record as a line, terminal or not;
- `-q`: warnings only;

so a log never fills with carriage returns, and a terminal is never silent for minutes.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

PREFIX = "pulse-edge: "
HASH_BAR_MIN_BYTES = 64 << 20  # smaller files hash in well under a second
_TICK_S = 0.5  # how often the elapsed time on the stage line is redrawn


def _tqdm(**kwargs: Any) -> Any:
    from tqdm import tqdm  # imported when a bar is shown, so `pulse-edge --help` stays fast

    return tqdm(**kwargs)


class Console(logging.Handler):
    """`pulse-edge: message` lines on stderr; while a stage bar is up, INFO records become its text."""

    def __init__(self, *, verbose: bool = False, quiet: bool = False, stream: TextIO | None = None) -> None:
        super().__init__(logging.INFO)
        self.verbose, self.quiet = verbose, quiet
        self._stream = stream
        self.bar: Any = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr  # click's runner swaps sys.stderr

    def bars_allowed(self) -> bool:
        return not self.verbose and not self.quiet and bool(getattr(self.stream, "isatty", lambda: False)())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = PREFIX + record.getMessage()
            if self.bar is not None and record.levelno < logging.WARNING:
                self.bar.set_description_str(line)
            elif self.bar is not None:
                self.bar.write(line, file=self.stream)
            elif record.levelno >= logging.WARNING or self.verbose:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:  # a logging handler never raises into the code that logs
            self.handleError(record)


def configure(*, verbose: bool, quiet: bool) -> Console:
    """Make `Console` the one handler of the `pulse_edge` logger (the exporters and optimisers pulse-edge
    calls log plenty on the root logger; only pulse-edge's own records are shown)."""
    logger = logging.getLogger("pulse_edge")
    for handler in list(logger.handlers):
        if isinstance(handler, Console):
            logger.removeHandler(handler)
    console = Console(verbose=verbose, quiet=quiet)
    logger.addHandler(console)
    logger.propagate = False
    logger.setLevel(logging.INFO)  # Console decides what is shown
    return console


def console() -> Console | None:
    return next((h for h in logging.getLogger("pulse_edge").handlers if isinstance(h, Console)), None)


def quiet() -> bool:
    """`pulse-edge -q`: no progress and no summaries, only results, warnings and errors."""
    handler = console()
    return handler is not None and handler.quiet


@contextmanager
def stage_progress(what: str) -> Iterator[None]:
    """Show the current stage of a long job on one line that keeps its elapsed time running."""
    handler = console()
    if handler is None or not handler.bars_allowed():
        yield
        return
    bar = _tqdm(total=None, desc=f"{PREFIX}{what}", bar_format="{desc} [{elapsed}]", file=handler.stream,
                leave=False, dynamic_ncols=True)
    stop = threading.Event()

    def tick() -> None:
        while not stop.wait(_TICK_S):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="pulse-edge-progress", daemon=True)
    handler.bar = bar
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
        handler.bar = None
        bar.close()


class HashBar:
    """A byte bar per file of at least HASH_BAR_MIN_BYTES while a bundle is hashed (`HashProgress`)."""

    def __init__(self) -> None:
        handler = console()
        self._stream = handler.stream if handler is not None else sys.stderr
        self._enabled = handler.bars_allowed() if handler is not None else False
        self._bar: Any = None

    def file(self, name: str, size: int) -> None:
        self.close()
        if self._enabled and size >= HASH_BAR_MIN_BYTES:
            self._bar = _tqdm(total=size, desc=f"{PREFIX}hashing {name}", unit="B", unit_scale=True,
                              unit_divisor=1024, file=self._stream, leave=False, dynamic_ncols=True)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> HashBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
