"""Many inputs at once: `DIR`, `GLOB` and `FILE` arguments expanded into the ECGs to read, in a stable order.

A folder yields every file below it (hidden ones skipped) in sorted order; a quoted glob pattern is
expanded here (`**` reaches into subfolders); anything else is taken as it is, and an input that cannot
be read fails when it is read, like a single one. A WFDB record is one input however many files it has:
its `.hea` stands for it, and the `.dat`/`.mat` signal files beside it are not inputs of their own
(unless named one by one).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from pulse_edge.errors import InputError
from pulse_edge.runtime.inputs.wfdb_names import HEADER_SUFFIX, header_of

_GLOB_CHARS = ("*", "?", "[")


def expand_inputs(arguments: Sequence[str], *, exclude: Collection[str | os.PathLike] = ()) -> list[str]:
    """The input paths the arguments name, each once, in argument order; `exclude` (e.g. the output file)
    is left out. A glob that matches nothing is an error; so is an empty result."""
    skip = {Path(p).resolve() for p in exclude}
    found: dict[str, None] = {}
    for argument in arguments:
        for path in _expand(argument):
            if Path(path).resolve() in skip:
                continue
            found.setdefault(path, None)
    if not found:
        raise InputError(f"{' '.join(arguments)}: no input files found; pass ECG files, folders or glob patterns.")
    return list(found)


def _expand(argument: str) -> Iterator[str]:
    path = Path(argument)
    if path.is_dir():
        yield from _walk(path)
    elif not path.exists() and any(c in argument for c in _GLOB_CHARS):
        if any(c in str(path.parent) for c in _GLOB_CHARS):  # it reaches into folders, which glob skips in silence
            _check_listable(_fixed_prefix(path))
        matches = sorted(glob.glob(argument, recursive=True))
        if not matches:
            raise InputError(f"{argument}: the pattern matches no file; check it (quote it to let pulse-edge "
                             "expand it, `**` for subfolders).")
        for match in matches:
            if Path(match).is_dir():
                yield from _walk(Path(match))
            elif not _is_wfdb_signal_file(match):
                yield match
    else:
        yield argument


def _walk(folder: Path) -> Iterator[str]:
    """Every file below `folder`; a folder below it that cannot be listed refuses the whole batch before anything
    is read (os.walk skips it in silence: its ECGs would go unanswered with a batch that exits 0)."""
    unreadable: list[OSError] = []
    for root, dirs, files in os.walk(folder, onerror=unreadable.append):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.startswith(".") and not _is_wfdb_signal_file(path):
                yield path
    _refuse_unlisted(unreadable)


def _check_listable(folder: Path) -> None:
    """Refuse a batch when a folder below `folder` cannot be listed (what a glob would skip)."""
    unreadable: list[OSError] = []
    for _, dirs, _ in os.walk(folder, onerror=unreadable.append):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
    _refuse_unlisted(unreadable)


def _refuse_unlisted(unreadable: list[OSError]) -> None:
    if unreadable:
        first = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise InputError(f"{first.filename}: this folder cannot be listed ({first.strerror or first}){more}, so its "
                         "ECGs would be left out; fix its permissions, or pass the folders that can be read.")


def _fixed_prefix(pattern: Path) -> Path:
    """The folder a pattern starts in: its parts before the first with a glob character."""
    fixed = []
    for part in pattern.parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _is_wfdb_signal_file(path: str) -> bool:
    p = Path(path)
    return p.suffix.lower() != HEADER_SUFFIX and header_of(p) is not None
