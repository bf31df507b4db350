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
_NEVER_ECGS = frozenset({"lost+found"})  # a file system's own folder, root's only: listing it is no one's business


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
            _check_listable(path)
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
    """Every file below `folder`, hidden ones left out."""
    for root, files in _listing(folder, depth=None):
        for name in sorted(files):
            path = os.path.join(root, name)
            if not name.startswith(".") and not _is_wfdb_signal_file(path):
                yield path


def _listing(folder: Path, depth: int | None) -> Iterator[tuple[str, list[str]]]:
    """(folder, its file names) below `folder`, down to `depth` levels (None: all), hidden folders and a file
    system's lost+found left out; a folder that cannot be listed refuses the whole batch, after the walk and
    before anything is read (os.walk skips it in silence: its ECGs would go unanswered in a batch that exits 0)."""
    unreadable: list[OSError] = []
    top = len(folder.parts)
    for root, dirs, files in os.walk(folder, onerror=unreadable.append):
        deeper = depth is None or len(Path(root).parts) - top < depth
        dirs[:] = sorted(d for d in dirs if deeper and not d.startswith(".") and d not in _NEVER_ECGS)
        yield root, files
    if unreadable:
        first = unreadable[0]
        more = f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else ""
        raise InputError(f"{first.filename}: this folder cannot be listed ({first.strerror or first}){more}, so its "
                         "ECGs would be left out; fix its permissions, or pass the folders that can be read.")


def _check_listable(pattern: Path) -> None:
    """Refuse a batch where a folder the pattern reaches into cannot be listed (a glob skips it in silence): every
    level below its fixed start for `**`, else as many levels as the pattern has folders. A start that does not
    exist is left to the glob, which then matches nothing and says so."""
    fixed = []
    for part in pattern.parts:
        if any(c in part for c in _GLOB_CHARS):
            break
        fixed.append(part)
    start = Path(*fixed) if fixed else Path(".")
    if start.is_dir():
        depth = None if "**" in pattern.parts else len(pattern.parts) - len(fixed) - 1
        for _ in _listing(start, depth):
            pass


def _is_wfdb_signal_file(path: str) -> bool:
    p = Path(path)
    return p.suffix.lower() != HEADER_SUFFIX and header_of(p) is not None
