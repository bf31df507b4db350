"""The native decode step in the export: its index beside the decode graph, and its validation.

    index_graph     after the decode graph is written: its decode index (export/graphs/decode_index.py), where the
                    graph has the step's form and the step's kernels run on this machine (only then can the export
                    validate it)
    native_parity   the step (runtime/engines/native.py) against the reference computing the decode graph's recipe,
                    each input attending to its keys and values as the step stores them (+-127), every attention
                    call against its float32 twin
    drop_native_index  the step right but its rounding too coarse for this model: the bundle decodes on ORT

The step quantizes every projection's activations to int8 per block (MatMulNBits' accuracy level 4 on prepacked
weights), so its end-to-end bound is the prefill graph's, not the decode graph's: an activation one float rounding
away from a code boundary takes the other code in the reference, and those flips add up layer after layer (the
real-width 4-layer int4 export: rel err 0.022 / 0.028, cosine 0.99979 / 0.99975 after 5 / 64 positions, over the
decode graph's 0.02; the prefill graph's per-token codes did the same, docs/quantization.md). That each projection
computes exactly MatMulNBits' function is the kernel's own check: its load self-test and the tests against ORT's
kernel on the same codes (3-8e-7).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from pulse_edge.errors import KernelUnavailable
from pulse_edge.export.build.segments import bound_text, checked_decode_parity, without_files
from pulse_edge.export.graphs.decode_index import NotIndexable, read_decode_graph
from pulse_edge.export.graphs.decoder import LinearPlan
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.context import QuantContext
from pulse_edge.export.validate.parity import ValidationPlan, case_checks, validate_native_decode
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import BlockGemv

log = logging.getLogger(__name__)
# The step's verdict, as the prefill segments' (export/build/segments.py): within the prefill graph's bound it is
# kept; beyond it, with every logit row still at cosine >= WRONG_STEP_COSINE and every attention call on its twin,
# its rounding is too coarse for this model (its per-block activation codes flip layer after layer) and it is
# dropped with one warning, ONNX Runtime decoding instead; below that cosine it computes something else and the
# export is refused. Rounding alone measured: cosine 0.9998 (real width, 4 layers), 0.998 (a random 32-layer int4
# model with one float32 rounding changed, docs/performance.md).
WRONG_STEP_COSINE = 0.99


def index_graph(work: Path, spec: GraphSpec) -> GraphSpec:
    """The decode graph `spec` with its decode index written beside it, or as it was (one line says why)."""
    try:
        BlockGemv.load()
        CausalAttention.load(DECODE)
        LayerOps.load()  # all three, as the runtime loads them (runtime/engines/native.py native_for)
        index = read_decode_graph(work / spec.file)
    except (KernelUnavailable, NotIndexable) as e:
        log.info("no native decode step for this bundle: %s", e)
        return spec
    path = work / names.DECODE_INDEX_FILE
    index.write(path)
    log.info("wrote the decode index for the native decode step (%d layers)", len(index.layers))
    return replace(spec, native_index=path.name, sizes={**spec.sizes, path.name: path.stat().st_size})


def native_parity(loaded: LoadedCheckpoint, bundle: Path, manifest: Manifest, checks: ValidationPlan,
                  quant: QuantContext, linear: LinearPlan, kv: KVScales | None, level: str,
                  session: SessionConfig) -> dict[str, Any]:
    """The native decode step against the reference computing the decode graph's schemes with the step's store
    rule: kept within the bound, dropped beyond it (drop_native_index), refused where it computes something else
    (a logit row below WRONG_STEP_COSINE, an attention call off its twin)."""
    log.info("validating the native decode step at prefill lengths %s", list(checks.prefill_lengths))
    # the step always quantizes the activations per block, as MatMulNBits does on prepacked weights; validation
    # sessions map the weights unpacked (export/build/memory.py), so the reference is told "prepacked" here
    record = checked_decode_parity(validate_native_decode,
                                   "block GEMV (AVX-512 VNNI) + AVX-512 decode attention (runtime/kernels)", loaded,
                                   bundle, manifest, checks, quant, linear, kv, level, session, prepacked=True)
    rows = _steps(record)
    right = bool(rows) and record["kernel_plausible"] and all(s["cosine"] >= WRONG_STEP_COSINE for s in rows)  # NaN
    return {**record, "pass": right, "kept": bool(right and record["graph_pass"]),
            "wrong_step_cosine": WRONG_STEP_COSINE}


def drop_native_index(work: Path, manifest: Manifest, record: dict[str, Any]) -> Manifest:
    """The step computes the recipe but moves this model's logits beyond its bound: the bundle keeps the decode graph
    only (its index removed, the manifest rewritten). Says so once."""
    worst = max((step["max_rel_err"] for step in _steps(record)), default=float("nan"))
    log.warning("the native decode step's per-block activation rounding moves this model's logits beyond its bound "
                "(worst rel err %.3g; bound %s): the bundle has no native decode step, ONNX Runtime decodes",
                worst, bound_text(record["tolerance"]))
    index = str(manifest.graphs[names.DECODER].native_index)
    return without_files(work, manifest, names.DECODER, [index], native_index=None)


def _steps(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Every compared logit row of a decode-path record: each case's prefill and its decode steps."""
    return [step for case in record["cases"] for step in case_checks(case)]
