"""Write outputs so that they appear whole or not at all, and check where they go before any work.

`pulse-edge export` and `make-tiny` write many large files into a hidden temporary sibling of the target,
`.NAME.XXXX.partial`, renamed into place at the end. Around that:

- `check_output_dir` / `check_output_file` refuse a bad target before any work: a file where a directory
  is wanted, a non-empty directory, a place that cannot be written (under a file, /proc, read-only).
- A lock on the target (`.NAME.lock` beside it, `fcntl.flock`) is held from the start to the rename: a
  second command writing the same target is refused at once. The kernel drops a flock when its process
  dies, however it dies, so holding the lock proves that any `.NAME.*.partial` left beside the target is
  stale (its writer held the same lock and is gone): those are removed, and a live writer's never is. So are
  the `.STEM.XXXX.partial.SUFFIX` files staged_file writes under `sole_writer` (a scales file, a run's scores).
- SIGTERM (and SIGHUP) are handled like Ctrl-C while the work runs: the temporary directory is removed,
  and the command exits 128 + the signal's number.

fcntl is POSIX (Linux, the Jetson boards, macOS): a library such as `filelock` adds nothing here and would
leave its lock files behind; the lock file is unlinked while still locked, and a process that locked a
file that was unlinked meanwhile tries again (so two processes can never both hold the target).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from types import FrameType

from pulse_edge.errors import DISK_ERRORS, ConfigError

FULL_BELOW_BYTES = 1 << 20  # a file system with less free is taken as full
_LOCK_TRIES = 5  # a lock file unlinked under us is re-created by the next try
HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP during staged work; `signum` says which (the exit code is 128 + signum)."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _Handler:
    """The signal handler while staged work runs: remembers that a signal came, then interrupts."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.cleaning = False  # a second Ctrl-C must not cut the removal of the temporary directory short

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        if not self.cleaning:
            raise Interrupted(signum)


def interrupt_requested() -> int | None:
    """The signal received while staged work runs, if any: an exception that surfaces from deep inside a
    library after it (torch.onnx wraps what it catches in its own errors) is an interruption, not a bug. Any
    handled signal's handler says (SIGINT's may be ignored: a script's `pulse-edge export ... &`)."""
    handlers = (signal.getsignal(s) for s in HANDLED_SIGNALS)
    return next((h.received for h in handlers if isinstance(h, _Handler)), None)


@contextmanager
def interrupts_handled() -> Iterator[None]:
    """Turn SIGINT, SIGTERM and SIGHUP into `Interrupted` (cleanup runs) until the block ends."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    handler = _Handler()
    # a signal the process was told to ignore stays ignored: `nohup pulse-edge ...` must outlive its terminal
    previous = {s: signal.signal(s, handler) for s in HANDLED_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def user_cache_dir() -> Path:
    """pulse-edge's folder in the user's cache ($XDG_CACHE_HOME, else ~/.cache): built kernels, TensorRT engine
    caches, verification stamps."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pulse-edge"


def nearest_existing(path: Path) -> Path:
    """`path`, or the deepest of its parents that exists: where an output yet to be made will be written."""
    current = path.absolute()
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _check_writable_place(out: Path, what: str) -> Path:
    """The deepest existing folder on the way to `out` must be a directory this process can create in."""
    place = nearest_existing(out.parent)
    if not place.is_dir():
        raise ConfigError(f"{out} cannot be created: {place} is a file, not a directory; choose another {what} path")
    try:
        probe = tempfile.mkdtemp(prefix=".pulse-edge-probe.", dir=place)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ConfigError(f"{out} cannot be created: {place} is not writable ({reason}); choose another {what} "
                          "path") from e
    os.rmdir(probe)
    return place


def check_output_dir(out: Path, *, what: str) -> None:
    """Before any work: `out` is a new (or empty) directory in a place this process can write."""
    if out.is_symlink():  # the work is renamed onto `out` at the end: onto a link it fails, after all the work
        raise ConfigError(f"{out} is a symbolic link; give the {what} directory's real path")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose a new {what} directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty; choose a new {what} directory (nothing was written)")
    _check_writable_place(out, what)


def check_output_file(out: Path, *, what: str, make_parents: bool = True) -> None:
    """Before any work: `out` can be written as a file (replacing a file of that name is fine)."""
    if out.is_dir():
        raise ConfigError(f"{out} is a directory, not a {what}; give a file name")
    if out.exists() and not out.is_file():  # /dev/null, a pipe: written through, never replaced (nor fsync'd)
        raise ConfigError(f"{out} is not a regular file (a device or a pipe); give a file name for the {what}")
    _check_writable_place(out, what)
    if not make_parents and not out.absolute().parent.is_dir():
        raise ConfigError(f"the folder {out.absolute().parent} does not exist; create it first or choose another "
                          f"{what} path")


@contextmanager
def target_lock(out: Path, *, what: str) -> Iterator[Path]:
    """Hold `.NAME.lock` beside `out` exclusively; refused at once when another process holds it. The lock goes
    beside the path with every link resolved: two spellings of one file (a symbolic link to it) share it."""
    real = Path(out).resolve()
    lock = real.parent / f".{real.name}.lock"
    for _ in range(_LOCK_TRIES):
        fd = _open_lock(lock, out, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise ConfigError(f"another pulse-edge command is writing {out} (it holds {lock}); wait for it to finish "
                              f"or choose another {what}") from e
        if _same_file(fd, lock):
            break
        os.close(fd)  # the holder before us unlinked the file after we opened it: lock the new one
    else:
        raise ConfigError(f"could not lock {lock}: other pulse-edge commands keep taking it; try again")
    try:
        yield lock
    finally:
        with suppress(PermissionError):  # another user's file in a sticky folder stays: it is only ever flocked
            lock.unlink(missing_ok=True)  # while still locked: whoever opened it meanwhile sees it gone and retries
        os.close(fd)


def _open_lock(lock: Path, out: Path, what: str) -> int:
    """The lock file, made if need be; one another user left (a run they killed) is locked read-only (a flock
    needs no write access), and one this user cannot even read is one line."""
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        pass
    try:
        return os.open(lock, os.O_RDONLY)
    except PermissionError as e:
        raise ConfigError(f"cannot open {lock} to lock {out} ({e.strerror}): a run by another user left it; remove "
                          f"it, or choose another {what}") from e


def _disk_full(place: Path) -> bool:
    """Whether the file system holding `place` has (almost) nothing left: what an OSError without errno from a
    writer means when it comes with that."""
    try:
        return shutil.disk_usage(place).free < FULL_BELOW_BYTES
    except OSError:
        return False


def size_text(n_bytes: float) -> str:
    """A size for a message: GiB from 1 GiB, else MiB, else KiB ("~0.0 GiB ... 0.0 GiB is free" said nothing)."""
    for shift, unit in ((30, "GiB"), (20, "MiB")):
        if n_bytes >= 1 << shift:
            return f"{n_bytes / 2**shift:.1f} {unit}"
    return f"{n_bytes / 2**10:.0f} KiB"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def stale_partials(out: Path) -> list[Path]:
    """Hidden temporary siblings of `out` that staged_directory makes (`.NAME.XXXXXXXX.partial`: mkdtemp's eight
    characters exactly). A glob's `*` would also match `.NAME.int8.XXXXXXXX.partial`, the live work of an export
    to `NAME.int8`, which holds another lock than `NAME`'s."""
    own = re.compile(re.escape(f".{out.name}.") + r"[a-z0-9_]{8}" + re.escape(".partial"))
    return sorted(p for p in out.parent.glob(f".{out.name}.*.partial") if own.fullmatch(p.name) and p.is_dir())


def stale_file_partials(out: Path) -> list[Path]:
    """The temporary files staged_file makes for the file `out` (`.STEM.XXXXXXXX.partial.SUFFIX`: mkstemp's eight
    characters exactly): a run killed between their writing and their rename (SIGKILL, a power cut) left them,
    hidden, for good. Another file's (`.STEM.int8.XXXXXXXX...`) never match."""
    own = re.compile(re.escape(f".{out.stem}.") + r"[a-z0-9_]{8}" + re.escape(f".partial{out.suffix}"))
    places = out.parent.glob(f".{out.stem}.*.partial{out.suffix}") if out.parent.is_dir() else iter(())
    return sorted(p for p in places if own.fullmatch(p.name) and p.is_file() and not p.is_symlink())


@contextmanager
def sole_writer(out: Path, *, what: str, staged: Iterable[Path] | None = None) -> Iterator[Path]:
    """Long work into `out`: the target locked against a second writer (target_lock), and SIGTERM and SIGHUP
    turned into the interruption Ctrl-C is (interrupts_handled: one line, exit 128 + n, cleanup run). `staged`:
    the files the work stages (staged_file) whose every writer holds this lock (default: `out`); what a killed run
    left of them is removed, the lock proving its writer gone."""
    with target_lock(out, what=what) as lock, interrupts_handled():
        for stale in (p for file in (staged if staged is not None else (out,)) for p in stale_file_partials(file)):
            with suppress(OSError):  # another user's, in a sticky folder: left, as its lock file is
                stale.unlink(missing_ok=True)
        yield lock


@contextmanager
def staged_directory(out: Path, *, what: str) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out`; on success it is renamed to `out`, on any failure or
    signal removed. The target is locked throughout; stale temporaries of the same target are removed."""
    out = Path(out)
    check_output_dir(out, what=what)
    out.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(sole_writer(out, what=f"{what} directory"))
        check_output_dir(out, what=what)  # another command may have finished writing it while we waited
        for stale in stale_partials(out):
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        try:
            yield work
            share_like_umask(work)
            synced(work)
            if out.exists():
                out.rmdir()
            work.rename(out)
            _sync_dir(out.parent)
        except BaseException as e:
            for handler in {signal.getsignal(s) for s in HANDLED_SIGNALS}:  # one _Handler, whichever signals it has
                if isinstance(handler, _Handler):
                    handler.cleaning = True
            full = isinstance(e, OSError) and e.errno is None and _disk_full(work)  # before the space comes back
            shutil.rmtree(work, ignore_errors=True)
            if full:  # numpy's short write ("N requested and M written") carries no errno
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out)) from e
            if isinstance(e, OSError) and e.errno in DISK_ERRORS and e.filename is None:  # a write into an open
                raise OSError(e.errno, e.strerror, str(out)) from e  # file names none: name the target
            raise


@contextmanager
def staged_file(out: Path) -> Iterator[Path]:
    """Yield a hidden temporary name beside `out` (same suffix, so writers that go by it still do); on
    success it replaces `out`, on any failure it is removed."""
    out = Path(out)
    fd, name = tempfile.mkstemp(prefix=f".{out.stem}.", suffix=f".partial{out.suffix}", dir=out.parent)
    os.close(fd)
    work = Path(name)
    try:
        yield work
        umask = os.umask(0)
        os.umask(umask)
        work.chmod(0o666 & ~umask)
        synced(work)
        os.replace(work, out)
        _sync_dir(out.parent)
    except BaseException as e:
        work.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in DISK_ERRORS and e.filename in (None, name):  # a write into an
            raise OSError(e.errno, e.strerror, str(out)) from e  # open file, or into the hidden one: the target's
        raise


def synced(root: Path) -> None:
    """Every file under `root` (or the file `root`) and its folders on the disk before the rename that shows them:
    a cart that loses power right after an export must find the old state or the whole new one, not files of
    the right size and times full of zeros (which a verification stamp would then pass, runtime/bundle/verified.py).
    Costs the time to write what the page cache still holds: once per export, before it is called done."""
    paths = [root] if root.is_file() else [*(p for p in root.rglob("*") if p.is_file()), root,
                                           *(p for p in root.rglob("*") if p.is_dir())]
    for path in paths:
        if path.is_dir():
            _sync_dir(path)
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync_dir(folder: Path) -> None:
    """A folder's entries (a rename into it) on the disk; where a file system cannot sync a folder, nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a directory (EINVAL): their renames are what they are
    finally:
        os.close(fd)


def share_like_umask(root: Path) -> None:
    """mkdtemp makes 0700 and safetensors 0600; a model store wants the user's usual modes."""
    umask = os.umask(0)
    os.umask(umask)
    for path in (root, *root.rglob("*")):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
