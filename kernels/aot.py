"""Ahead-of-time compilation of the projector kernels for a named GPU, without that GPU.

Triton's compiler needs no device to produce PTX and a cubin for a given compute capability
(triton.compile with a GPUTarget; ptxas and cuobjdump ship inside the triton wheel). This is what
a TensorRT plugin embeds (kernels/trt_plugin.py), and what the tests use on a CPU machine to check
that every variant compiles for Ampere, Orin, Ada and Hopper, that its shared memory fits each of
them, and that Hopper gets wgmma (HGMMA, QGMMA for fp8) rather than the older mma.sync.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pulse_edge.kernels import triton_src

WARP_SIZE = 32
# Shared memory one block may use (opt-in maximum), bytes, by compute capability (CUDA programming guide).
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# The integer arguments of linear_kernel that stay arguments (the unit strides become constants).
_INT_ARGS = ("M", "N", "K", "stride_am", "stride_bn", "stride_cm", "M_BUCKET")
# Unit strides: at run time triton's JIT specialises an int argument equal to 1 into a constant, which
# is what makes the tiles contiguous (vector loads, cp.async); an AOT build must say so itself.
_UNIT_STRIDES = {"stride_ak": 1, "stride_bk": 1, "stride_cn": 1}
_ALIGNED = ("a_ptr", "b_ptr", "bias_ptr", "b_scale_ptr", "a_scale_ptr", "out_scale_ptr", "c_ptr", "K",
            "stride_am", "stride_bn", "stride_cm")  # 16-byte aligned / multiples of 16 at PULSE's shapes


@dataclass(frozen=True)
class LinearVariant:
    """One specialisation of linear_kernel: operand types and the prologue/epilogue flags."""

    a: str
    b: str
    out: str
    QUANT_A: bool = False
    HAS_B_SCALE: bool = False
    HAS_A_SCALE: bool = False
    GELU: bool = False
    HAS_OUT_SCALE: bool = False


def _pair(act: str, weight: str, scaled: bool) -> tuple[LinearVariant, LinearVariant]:
    return (LinearVariant(act, weight, act, HAS_B_SCALE=scaled, GELU=True),
            LinearVariant(act, weight, act, HAS_B_SCALE=scaled))


def _fp8_pair(act: str) -> tuple[LinearVariant, LinearVariant]:
    fp8 = "fp8e4nv"
    return (LinearVariant(act, fp8, fp8, QUANT_A=True, HAS_B_SCALE=True, HAS_A_SCALE=True, GELU=True,
                          HAS_OUT_SCALE=True),
            LinearVariant(fp8, fp8, act, HAS_B_SCALE=True, HAS_A_SCALE=True))


# The two launches of each projector precision (projector.py), by name.
PROJECTOR_VARIANTS: dict[str, tuple[LinearVariant, LinearVariant]] = {
    "fp16": _pair("fp16", "fp16", False),
    "bf16": _pair("bf16", "bf16", False),
    "int8-fp16": _pair("fp16", "i8", True),
    "int8-bf16": _pair("bf16", "i8", True),
    "fp8-fp16": _fp8_pair("fp16"),
    "fp8-bf16": _fp8_pair("bf16"),
}


def _signature(variant: LinearVariant) -> dict[str, str]:
    """Each argument's type, in the kernel's argument order: pointers, i32 or constexpr."""
    activation = variant.a if variant.a != "fp8e4nv" else variant.out  # the bias has the model's dtype
    pointers = {"a_ptr": variant.a, "b_ptr": variant.b, "bias_ptr": activation, "b_scale_ptr": "fp32",
                "a_scale_ptr": "fp32", "out_scale_ptr": "fp32", "c_ptr": variant.out}
    types = {name: f"*{kind}" for name, kind in pointers.items()} | dict.fromkeys(_INT_ARGS, "i32")
    return {name: types.get(name, "constexpr") for name in triton_src.linear_kernel.arg_names}


def compile_linear(variant: LinearVariant, capability: int, config: triton.Config) -> Any:
    """linear_kernel compiled for sm_<capability> with one block configuration (row-major operands and output,
    16-byte aligned pointers and row strides, as at PULSE's shapes): a triton CompiledKernel
    whose .asm holds 'ptx' and 'cubin' and whose .metadata.shared is its shared memory in bytes."""
    flags = {f.name: getattr(variant, f.name) for f in dataclasses.fields(variant) if f.type == "bool"}
    constexprs = {**_UNIT_STRIDES, **flags, "INTERPRET": False, **config.kwargs}
    kernel = triton_src.linear_kernel
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in _ALIGNED}
    source = ASTSource(fn=kernel, signature=_signature(variant), constexprs=constexprs, attrs=attrs)
    target = GPUTarget("cuda", capability, WARP_SIZE)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=target, options=options)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack (spills show up here) and shared memory of a cubin, read by the bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], check=True, capture_output=True,
                              text=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED):(\d+)", text)}


def sass(cubin: bytes) -> str:
    """The cubin's SASS, by the bundled cuobjdump (to look for HGMMA / QGMMA / HMMA)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        return subprocess.run([str(tool), "--dump-sass", str(path)], check=True, capture_output=True,
                              text=True).stdout
