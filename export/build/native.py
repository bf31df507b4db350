"""The native decode step in the export: its index beside the decode graph, and its validation.

    index_graph     after the decode graph is written: its decode index (export/graphs/decode_index.py), where the
                    graph has the step's form and the step's kernels run on this machine (only then can the export
                    validate it)
    native_parity   the step (runtime/engines/native.py) against the reference computing the decode graph's recipe,
                    each input attending to its keys and values as the step stores them (+-127), every attention
                    call against its float32 twin

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
from pulse_edge.export.build.segments import checked_decode_parity
from pulse_edge.export.graphs.decode_index import NotIndexable, read_decode_graph
from pulse_edge.export.graphs.decoder import LinearPlan
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.context import QuantContext
from pulse_edge.export.validate.parity import ValidationPlan, validate_native_decode
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import BlockGemv

log = logging.getLogger(__name__)


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
    rule; refused like any graph where they differ, or where an attention call is off its twin."""
    log.info("validating the native decode step at prefill lengths %s", list(checks.prefill_lengths))
    # the step always quantizes the activations per block, as MatMulNBits does on prepacked weights; validation
    # sessions map the weights unpacked (export/build/memory.py), so the reference is told "prepacked" here
    return checked_decode_parity(validate_native_decode,
                                 "block GEMV (AVX-512 VNNI) + AVX-512 decode attention (runtime/kernels)", loaded,
                                 bundle, manifest, checks, quant, linear, kv, level, session, prepacked=True)
