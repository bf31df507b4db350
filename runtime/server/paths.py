"""File paths named in a request: only inside `--allow-dir`, after every `..` and symlink is resolved.

    "ecgs/today/12.png" or "/srv/ecg/ecgs/today/12.png"
        -> lexically inside the root?          no: 403 (before touching the disk, so nothing outside is probed)
        -> exists?                             no: 404
        -> real path (symlinks resolved) inside the root?   no: 403

Relative paths are taken from the root. What is read is the resolved path, so a symlink inside the root that
points out of it is refused, and one that stays inside works. A WFDB record may be named bare, as `infer`
takes it ("rec" for rec.hea and rec.dat): the header is what is read, and the files it names beside it (its
signal files, a multi-segment record's segments) are held to the same rule, since the reader opens them too.
"""

from __future__ import annotations

import os
from pathlib import Path

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
    if real.suffix.lower() == ".hea":
        _check_header_files(real, root, requested)
    return real


MAX_HEADER_BYTES = 1 << 20  # a 12-lead header is a few hundred bytes: one larger is refused, not read in part


def _check_header_files(header: Path, root: Path, requested: str) -> None:
    """Each file a WFDB header names (the first word of each line after the record line: a signal file, or a
    segment whose own header and signals follow) that exists beside it must resolve inside the root."""
    try:
        with open(header, "rb") as f:
            data = f.read(MAX_HEADER_BYTES + 1)
    except OSError:
        return  # the reader says why it cannot read it
    if len(data) > MAX_HEADER_BYTES:
        raise ApiError("bad_request", f"{requested!r} is a WFDB header larger than {MAX_HEADER_BYTES >> 20} MiB; "
                       "a 12-lead record's is a few hundred bytes", param="path")
    text = data.decode("utf-8", "replace")
    lines = [line.split() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for words in lines[1:]:
        for name in (words[0], f"{words[0]}.hea"):
            path = header.parent / name
            if path.is_symlink() or path.exists():
                real = path.resolve()
                if not real.is_relative_to(root):
                    raise ApiError("forbidden", f"{requested!r} names {name!r}, which leads outside the allowed "
                                   "directory (a symlink)", param="path")
