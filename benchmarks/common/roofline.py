"""The memory-bandwidth bound on decode speed (docs/performance.md, bounds), and this machine's measured bandwidth.

One decode step reads every decoder weight once and the whole KV cache once:

    tokens/s <= bandwidth / (weight bytes + KV bytes per position x context)

KV bytes per position = 2 (key, value) x layers x kv_heads x head_dim x itemsize:
0.5 MiB for Vicuna-7B in fp16 (2 x 32 x 32 x 128 x 2 bytes).

The bandwidth is measured here, with numpy, in the same process that runs the
benchmark: a large-array read and a large-array copy, each split across the
cores in threads (numpy releases the GIL inside both), median of several runs.
The read is a max, not a sum: numpy's pairwise float sum is compute-bound near
28 GB/s per core on a modern CPU, below what memory delivers. A copy moves its
bytes twice (read + write) and is counted so, as STREAM counts it. The bound
uses the better of the two: a roofline must not sit below what the machine was
seen to do.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.runtime.engines.sessions import usable_cpus

GB = 1e9  # bandwidths in decimal GB/s, as vendors quote them
GIB = 2**30

# Vicuna-7B (PULSE-7B's decoder): docs/architecture.md (the model) and docs/performance.md (bounds). A decode step
# reads one row of the 131 M-parameter token table, so the bytes it reads are the decoder's other parameters:
# 32 layers x (4 x 4096^2 + 3 x 4096 x 11008 + 2 x 4096) + the 4096 x 32000 output head + the final norm.
VICUNA_PARAMS = 6.74e9
VICUNA_DECODER_PARAMS = 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 4096 * 32000 + 4096
VICUNA_KV = {"layers": 32, "kv_heads": 32, "head_dim": 128}
# Bytes a decode step reads per precision: fp from the parameter count; int8/int4 the decode graphs of the 7B
# bundles measured in docs/performance.md (6.8 and 3.5 GB: their scales and the parts left unquantized included).
VICUNA_WEIGHT_BYTES = {"fp32": VICUNA_DECODER_PARAMS * 4, "fp16": VICUNA_DECODER_PARAMS * 2, "int8": 6.8e9,
                       "int4": 3.5e9}
# The KV cache's item size each precision's CPU bundle writes (calibration/recipes.py: the quantized recipes store
# int8 with per-channel scales, a float bundle its graphs' type).
VICUNA_KV_ITEMSIZE = {"fp32": 4, "fp16": 2, "int8": 1, "int4": 1}

def kv_bytes_per_position(layers: int, kv_heads: int, head_dim: int, itemsize: float) -> float:
    """Bytes of key + value cache one position holds (and one decode step reads per position of context)."""
    return 2 * layers * kv_heads * head_dim * itemsize


def bytes_per_token(weight_bytes: float, kv_per_position: float, context: int) -> float:
    """Bytes one decode step reads at `context` positions: all weights, and the KV of every position."""
    return weight_bytes + kv_per_position * context


def roofline_tokens_per_s(bandwidth_bytes_s: float, weight_bytes: float, kv_per_position: float,
                          context: int) -> float:
    """The memory-bound ceiling on decode tokens/s."""
    return bandwidth_bytes_s / bytes_per_token(weight_bytes, kv_per_position, context)


def achieved_bandwidth(tokens_per_s: float, bytes_read_per_token: float) -> float:
    """Bytes/s a backend must have read to decode at `tokens_per_s` (gpt-fast's 'achieved bandwidth')."""
    return tokens_per_s * bytes_read_per_token


def vicuna_rooflines(bandwidth_bytes_s: float, context: int) -> dict[str, float]:
    """The full PULSE-7B decoder's ceiling at this bandwidth, per precision, with the KV cache its CPU bundle
    stores (VICUNA_KV_ITEMSIZE) read at `context` positions."""
    return {p: roofline_tokens_per_s(bandwidth_bytes_s, w, kv_bytes_per_position(**VICUNA_KV,
                                                                                 itemsize=VICUNA_KV_ITEMSIZE[p]),
                                     context) for p, w in VICUNA_WEIGHT_BYTES.items()}


@dataclass(frozen=True)
class Bandwidth:
    """Measured memory bandwidth in bytes/s; `best` is what the roofline uses. copy None: read only probed."""

    read: float
    copy: float | None
    array_bytes: int
    repeats: int
    threads: int

    @property
    def best(self) -> float:
        return max(self.read, self.copy or 0.0)

    def to_dict(self) -> dict[str, Any]:
        method = "numpy max (read)" + ("" if self.copy is None else " and copyto (read + write, counted twice)")
        return {**asdict(self), "read_gb_s": self.read / GB, "copy_gb_s": None if self.copy is None else self.copy / GB,
                "best_gb_s": self.best / GB, "method": f"{method}, split over threads, median of repeats"}


def call_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """`warmup` untimed calls, then the seconds of each of `repeats` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    # one warm-up: it faults the pages in, so the timed runs see memory, not the page allocator
    return statistics.median(call_seconds(fn, repeats))


def measure_bandwidth(array_bytes: int = GIB, repeats: int = 5, threads: int | None = None,
                      copy: bool = True) -> Bandwidth:
    """Read and copy bandwidth of main memory: `array_bytes` must be far larger than the caches. copy=False: the
    read only, with one array instead of two (a probe beside a loaded model adds half the memory)."""
    threads = threads or usable_cpus()  # the cores this process may run on, as the runtime's sessions count them
    src = np.ones(max(array_bytes // 4, threads), dtype=np.float32)
    src_parts = np.array_split(src, threads)
    with ThreadPoolExecutor(threads) as pool:
        read_s = _median_seconds(lambda: list(pool.map(np.max, src_parts)), repeats)
        copied = None
        if copy:
            dst = np.empty_like(src)
            dst_parts = np.array_split(dst, threads)
            copied = 2 * src.nbytes / _median_seconds(lambda: list(pool.map(np.copyto, dst_parts, src_parts)), repeats)
    return Bandwidth(read=src.nbytes / read_s, copy=copied, array_bytes=src.nbytes, repeats=repeats, threads=threads)


# ---------------------------------------------------------------- what one decode step reads

@dataclass(frozen=True)
class DecoderFacts:
    """Bytes one decode step must read: every decoder weight (the embedding table only by one row,
    so it is left out), and the KV cache of every position of context."""

    weight_bytes: int
    kv_bytes_per_position: float
    layers: int
    kv_heads: int
    head_dim: int
    kv_itemsize: int
    hidden_size: int
    source: str

    def bytes_per_token(self, context: int) -> float:
        return bytes_per_token(self.weight_bytes, self.kv_bytes_per_position, context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KV_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def bundle_decoder_facts(bundle: Path) -> DecoderFacts:
    """From the manifest: the decoder graph's files (its initializers live in the external data)."""
    from pulse_edge.runtime.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    kv = manifest.kv
    sizes = manifest.graphs["decoder"].sizes
    return DecoderFacts(weight_bytes=int(sum(sizes.values())),
                        kv_bytes_per_position=kv_bytes_per_position(kv.layers, kv.kv_heads, kv.head_dim,
                                                                    KV_ITEMSIZE[kv.dtype]),
                        layers=kv.layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                        kv_itemsize=KV_ITEMSIZE[kv.dtype], hidden_size=manifest.text.hidden_size,
                        source=f"bundle manifest: {', '.join(sizes)} ({manifest.precision})")


def torch_decoder_facts(lm: Any) -> DecoderFacts:
    """From the loaded language model: its parameters (bar the embedding table) x their dtype size."""
    cfg = lm.config
    params = [p for name, p in lm.named_parameters() if "embed_tokens" not in name]
    itemsize = params[0].element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderFacts(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                        kv_bytes_per_position=kv_bytes_per_position(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                                    head_dim, itemsize),
                        layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                        kv_itemsize=itemsize, hidden_size=cfg.hidden_size,
                        source=f"checkpoint: language-model parameters x {itemsize} bytes")


def decode_entry(facts: DecoderFacts, context: float, tokens_per_s: float | None) -> dict[str, Any]:
    """What one decode step reads at `context` positions, and the bytes/s a rate of `tokens_per_s` needed."""
    per_token = facts.bytes_per_token(round(context))
    achieved = achieved_bandwidth(tokens_per_s, per_token) if tokens_per_s else None
    return {"context": context, "bytes_per_token": per_token,
            "achieved_gb_s": achieved / GB if achieved is not None else None}


def roofline_entry(facts: DecoderFacts, bandwidth: Bandwidth, context: float, tokens_per_s: float | None,
                   ) -> dict[str, Any]:
    """The bound at one context length, and what a step reads and was achieved (the fraction of a bound is each
    benchmark's own: per run against its neighbouring probes, common/rounds.py)."""
    bound = roofline_tokens_per_s(bandwidth.best, facts.weight_bytes, facts.kv_bytes_per_position, round(context))
    return {**decode_entry(facts, context, tokens_per_s), "roofline_tokens_per_s": bound}
