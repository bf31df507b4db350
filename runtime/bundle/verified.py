"""Which bundle files this machine has hashed whole: a stamp per manifest, so a copy is hashed once, not never.

    load: sizes, sampled sha256 (every time)
          ├─ the stamp names every file with its (device, inode, size, mtime, ctime): done
          └─ else: sha256 of every byte against the manifest, then the stamp is written

Why: the sampled check reads 256 pages of each file (1 MiB), about 0.015% of a 7B bundle's decoder data. In a
review (2026-12-07) four flipped bits in pages it skips loaded and answered wrong tokens with exit 0; only
`--verify` saw them. The first load of a copy now pays the full hash (one read of the bundle: ~11 s for 14 GB
from the page cache here), later loads of the same files only the sample. A file copied, replaced, renamed or
touched gets another inode, size or time, so its stamp no longer matches and it is hashed again.

What it cannot see: bits that rot on the disk after the stamp was written (the file's metadata does not
change); `pulse-edge verify` hashes everything again. Stamps live in the user's cache
($XDG_CACHE_HOME/pulse-edge/verified/<manifest sha256>.json), written whole (staging.staged_file); a stamp
that cannot be read or written only costs a full hash next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from pulse_edge.runtime.bundle.manifest import FileRecord
from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.staging import staged_file, user_cache_dir

log = logging.getLogger(__name__)
STAMP_FORMAT = "pulse-edge-verified"


def stamp_path(folder: Path, listing: str = MANIFEST_FILE) -> Path:
    """The stamp of this folder with a `listing` (the JSON file recording its checksums: a bundle's manifest.json,
    an engine set's engines.json) of these bytes: two copies of one bundle keep a stamp each (one for both was
    rewritten by every load of the other, which then hashed all again)."""
    digest = hashlib.sha256((folder / listing).read_bytes())
    digest.update(str(folder.resolve()).encode("utf-8", "surrogateescape"))
    return user_cache_dir() / "verified" / f"{digest.hexdigest()}.json"


def _identity(path: Path) -> list[int]:
    stat = os.stat(path)
    return [stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def identities(folder: Path, records: Mapping[str, FileRecord]) -> dict[str, list[int]]:
    """The files' identities now: taken before a full hash and compared after it, so a file written while it was
    hashed is never stamped as the one that matched."""
    return {name: _identity(folder / name) for name in records}


def is_stamped(bundle: Path, records: Mapping[str, FileRecord], listing: str = MANIFEST_FILE) -> bool:
    """Whether every file of `records` was hashed whole, as it is now (module doc)."""
    try:
        stamp = json.loads(stamp_path(bundle, listing).read_text(encoding="utf-8"))
        files = stamp["files"] if stamp.get("format") == STAMP_FORMAT else {}
        return bool(records) and all(files.get(name) == _identity(bundle / name) for name in records)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return False  # none yet, or unreadable (nested too deeply too): hashed whole again


def stamp(bundle: Path, records: Mapping[str, FileRecord], listing: str = MANIFEST_FILE, *,
          before: Mapping[str, list[int]] | None = None) -> None:
    """Record that `records`' files were hashed whole and matched, unless any changed since `before` (their
    identities when the hash began); a failure to write it is only logged."""
    files = identities(bundle, records)
    if before is not None and files != dict(before):
        log.warning("%s changed while it was hashed: not recorded as verified; the next load hashes it again", bundle)
        return
    record = {"format": STAMP_FORMAT, "version": 1, "bundle": str(bundle.resolve()), "files": files}
    try:
        path = stamp_path(bundle, listing)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged_file(path) as work:
            work.write_text(json.dumps(record) + "\n", encoding="utf-8")
    except OSError as e:
        log.warning("could not record that %s was verified (%s): the next load hashes it whole again", bundle, e)


def forget(folder: Path) -> None:
    """Remove the stamps of `folder` (resolved): an export's staging folder, whose loads during validation stamp
    it, is renamed away or removed, and nothing would read its stamps again."""
    name = str(folder.resolve())
    for path in (user_cache_dir() / "verified").glob("*.json"):
        try:
            if json.loads(path.read_text(encoding="utf-8")).get("bundle") == name:
                path.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError, RecursionError):
            continue  # another process's stamp being written, or not a stamp: not ours to judge
