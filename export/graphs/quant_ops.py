"""Quantized MatMuls as ONNX nodes, one emitter per scheme, shared by the decoder builder and the vision rewrite.

    fp     x ─ MatMul(W) ─ y
    w8/w4  x ─ MatMulNBits(packed W, block scales; bits, block_size, accuracy_level) ─ y        (com.microsoft)
    w8a8   x ─ QuantizeLinear(s_x, 0:int8) ─ DequantizeLinear ─┐
                                  W:int8 ─ DequantizeLinear(s_w[N], axis 1) ─ MatMul ─ y
    w8a8u8   x ─ QuantizeLinear(s_x, 128:uint8) ─ MatMulIntegerToFloat(W:int8, s_x, s_w[N], 128, bias) ─ y
    w8a8dyn  x [.., K] ─ rows [R, K] ─ max(ReduceMax, -ReduceMin) / 127 = s_t [R, 1]   (one scale per token)
             rows ─ QuantizeLinear(s_t, 128:uint8, per row) ─ MatMulIntegerToFloat(W:int8, s_t, s_w[N], 128)
             ─ [R, N] ─ back to [.., N] ─ y
    fp8    the w8a8 picture with float8e4m3fn in place of int8 (opset >= 19)

Q/DQ is the form TensorRT and ORT's QDQ passes consume: ORT's CPU EP fuses the int8
pattern into QuantizeLinear + MatMulIntegerToFloat (checked on ORT 1.31). Its
ORT_ENABLE_ALL level tries the same fusion on float8 and rejects the graph, so fp8
graphs run in ORT only at the "basic" level, where the Q/DQ nodes execute as written:
an exact emulation of E4M3 rounding, for validation on a CPU.

w8a8u8 is w8a8 as ORT's CPU EP runs it (its QDQ passes turn int8 activations into uint8 ones on x86:
a MatMulIntegerToFloat with int8 activations measured 49x slower than with uint8 ones here), written
directly, with the Linear's bias inside the op instead of an Add after it: for the vision graph.

w8a8dyn is the CPU's fast int8 GEMM: activations quantized per token at run time (symmetric range,
stored as uint8 around 128, the operand type MLAS's u8 x s8 kernels take) against int8 weights per
output channel. On a CPU with AMX (Sapphire Rapids and later) MLAS runs that product on the tiles;
the other int8 forms do not reach them (measured with ORT 1.32: MatMulNBits at accuracy level 4 runs
AVX-512 VNNI with a float rescale per block; see docs/performance.md). Per token, not per tensor:
one outlier token (LLaMA's first position carries huge activations) would otherwise set the scale
of every other token in the chunk. A Linear's bias stays a separate Add: with a per-row activation
scale, ORT 1.32's MatMulIntegerToFloat scales its bias input by that row's scale too (measured: 21%
relative error on [577, 1024] x [1024, 1024]), so the bias input is never used.

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
UINT8_ZERO = 128  # w8a8dyn: a symmetric int8 grid stored as uint8 (MLAS's fast kernels take u8 x s8)
DYNAMIC_SCALE_FLOOR = 1e-30  # w8a8dyn: an all-zero row still gets a finite scale
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
    opset: int = 17  # the graph's default-domain opset (ReduceMax took its axes as an input from 18)
    bias: np.ndarray | None = None  # [N] added to y: w8a8u8 only (MatMulIntegerToFloat's bias input)


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


def _reduce(op: str, x: str, y: str, spec: MatMulSpec) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    """op over the last axis, kept: the axes are an attribute before opset 18, an input from it."""
    p = spec.site
    if spec.opset >= 18:
        return (helper.make_node(op, [x, f"{p}.last_axis"], [y], name=f"{p}/{op.lower()}", keepdims=1),
                {f"{p}.last_axis": np.array([-1], np.int64)})
    return helper.make_node(op, [x], [y], name=f"{p}/{op.lower()}", axes=[-1], keepdims=1), {}


def _w8a8_dynamic(spec: MatMulSpec) -> Emitted:
    """Per-token quantization in three passes over x (max, min, quantize): the rows are flattened to [R, K] so
    that QuantizeLinear's per-axis mode takes one scale (and zero point) per row."""
    p = spec.site
    q, w_scale = quantize_int8_per_channel(spec.weight)
    k, n = q.shape
    high, raw = _reduce("ReduceMax", f"{p}.x2", f"{p}.high", spec)
    low, _ = _reduce("ReduceMin", f"{p}.x2", f"{p}.low", spec)
    node = helper.make_node
    nodes = [
        node("Reshape", [spec.x, f"{p}.rows_k"], [f"{p}.x2"], name=f"{p}/rows"),                    # [R, K]
        high, low, node("Neg", [f"{p}.low"], [f"{p}.neg_low"], name=f"{p}/neg"),
        node("Max", [f"{p}.high", f"{p}.neg_low"], [f"{p}.amax"], name=f"{p}/amax"),                # [R, 1]
        node("Mul", [f"{p}.amax", f"{p}.inv_qmax"], [f"{p}.s_raw"], name=f"{p}/per_step"),
        node("Max", [f"{p}.s_raw", f"{p}.s_min"], [f"{p}.s_tok"], name=f"{p}/floor"),              # [R, 1]
        node("Reshape", [f"{p}.s_tok", f"{p}.flat"], [f"{p}.s_row"], name=f"{p}/s_row"),            # [R]
        node("Shape", [f"{p}.s_row"], [f"{p}.r"], name=f"{p}/r"),
        node("Expand", [f"{p}.zero_u8", f"{p}.r"], [f"{p}.zero_row"], name=f"{p}/zero_row"),       # [R] of 128
        node("QuantizeLinear", [f"{p}.x2", f"{p}.s_row", f"{p}.zero_row"], [f"{p}.xq"], name=f"{p}/q", axis=0),
        node("MatMulIntegerToFloat", [f"{p}.xq", f"{p}.qweight", f"{p}.s_tok", f"{p}.w_scale", f"{p}.zero_u8"],
             [f"{p}.y2"], name=f"{p}/matmul_int", domain=CONTRIB),                                    # [R, N]
        node("Shape", [spec.x], [f"{p}.x_shape"], name=f"{p}/x_shape", end=-1),
        node("Concat", [f"{p}.x_shape", f"{p}.n"], [f"{p}.y_shape"], name=f"{p}/y_shape", axis=0),
        node("Reshape", [f"{p}.y2", f"{p}.y_shape"], [spec.y], name=f"{p}/unrows"),                 # [.., N]
    ]
    raw.update({f"{p}.rows_k": np.array([-1, k], np.int64), f"{p}.flat": np.array([-1], np.int64),
                f"{p}.n": np.array([n], np.int64), f"{p}.inv_qmax": np.array(1.0 / INT8_MAX, np.float32),
                f"{p}.s_min": np.array(DYNAMIC_SCALE_FLOOR, np.float32), f"{p}.zero_u8": np.array(UINT8_ZERO, np.uint8),
                f"{p}.qweight": q, f"{p}.w_scale": w_scale.astype(np.float32)})
    return Emitted(nodes, raw=raw)


def _w8a8_u8(spec: MatMulSpec) -> Emitted:
    """The calibrated per-tensor scale of w8a8, stored as uint8 around 128, straight into MatMulIntegerToFloat
    with the Linear's bias (a scalar activation scale leaves the bias unscaled, unlike a per-row one)."""
    if spec.act_amax is None:
        raise ValueError(f"{spec.site}: w8a8u8 needs a calibrated activation range")
    p = spec.site
    q, w_scale = quantize_int8_per_channel(spec.weight)
    bias = [] if spec.bias is None else ["", f"{p}.bias"]
    nodes = [helper.make_node("QuantizeLinear", [spec.x, f"{p}.x_scale", f"{p}.zero_u8"], [f"{p}.xq"], name=f"{p}/q"),
             helper.make_node("MatMulIntegerToFloat", [f"{p}.xq", f"{p}.qweight", f"{p}.x_scale", f"{p}.w_scale",
                                                       f"{p}.zero_u8", *bias], [spec.y], name=f"{p}/matmul_int",
                              domain=CONTRIB)]
    raw = {f"{p}.x_scale": np.array(max(spec.act_amax, 1e-12) / INT8_MAX, np.float32),
           f"{p}.zero_u8": np.array(UINT8_ZERO, np.uint8), f"{p}.qweight": q,
           f"{p}.w_scale": w_scale.astype(np.float32)}
    if spec.bias is not None:
        raw[f"{p}.bias"] = np.asarray(spec.bias, np.float32)
    return Emitted(nodes, raw=raw)


EMITTERS: Mapping[str, Callable[[MatMulSpec], Emitted]] = MappingProxyType({
    "fp": _fp, "w8": _nbits(8), "w4": _nbits(4), "w8a8": _qdq("w8a8"), "fp8": _qdq("fp8"),
    "w8a8dyn": _w8a8_dynamic, "w8a8u8": _w8a8_u8,
})


def emit_matmul(scheme: str, spec: MatMulSpec) -> Emitted:
    if spec.bias is not None and scheme != "w8a8u8":
        raise ValueError(f"{spec.site}: scheme {scheme} does not take a bias")
    return EMITTERS[scheme](spec)


def graph_opt_level(schemes: set[str]) -> str:
    """The ORT optimisation level a graph holding these schemes runs at ("basic" wins over "all")."""
    levels = {ORT_OPT_LEVEL.get(s, "all") for s in schemes}
    return "basic" if "basic" in levels else "all"
