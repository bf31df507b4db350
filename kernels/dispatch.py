"""Which implementation runs: the compiled Triton kernels, Triton's CPU interpreter, or the torch reference twin.

`impl` everywhere in pulse_edge.kernels is one of IMPLS:

    auto       Triton on a CUDA GPU where the precision is supported there, else the reference twin,
               with one log warning per distinct reason (never silently)
    triton     the compiled kernels; a ConfigError with the reason where they cannot run
    interpret  the same kernels under Triton's CPU interpreter (tests, debugging; slow)
    reference  the plain-torch twin (kernels/reference.py)

Nothing here imports triton at module import: `triton_available()` looks for it, and
`kernel_source()` loads the kernel module when a kernel is about to run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from pulse_edge.errors import ConfigError

logger = logging.getLogger(__name__)

IMPLS = ("auto", "triton", "interpret", "reference")
TRITON_MISSING = "triton not installed: pip install -e .[kernels]"

# Dispatch thresholds. fp16 tensor-core dots need Turing; bf16 (and so the int8 path's bf16 activations)
# needs Ampere; fp8 E4M3 dots need Ada or Hopper (docs/architecture.md, engines: Orin and Ampere get a clear refusal).
MIN_CAPABILITY: dict[tuple[str, torch.dtype], tuple[int, int]] = {
    ("native", torch.float16): (7, 5), ("native", torch.bfloat16): (8, 0),
    ("int8", torch.float16): (7, 5), ("int8", torch.bfloat16): (8, 0),
    ("fp8", torch.float16): (8, 9), ("fp8", torch.bfloat16): (8, 9),
}
PRECISIONS = ("native", "int8", "fp8")
KERNEL_DTYPES = (torch.float16, torch.bfloat16)

INTERPRET_VARIABLE = "TRITON_INTERPRET"
_SOURCE_MODULE = "pulse_edge.kernels.triton_src"
_INTERPRETED_MODULE = "pulse_edge.kernels._triton_src_interpreted"


@dataclass(frozen=True)
class Choice:
    """What runs, and why (the reason is what a log line or a refusal says)."""

    impl: str  # "triton" | "interpret" | "reference"
    reason: str

    @property
    def fused(self) -> bool:
        return self.impl != "reference"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _gpu_refusal(device: torch.device, dtype: torch.dtype, precision: str) -> str | None:
    """Why the compiled kernels cannot run for this device and dtype, or None if they can."""
    if device.type != "cuda":
        return f"the Triton kernels need a CUDA GPU; the tensors are on {device.type}"
    if dtype not in KERNEL_DTYPES:
        return f"the Triton kernels take fp16 or bf16 activations, not {_name(dtype)}"
    if not triton_available():
        return TRITON_MISSING
    if not torch.cuda.is_available():
        return "torch sees no CUDA GPU"
    have, need = cuda_capability(device), MIN_CAPABILITY[(precision, dtype)]
    if have < need:
        return (f"{precision} with {_name(dtype)} needs compute capability "
                f"{need[0]}.{need[1]}; this GPU has {have[0]}.{have[1]}")
    return None


def choose(impl: str, device: torch.device, dtype: torch.dtype, precision: str = "native") -> Choice:
    """Resolve `impl` for tensors on `device` of `dtype`; ConfigError where the asked-for one cannot run."""
    if impl not in IMPLS:
        raise ConfigError(f"impl {impl!r} is not one of {', '.join(IMPLS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if impl == "reference":
        return Choice("reference", "asked for the reference twin")
    if impl == "interpret":
        if not triton_available():
            raise ConfigError(TRITON_MISSING)
        if dtype not in KERNEL_DTYPES:
            raise ConfigError(f"the Triton kernels take fp16 or bf16 activations, not {_name(dtype)}")
        return Choice("interpret", "asked for Triton's CPU interpreter")
    refusal = _gpu_refusal(device, dtype, precision)
    if refusal is None:
        return Choice("triton", f"fused Triton kernels on {torch.cuda.get_device_name(device)}")
    if impl == "triton":
        raise ConfigError(f"cannot run the Triton kernels: {refusal}")
    return Choice("reference", refusal)


def resolve(impl: str, tensor: torch.Tensor, precision: str = "native") -> Choice:
    """`choose` for one input tensor; a fallback to the twin is logged once per reason."""
    choice = choose(impl, tensor.device, tensor.dtype, precision)
    if impl == "auto" and not choice.fused:
        warn_fallback(choice.reason)
    return choice


@functools.cache
def warn_fallback(reason: str) -> None:
    """Say once per distinct reason that the reference twin runs instead of the kernels (cached: no repeats)."""
    logger.warning("pulse_edge.kernels: running the plain-torch reference instead of the Triton kernels: %s", reason)


@functools.lru_cache(maxsize=2)
def kernel_source(interpret: bool) -> ModuleType:
    """The module holding the @triton.jit kernels: compiled, or a separate copy built for the interpreter.

    triton.jit decides at decoration time whether a kernel is interpreted (TRITON_INTERPRET). The
    interpreted copy is therefore executed from the same file as its own module object, with the
    variable set only while it is built or runs (interpreter_environment), so that both kinds live in
    one process (a GPU test session runs both) and nothing else in the process sees the variable.
    """
    if not triton_available():
        raise ConfigError(TRITON_MISSING)
    if not interpret:
        return importlib.import_module(_SOURCE_MODULE)
    # triton itself must be imported outside the variable: it decorates its own library functions
    # (tl.cdiv, ...) at import, and torch.compile's kernels in this process need them compiled.
    importlib.import_module("triton.language")
    spec = importlib.util.find_spec(_SOURCE_MODULE)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"cannot locate {_SOURCE_MODULE}")
    copy = importlib.util.spec_from_file_location(_INTERPRETED_MODULE, Path(spec.origin))
    module = importlib.util.module_from_spec(copy)
    with interpreter_environment(True):
        copy.loader.exec_module(module)
    return module


@contextlib.contextmanager
def interpreter_environment(interpret: bool) -> Iterator[None]:
    """TRITON_INTERPRET=1 for the length of a with-block where `interpret`, then put back what was there.

    Needed while the interpreted copy is built (triton.jit reads it then) and while it runs too:
    triton 3.9 imports parts of itself lazily during an interpreted launch and checks the
    variable again there (triton.experimental.gluon asserts on it).
    """
    if not interpret:
        yield
        return
    saved = os.environ.get(INTERPRET_VARIABLE)
    os.environ[INTERPRET_VARIABLE] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(INTERPRET_VARIABLE, None)
        else:
            os.environ[INTERPRET_VARIABLE] = saved
