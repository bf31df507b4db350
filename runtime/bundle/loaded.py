"""A loaded bundle's files, held open so that a write into them after the load is seen before the next answer.

The embedding table is mapped into memory (np.load, mmap_mode) and ONNX Runtime maps its graphs' external data:
a file written over in place after the load (`cp` onto it, `rsync --inplace`: a cart's updater copying into the
folder it serves from) changes the model under a running pipeline. In a review (2026-12-08) a `cp` of another
table over a served bundle's embed_tokens.npy changed every generated token while /health said "ok", and a file
cut short killed the process with SIGBUS at the next read of a page past its new end.

A write changes the inode's size or modification time, which `fstat` of a descriptor opened at load reads: about
a microsecond a file, checked before every question (BundleEngine.prefill) and by the server's /health. A bundle
replaced by renaming new files over the old paths leaves the loaded (mapped) files whole, and is not a change
here: the pipeline goes on answering from the bundle it checked, as its bundle id says.

Not covered: a write during one answer is seen at the next question only (a file cut short then still ends the
process), and a write between ONNX Runtime mapping a file and this opening it (milliseconds at load).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.integrity import bundle_files
from pulse_edge.runtime.bundle.manifest import Manifest
from pulse_edge.runtime.bundle.names import MANIFEST_FILE

_TOO_MANY = (errno.EMFILE, errno.ENFILE)


class LoadedFiles:
    """The bundle's files as they were loaded: a descriptor and (size, mtime) each (module doc)."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        self.bundle = bundle
        self._held: list[tuple[str, int, tuple[int, int]]] = []  # first: __del__ runs after a failed __init__ too
        name = MANIFEST_FILE
        try:
            names = list(manifest.files) or [p.name for p in bundle_files(bundle)]  # version 1: no records
            for name in names:
                fd = os.open(bundle / name, os.O_RDONLY)
                self._held.append((name, fd, _state(os.fstat(fd))))
        except OSError as e:
            self.close()
            fix = ("raise the open-files limit (ulimit -n) or close other programs" if e.errno in _TOO_MANY
                   else "copy the bundle again")
            raise BundleError(f"{bundle / name} cannot be opened ({e.strerror or e}); {fix}") from e

    def check(self) -> None:
        """A BundleError naming the first file written since the load."""
        for name, fd, loaded in self._held:
            try:
                now = _state(os.fstat(fd))
            except OSError:  # closed under this check by the pipeline's close (a server stopping): nothing to say
                return
            if now != loaded:
                raise BundleError(f"{self.bundle / name} was written over after the bundle was loaded (an update "
                                  "copied into the folder in use?): this model is no longer the one checked; load "
                                  "the bundle again (restart the server) once the copy has ended, and deploy "
                                  "updates to a new folder")

    def close(self) -> None:
        held, self._held = self._held, []
        for _, fd, _ in held:
            os.close(fd)

    def __del__(self) -> None:  # a pipeline dropped without close(): its descriptors go with it
        self.close()


def _state(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_size, stat.st_mtime_ns
