"""The names a bundle's writer and reader share: files, graphs, and the graphs' tensors.

Export builds its graphs with these names and the runtime binds them; one spelling, so they cannot drift.
"""

from __future__ import annotations

FORMAT = "pulse-edge-bundle"
MANIFEST_VERSION = 3  # 2: a size and sha256 per file (`files`); 3: the manifest's own sha256 (SEAL_KEY)
MANIFEST_FILE = "manifest.json"
SEAL_KEY = "manifest_sha256"  # runtime/bundle/seal.py
TOKENIZER_FILE = "tokenizer.json"
EMBEDDING_FILE = "embed_tokens.npy"
NEWLINE_FILE = "image_newline.npy"  # spatial_unpad only: float32 [hidden]
SCALES_FILE = "calibration.npz"  # quantized bundles: the scales they were built from

# The graphs of a bundle, by role.
VISION = "vision"
DECODER = "decoder"
PREFILL = "prefill"  # optional: the decoder again, for long inputs (int8 activations; same interface and cache)

# Vision graph: tiles [K, 3, T, T] float32 -> features [K, P, H] float32.
PIXEL_VALUES = "pixel_values"
IMAGE_FEATURES = "image_features"

# Decoder graph: inputs_embeds [1, S, H] float32 at positions [L, L + S) -> logits [1, 1, V] of the last one.
INPUTS_EMBEDS = "inputs_embeds"
LOGITS = "logits"
# the Add that carries a non-finite position into an int8 cache's logits (export/graphs/decoder.py `_poisoned`):
# the logits' own value passes through it (input 0), as through a Cast
POISON_ADD = "poison/add"
# ORT's GroupQueryAttention: seqlens_k [1] = total length - 1, total_sequence_length [] = total length.
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
# TensorRT-ready decoders (standard ONNX): positions [1, S] int64, the cache index the new positions are written
# at [1] int64, and attention_mask [1, T] int64 whose shape gives the positions held after the step.
POSITION_IDS = "position_ids"
WRITE_INDEX = "write_index"
ATTENTION_MASK = "attention_mask"
KV_PARTS = ("key", "value")


def past_name(layer: int, part: str) -> str:
    return f"past_key_values.{layer}.{part}"


def present_name(layer: int, part: str) -> str:
    return f"present.{layer}.{part}"


def kv_names(layers: int, kind: str) -> list[str]:
    """Every layer's key and value tensor, in graph order; kind "past" (inputs) or "present" (outputs)."""
    name = {"past": past_name, "present": present_name}[kind]
    return [name(i, part) for i in range(layers) for part in KV_PARTS]


# A decoder graph (the prefill graph, the decode graph) cut at each layer's attention (export/graphs/segments.py),
# for the CPU attention kernels (runtime/kernels): segment i ends with layer i's query, segment i + 1 starts from
# its attention output. Files named after the graph's key: prefill.seg00.onnx, decoder.kv_scales.npy.
SEGMENT_FILE = "{graph}.seg{k:02d}.onnx"
SEGMENT_SCALES_FILE = "{graph}.kv_scales.npy"  # float32 [layers, 2 (key, value), kv_heads, head_dim]


# The decode graph's index for the native decode step (runtime/bundle/decode_index.py, runtime/engines/native.py).
DECODE_INDEX_FILE = "decoder.index.json"


def segment_file(graph: str, k: int) -> str:
    return SEGMENT_FILE.format(graph=graph, k=k)


def segment_scales_file(graph: str) -> str:
    return SEGMENT_SCALES_FILE.format(graph=graph)


def attention_query_name(layer: int) -> str:
    """Layer `layer`'s queries after the rotary embedding, [1, S, heads x head_dim] float32."""
    return f"layers.{layer}.attn.q"


def attention_output_name(layer: int) -> str:
    """Layer `layer`'s attention output, [1, S, heads x head_dim] float32 (before the output projection)."""
    return f"layers.{layer}.attn.out"
