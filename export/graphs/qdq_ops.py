"""Quantized MatMuls in standard ONNX Q/DQ, in the graph's own float type: what TensorRT's parser consumes.

    fp     x ─ MatMul(W) ─ y
    w4     W:int4 [K, N] ─ DequantizeLinear(s [ceil(K/B), N], axis 0, block_size B) ─┐
           x ──────────────────────────────────────────────────────────── MatMul ─ y     (weight-only, opset >= 21)
    w8a8   x ─ QuantizeLinear(s_x, 0:int8) ─ DequantizeLinear ─┐
           W:int8 [K, N] ─ DequantizeLinear(s_w [N], axis 1) ─ MatMul ─ y                (opset >= 19: fp16 scales)
    fp8    the w8a8 picture with float8e4m3fn in place of int8 (opset >= 19)

export/graphs/quant_ops.py emits the ONNX Runtime forms (MatMulNBits, fp32 scales). Here every scale has
the activations' float type (a DequantizeLinear's output type is its scale's), so an fp16 graph stays
fp16 throughout: TensorRT's networks are strongly typed and take their precision from exactly these types.
Weights carry no zero point (symmetric); the activation Q/DQ pair carries a zero zero point, which fixes the
quantized type. The int4 codes are signed and stored packed, two per byte, low nibble first (the ONNX INT4
layout); TensorRT keeps them packed in the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper

from pulse_edge.calibration.quant_math import (
    E4M3_MAX,
    dequantize_blockwise,
    quantize_blockwise,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
)
from pulse_edge.export.graphs.quant_ops import MatMulSpec

INT8_MAX = 127.0
# The opset each scheme needs: block-wise DequantizeLinear arrived in 21, fp16 scales and float8 in 19.
MIN_OPSET = MappingProxyType({"fp": 17, "w4": 21, "w8a8": 19, "fp8": 19})
SCHEMES = tuple(MIN_OPSET)


@dataclass(frozen=True)
class Int4Weight:
    """Signed int4 codes [K, N] packed two per byte along the flattened array, and their element shape."""

    packed: np.ndarray  # uint8 [ceil(K * N / 2)]
    shape: tuple[int, int]


@dataclass
class QDQEmitted:
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    floats: dict[str, np.ndarray] = field(default_factory=dict)  # stored in the graph's float type
    raw: dict[str, np.ndarray] = field(default_factory=dict)  # stored as they are (int8, float8, fp16 scalars)
    int4: dict[str, Int4Weight] = field(default_factory=dict)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Signed codes in [-8, 7] -> the ONNX INT4 byte layout: element 2j in the low nibble of byte j."""
    flat = (codes.reshape(-1).astype(np.int16) & 0x0F).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return flat[0::2] | (flat[1::2] << 4)


def int4_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> signed codes int8 [K, N] and scales float32 [ceil(K/B), N], blocks along K.

    The same rounding as ONNX Runtime's MatMulNBits bundles (calibration/quant_math.quantize_blockwise), so both
    targets carry the same int4 numbers; only the layout differs."""
    bq = quantize_blockwise(weight, 4, block_size)
    k, n, blocks = bq.k, bq.n, bq.n_blocks
    scales = bq.scales.reshape(n, blocks).T  # [nb, N]
    recon = dequantize_blockwise(bq)  # [K, N] = codes * scale
    per_row = np.repeat(scales, block_size, axis=0)[:k]  # [K, N]
    safe = np.where(per_row == 0, 1.0, per_row)
    codes = np.rint(recon / safe).astype(np.int8)
    return codes, np.ascontiguousarray(scales, dtype=np.float32)


def _fp(spec: MatMulSpec, float_dtype: type) -> QDQEmitted:
    w = f"{spec.site}.weight"
    return QDQEmitted([helper.make_node("MatMul", [spec.x, w], [spec.y], name=f"{spec.site}/matmul")],
                      floats={w: spec.weight})


def _w4(spec: MatMulSpec, float_dtype: type) -> QDQEmitted:
    p = spec.site
    codes, scales = int4_blocks(spec.weight, spec.block_size)
    nodes = [
        helper.make_node("DequantizeLinear", [f"{p}.qweight", f"{p}.w_scale"], [f"{p}.wdq"], name=f"{p}/wdq",
                         axis=0, block_size=spec.block_size),
        helper.make_node("MatMul", [spec.x, f"{p}.wdq"], [spec.y], name=f"{p}/matmul"),
    ]
    return QDQEmitted(nodes, raw={f"{p}.w_scale": scales.astype(float_dtype)},
                      int4={f"{p}.qweight": Int4Weight(pack_int4(codes), codes.shape)})


@dataclass(frozen=True)
class _ActType:
    dtype: type
    qmax: float
    quantize_weight: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


ACT_TYPES = MappingProxyType({
    "w8a8": _ActType(np.int8, INT8_MAX, quantize_int8_per_channel),
    "fp8": _ActType(ml_dtypes.float8_e4m3fn, E4M3_MAX, quantize_fp8_per_channel),
})


def _w8a8_like(scheme: str) -> Callable[[MatMulSpec, type], QDQEmitted]:
    kind = ACT_TYPES[scheme]

    def emit(spec: MatMulSpec, float_dtype: type) -> QDQEmitted:
        if spec.act_amax is None:
            raise ValueError(f"{spec.site}: {scheme} needs a calibrated activation range")
        p = spec.site
        q, w_scale = kind.quantize_weight(spec.weight)
        x_scale = np.array(max(spec.act_amax, 1e-12) / kind.qmax, dtype=float_dtype)
        nodes = [
            helper.make_node("QuantizeLinear", [spec.x, f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.xq"], name=f"{p}/q"),
            helper.make_node("DequantizeLinear", [f"{p}.xq", f"{p}.x_scale", f"{p}.x_zero"], [f"{p}.xdq"],
                             name=f"{p}/dq"),
            helper.make_node("DequantizeLinear", [f"{p}.qweight", f"{p}.w_scale"], [f"{p}.wdq"], name=f"{p}/wdq",
                             axis=1),
            helper.make_node("MatMul", [f"{p}.xdq", f"{p}.wdq"], [spec.y], name=f"{p}/matmul"),
        ]
        raw = {f"{p}.x_scale": x_scale, f"{p}.x_zero": np.zeros((), kind.dtype), f"{p}.qweight": q,
               f"{p}.w_scale": w_scale.astype(float_dtype)}
        return QDQEmitted(nodes, raw=raw)
    return emit


EMITTERS: Mapping[str, Callable[[MatMulSpec, type], QDQEmitted]] = MappingProxyType({
    "fp": _fp, "w4": _w4, "w8a8": _w8a8_like("w8a8"), "fp8": _w8a8_like("fp8"),
})


def emit_qdq_matmul(scheme: str, spec: MatMulSpec, float_dtype: type) -> QDQEmitted:
    if scheme not in EMITTERS:
        raise ValueError(f"{spec.site}: scheme {scheme!r} has no standard-ONNX form (one of {', '.join(EMITTERS)})")
    return EMITTERS[scheme](spec, float_dtype)


def int4_initializer(name: str, weight: Int4Weight) -> TensorProto:
    """An embedded INT4 initializer (the vision graph keeps its weights in the protobuf)."""
    return helper.make_tensor(name, TensorProto.INT4, weight.shape, weight.packed.tobytes(), raw=True)
