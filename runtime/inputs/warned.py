"""`warnings.catch_warnings` for the readers, one thread at a time.

Python's warning filters and its warning printer belong to the whole process, and `catch_warnings` saves them on
entry and puts them back on exit: two threads inside at once (a cart loading ECGs from two threads through
`Pipeline.interpret` or `load_input`) restored each other's settings. A clean PNG then got another thread's
"EXIF data is damaged" note, and filters ("DecompressionBombWarning is an error", "ignore UserWarning") and a
recording printer were left set for the rest of the host program, its own warnings never shown. The readers'
blocks take this lock (re-entrant: they nest); warnings that other code raises meanwhile are theirs to keep.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ONE_AT_A_TIME = threading.RLock()  # process-wide, like the state it guards


def _fresh_lock_in_child() -> None:
    """A process forked while another thread held the lock would wait on it for ever: its holder is not there."""
    global _ONE_AT_A_TIME
    _ONE_AT_A_TIME = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_fresh_lock_in_child)


@contextmanager
def caught_warnings(*, record: bool = False) -> Iterator[list[Any] | None]:
    """`warnings.catch_warnings(record=record)` held against the other readers' threads."""
    with _ONE_AT_A_TIME, warnings.catch_warnings(record=record) as caught:
        yield caught
