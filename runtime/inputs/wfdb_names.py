"""WFDB's file names and header lines, as every part that meets a record reads them (the reader, the input
kinds, folder discovery, the server's path check), so that they cannot drift apart.

A record is a `.hea` header and the signal files it names beside it (`.dat`, `.mat`); a signal file stands for
the record whose header sits next to it. Standard library only: discovery and the server import it.
"""

from __future__ import annotations

from pathlib import Path

HEADER_SUFFIX = ".hea"
SIGNAL_SUFFIXES = (".dat", ".mat")
RECORD_SUFFIXES = (HEADER_SUFFIX, *SIGNAL_SUFFIXES)


def header_of(path: Path) -> Path | None:
    """The header a WFDB read of `path` opens: `path` itself (a .hea), or the one beside a signal file; None when
    `path` is neither."""
    suffix = path.suffix.lower()
    if suffix == HEADER_SUFFIX:
        return path
    if suffix not in SIGNAL_SUFFIXES:  # a name with no suffix at all ("/", "."): with_suffix would raise
        return None
    beside = path.with_suffix(HEADER_SUFFIX)
    return beside if beside.is_file() else None


def multi_segment(lines: list[list[str]]) -> bool:
    """Whether a header (header_words) is a multi-segment record's: its record line reads "name/segments", and the
    lines after it name segments, each a record with a header of its own, not signal files."""
    return bool(lines) and "/" in lines[0][0]


def header_words(text: str) -> list[list[str]]:
    """A header's lines as words, comments and blank lines left out: the record line first, then one line per
    signal (or, in a multi-segment record, per segment)."""
    return [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
