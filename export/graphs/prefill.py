"""The CPU recipes' second decoder graph, for long inputs, and their int8 KV cache's scales.

    decoder.onnx  (decode: one position a step)      weight-only int8 / int4 MatMulNBits: the fewest bytes
    prefill.onnx  (inputs of >= 16 positions)        w8a8dyn MatMuls: int8 x int8 on the CPU's fastest GEMM
         │                                            (AMX tiles where the CPU has them)
         └── same interface, same norms, rotary tables, folded input scales and lm_head scheme as decoder.onnx,
             same KV cache (the runtime binds both sessions to one set of buffers); over an int8 cache it
             attends in float32 (export/graphs/kv_cache.py: ORT's quantized-cache attention is slow on prompts)

A decode step is memory-bound: it streams every weight once, so the weight-only graph with
the fewest bytes per weight is the fast one. A 2950-position prefill is compute-bound: its
MatMuls are [~512, K] x [K, N] products, where ORT's MatMulNBits (accuracy level 4) runs AVX-512
VNNI dot products with a float rescale every block, but MatMulIntegerToFloat with uint8
activations runs MLAS's u8 x s8 GEMM, which uses AMX on Sapphire Rapids and later (measured:
docs/performance.md, prefill). The prefill graph costs a second copy of the decoder layers' weights
(int8 per output channel) on disk and in memory.

Both graphs fold the same input scales (SmoothQuant / AWQ) into the same norms, so they compute the
same function up to their own rounding; the prefill graph's per-token activation quantization
needs no calibrated range.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from transformers import LlamaForCausalLM

from pulse_edge.calibration.kv import kv_scales
from pulse_edge.calibration.recipes import Recipe, decoder_sites
from pulse_edge.calibration.scales import Scales
from pulse_edge.errors import ConfigError
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan, build_decoder
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.runtime.bundle.manifest import GraphSpec

PREFILL_FILE = "prefill.onnx"
# Static int8 KV scales cover the largest key (rotary-pair length) and value seen in calibration times this:
# a later token up to 25% larger still fits the grid; beyond it, it saturates. Costs 0.3 bit of resolution.
KV_HEADROOM = 1.25


def kv_scales_for(recipe: Recipe, scales: Scales, shape: DecoderShape, plan: LinearPlan) -> KVScales | None:
    """The int8 KV cache's scales from the calibration's KV statistics, for the graphs `plan` emits; None for a
    float cache.

    Calibration records the float model's values. Where the plan folds an input scale s into o (AWQ on the int4
    recipe), the graph divides v's columns by s (decoder.py `_attention`), so the cache holds v / s: its value
    scales are divided by s too. Left as recorded, a channel with s < 0.8 saturated and one with s > 1 used few
    of the 127 levels (random 7B-shaped activations, AWQ alpha 0.8: 12% of codes clipped, cache error 0.155
    against 0.009)."""
    if recipe.kv_cache != "int8":
        return None
    try:
        key, value = kv_scales(scales.kv, shape.layers, headroom=KV_HEADROOM)
    except KeyError as e:
        raise ConfigError("the scales file holds no key/value ranges (it predates the int8 KV cache): re-run "
                          "pulse-edge calibrate, or export with --kv-cache float") from e
    plan.check(shape)  # o's scale only where heads == kv_heads: then it is per (kv head, channel), as the cache
    value = [v / plan.input_scales[site].reshape(v.shape).astype(np.float32) if site in plan.input_scales else v
             for v, site in ((v, f"layers.{i}.o") for i, v in enumerate(value))]  # o's scale only where heads == kv
    return KVScales(key=tuple(key), value=tuple(value))


def prefill_plan(recipe: Recipe, plan: LinearPlan, layers: int) -> LinearPlan:
    """The decode plan with the prefill scheme on the sites it quantizes; input scales unchanged."""
    return replace(plan, schemes={site: recipe.prefill_scheme(site) for site in decoder_sites(layers)})


def build_prefill(lm: LlamaForCausalLM, shape: DecoderShape, out_dir: Path, recipe: Recipe, plan: LinearPlan,
                  kv: KVScales | None, *, label: str, fp16_cache: bool = False) -> GraphSpec:
    """Write prefill.onnx (+ .data) beside the decoder graph; its manifest entry (`fp16_cache`: as the decode
    graph's, export/graphs/kv_cache.py)."""
    if recipe.prefill is None:
        raise ValueError(f"recipe {recipe.name} has no prefill graph")
    return build_decoder(lm, shape, out_dir, file_name=PREFILL_FILE, plan=prefill_plan(recipe, plan, shape.layers),
                         label=label, kv=None if kv is None else replace(kv, float_attention=True),
                         fp16_cache=fp16_cache)
