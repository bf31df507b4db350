"""The numbers that judge an exported bundle: parity bounds (refuse) and recommended fidelity (warn).

Parity asks "is the graph right?". A graph passes a check when max|graph - ref| / max|ref| <= max_rel_err and
every row's cosine >= min_cosine, where ref is
    - a float graph (fp32, fp16): the torch reference itself (with an fp16 KV cache: caching the same way,
      export/validate/kv_caches.py);
    - a quantized graph (int8, int4, fp8): the emulated reference (export/validate/emulate.py), the torch
      reference computing the same recipe: the same weight codes and scales, folded input scales, and
      activation quantization where the graph has it.
Either way the only legitimate difference is float accumulation order. For a quantized graph that order
also moves an activation across a rounding boundary now and then (a different int8 code in MLAS's
per-block activations or in a Q/DQ pair), and such a flip travels through the later layers: those bounds
are wider than fp32's, and set from measurements with margin (below, and docs/performance.md).

Fidelity asks "is the recipe good enough for this model?": the quantized bundle against the fp32 reference
on held-out ECG samples (export/validate/fidelity.py). It never refuses a bundle by itself: below
RECOMMENDED_FIDELITY export warns; `--accuracy-gate` is the user's way to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Tolerance:
    """A graph passes when max|ort - ref| / max|ref| <= max_rel_err and every tile's cosine >= min_cosine."""

    max_rel_err: float
    min_cosine: float


# fp32: only summation order differs (fused attention, MLAS GEMMs vs torch SDPA); real shape: 1.1e-6.
FP32_TOLERANCE = Tolerance(max_rel_err=1e-4, min_cosine=0.99999)
# fp16: weights and activations rounded to 11 bits through 23 layers (real shape on the CPU EP: 1.6e-3, 0.999999).
FP16_TOLERANCE = Tolerance(max_rel_err=2e-2, min_cosine=0.999)
# An fp32 graph with an fp16 KV cache (export/graphs/kv_cache.py) against the reference with the same cache
# (export/validate/kv_caches.py): ORT's fp16 attention rounds inside where the reference cannot follow (the
# rotated query). Measured, 4 decode steps after each prefill, ORT 1.32: tiny model 3.1e-4 after 5 positions
# (7.4e-5 after 500); real width with 4 layers 3.3e-4 / 2.2e-4 after 5 / 64 positions (the export's quick
# plan); cosine >= 0.99999994. Bound ~6x that: a swapped rotary table moves the logits by whole percents.
FP16_KV = "fp32+fp16_kv"
FP16_KV_TOLERANCE = Tolerance(max_rel_err=2e-3, min_cosine=0.99999)
# Quantized graphs against the emulated reference (same recipe). Measured worst cases (max rel err, min cosine)
# over the vision checks (1 and 5 tiles, merged print) and the decoder checks (prefills of 5 / 64 / 2950
# positions, 4 decode steps each), CPU EP, ORT 1.32, see docs/performance.md for the table:
PARITY_TOLERANCES = {"int8": Tolerance(max_rel_err=2e-2, min_cosine=0.999),
                     "int4": Tolerance(max_rel_err=2e-2, min_cosine=0.999),
                     "fp8": Tolerance(max_rel_err=2e-2, min_cosine=0.999)}
VISION_PARITY_TOLERANCES = {f"{name} vision": Tolerance(max_rel_err=0.1, min_cosine=0.999)
                            for name in PARITY_TOLERANCES}
# TensorRT-ready quantized graphs (export/build/tensorrt.py) against the emulated reference with their fp16
# Q/DQ (export/validate/emulate.py, QDQForm.fp16). Each quantized MatMul matches its emulation on the graph's own
# input to fp16's output rounding (<= 4.2e-4 measured at every site of the tiny int8 W8A8 and fp8 decoders), but
# the rest of the graph computes in fp16 where the reference computes in fp32, and that rounding moves per-tensor
# int8 / fp8 activation codes across their boundaries, layer after layer: end to end the error is chaotic, about
# as large as the recipe's own distance from fp32 for W8A8 and fp8. Worst measured (quick plan: prefills of 5
# and 64 positions, 2 decode steps; the default tiny model / the initializer_range 0.3 one, docs/quantization.md):
#   decoder  int4 1.0e-3 / 6.4e-3 (cosine >= 0.99997); int8 W8A8 2.9e-2 / 8.2e-2 (0.99595); fp8 6.1e-2 / 0.116 (0.99341)
#   vision   W8A8 (the int8 and int4 recipes) 9.9e-2 (0.99874); fp8 0.176 (0.99434)
# Bounds: fp16's for the int4 decoder (weight-only: float activations, nothing to flip); about 1.5-2x the worst
# measured error otherwise. A wrong weight or activation scale moves a site by whole factors, far beyond them.
TENSORRT = "tensorrt"
TRT_PARITY_TOLERANCES = {
    f"int4 {TENSORRT}": FP16_TOLERANCE,
    f"int8 {TENSORRT}": Tolerance(max_rel_err=0.15, min_cosine=0.99),
    f"fp8 {TENSORRT}": Tolerance(max_rel_err=0.2, min_cosine=0.985),
    f"int4 vision {TENSORRT}": Tolerance(max_rel_err=0.15, min_cosine=0.995),
    f"int8 vision {TENSORRT}": Tolerance(max_rel_err=0.15, min_cosine=0.995),
    f"fp8 vision {TENSORRT}": Tolerance(max_rel_err=0.3, min_cosine=0.99),
}
# A CPU recipe's prefill graph (export/graphs/prefill.py) end to end: its activations are quantized per token
# at run time (w8a8dyn), so, as for the TensorRT W8A8 graphs, a value that the graph and the reference round
# to different sides of an int8 step changes that token's code, and the difference travels through the
# later layers; it grows with width and depth (on the tiny model it stays < 1e-6). Measured, quick plan
# (prefills of 5 and 64 positions): real width, 4 layers, fp32 reference: rel err 0.021 / 0.032, cosine
# >= 0.99958; the full 7B, bf16 reference: 0.062 / 0.071, cosine >= 0.99784. Every site of the prefill graph
# is checked on the graph's own input as well (SITE_TOLERANCE), which a wrong scale or code cannot pass.
# Bounds: ~3x the fp32-reference error; with a bf16 reference, PREFILL_BF16_REFERENCE_TOLERANCE (below).
PREFILL = "prefill"
PREFILL_PARITY_TOLERANCES = {f"{name} {PREFILL}": Tolerance(max_rel_err=0.1, min_cosine=0.998)
                             for name in ("int8", "int4")}
# Each MatMul site (and folded norm) on the graph's own input (export/validate/sites.py): accumulation order only.
SITE_TOLERANCE = Tolerance(max_rel_err=1e-4, min_cosine=0.99999)
# A float graph against a bf16 reference (a model too big for fp32 here): the oracle's own rounding dominates.
# bf16 keeps 8 mantissa bits to fp16's 11. Measured: real width, 2 layers, bf16 vs fp32 torch reference:
# rel err 0.006; the full 7B (32 layers): the fp32 AND the fp16 graph both sit 0.0173-0.0179 from the bf16
# reference after 5/64-position prefills (they agree with each other far more closely: the error is the
# oracle's), 0.022 after 2950 positions, cosine >= 0.99978 everywhere.
BF16_REFERENCE_TOLERANCE = Tolerance(max_rel_err=5e-2, min_cosine=0.999)
BF16_REFERENCE = "bf16_reference"


# A prefill graph against its emulated reference in bf16: the two errors do not add. The oracle's bf16
# rounding (8 mantissa bits) moves ITS per-token activation codes across int8 steps far more often than float32
# order moves the graph's, and those flips compound through the layers like the graph's own, so the distance
# grows with depth where a float graph's bf16 allowance (above) does not. Measured on the random 32-layer 7B
# (quick plan: prefills of 5 and 64 positions, 2 decode steps each; docs/performance.md): int8 rel err 0.072,
# cosine >= 0.99757; int4 0.079, >= 0.99716, where the sum of the two bounds (0.15 / 0.997) left 0.00016 to
# spare. Bound: ~2.5x the worst measured (rel err and 1 - cosine). It stays above the 0.99 below which the
# CPU fast paths judged under it are refused as wrong (export/build/native.py, segments.py); what it cannot
# see, a wrong scale or code at one site, the site checks (SITE_TOLERANCE) catch on the graph's own inputs.
PREFILL_BF16_REFERENCE_TOLERANCE = Tolerance(max_rel_err=0.2, min_cosine=0.993)


def _with_bf16_reference(tol: Tolerance) -> Tolerance:
    """A decode graph against an emulated reference whose float parts run in bf16: both errors at once. The 7B's
    int8 and int4 decode graphs measured 0.022 / 0.99977 at worst against the resulting 0.07 / 0.998
    (docs/performance.md): their per-block activation codes, unlike the prefill graph's per-token ones, did
    not compound measurably."""
    return Tolerance(max_rel_err=tol.max_rel_err + BF16_REFERENCE_TOLERANCE.max_rel_err,
                     min_cosine=tol.min_cosine - (1.0 - BF16_REFERENCE_TOLERANCE.min_cosine))


TOLERANCES = MappingProxyType({
    "fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE, BF16_REFERENCE: BF16_REFERENCE_TOLERANCE, **PARITY_TOLERANCES,
    FP16_KV: FP16_KV_TOLERANCE,
    **VISION_PARITY_TOLERANCES, **TRT_PARITY_TOLERANCES, "site": SITE_TOLERANCE,
    **PREFILL_PARITY_TOLERANCES,
    **{f"{name}+{BF16_REFERENCE}": _with_bf16_reference(tol) for name, tol in PARITY_TOLERANCES.items()},
    **{f"{name}+{BF16_REFERENCE}": PREFILL_BF16_REFERENCE_TOLERANCE for name in PREFILL_PARITY_TOLERANCES},
})


def tolerance_level(precision: str, *, fp32_reference: bool, graph: str = "decoder", fp16_cache: bool = False) -> str:
    """The TOLERANCES key a bundle's decoder checks run under: the precision's own with an fp32 reference.
    graph "prefill": a CPU recipe's prefill graph (PREFILL_PARITY_TOLERANCES). fp16_cache: an fp32 graph's fp16
    KV cache (FP16_KV; a quantized recipe's bounds are wider than its rounding)."""
    name = f"{precision} {PREFILL}" if graph == PREFILL else precision
    if fp32_reference:
        return FP16_KV if fp16_cache and precision == "fp32" else name
    return f"{name}+{BF16_REFERENCE}" if precision in PARITY_TOLERANCES else BF16_REFERENCE


# The fidelity each recipe should reach against fp32 on held-out samples for its answers to be trusted to
# follow the fp32 model's (AccuracyGate syntax, over the fidelity summary). Below them export warns on one
# line and keeps the bundle. Chosen, not measured on PULSE's trained weights (there are none here): int8
# and fp8 keep ~99.9% logit cosine on the real-width random model (docs/performance.md), int4's block
# rounding costs more (0.976 there), so its level is lower.
RECOMMENDED_FIDELITY = MappingProxyType({
    "int8": "cosine>=0.99,kl<=0.05,vision_cosine>=0.99",
    "int4": "cosine>=0.97,kl<=0.1,vision_cosine>=0.99",
    "fp8": "cosine>=0.99,kl<=0.05,vision_cosine>=0.99",
})
