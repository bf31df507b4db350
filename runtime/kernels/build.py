"""Compile a kernel's C source on this machine, once, into a shared library kept in a cache folder.

Why on this machine: the kernels use the CPU's own instruction sets (AMX, AVX-512 BF16) and a cart's
compiler knows its own CPU; nothing prebuilt is shipped. The library's name carries a hash of the source,
the flags and the compiler's version, so an edited kernel or another compiler builds anew and an old
library is never loaded for a new source. Builds write a temporary file and rename it (a reader never sees
half a library); a lock in the cache folder makes a second process wait for the first one's build rather
than compile the same file beside it.

Everything that stops a build or a load is a KernelUnavailable with one line. What the machine lacks (a CPU
without the instructions, no compiler, a compiler too old for the flags) is its MachineUnsupported kind; the
rest (a source that a working compiler refuses, a library that does not load) means a broken kernel.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sysconfig
import threading
from collections.abc import Iterable
from pathlib import Path

from pulse_edge.errors import KernelUnavailable
from pulse_edge.staging import staged_file, user_cache_dir

SOURCE_DIR = Path(__file__).resolve().parent
CACHE_ENV = "PULSE_EDGE_KERNEL_CACHE"
COMMON_FLAGS = ("-O3", "-shared", "-fPIC", "-pthread", "-std=c11", "-D_GNU_SOURCE")
BUILD_TIMEOUT_S = 120


def default_cache() -> Path:
    """$PULSE_EDGE_KERNEL_CACHE, else the user's cache folder (as ORT's engine cache: runtime/engines/ort.py)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return user_cache_dir() / "kernels"


def compiler() -> list[str]:
    """$CC, else the compiler Python was built with, else `cc`; the command as a list. A $CC that is no command
    line (blank, an unclosed quote) counts as no compiler there, like one that is not installed."""
    for candidate in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        try:
            words = shlex.split(candidate or "")
        except ValueError:
            continue
        if words and shutil.which(words[0]):
            return words
    raise MachineUnsupported("no C compiler found ($CC, Python's own CC, cc): install one (Debian: apt install gcc) "
                             "to build pulse-edge's CPU kernels")


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux names them; empty where /proc/cpuinfo cannot be read."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


class MachineUnsupported(KernelUnavailable):
    """This machine cannot run the kernel (its CPU's instructions, no C compiler, the OS refusing AMX state): not a
    fault of the kernel. Every other KernelUnavailable (a source that does not compile with a working compiler, a
    library that does not load, a failed self-test) is one: the tests fail on those rather than skip."""


class CPUUnsupported(MachineUnsupported):
    """The CPU lacks the instructions: expected on most machines, not a fault of the installation."""


def require_cpu(needed: Iterable[str], what: str, flags: frozenset[str] | None = None) -> None:
    missing = sorted(set(needed) - (cpu_flags() if flags is None else flags))
    if missing:
        raise CPUUnsupported(f"{what} needs CPU features this machine lacks ({', '.join(missing)}); ONNX "
                                "Runtime's own kernels run instead")


def _version(cc: list[str]) -> str:
    try:
        done = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"the C compiler {cc[0]} does not run ({e}); set $CC to a working one") from e
    return done.stdout


def library_path(source: Path, flags: tuple[str, ...], cache: Path, cc: list[str]) -> Path:
    try:  # the source and every header beside it (vector_math.h): an edited header builds anew too
        texts = [path.read_bytes() for path in (source, *sorted(source.parent.glob("*.h")))]
    except OSError as e:
        raise KernelUnavailable(f"the kernel's source {e.filename} cannot be read ({e.strerror or e}); reinstall "
                                "pulse-edge") from e
    digest = hashlib.sha256()
    for part in (*texts, " ".join((*cc, *COMMON_FLAGS, *flags)).encode(), _version(cc).encode()):
        digest.update(part)
        digest.update(b"\0")
    return cache / f"{source.stem}-{digest.hexdigest()[:16]}.so"


def _compile(cc: list[str], source: Path, flags: tuple[str, ...], out: Path) -> None:
    command = [*cc, *COMMON_FLAGS, *flags, str(source), "-o", str(out)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelUnavailable(f"compiling {source.name} failed ({e}); set $CC to a working compiler") from e
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if "error" in line] or done.stderr.splitlines() or ["?"]
        # a compiler too old for the flags is the machine's limit; one that takes them but not the source, a broken
        # kernel (the tests fail on that one, not skip)
        refusal = MachineUnsupported if not _takes_flags(cc, flags, out.parent) else KernelUnavailable
        raise refusal(f"{cc[0]} could not compile {source.name} ({lines[0].strip()}); a compiler with "
                      f"{' '.join(flags)} is needed (gcc >= 11, clang >= 12)")


def _takes_flags(cc: list[str], flags: tuple[str, ...], scratch: Path) -> bool:
    """Does the compiler accept these flags at all (an empty translation unit)? A probe that cannot even be written
    (a full disk) says nothing about the compiler: then the failed build stays the kernel's KernelUnavailable."""
    empty = scratch / f".flags-{os.getpid()}-{threading.get_ident()}.c"  # threads of one process build at once too
    try:
        empty.write_text("int pe_nothing;\n")
    except OSError:
        return True
    try:
        done = subprocess.run([*cc, *COMMON_FLAGS, *flags, str(empty), "-o", os.devnull], capture_output=True,
                              timeout=BUILD_TIMEOUT_S)
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        empty.unlink(missing_ok=True)


def build(source: Path, flags: tuple[str, ...], cache: Path | None = None) -> Path:
    """The compiled library of `source` (a kernel here: SOURCE_DIR / name), built now if the cache lacks it."""
    cache = default_cache() if cache is None else Path(cache)
    cc = compiler()
    out = library_path(source, flags, cache, cc)
    if out.is_file():
        return out
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(cache / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise KernelUnavailable(f"the kernel cache {cache} is not writable ({e.strerror or e}); set ${CACHE_ENV} to a "
                                "writable folder") from e
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # wait: another process may be building this very library
        if not out.is_file():
            for stale in cache.glob(f".{out.stem}.*.partial{out.suffix}"):  # a build killed half-way, under this lock
                stale.unlink(missing_ok=True)
            with staged_file(out) as partial:
                _compile(cc, source, flags, partial)
    except OSError as e:  # a full disk, a lock the file system does not take (some NFS mounts): ORT's kernels run
        raise KernelUnavailable(f"the kernel cache {cache} cannot hold a new build ({e.strerror or e}); free some "
                                f"space or set ${CACHE_ENV} to a writable local folder") from e
    finally:
        os.close(lock_fd)
    return out


def load(path: Path) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"the compiled kernel {path} does not load ({e}); delete it to rebuild, or set "
                                f"${CACHE_ENV} to a folder on a disk that may hold programs (not noexec)") from e
