"""Write a directory so that it appears whole or not at all.

`pulse-edge export` and `make-tiny` both write many large files; an
interrupted or failed run must not leave a half-written bundle or checkpoint
under the name the user asked for.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pulse_edge.errors import ConfigError


@contextmanager
def staged_directory(out: Path, *, what: str) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out`; on success it is renamed to `out`, on any failure removed."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty (or is a file); choose a new {what} directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield work
        share_like_umask(work)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def share_like_umask(root: Path) -> None:
    """mkdtemp makes 0700 and safetensors 0600; a model store wants the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
