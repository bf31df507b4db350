"""`pulse-edge export --target tensorrt`: the bundle's graphs in standard ONNX, for TensorRT's parser.

    vision.onnx    torch's plain fp16 export (no ORT fusions: they are contrib ops); quantized: Q/DQ with fp16
                   scales (export/graphs/qdq_ops.py) at the recipe's sites
    decoder.onnx   export/graphs/trt_decoder.py: fp16, KV cache written in place at write_index; quantized
                   sites as block-wise int4 DequantizeLinear (AWQ folded), W8A8 (SmoothQuant folded) or FP8 Q/DQ

Everything is fp16 (TensorRT's attention kernels have no fp32 form) with a float32 interface, so the runtime
feeds these graphs exactly like the ONNX Runtime ones. ONNX Runtime's CPU EP runs them too: export validates
them there against the torch reference like any bundle, and `infer --backend ort` serves them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pulse_edge.errors import ConfigError
from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, LinearPlan
from pulse_edge.export.graphs.qdq_ops import emit_qdq_matmul
from pulse_edge.export.graphs.quant_ops import Emitted, MatMulSpec
from pulse_edge.export.graphs.trt_decoder import QDQ_MATMULNBITS_ACCURACY_LEVEL, TrtDecoderOptions, build_trt_decoder
from pulse_edge.export.graphs.vision import export_vision_graph
from pulse_edge.runtime.bundle.manifest import GraphSpec
from pulse_edge.runtime.engines.ort import SessionConfig

if TYPE_CHECKING:
    from pulse_edge.export.model.checkpoint import LoadedCheckpoint
    from pulse_edge.export.quant.context import QuantContext

# The schemes a TensorRT-ready graph can hold, per recipe; "w8" (MatMulNBits' block-wise int8) has no TensorRT
# form: TensorRT's int8 decoder is W8A8 with SmoothQuant.
TRT_DECODER_SCHEMES = ("fp", "w4", "w8a8", "fp8")
FLOAT_BASE = "fp16"
# ORT's CPU EP in validation: fp16 graphs at "basic" without the arena keep the weights mapped (see
# export/build/bundle.validation_session); fp8 runs as an exact Q/DQ emulation there.
VALIDATION_SESSION = SessionConfig(prepack=False, emulate=True, opt_level="basic", mem_arena=False)


def check_trt_options(precision: str, decoder_scheme: str | None) -> None:
    """What --target tensorrt refuses, before anything is loaded."""
    if precision == "fp32":
        raise ConfigError("--target tensorrt writes fp16 graphs (TensorRT's attention kernels have no fp32 form): "
                          "use --precision fp16, int8, int4 or fp8")
    if decoder_scheme is not None and decoder_scheme not in TRT_DECODER_SCHEMES:
        raise ConfigError("TensorRT's int8 decoder is W8A8 with SmoothQuant, not weight-only MatMulNBits: pass "
                          "--int8-decoder w8a8 (the default for --target tensorrt)")


def _vision_emit(scheme: str, spec: MatMulSpec) -> Emitted:
    emitted = emit_qdq_matmul(scheme, spec, np.float16)
    return Emitted(emitted.nodes, arrays=emitted.floats, raw=emitted.raw)


def write_vision(loaded: LoadedCheckpoint, work: Path, quant: QuantContext | None) -> GraphSpec:
    """The fp16 plain vision graph, Q/DQ at the recipe's sites when quantized."""
    spec = replace(export_vision_graph(loaded.model, work, precision=FLOAT_BASE), target="tensorrt")
    return spec if quant is None else quantize_vision(loaded, work, spec, quant)


def quantize_vision(loaded: LoadedCheckpoint, work: Path, spec: GraphSpec, quant: QuantContext) -> GraphSpec:
    """Rewrite the fp16 vision graph's MatMuls by the recipe, with fp16 scales."""
    spec = quant.quantize_vision(loaded, work, spec, emit=_vision_emit, dtype=np.float16)
    # ORT 1.32 runs these fp16 Q/DQ graphs at every level (the fp32 ones of export/graphs/quant_ops.py need
    # "basic" for fp8): measured equal to level "disable" for fp8, 1.7e-2 apart for w8a8 at "all" (its
    # integer MatMul), within the recipe's bound.
    quantized = bool(set(spec.matmul_schemes) - {"fp"})
    return replace(spec, target="tensorrt", opt_level_limit=None,
                   ort_qdq_matmulnbits_accuracy_level=QDQ_MATMULNBITS_ACCURACY_LEVEL if quantized else None)


def write_decoder(loaded: LoadedCheckpoint, work: Path, shape: DecoderShape, quant: QuantContext | None, *,
                  label: str, ops: str) -> tuple[GraphSpec, LinearPlan]:
    plan = quant.decoder_plan(loaded, shape) if quant else FLOAT_PLAN
    check_trt_options(label, next((s for s in plan.schemes.values() if s not in TRT_DECODER_SCHEMES), None))
    spec = build_trt_decoder(loaded.model.language_model, shape, work, plan=plan,
                             options=TrtDecoderOptions(ops=ops, label=label))
    return spec, plan


def validation_session() -> SessionConfig:
    return VALIDATION_SESSION


def parity_level(precision: str) -> str:
    """The tolerance a TensorRT-ready graph is held to against the fp32 torch reference: fp16's bound for the
    float graph, the recipe's bound (export/validate/tolerances.py) for a quantized one. The one place to switch
    quantized graphs to a reference that emulates their recipe."""
    return precision
