"""Is every file of a bundle the one export wrote? Sizes, sampled checksums, full checksums.

A bundle's graphs and tables can be damaged on disk or in a copy (zeroed blocks), or replaced by the file of
another export (the decoder of another checkpoint has the same names and sizes): both run and give wrong
tokens without any error. Export records, per file, its size, its sha256 and the sha256 of a fixed sample
of its pages (manifest `files`, version 2). What is checked when:

- every load (`check_bundle`): the sizes; the sampled sha256 (256 pages of 4 KiB per file, small files
  whole: ~1 MiB read per file); the embedding table's header, shape, dtype and finite values (one pass).
- every load, before these: the manifest's own checksum (`seal.py`, manifest version 3).
- the first load of these files on this machine (`verified.py`: no stamp for their inode, size and times),
  `--verify`, `Pipeline.from_bundle(verify=True)`, `pulse-edge verify`: the sha256 of every byte, one read
  of the bundle (1.25 GB/s from the page cache here: ~11 s for a 14 GB fp16 7B bundle, more from a disk
  slower than that).

A file replaced by another export's fails the sampled check almost surely (any of 256 pages differs); a few
zeroed blocks or flipped bits need the full hash, which every copy now gets once.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.arrays import check_embedding, read_newline
from pulse_edge.runtime.bundle.checks import check_file_size
from pulse_edge.runtime.bundle.manifest import FileRecord, Manifest, read_manifest
from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.runtime.bundle.seal import SEALED_FROM_VERSION
from pulse_edge.runtime.bundle.verified import identities, is_stamped, stamp

PAGE = 4096
SAMPLED_PAGES = 256  # read at every load: 1 MiB per file
_CHUNK = 8 << 20  # full hashing reads 8 MiB at a time (measured 1.1 GB/s here, 0.8 with 1 MiB chunks)
log = logging.getLogger(__name__)
_REFETCH = "re-copy the bundle from where it was exported, or re-export it"


class HashProgress(Protocol):
    """Told what is being hashed, for a progress bar: `file` at the start of each file, `advance` per chunk."""

    def file(self, name: str, size: int) -> None: ...

    def advance(self, n: int) -> None: ...


@dataclass(frozen=True)
class VerifyReport:
    files: int
    bytes: int


def file_sha256(path: Path, progress: HashProgress | None = None) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            if progress is not None:
                progress.advance(n)
    return digest.hexdigest()


def sampled_sha256(path: Path) -> str:
    """sha256 of the size and SAMPLED_PAGES pages evenly spread from the first to the last byte (the whole
    file when it is no larger than the sample)."""
    size = path.stat().st_size
    digest = hashlib.sha256(size.to_bytes(8, "little"))
    fd = os.open(path, os.O_RDONLY)
    try:
        if size <= SAMPLED_PAGES * PAGE:
            digest.update(os.pread(fd, size, 0))
        else:
            for k in range(SAMPLED_PAGES):
                digest.update(os.pread(fd, PAGE, k * (size - PAGE) // (SAMPLED_PAGES - 1)))
    finally:
        os.close(fd)
    return digest.hexdigest()


def file_record(path: Path, progress: HashProgress | None = None) -> FileRecord:
    size = path.stat().st_size
    if progress is not None:
        progress.file(path.name, size)
    return FileRecord(size=size, sha256=file_sha256(path, progress), sampled_sha256=sampled_sha256(path))


def bundle_file_records(bundle: Path, progress: HashProgress | None = None) -> dict[str, FileRecord]:
    """What export records: every file of the bundle directory except the manifest, by name."""
    return {p.name: file_record(p, progress) for p in bundle_files(bundle)}


def bundle_files(bundle: Path) -> list[Path]:
    """Every file of a bundle directory but its manifest, sorted: what export records (and a version-1 bundle's
    files, which it did not record)."""
    return sorted(p for p in bundle.iterdir() if p.is_file() and p.name != MANIFEST_FILE)


def check_bundle(bundle: Path, manifest: Manifest, *, verify: bool = False,
                 progress: HashProgress | None = None) -> None:
    """The checks of a load (see the module's table); with `verify`, every byte's sha256 too.

    A bundle without checksums (manifest version 1) loads with a warning, and is refused when verification
    is asked for."""
    if verify and not manifest.files:
        raise BundleError(f"{bundle} has no checksums to verify (manifest version {manifest.version}, written by "
                          f"{manifest.created_by or 'an older pulse-edge'}); re-export it with this pulse-edge")
    with readable():
        check_embedding(bundle, manifest)
        read_newline(bundle, manifest)
    records = manifest.files
    check_files(bundle, records, EXPORTED, verify=verify, progress=progress)
    if not records:
        log.warning("%s has no checksums (manifest version %d): its files are checked by size only; re-export it "
                    "to be able to verify it", bundle, manifest.version)
    elif manifest.version < SEALED_FROM_VERSION:
        log.warning("%s has no checksum of its manifest (version %d): an edit to manifest.json goes unnoticed; "
                    "re-export it to seal it", bundle, manifest.version)


@dataclass(frozen=True)
class Recorded:
    """Who recorded a folder's checksums, in which file, and what to do when a file differs: for the messages."""

    writer: str  # "export"
    listing: str  # the JSON file that records them, whose bytes also key the folder's stamp (verified.py)
    fix: str


EXPORTED = Recorded("export", MANIFEST_FILE, _REFETCH)


def check_files(folder: Path, records: Mapping[str, FileRecord], recorded: Recorded, *, verify: bool = False,
                progress: HashProgress | None = None) -> None:
    """Each recorded file's size and sampled sha256; every byte's sha256 with `verify` or where the folder's files
    were never hashed whole on this machine as they are now (verified.py), then stamped."""
    for name, record in records.items():
        check_file_size(folder / name, record.size, recorded.fix)
    with readable():
        for name, record in records.items():
            if sampled_sha256(folder / name) != record.sampled_sha256:
                raise BundleError(f"{folder / name} is not the file {recorded.writer} wrote (its sampled checksum "
                                  f"differs from {recorded.listing}'s): it was replaced or damaged; {recorded.fix}")
        if records and (verify or not is_stamped(folder, records, recorded.listing)):  # a copy's first load: once
            before = identities(folder, records)
            _check_full(folder, records.items(), recorded, progress)
            stamp(folder, records, recorded.listing, before=before)


@contextmanager
def readable() -> Iterator[None]:
    """A file the OS will not let this user read (a bundle copied by root with a tight umask and served by a service
    user) is one line naming it, not a traceback."""
    try:
        yield
    except OSError as e:
        fix = ("make every file of the bundle readable by the user that runs pulse-edge (chmod -R a+rX, or chown)"
               if isinstance(e, PermissionError) else "the disk or the copy is damaged: copy the bundle again")
        raise BundleError(f"{e.filename or 'a bundle file'} cannot be read ({e.strerror or e}); {fix}") from e


def verify_bundle(bundle: str | Path, progress: HashProgress | None = None) -> VerifyReport:
    """Every check a load does, and the sha256 of every file: `pulse-edge verify`."""
    root = Path(bundle)
    manifest = read_manifest(root)
    check_bundle(root, manifest, verify=True, progress=progress)
    return VerifyReport(files=len(manifest.files), bytes=sum(r.size for r in manifest.files.values()))


def _check_full(folder: Path, records: Iterable[tuple[str, FileRecord]], recorded: Recorded,
                progress: HashProgress | None) -> None:
    for name, record in records:
        if progress is not None:
            progress.file(name, record.size)
        actual = file_sha256(folder / name, progress)
        if actual != record.sha256:
            raise BundleError(f"{folder / name} is not the file {recorded.writer} wrote (sha256 {actual[:16]}..., "
                              f"{recorded.listing} says {record.sha256[:16]}...): it was damaged or replaced; "
                              f"{recorded.fix}")
