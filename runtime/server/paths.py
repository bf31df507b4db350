"""File paths named in a request: only inside `--allow-dir`, after every `..` and symlink is resolved.

    "ecgs/today/12.png" or "/srv/ecg/ecgs/today/12.png"
        -> lexically inside the root?          no: 403 (before touching the disk, so nothing outside is probed)
        -> exists?                             no: 404
        -> real path (symlinks resolved) inside the root?   no: 403

Relative paths are taken from the root. What is read is the resolved path, so a symlink inside the root that
points out of it is refused, and one that stays inside works. A WFDB record may be named bare, as `infer`
takes it ("rec" for rec.hea and rec.dat), by its header or by a signal file: the reader then opens the header
and the files it names beside it (signal files; a multi-segment record's segments, and theirs), which are held
to the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

from pulse_edge.runtime.inputs.wfdb_names import header_of, header_words, multi_segment
from pulse_edge.runtime.server.errors import ApiError


def resolve_allowed(requested: str, root: Path | None) -> Path:
    """The real path of `requested` if it is a file under `root` (itself already resolved)."""
    if root is None:
        raise ApiError("forbidden", "this server accepts no file paths: upload the file, or start the server with "
                       "--allow-dir DIR", param="path")
    if not requested or "\x00" in requested:
        raise ApiError("bad_request", "path must be a non-empty file path", param="path")
    joined = Path(os.path.normpath(root / requested))  # root / an absolute path is that path
    if not joined.is_relative_to(root):
        raise ApiError("forbidden", f"{requested!r} is outside the allowed directory", param="path")
    if not joined.exists() and (header := joined.with_name(joined.name + ".hea")).is_file():
        joined = header  # a bare WFDB record name; its real path is checked like any other below
    try:
        real = joined.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # missing, unreadable, or a symlink loop
        raise ApiError("not_found", f"{requested!r} does not exist under the allowed directory", param="path") from e
    if not real.is_relative_to(root):
        raise ApiError("forbidden", f"{requested!r} leads outside the allowed directory (a symlink)", param="path")
    if not real.is_file():
        raise ApiError("bad_request", f"{requested!r} is not a file", param="path")
    if (header := header_of(real)) is not None:  # the header the reader opens for it
        _check_record(header, root, requested, depth=0)
    return real


MAX_HEADER_BYTES = 1 << 20  # a 12-lead header is a few hundred bytes: one larger is refused, not read in part


def _check_record(header: Path, root: Path, requested: str, *, depth: int) -> None:
    """The header, each file it names beside it (the first word of each line after the record line: a signal
    file, or a segment, whose own header is checked the same way) and their real paths: inside the root."""
    _inside(header, root, requested, header.name)
    lines = _header_lines(header, requested)
    segmented = multi_segment(lines)
    for words in lines[1:]:
        _inside(header.parent / words[0], root, requested, words[0])
        segment = header.parent / f"{words[0]}.hea"
        if segmented and depth == 0 and _exists(segment, requested):
            _check_record(segment, root, requested, depth=1)


def _inside(path: Path, root: Path, requested: str, name: str) -> None:
    if _exists(path, requested) and not path.resolve().is_relative_to(root):
        raise ApiError("forbidden", f"{requested!r} names {name!r}, which leads outside the allowed directory "
                       "(a symlink)", param="path")


def _exists(path: Path, requested: str) -> bool:
    try:
        return path.is_symlink() or path.exists()
    except OSError as e:  # a name too long for the OS, a folder on the way that cannot be read
        raise ApiError("bad_request", f"{requested!r} is a WFDB record whose header names a file that cannot be "
                       f"looked up ({e.strerror or e})", param="path") from e


def _header_lines(header: Path, requested: str) -> list[list[str]]:
    try:
        with open(header, "rb") as f:
            data = f.read(MAX_HEADER_BYTES + 1)
    except OSError:
        return []  # the reader says why it cannot read it
    if len(data) > MAX_HEADER_BYTES:
        raise ApiError("bad_request", f"{requested!r} is a WFDB header larger than {MAX_HEADER_BYTES >> 20} MiB; "
                       "a 12-lead record's is a few hundred bytes", param="path")
    return header_words(data.decode("utf-8", "replace"))
