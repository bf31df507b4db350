"""What an export needs from this machine: memory for its validation (and how that opens the graphs to fit),
and disk for the bundle.

Validation runs the torch reference and the exported graphs side by side on the same machine; for the 7B that
is most of a 24 GiB cart. The anonymous memory it needs (ORT's packed weights, KV caches, activations, the
emulated reference's codes) must fit, so the export refuses up front, in one line, where it cannot; mapped
weights (the bf16 reference, the float graphs) need not fit beside each other: the kernel re-reads their pages
from disk, slow but it finishes. The figures below were measured on the 7B; docs/performance.md has the runs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from pulse_edge.errors import ConfigError
from pulse_edge.export.model.checkpoint import SHARD_INDEX, LoadedCheckpoint, read_shard_index
from pulse_edge.runtime.engines.memory import mem_available_bytes
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.engines.sessions import int8_products_saturate
from pulse_edge.staging import size_text

log = logging.getLogger(__name__)

# Quantized recipes keep fp32 for what they leave unquantized (ORT's CPU EP computes in fp32 anyway).
FLOAT_BASE = {"fp32": "fp32", "fp16": "fp16", "int8": "fp32", "int4": "fp32", "fp8": "fp32"}
KV_DTYPES = {"fp32": "float32", "fp16": "float16"}
# Anonymous bytes per weight that ORT's CPU EP holds in the validation sessions (`validation_session`): the
# float graphs' weights stay mapped from the bundle file (file pages the kernel can drop and re-read); the
# quantized figures are the packed bytes plus scales, as the formats store them.
ORT_CPU_ANON_BYTES_PER_WEIGHT = {"fp32": 0.0, "fp16": 0.0, "int8": 1.1, "int4": 0.6, "fp8": 1.1}
# The emulated reference a quantized bundle is checked against holds its weight codes as int8 (float8 for
# fp8): one byte per weight, plus one site's float32 weight while it is quantized (export/validate/emulate.py).
EMULATION_BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 1.0, "fp8": 1.0}
# Anonymous memory validation needs beyond ORT's KV cache, per parameter: the reference's cache and
# activations for a 2880-image-token prompt, the fp32 copy of the vision tower, the embedding table, ORT's
# arenas and (fp16) the per-call fp32 casts. Measured on the 7B (7.06 B parameters, peaks sampled every 10 s):
# 6.8 GiB (fp32) and 6.2 GiB (fp16) with the quick plan, 9.4 GiB (fp32) with a 2950-position decoder check
# (KV 4.0 GiB fp32, 2.0 fp16): at most 5.4 GiB beyond the KV, 0.82 bytes per parameter; 1.0 leaves room for
# what the sampling missed.
ANON_BYTES_PER_PARAM = 1.0
# A CPU recipe's prefill graph is checked against the reference emulating its own scheme after the decode
# graph's checks; that stage is the validation's peak. Measured on the 7B int8 bundle (7.06 B parameters,
# bf16 reference, quick plan, 4096 positions, anonymous memory sampled every 10 s; 2026-12-06): 21.9 GiB,
# and 22.2 GiB once the prefill graph's sites were checked too (3.38 bytes per parameter), more than the
# parts above add up to (21.4 GiB). 3.4 covers it, with little room: a machine with less free memory than
# that is refused rather than killed half an hour in.
PREFILL_PARITY_ANON_BYTES_PER_PARAM = 3.4
# On an x86 CPU without VNNI ORT rewrites every int8 GEMM weight into a u8 copy in anonymous memory, prepacking
# or not (runtime/engines/sessions.py U8U8_ENTRY): the prefill graph's int8 decoder layers (0.93 bytes per
# parameter on the 7B, see below) and the vision graph's (0.04). Measured with the entry set on this project's
# VNNI machine (ORT 1.32 rewrites wherever it is set): one DynamicQuantizeMatMul of 128 MiB of int8 weights in
# external data, prepacking off, added 130 MiB of anonymous memory against 2 MiB without the entry.
U8_COPY_BYTES_PER_PARAM = 1.0
GRAPH_BYTES_PER_WEIGHT = {"fp32": 4, "fp16": 2}  # the float graphs' mapped weights (quantized: packed, in RAM)
# The least a bundle takes on disk per checkpoint parameter, below every bundle measured, so that a refusal is
# sure (room above it is not promised). Measured (bytes on disk / parameters): real width with 4 layers (1.40 B
# parameters): fp32 3.97, int8 1.79 and int4 1.41 with the prefill graph (~1.15 and ~0.85 without); the 7B (7.06
# B): int8 1.90 and int4 1.42 with it, its parts 1.04 and 0.58 without (the decode graphs 6.8 / 3.5 GB, vision
# 0.3, table 0.26). The prefill graph adds its int8 decoder layers: 0.69 (4 layers) to 0.93 (7B) per parameter.
BUNDLE_BYTES_PER_PARAM = {"fp32": 3.5, "fp16": 1.75, "int8": 0.9, "int4": 0.45, "fp8": 0.9}
PREFILL_GRAPH_BYTES_PER_PARAM = 0.6


def validation_session(precision: str) -> SessionConfig:
    """How validation opens the bundle's graphs: so that a model as large as this machine's memory fits.

    Without prepacking, ORT computes from the weights as they lie in the mapped external data file
    (measured on 2 GiB of fp32 MatMul weights: +0 anonymous memory, +2 GiB with prepacking). An fp16 graph
    on the CPU EP computes in fp32 behind Casts that ORT inserts; at level "all" it folds them into fp32
    copies of every weight (1 GiB of fp16 weights: +2 GiB anonymous), at "basic" with the arena off the
    casts run per call and their outputs are freed (+0). Casting is exact, so the numbers are the same.
    make_session adds what every mapped session needs: no memory pattern, priority-based node order.
    """
    if precision == "fp16":
        return SessionConfig(prepack=False, emulate=True, opt_level="basic", mem_arena=False)
    return SessionConfig(prepack=False, emulate=True)


def validation_anon_bytes(params: int, *, layers: int, kv_heads: int, head_dim: int, max_context: int,
                          precision: str, kv_cache: str = "float", prefill_graph: bool = False,
                          u8_copies: bool = False) -> dict[str, float]:
    """The anonymous memory a validation needs: ORT's packed weights, its KV cache, the rest per parameter.

    kv_cache "int8" / "fp16": one / two bytes per cached value whatever the base. prefill_graph: a CPU recipe's
    second decoder graph, whose parity stage needs PREFILL_PARITY_ANON_BYTES_PER_PARAM at least (the fidelity check's
    pipeline loads that graph only where the memory left holds it: runtime/engines/memory.py). u8_copies: this CPU
    has ORT copy the int8 GEMMs' weights (U8_COPY_BYTES_PER_PARAM), counted with the prefill graph."""
    kv_itemsize = {"int8": 1, "fp16": 2}.get(kv_cache) or np.dtype(KV_DTYPES[FLOAT_BASE[precision]]).itemsize
    parts = {"weights": params * ORT_CPU_ANON_BYTES_PER_WEIGHT[precision],
             "kv_cache": 2 * layers * kv_heads * head_dim * max_context * kv_itemsize,
             "emulated_reference": params * EMULATION_BYTES_PER_WEIGHT.get(precision, 0.0),
             "other": params * ANON_BYTES_PER_PARAM,
             "u8_weight_copies": params * U8_COPY_BYTES_PER_PARAM if prefill_graph and u8_copies else 0.0}
    floor = params * PREFILL_PARITY_ANON_BYTES_PER_PARAM + parts["u8_weight_copies"] if prefill_graph else 0.0
    return {**parts, "total": max(sum(parts.values()), floor)}


def check_validation_memory(loaded: LoadedCheckpoint, params: int, max_context: int, *, precision: str,
                            kv_cache: str, prefill_graph: bool) -> None:
    """Refuse before writing anything when validation cannot run in this machine's memory.

    What must fit is the anonymous memory (validation_anon_bytes). Mapped weights (the 16-bit reference,
    the float graphs) need not fit beside each other: the kernel re-reads their pages from disk, which is
    slow but finishes.
    """
    text = loaded.config.text
    need = validation_anon_bytes(params, layers=text.num_layers, kv_heads=text.num_kv_heads,
                                 head_dim=text.head_dim, max_context=max_context, precision=precision,
                                 kv_cache=kv_cache, prefill_graph=prefill_graph,
                                 u8_copies=int8_products_saturate())
    available = mem_available_bytes()
    if available is not None and need["total"] > available:
        fix = "without the prefill graph (--no-prefill-graph)" if prefill_graph else "with a smaller --max-context"
        raise ConfigError(f"validating a {precision} bundle of this model in ONNX Runtime's CPU EP needs ~"
                          f"{need['total'] / 2**30:.1f} GiB of memory (weights {need['weights'] / 2**30:.1f}, KV "
                          f"cache {need['kv_cache'] / 2**30:.1f} for {max_context} positions) but "
                          f"{available / 2**30:.1f} GiB is available; export {fix}, or on a machine with more "
                          "memory")
    mapped = params * (loaded.model.dtype.itemsize + GRAPH_BYTES_PER_WEIGHT.get(precision, 0))
    if available is not None and mapped > available:
        log.warning("the reference's and the graph's weights (%.0f GiB) exceed the free memory (%.0f GiB): "
                    "validation re-reads them from disk and takes a while", mapped / 2**30, available / 2**30)


def check_disk_space(where: Path, params: int, *, precision: str, prefill_graph: bool) -> None:
    """Refuse before writing graphs when the disk holding `where` cannot take the bundle (a full disk
    half-way is one line as well, pulse_edge/cli/group.py, but after minutes of work)."""
    need = params * (BUNDLE_BYTES_PER_PARAM[precision] + (PREFILL_GRAPH_BYTES_PER_PARAM if prefill_graph else 0.0))
    free = shutil.disk_usage(where).free
    if need > free:
        raise ConfigError(f"the {precision} bundle of this model takes at least ~{size_text(need)} on disk but "
                          f"{size_text(free)} is free where it is written ({where.parent}); free some space "
                          "or choose another output directory")


def reference_dtype(checkpoint: Path) -> torch.dtype:
    """fp32 when it fits with room to spare, else the checkpoint's own dtype (its files map in place)."""
    index = checkpoint / SHARD_INDEX
    metadata = read_shard_index(index).get("metadata") if index.is_file() else None
    total = metadata.get("total_size") if isinstance(metadata, dict) else None
    total = total if isinstance(total, int) and not isinstance(total, bool) and total > 0 else None
    available = mem_available_bytes()
    if total is None or available is None or total * 2 < 0.4 * available:
        return torch.float32
    return torch.bfloat16
