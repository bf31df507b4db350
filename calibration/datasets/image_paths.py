"""Image names in dataset files (ECGInstruct, ECGBench JSON and parquet), resolved under the folder they name.

A name is taken as written in the file: relative to its image root. One that is absolute or climbs out of the root
("../../x.png") is refused: a dataset file from elsewhere must not make calibration or scoring read files outside
the folder the user pointed at. The check is on the name itself, not on resolved paths, so an image folder that
is a symbolic link to another disk still works. A name the OS cannot take as a path (an image embedded as 5000
characters of text) is one line, not an OSError from deep in pathlib.
"""

from __future__ import annotations

from pathlib import Path, PurePath

from pulse_edge.errors import InputError


def image_under(root: Path, name: str, where: str) -> Path | None:
    """`root / name` where that is a file, else None; a name that leaves `root` or is no path is refused."""
    parts = PurePath(name).parts
    if PurePath(name).is_absolute() or ".." in parts:
        raise InputError(f"{where}: image {name[:80]!r} is not a path inside the image folder (absolute, or "
                         "'..'): dataset image paths must be relative to the image root")
    candidate = root / name
    try:
        return candidate if candidate.is_file() else None
    except OSError as e:  # ENAMETOOLONG, a loop of links
        raise InputError(f"{where}: image {name[:80]!r} cannot be a file name ({e.strerror or e}); the dataset "
                         "file is damaged, or holds an image as text where a path belongs") from e
