"""One code path over the two TensorRT Python modules pulse-edge builds and runs engines with.

    tensorrt_rtx   TensorRT for RTX (pip `tensorrt-rtx`): builds ahead of time on any machine, no GPU needed,
                   for the compute capabilities it is told (8.6, 8.9, 12.0, ...); engines JIT-compile on the
                   RTX GPU at load. Networks are always strongly typed; no timing cache (a no-op there).
    tensorrt       standard TensorRT (JetPack's on a Jetson, or an x86 install): builds for the GPU it runs
                   on; strongly typed only when asked; a real timing cache.

Everything else pulse-edge uses (OnnxParser, profiles, build_serialized_network, Runtime, engines, execution
contexts, tensor names / modes / dtypes) has the same Python API in both, so the callers hold a `TensorRT`
and ask it only for what differs. No GPU is needed to import either.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pulse_edge.errors import ConfigError

# Which module a build target uses; "auto" takes the first one importable.
MODULES = MappingProxyType({"rtx": ("tensorrt_rtx",), "jetson": ("tensorrt",), "auto": ("tensorrt_rtx", "tensorrt")})
FLAVOURS = MappingProxyType({"tensorrt_rtx": "rtx", "tensorrt": "standard"})
INSTALL_HINTS = MappingProxyType({
    "tensorrt_rtx": "pip install 'pulse-edge[rtx]' (TensorRT for RTX)",
    "tensorrt": "on a Jetson it comes with JetPack (apt install python3-libnvinfer); on x86 install NVIDIA's "
                "tensorrt wheel",
})
# TensorRT's data types by numpy's names (the manifest's); FP8/INT4 only occur inside engines, never as IO.
DTYPE_NAMES = MappingProxyType({"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT32": "int32",
                                "INT64": "int64", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"})
# The ONNX parser of standard TensorRT reads the opset-23/24 LLM ops (Attention, RotaryEmbedding,
# RMSNormalization, TensorScatter) from 10.15 on (onnx-tensorrt's changelog); TensorRT-RTX 1.7 reads them.
NATIVE_OPS_MIN_VERSION = (10, 15)


@dataclass(frozen=True)
class TensorRT:
    """An imported TensorRT module and what differs between the two."""

    module: Any
    name: str  # "tensorrt_rtx" | "tensorrt"

    @property
    def flavour(self) -> str:
        return FLAVOURS[self.name]

    @property
    def version(self) -> str:
        return str(self.module.__version__)

    @property
    def version_tuple(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.version.split(".")[:2] if p.isdigit())

    @property
    def targets_compute_capabilities(self) -> bool:
        """TensorRT-RTX compiles for a list of compute capabilities; standard TensorRT for the GPU it runs on."""
        return self.flavour == "rtx"

    def reads_native_ops(self) -> bool:
        return self.flavour == "rtx" or self.version_tuple >= NATIVE_OPS_MIN_VERSION

    def create_network(self, builder: Any) -> Any:
        """A strongly typed network: precisions come from the ONNX types and Q/DQ nodes, never from flags."""
        if self.flavour == "rtx":
            return builder.create_network(0)  # always strongly typed; the flag does not exist there
        flag = int(self.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        return builder.create_network(1 << flag)

    def set_compute_capabilities(self, config: Any, capabilities: tuple[str, ...]) -> None:
        """capabilities "8.9", "12.0"...; TensorRT-RTX spells them SM89, SM120."""
        enum = self.module.ComputeCapability
        config.num_compute_capabilities = len(capabilities)
        for i, capability in enumerate(capabilities):
            config.set_compute_capability(getattr(enum, "SM" + capability.replace(".", "")), i)

    def dtype_name(self, dtype: Any) -> str:
        key = str(dtype).rsplit(".", 1)[-1]
        return DTYPE_NAMES.get(key, key.lower())

    def logger(self, on_message: Callable[[str, str], None]) -> Any:
        """An ILogger that hands (severity, message) to `on_message` for warnings and errors."""
        trt = self.module

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: Any, message: str) -> None:
                if severity <= trt.ILogger.Severity.WARNING:
                    on_message(severity.name, message)

        return Logger()

    def progress_monitor(self, on_phase: Callable[[str], None]) -> Any:
        """An IProgressMonitor that reports each top-level build phase as it starts."""
        trt = self.module

        class Monitor(trt.IProgressMonitor):
            def __init__(self) -> None:
                trt.IProgressMonitor.__init__(self)

            def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
                if parent_phase is None:
                    on_phase(phase_name)

            def step_complete(self, phase_name: str, step: int) -> bool:
                return True  # never cancel

            def phase_finish(self, phase_name: str) -> None:
                return None

        return Monitor()

    def stream_writer(self, write: Callable[[bytes], None]) -> Any | None:
        """An IStreamWriter over `write`, or None where the module has none (then the plan is returned whole).

        The Python binding hands `write` one bytes object (its doc string's (data, size) is wrong)."""
        trt = self.module
        if not hasattr(trt, "IStreamWriter"):
            return None

        class Writer(trt.IStreamWriter):
            def __init__(self) -> None:
                trt.IStreamWriter.__init__(self)

            def write(self, data: bytes) -> int:
                write(data)
                return len(data)

        return Writer()


def _import(name: str) -> Any | None:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def load_tensorrt(target: str) -> TensorRT:
    """The module for a build target ("rtx", "jetson", "auto"), or one line saying how to install it."""
    names = MODULES.get(target)
    if names is None:
        raise ConfigError(f"target {target!r} is not one of {', '.join(MODULES)}")
    for name in names:
        module = _import(name)
        if module is not None:
            return TensorRT(module, name)
    hints = "; ".join(f"{n}: {INSTALL_HINTS[n]}" for n in names)
    raise ConfigError(f"no TensorRT module for target {target!r} is importable ({hints})")


def load_module(name: str) -> TensorRT:
    """The module engines were built with (engines.json names it): only that one can deserialize them."""
    if name not in FLAVOURS:
        raise ConfigError(f"engines built with {name!r}: pulse-edge runs tensorrt_rtx or tensorrt engines")
    module = _import(name)
    if module is None:
        raise ConfigError(f"these engines were built with {name}, which is not importable here: {INSTALL_HINTS[name]}")
    return TensorRT(module, name)
