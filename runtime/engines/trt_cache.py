"""TensorRT's engine cache: one folder per graph as written and as built, and the folders no run can use again
removed.

    ~/.cache/pulse-edge/tensorrt/
        3f9c0a1b2c3d4e5f/             graph_cache_key(graph, settings)
            pulse-edge-cache.json     {"graph": ..., "bundle": graph_cache_key(graph), "onnxruntime": "1.32.0"}
            TensorrtExecutionProvider_TRTKernel_....engine   (ORT's own files)
        timing-....cache              export's TensorRT timing cache (a file: never pruned)

A 7B engine is gigabytes (a Jetson's eMMC holds 32-64 GB), and every re-export or ONNX Runtime upgrade keys a
new folder: without pruning, each one left its predecessor's engines on the disk for good. A folder is stale
when its record names the graph path this run opened (its folder resolved, the file not: two bundles may link
one shared graph file, and a link to the current bundle moves on) and another state of the bundle there
(re-exported or replaced), or another ONNX Runtime version that has not used it for OTHER_RUNTIME_IDLE_DAYS
(engines are rebuilt for another version, ORT's documentation says; two environments with two versions on one
cart each keep theirs while they use them: every session start rewrites its folder's record). Folders for the
same graph built with other settings (fp16, provider options) stay: a run with those settings uses them.
Folders without a record (made by hand, or before records) and engines of bundles at other paths are left
alone, whatever they hold. A folder a live session holds (`hold_folder`: a shared flock on its IN_USE file, from
before its engines are built or loaded to the session's end) is never removed: a server up for months wrote its
record once, at its start, and a clock set forward (a cart without a real-time clock, before NTP) made a record
written minutes ago a month old.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.staging import size_text, staged_file, user_cache_dir

RECORD = "pulse-edge-cache.json"
IN_USE = "pulse-edge-in-use.lock"
OTHER_RUNTIME_IDLE_DAYS = 30

log = logging.getLogger(__name__)


def default_trt_cache() -> Path:
    """Where TensorRT engines built from bundles are kept: building a 7B engine takes minutes, once."""
    return user_cache_dir() / "tensorrt"


def graph_cache_key(path: Path, settings: Mapping[str, Any] | None = None) -> str:
    """One engine-cache folder per graph as written and as built: ORT names cached engines by the model's name,
    inputs and nodes, not its weights, and every bundle's decoder is called decoder.onnx. The graph's files' sizes
    and times, the bundle's manifest (sealed, it holds every file's sha256: a re-export copied in with its times
    kept, `cp -p`, `rsync -a`, is another bundle of the same sizes and times) and `settings` (ONNX Runtime's
    version, fp16 and the provider options given: what ORT's documentation says an engine must be rebuilt for)."""
    parts = [os.fspath(path.resolve())]
    for file in (path, path.with_name(path.name + ".data")):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    manifest = path.with_name(MANIFEST_FILE)
    if manifest.is_file():
        parts.append(hashlib.sha256(manifest.read_bytes()).hexdigest())
    if settings:
        parts.append(json.dumps(settings, sort_keys=True, default=str))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_folder(path: Path, settings: Mapping[str, Any]) -> Path:
    """Where TensorRT's engines for the graph at `path`, built with `settings`, are cached."""
    return default_trt_cache() / graph_cache_key(path, settings)


def cache_record(path: Path, onnxruntime: str) -> dict[str, str]:
    """What a cache folder records of the graph its engines were built from."""
    # the bundle's folder resolved (a "current" link switched from v2 to v3 must not make v2's engines v3's past),
    # the graph file not (two bundles may link one shared graph file)
    graph = os.path.join(os.path.realpath(path.parent), path.name)
    return {"graph": graph, "bundle": graph_cache_key(path), "onnxruntime": onnxruntime}


def keep_and_prune(folder: Path, path: Path, onnxruntime: str) -> None:
    """After a session built or loaded `folder`'s engines: record what they were built from, and remove the
    sibling folders no run can use again (module doc). Never fails the run: a cache that cannot be tidied is
    logged, and the engines just built are used all the same."""
    record = cache_record(path, onnxruntime)
    try:
        with staged_file(folder / RECORD) as staged:
            staged.write_text(json.dumps(record, indent=1))
        stale = [sibling for sibling in sorted(folder.parent.iterdir())
                 if sibling != folder and sibling.is_dir() and _stale(sibling, record)]
    except OSError as e:
        log.warning("warning: the TensorRT engine cache %s could not be tidied (%s); its engines are used all the "
                    "same", folder.parent, e.strerror or e)
        return
    for sibling in stale:
        size = _size(sibling)
        if not _removed_unless_held(sibling):
            continue
        log.info("removed the TensorRT engines in %s (%s): built from %s as it was before, or by another "
                 "onnxruntime unused for %d days; they cannot be used again", sibling, size_text(size),
                 record["graph"], OTHER_RUNTIME_IDLE_DAYS)


def hold_folder(folder: Path) -> int | None:
    """A shared lock on `folder` against pruning (module doc), taken before ONNX Runtime builds or loads the
    engines there (a build takes minutes): the open lock file, or None where the folder cannot be locked (it is
    used unheld). Handed to keep_held once the session stands, closed by the caller if it never does."""
    for _ in range(3):  # a prune that held the folder while this waited removed it: make it again
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.path.samestat(os.fstat(fd), os.stat(folder / IN_USE)):  # not removed while this waited
                return fd
        except OSError:
            pass
        os.close(fd)
    return None


def keep_held(fd: int | None, session: object) -> None:
    """Keep hold_folder's lock for as long as `session` lives: released when the session is collected (or its
    process ends, however it ends)."""
    if fd is None:
        return
    try:
        weakref.finalize(session, os.close, fd)
    except TypeError:  # a session object that takes no weak reference: used unheld
        os.close(fd)


def _removed_unless_held(folder: Path) -> bool:
    """Remove `folder` unless a live session holds it (hold_folder); locked while removing, so none starts on it
    meanwhile."""
    try:
        fd = os.open(folder / IN_USE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False  # cannot tell whether it is in use: kept
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _stale(folder: Path, current: Mapping[str, str]) -> bool:
    """Built from this graph path as it no longer is, or by another ONNX Runtime version long unused (module doc)."""
    try:
        recorded = json.loads((folder / RECORD).read_text())
        idle_days = (time.time() - (folder / RECORD).stat().st_mtime) / 86400
    except (OSError, ValueError):  # no record, or one not ours: left alone
        return False
    if not isinstance(recorded, dict) or recorded.get("graph") != current["graph"]:
        return False
    if recorded.get("bundle") != current["bundle"]:
        return True
    return recorded.get("onnxruntime") != current["onnxruntime"] and idle_days > OTHER_RUNTIME_IDLE_DAYS


def _size(folder: Path) -> int:
    """Bytes in the folder, as far as they can be counted (another process may be removing it)."""
    total = 0
    for file in folder.rglob("*"):
        try:
            total += file.stat().st_size if file.is_file() and not file.is_symlink() else 0
        except OSError:
            continue
    return total
