"""Quantized MatMuls as ONNX nodes, one emitter per scheme, shared by the decoder builder and the vision rewrite.

    fp     x ─ MatMul(W) ─ y
    w8/w4  x ─ MatMulNBits(packed W, block scales; bits, block_size, accuracy_level) ─ y        (com.microsoft)
    w8a8   x ─ QuantizeLinear(s_x, 0:int8) ─ DequantizeLinear ─┐
                                  W:int8 ─ DequantizeLinear(s_w[N], axis 1) ─ MatMul ─ y
    fp8    the w8a8 picture with float8e4m3fn in place of int8 (opset >= 19)

Q/DQ is the form TensorRT and ORT's QDQ passes consume: ORT's CPU EP fuses the int8
pattern into QuantizeLinear + MatMulIntegerToFloat (checked on ORT 1.31). Its
ORT_ENABLE_ALL level tries the same fusion on float8 and rejects the graph, so fp8
graphs run in ORT only at the "basic" level, where the Q/DQ nodes execute as written:
an exact emulation of E4M3 rounding, for validation on a CPU.

An emitter returns nodes and named arrays; the caller decides where the arrays go
(the decoder's external-data file, or the vision graph's initializers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from pulse_edge.calibration.quant_math import (
    E4M3_MAX,
    quantize_blockwise,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
)

CONTRIB = "com.microsoft"
# Graphs that need a newer opset than the float bundle's: float8 Q/DQ exists from opset 19.
FP8_MIN_OPSET = 19
INT8_MAX = 127.0
# The graph optimisation level each scheme's graph needs in ORT ("all" unless listed).
ORT_OPT_LEVEL = MappingProxyType({"fp8": "basic"})


@dataclass(frozen=True)
class MatMulSpec:
    """One site to emit: its name, input and output tensor names, and the float weight [K, N]."""

    site: str
    x: str
    y: str
    weight: np.ndarray  # [K, N] float32, y = x @ weight
    act_amax: float | None = None  # calibrated |x| clip for w8a8 / fp8
    block_size: int = 128
    accuracy_level: int = 4


@dataclass
class Emitted:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # float arrays keep the caller's float dtype
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # quantized arrays, stored as they are


def _fp(spec: MatMulSpec) -> Emitted:
    w = f"{spec.site}.weight"
    return Emitted([helper.make_node("MatMul", [spec.x, w], [spec.y], name=f"{spec.site}/matmul")],
                   arrays={w: spec.weight})


def _nbits(bits: int) -> Callable[[MatMulSpec], Emitted]:
    def emit(spec: MatMulSpec) -> Emitted:
        bq = quantize_blockwise(spec.weight, bits, spec.block_size)
        w, s = f"{spec.site}.qweight", f"{spec.site}.scales"
        node = helper.make_node("MatMulNBits", [spec.x, w, s], [spec.y], name=f"{spec.site}/matmul_nbits",
                                domain=CONTRIB, K=bq.k, N=bq.n, bits=bits, block_size=bq.block_size,
                                accuracy_level=spec.accuracy_level)
        return Emitted([node], raw={w: bq.packed, s: bq.scales.astype(np.float32)})
    return emit


@dataclass(frozen=True)
class _QDQType:
    dtype: type
    qmax: float
    quantize_weight: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


QDQ_TYPES = MappingProxyType({
    "w8a8": _QDQType(np.int8, INT8_MAX, quantize_int8_per_channel),
    "fp8": _QDQType(ml_dtypes.float8_e4m3fn, E4M3_MAX, quantize_fp8_per_channel),
})


def _qdq(scheme: str) -> Callable[[MatMulSpec], Emitted]:
    kind = QDQ_TYPES[scheme]

    def emit(spec: MatMulSpec) -> Emitted:
        if spec.act_amax is None:
            raise ValueError(f"{spec.site}: {scheme} needs a calibrated activation range")
        p = spec.site
        q, w_scale = kind.quantize_weight(spec.weight)
        scale = np.float32(max(spec.act_amax, 1e-12) / kind.qmax)
        nodes = [
            helper.make_node("QuantizeLinear", [spec.x, f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.xq"], name=f"{p}/q"),
            helper.make_node("DequantizeLinear", [f"{p}.xq", f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.xdq"],
                             name=f"{p}/dq"),
            helper.make_node("DequantizeLinear", [f"{p}.qweight", f"{p}.w_scale", f"{p}.w_zero"], [f"{p}.wdq"],
                             name=f"{p}/wdq", axis=1),
            helper.make_node("MatMul", [f"{p}.xdq", f"{p}.wdq"], [spec.y], name=f"{p}/matmul"),
        ]
        raw = {f"{p}.x_scale": np.array(scale, np.float32), f"{p}.x_zero": np.zeros((), kind.dtype),
               f"{p}.qweight": q, f"{p}.w_scale": w_scale.astype(np.float32),
               f"{p}.w_zero": np.zeros(q.shape[1], kind.dtype)}
        return Emitted(nodes, raw=raw)
    return emit


EMITTERS: Mapping[str, Callable[[MatMulSpec], Emitted]] = MappingProxyType({
    "fp": _fp, "w8": _nbits(8), "w4": _nbits(4), "w8a8": _qdq("w8a8"), "fp8": _qdq("fp8"),
})


def emit_matmul(scheme: str, spec: MatMulSpec) -> Emitted:
    return EMITTERS[scheme](spec)


def graph_opt_level(schemes: set[str]) -> str:
    """The ORT optimisation level a graph holding these schemes runs at ("basic" wins over "all")."""
    levels = {ORT_OPT_LEVEL.get(s, "all") for s in schemes}
    return "basic" if "basic" in levels else "all"
