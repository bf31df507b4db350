"""The names a bundle's writer and reader share: files, graphs, and the graphs' tensors.

Export builds its graphs with these names and the runtime binds them; one spelling, so they cannot drift.
"""

from __future__ import annotations

FORMAT = "pulse-edge-bundle"
MANIFEST_VERSION = 2  # 2: a size and sha256 per file (`files`)
MANIFEST_FILE = "manifest.json"
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
