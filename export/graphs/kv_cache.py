"""The decoder graphs' smaller KV caches (int8, and fp16 in a float32 graph): how each graph attends over them.

ONNX Runtime's GroupQueryAttention (CPU EP, ORT >= 1.23) keeps an int8 cache itself: given
per-(kv head, channel) scales (PER_CHANNEL) it quantizes the new keys and values into the
shared buffer and reads the cache back through the scales. Measured with ORT 1.32 on a
2-core Sapphire Rapids VM (real width, one layer, 3000 positions of context; the two runs
interleaved): a decode step's attention took 0.55x the time of the float32 cache's, but a
2950-position prompt in chunks of 512 took 3.1x as long (its quantized path is built for
one position a step). So the two graphs attend differently over the same int8 buffer:

  decode graph (one position a step):
      qkv ─ GroupQueryAttention(past = present = the int8 buffer, k_scale, v_scale) ─ out

  prefill graph (long inputs; `attention_over_int8_cache`):
      int8 buffer ─ Slice [0, P) ─ Cast ─ x k_scale ─┐                 P = total - S positions cached before
      qkv ─────────────────────────────────── GroupQueryAttention (float32, past [1, N, P, D]) ─ out
                                                     └ present [1, N, P + S, D] ─ Slice [P, P + S)
                                                         ─ / k_scale ─ Round ─ Clip ±127 ─ Cast int8
      int8 buffer ─ TensorScatter(at P, along the positions) ─ the int8 buffer (bound as output too)

The prefill graph dequantizes only the positions already cached (not the buffer's full length)
and quantizes only the new ones; attention itself runs ORT's float32 prompt kernel. TensorScatter
needs opset 24.

An fp16 cache in a float32 graph (`attention_over_fp16_cache`) needs no scales: ORT's CPU
GroupQueryAttention runs on float16 inputs, so the graph casts qkv down and the output up,
and stores its rotary tables in fp16 (instead of float32):

      qkv (float32) ─ Cast fp16 ─ GroupQueryAttention(past = present = the fp16 buffer, cos16, sin16)
                                   ─ out (fp16) ─ Cast float32 ─ out

Measured with ORT 1.32 on a 2-core Sapphire Rapids VM (real width, one layer, 3000 positions of
context): a decode step's attention took 11.5-12.9 ms against 16.0 ms over a float32 cache, and a
512-position chunk over 2512 cached positions ran at the float32 cache's speed; the cache is half
the bytes. What the rounding costs is measured at export (fidelity against fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from onnx import TensorProto

from pulse_edge.runtime.bundle import names

# GroupQueryAttention's quantized cache: int8, one scale per (kv head, channel).
INT8_KV_ATTRS = {"k_quant_type": "PER_CHANNEL", "v_quant_type": "PER_CHANNEL", "kv_cache_bit_width": 8}
SCATTER_OPSET = 24  # TensorScatter
INT8_LIMIT = 127.0
ROTARY_FP16 = ("rotary.cos16", "rotary.sin16")


@dataclass(frozen=True)
class KVScales:
    """An int8 KV cache: per layer, static scales [kv_heads, head_dim] for the keys (as cached: after the
    rotary embedding) and the values (calibration/kv.py says where they come from). `float_attention`:
    attend in float32 over the dequantized cache (the prefill graph; see the module doc)."""

    key: tuple[np.ndarray, ...]
    value: tuple[np.ndarray, ...]
    float_attention: bool = False

    def check(self, layers: int, kv_heads: int, head_dim: int) -> None:
        if len(self.key) != layers or len(self.value) != layers:
            raise ValueError(f"KV scales for {len(self.key)} layers, the decoder has {layers}")
        bad = [s.shape for s in (*self.key, *self.value)
               if s.shape != (kv_heads, head_dim) or not np.all(np.asarray(s) > 0)]
        if bad:
            raise ValueError(f"KV scales must be positive [{kv_heads}, {head_dim}] arrays, got {bad[0]}")


class GraphBuilder(Protocol):
    """What the decoder builder offers the emitters here (export/graphs/decoder.py's _Builder)."""

    def weight(self, name: str, tensor: Any) -> str: ...

    def const(self, name: str, array: np.ndarray) -> str: ...

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> list[str]: ...

    def raw(self, name: str, array: np.ndarray) -> str: ...


def scale_inputs(b: GraphBuilder, kv: KVScales, i: int) -> tuple[str, str]:
    """Layer i's k_scale and v_scale initializers, [1, kv_heads, 1, head_dim] (GroupQueryAttention's shape)."""
    def put(part: str, scale: np.ndarray) -> str:
        heads, dim = scale.shape
        return b.weight(f"layers.{i}.attn.{part}_scale", np.asarray(scale, np.float32).reshape(1, heads, 1, dim))
    return put("k", kv.key[i]), put("v", kv.value[i])


def cache_positions(b: GraphBuilder) -> tuple[str, str]:
    """P (positions cached before this input) and T (after it) as int64 [1], once per graph."""
    (seq,) = b.node("Shape", [names.INPUTS_EMBEDS], ["kv.s"], "kv/s", start=1, end=2)
    (flat,) = b.node("Reshape", [names.TOTAL_SEQUENCE_LENGTH, b.const("kv.one_dim", np.array([1], np.int64))],
                     ["kv.total32"], "kv/total_flat")
    (total,) = b.node("Cast", [flat], ["kv.total"], "kv/total", to=TensorProto.INT64)
    (past,) = b.node("Sub", [total, seq], ["kv.past_len"], "kv/past_len")
    return past, total


def attention_over_int8_cache(b: GraphBuilder, kv: KVScales, i: int, qkv: str, positions: tuple[str, str],
                              gqa: dict[str, Any]) -> str:
    """The prefill graph's attention of layer i (module doc); returns the attention output's name."""
    past_len, _total = positions
    p = f"layers.{i}.attn"
    zero, axis = b.const("kv.zero", np.array([0], np.int64)), b.const("kv.seq_axis", np.array([2], np.int64))
    k_scale, v_scale = scale_inputs(b, kv, i)
    floats = {}
    for part, scale in (("key", k_scale), ("value", v_scale)):
        (cached,) = b.node("Slice", [names.past_name(i, part), zero, past_len, axis], [f"{p}.{part}_q"],
                           f"{p}/{part}_cached")
        (as_float,) = b.node("Cast", [cached], [f"{p}.{part}_qf"], f"{p}/{part}_to_float", to=TensorProto.FLOAT)
        floats[part] = b.node("Mul", [as_float, scale], [f"{p}.{part}_past"], f"{p}/{part}_dequantize")[0]
    out, present_k, present_v = b.node(
        "GroupQueryAttention", [qkv, "", "", floats["key"], floats["value"], names.SEQLENS_K,
                                names.TOTAL_SEQUENCE_LENGTH, "rotary.cos", "rotary.sin"],
        [f"{p}.out", f"{p}.key_all", f"{p}.value_all"], f"{p}/gqa", **gqa)
    for part, present, scale in (("key", present_k, k_scale), ("value", present_v, v_scale)):
        _store_new(b, part, i, present, scale, past_len)
    return out


def _store_new(b: GraphBuilder, part: str, i: int, present: str, scale: str, past_len: str) -> None:
    """present[:, :, P:] quantized to int8 and written into the cache buffer at position P."""
    p = f"layers.{i}.attn"
    end = b.const("kv.to_end", np.array([np.iinfo(np.int64).max], np.int64))
    axis = b.const("kv.seq_axis", np.array([2], np.int64))
    (new,) = b.node("Slice", [present, past_len, end, axis], [f"{p}.{part}_new"], f"{p}/{part}_new")
    store_int8(b, part, i, new, scale, past_len)


def store_int8(b: GraphBuilder, part: str, i: int, new: str, scale: str, past_len: str) -> None:
    """new [1, KVN, S, D] float quantized (round, clip to +-127) into layer i's cache buffer at position P: the
    rule the CPU attention kernels read the cache by (export/graphs/segments.py writes it into the cut decode
    graph too)."""
    p = f"layers.{i}.attn"
    (grid,) = b.node("Div", [new, scale], [f"{p}.{part}_grid"], f"{p}/{part}_to_grid")
    (rounded,) = b.node("Round", [grid], [f"{p}.{part}_round"], f"{p}/{part}_round")
    low, high = b.const("kv.low", np.array(-INT8_LIMIT, np.float32)), b.const("kv.high", np.array(INT8_LIMIT,
                                                                                                  np.float32))
    (clipped,) = b.node("Clip", [rounded, low, high], [f"{p}.{part}_clip"], f"{p}/{part}_clip")
    (q,) = b.node("Cast", [clipped], [f"{p}.{part}_int8"], f"{p}/{part}_to_int8", to=TensorProto.INT8)
    b.node("TensorScatter", [names.past_name(i, part), q, past_len], [names.present_name(i, part)],
           f"{p}/{part}_store", axis=2)


def fp16_rotary_tables(b: GraphBuilder, cos: np.ndarray, sin: np.ndarray) -> None:
    """The rotary tables [max_length, D/2] in fp16, for GroupQueryAttention over an fp16 cache."""
    for name, table in zip(ROTARY_FP16, (cos, sin), strict=True):
        b.raw(name, np.asarray(table, np.float16))


def attention_over_fp16_cache(b: GraphBuilder, i: int, qkv: str, gqa: dict[str, Any]) -> str:
    """Layer i's attention over an fp16 cache in a float32 graph (module doc); returns the output's name."""
    p = f"layers.{i}.attn"
    (half,) = b.node("Cast", [qkv], [f"{p}.qkv16"], f"{p}/qkv_to_fp16", to=TensorProto.FLOAT16)
    (out16, _, _) = b.node(
        "GroupQueryAttention", [half, "", "", names.past_name(i, "key"), names.past_name(i, "value"), names.SEQLENS_K,
                                names.TOTAL_SEQUENCE_LENGTH, *ROTARY_FP16],
        [f"{p}.out16", names.present_name(i, "key"), names.present_name(i, "value")], f"{p}/gqa", **gqa)
    return b.node("Cast", [out16], [f"{p}.out"], f"{p}/out_to_float", to=TensorProto.FLOAT)[0]
