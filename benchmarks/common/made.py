"""What made a benchmark's cached artifact: the command's arguments and the source of the code that ran it.

`--work DIR` keeps a benchmark's random checkpoint, scales and bundles between runs (an export of a real-width
model takes minutes). An artifact there is reused only when a stamp beside it (`.NAME.made.json`) records the
very arguments asked for now and the same source of pulse-edge's export, calibration and runtime packages;
otherwise it is made again. Before, scales from 2 samples were timed under a header that said 8, and a bundle
that older code exported was timed as the current recipe.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from importlib import util
from pathlib import Path
from typing import Any

from pulse_edge.errors import ConfigError

# The packages whose code decides what an artifact holds (the bundle format included).
MAKERS = ("pulse_edge.export", "pulse_edge.calibration", "pulse_edge.runtime", "pulse_edge.cli")


def sources(packages: tuple[str, ...] = MAKERS) -> list[tuple[str, Path]]:
    """(name, path) of every Python file of `packages`, in order."""
    found = []
    for package in packages:
        spec = util.find_spec(package)
        for root in (spec.submodule_search_locations or []) if spec else []:
            found += [(f"{package}/{path.relative_to(root)}", path) for path in sorted(Path(root).rglob("*.py"))]
    return found


def code_digest(packages: tuple[str, ...] = MAKERS) -> str:
    """sha256 over the Python source of `packages`, file by file in order (a few MB: milliseconds)."""
    digest = hashlib.sha256()
    for name, path in sources(packages):
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file an artifact is made from (a bundle's scales)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stamp_path(artifact: Path) -> Path:
    return artifact.with_name(f".{artifact.name}.made.json")


def made_as_asked(artifact: Path, args: list[str]) -> bool:
    """Whether `artifact` exists and was made by `args` and this source."""
    try:
        stamp = json.loads(stamp_path(artifact).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return artifact.exists() and stamp == _record(args)


def discard(artifact: Path) -> None:
    """Remove an artifact that was not made as asked (and its stamp), so that it is made again."""
    if artifact.is_dir():
        shutil.rmtree(artifact)
    else:
        artifact.unlink(missing_ok=True)
    stamp_path(artifact).unlink(missing_ok=True)


def record_made(artifact: Path, args: list[str]) -> None:
    stamp_path(artifact).write_text(json.dumps(_record(args)) + "\n", encoding="utf-8")


def _record(args: list[str]) -> dict[str, Any]:
    return {"args": list(args), "code": code_digest()}


def ensure_made(artifact: Path, args: list[str], run: Callable[[list[str]], None], progress: Callable[[str], None],
                *, inputs: list[str] = (), saying: str | None = None) -> bool:
    """`artifact` as `args` (a pulse-edge command line) makes it, from `inputs` (what it is made from: the maker's
    arguments or a file's digest); True where it was already so (reused). A link there is the user's: reused as
    given (the caller checks what it can). A stamped artifact made otherwise is made again; an unstamped one (an
    older pulse-edge's, or not the benchmark's) is refused rather than removed. `saying`: the progress line given
    when it is made."""
    asked = [*args, *inputs]
    if artifact.is_symlink():
        progress(f"{artifact.name} is a link: reused as given")
        return True
    if made_as_asked(artifact, asked):
        return True
    if artifact.exists():
        if not stamp_path(artifact).is_file():
            raise ConfigError(f"{artifact} holds no record of how it was made (an older pulse-edge's, or not this "
                              "benchmark's): remove it, or use another --work directory")
        progress(f"{artifact.name} was made by other arguments or other code: making it again")
        discard(artifact)
    if saying is not None:
        progress(saying)
    run(args)
    record_made(artifact, asked)
    return False
