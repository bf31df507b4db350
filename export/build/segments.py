"""The CPU recipes' decoder graphs cut at their attentions for the CPU attention kernels, in the export.

    cut_graph          after a decoder graph over the int8 cache is written (the prefill graph, the decode graph):
                       the segments beside it (export/graphs/segments.py), where its kernel runs on this machine
                       (only then can they be validated with it)
    segments_parity    the prefill segments against the reference, with the kernel's float32 twin (is the cut
                       right? refuses like any graph) and with the kernel (is bf16 attention close enough here?)
    decode_segments_parity  the decode segments with the decode kernel (float32) against the reference
    drop_segments      the kernel not close enough for this model: the bundle keeps the whole graph only
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from pulse_edge.errors import KernelUnavailable
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.graphs.prefill import prefill_plan
from pulse_edge.export.graphs.segments import write_segments
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.context import QuantContext
from pulse_edge.export.validate.emulate import emulated_reference
from pulse_edge.export.validate.parity import ValidationPlan, validate_segmented_decode, validate_segmented_prefill
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.engines.segmented import KERNELS
from pulse_edge.runtime.kernels.attention import D_MULTIPLE, CausalAttention

log = logging.getLogger(__name__)
# The kernel's verdict, from two measurements (export/validate/parity.py validate_segmented_prefill):
#   - each kernel call against its float32 twin on the same inputs: bf16 q moves a score by |score| x 2^-9, so a
#     call is off by ~2e-3 on scores near N(0, 1) and by a few percent on a peaked softmax (7.3e-3 at scores of
#     spread 30, tests/kernels); a call off by more than WRONG_CALL_REL_ERR attends wrongly: the export is refused;
#   - the logits with the kernel against those with the twin (same cut, same model): from KEEP_COSINE up the
#     segments stay; below, the rounding is too coarse for this model and they are dropped with one warning.
#     Measured: real width 4 layers int8 0.99942; the tiny model with 80x channels, SmoothQuant 0.99984, plain
#     W8A8 0.99568 (dropped).
KEEP_COSINE = 0.999
WRONG_CALL_REL_ERR = 0.25
# The cut's verdict, from the logits with the kernel's float32 twin against the reference: within the prefill
# graph's own bound the cut is right; below WRONG_CUT_COSINE it computes something else and the export is refused;
# between the two it is rounding: per-token activation codes flip under another float order and the flips compound
# with depth (the random 32-layer int4 export: 0.079 / 0.996984 after 64 positions in two chunks against the bound
# then, 0.15 / 0.997, the whole prefill graph passing its own check), so the segments are dropped and the bundle
# written.
WRONG_CUT_COSINE = 0.99
# The decode kernel computes in float32 (runtime/kernels/decode_attention.c): a call off its twin by more than
# this (measured ~1e-6) is a wrong kernel, refused
WRONG_DECODE_CALL_REL_ERR = 1e-4


def cut_graph(work: Path, key: str, spec: GraphSpec, shape: DecoderShape) -> GraphSpec:
    """Graph `key` (names.PREFILL, names.DECODER) also cut at its attentions for its CPU kernel
    (export/graphs/segments.py, runtime/engines/segmented.py KERNELS), where that kernel runs on this machine:
    only then can the export validate the pieces with it."""
    kinds = KERNELS[key][0]
    try:
        kind = CausalAttention.load(kinds).kind
        if shape.head_dim % D_MULTIPLE or shape.head_dim > (kind.max_head_dim or shape.head_dim):
            raise KernelUnavailable(f"its head dim {shape.head_dim} is not a multiple of {D_MULTIPLE} up to "
                                    f"{kind.max_head_dim}")
    except KernelUnavailable as e:
        log.info("the %s graph is not cut for %s: %s", key, " or ".join(k.what for k in kinds), e)
        return spec
    log.info("cutting the %s graph at its %d attentions (for %s)", key, shape.layers, kind.what)
    segments = write_segments(work, spec.file, shape.layers, shape.kv_heads, shape.head_dim, key)
    scales = names.segment_scales_file(key)
    written = [*(s.file for s in segments), scales]
    return replace(spec, segments=segments, segment_scales=scales,
                   sizes={**spec.sizes, **{f: (work / f).stat().st_size for f in written}})


def segments_parity(loaded: LoadedCheckpoint, bundle: Path, manifest: Manifest, checks: ValidationPlan,
                    quant: QuantContext, linear: LinearPlan, kv: KVScales | None, level: str,
                    session: SessionConfig) -> dict[str, Any]:
    """The prefill segments against the reference computing the prefill graph's schemes (`linear`'s folds, the
    prefill scheme), the chunk stored as the prefill graph stores it (+-127) and attended to as cached (as the
    kernel reads it)."""
    log.info("validating the prefill segments with the attention kernel at %s positions in two chunks",
             list(checks.prefill_lengths))
    own = prefill_plan(quant.recipe, linear, manifest.kv.layers)
    with emulated_reference(loaded.model, quant.recipe, quant.scales, own, prepacked=session.prepack,
                            kv=kv, quantized_self=True, symmetric=True):
        report = validate_segmented_prefill(
            loaded.model.language_model, bundle, manifest.graphs[names.PREFILL], manifest.kv, precision=level,
            plan=checks,
            session=replace(session, prefill_attention="kernel", prefill_graph="on"))  # "on": whatever memory says
    cases = report["cases"]
    keep = bool(cases) and all(c["kernel_vs_twin"]["cosine"] >= KEEP_COSINE for c in cases)  # NaN: not kept
    plausible = bool(cases) and all(c["kernel_call_rel_err"] <= WRONG_CALL_REL_ERR for c in cases)
    cut_right = bool(cases) and all(c["prefill_twin"]["cosine"] >= WRONG_CUT_COSINE for c in cases)
    # the verdict: the cut and the kernel not wrong (else refused); kept when the twin is within the bound and the
    # kernel's rounding fine here, else dropped (drop_segments)
    return {**report, "twin_pass": report["pass"], "kernel_pass": keep, "kernel_plausible": plausible,
            "pass": bool(cut_right and plausible), "tolerance_level": level, "kernel_keep_cosine": KEEP_COSINE,
            "kernel_wrong_call_rel_err": WRONG_CALL_REL_ERR, "wrong_cut_cosine": WRONG_CUT_COSINE,
            "kept": True}


def decode_segments_parity(loaded: LoadedCheckpoint, bundle: Path, manifest: Manifest, checks: ValidationPlan,
                           quant: QuantContext, linear: LinearPlan, kv: KVScales | None, level: str,
                           session: SessionConfig) -> dict[str, Any]:
    """The decode segments against the reference computing the decode graph's schemes, each input attending to its
    keys and values as the segments store them (+-127) and the kernel reads them; held to the decode graph's own
    bound (the kernel rounds as float32 does). Refused like any graph where they differ."""
    log.info("validating the decode segments with the decode kernel at prefill lengths %s",
             list(checks.prefill_lengths))
    return checked_decode_parity(validate_segmented_decode, "AVX-512 decode attention (runtime/kernels)", loaded,
                                 bundle, manifest, checks, quant, linear, kv, level, session,
                                 prepacked=session.prepack)


def checked_decode_parity(validate: Callable[..., dict[str, Any]], kernel: str, loaded: LoadedCheckpoint,
                          bundle: Path, manifest: Manifest, checks: ValidationPlan, quant: QuantContext,
                          linear: LinearPlan, kv: KVScales | None, level: str, session: SessionConfig, *,
                          prepacked: bool) -> dict[str, Any]:
    """A decode path on the decode kernel (the segments, the native step: `validate`) against the emulated reference
    storing as the kernel reads (+-127), `prepacked` saying how MatMulNBits' activations are quantized; the verdict
    also needs every attention call within WRONG_DECODE_CALL_REL_ERR of its float32 twin."""
    with emulated_reference(loaded.model, quant.recipe, quant.scales, linear, prepacked=prepacked, kv=kv,
                            quantized_self=True, symmetric=True):
        report = validate(loaded.model.language_model, bundle, manifest.graphs[names.DECODER], manifest.kv,
                          precision=level, plan=checks, session=session)
    plausible = report["kernel_call_rel_err"] <= WRONG_DECODE_CALL_REL_ERR
    return {**report, "graph_pass": report["pass"], "pass": bool(report["pass"] and plausible),
            "kernel_plausible": plausible,
            "tolerance_level": level, "kernel_wrong_call_rel_err": WRONG_DECODE_CALL_REL_ERR, "kernel": kernel}


def bound_text(tolerance: dict[str, float]) -> str:
    """A parity bound as the logs print it: "rel err 0.15, cosine 0.997"."""
    return f"rel err {tolerance['max_rel_err']:.3g}, cosine {tolerance['min_cosine']:.6g}"


def drop_segments(work: Path, manifest: Manifest, record: dict[str, Any]) -> Manifest:
    """The cut and the kernel compute the prefill, but rounding moves this model's logits too far: the segments' own
    (the twin's logits beyond the prefill graph's bound: per-token codes flipping layer after layer) or the kernel's
    bf16 attention against its twin (large scores: bf16 q moves each by |score| x 2^-9). The bundle keeps only the
    whole prefill graph. Says so once."""
    if not record["twin_pass"]:
        worst = min(c["prefill_twin"]["cosine"] for c in record["cases"])
        log.warning("the prefill segments (with the attention kernel's float32 twin) move this model's logits beyond "
                    "the prefill graph's bound (cosine %.6f; bound %s): rounding, not a wrong cut (that is below "
                    "%s); the prefill graph is kept whole (no segments): its attention runs in ONNX Runtime's "
                    "float32", worst, bound_text(record["tolerance"]), WRONG_CUT_COSINE)
    else:
        worst = min(c["kernel_vs_twin"]["cosine"] for c in record["cases"])
        log.warning("the CPU attention kernel's bf16 rounding moves this model's logits to cosine %.6f of its float32 "
                    "twin's (kept from %s): the prefill graph is kept whole (no segments): its attention runs in ONNX "
                    "Runtime's float32", worst, KEEP_COSINE)
    record["kept"] = False
    prefill = manifest.graphs[names.PREFILL]
    dropped = [*(s.file for s in prefill.segments), str(prefill.segment_scales)]
    return without_files(work, manifest, names.PREFILL, dropped, segments=(), segment_scales=None)


def without_files(work: Path, manifest: Manifest, key: str, dropped: list[str], **changes: Any) -> Manifest:
    """Graph `key` with `changes` and without the files `dropped` (deleted from `work`, from the graph's sizes and
    from the manifest's files); the manifest rewritten."""
    for name in dropped:
        (work / name).unlink()
    graph = manifest.graphs[key]
    spec = replace(graph, **changes, sizes={k: v for k, v in graph.sizes.items() if k not in dropped})
    manifest = replace(manifest, graphs={**manifest.graphs, key: spec},
                       files={k: v for k, v in manifest.files.items() if k not in dropped})
    manifest.write(work)
    return manifest
