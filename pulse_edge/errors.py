"""Errors that reach the user as one line and a non-zero exit code.

Anything raised as a `PulseEdgeError` is the user's to fix (a bad file, a wrong
flag, an unsupported checkpoint: exit code 2) or a fault the user can only
report (an engine failing mid-run, `EngineRunError`: exit code 3); the CLI prints
its message without a traceback. Anything else is a bug in pulse-edge and keeps
its traceback.
"""

from __future__ import annotations

import errno
from types import MappingProxyType

# OS errors that are the machine's state, not a bug: (what happened, what to do), for one line.
DISK_ERRORS = MappingProxyType({
    errno.ENOSPC: ("the disk is full", "free some space or choose another output directory"),
    errno.EDQUOT: ("the disk quota is used up", "free some space or choose another output directory"),
    errno.EROFS: ("the file system is read-only", "choose an output directory on a writable disk"),
})


class PulseEdgeError(Exception):
    """Base of every user-facing error. `exit_code` is what the CLI exits with."""

    exit_code = 2


class InputError(PulseEdgeError):
    """An input file (image, PDF, ...) cannot be used."""


class BundleError(InputError):
    """A bundle that cannot be served: wrong version, missing, damaged or replaced files, bad fields."""


class CheckpointError(PulseEdgeError):
    """A checkpoint is missing files, has unexpected keys or unsupported settings."""


class ConfigError(PulseEdgeError):
    """A configuration value is not one of the allowed values."""


class PromptError(PulseEdgeError):
    """A prompt cannot be built or does not fit the context."""


class ModelOutputError(PulseEdgeError):
    """The model computed something no answer can come from (NaN or inf logits): a damaged bundle or a numeric
    overflow, refused rather than decoded into text."""


class GenerationStopped(PulseEdgeError):
    """The caller's `should_stop` said stop before the first token (between prefill chunks): a server's client
    gone, its deadline passed or it is shutting down. The conversation's cache holds part of the prompt."""


class EngineRunError(PulseEdgeError):
    """An inference engine failed while running a graph of a bundle that passed its load checks: a fault in
    pulse-edge or the engine, not the user's input, hence its own exit code. Unlike non-finite logits (one input's
    failure), it stops a batch: the next input would meet the same fault."""

    exit_code = 3


class DeviceMemoryError(MemoryError):
    """A GPU's memory is full; the message carries its own remedy (the host's RAM and --threads are not it)."""


class KernelUnavailable(PulseEdgeError):
    """A compiled CPU kernel cannot run on this machine: no compiler, or the CPU or kernel lacks what it needs."""
