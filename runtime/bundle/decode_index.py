"""The decode index: where a decode step's weights lie in the decode graph's data file, for the runtime's own
decode step (runtime/engines/native.py), which reads them in place without ONNX or ONNX Runtime.

Export writes it beside a decode graph it has checked node by node (export/graphs/decode_index.py); the manifest
names it (`graphs.decoder.native_index`) and records its size and checksum like any file. Both sides use this
module, so the format cannot drift:

    {"format": "pulse-edge-decode-index", "version": 1, "data": "decoder.onnx.data",
     "hidden": 4096, "heads": 32, "kv_heads": 32, "head_dim": 128, "intermediate": 11008, "vocab": 32000,
     "eps": 1e-05, "store": "round-clip-127",
     "rotary": {"cos": T, "sin": T},
     "layers": [{"input_norm": T, "qkv": LIN, "k_scale": T, "v_scale": T, "o": LIN, "post_norm": T,
                 "gate_up": LIN, "down": LIN}, ...],
     "final_norm": T, "lm_head": LIN}

    T    {"name": "layers.0.qkv.qweight", "dtype": "uint8", "shape": [12288, 32, 64], "offset": 4096}
    LIN  {"bits": 4 | 8, "block": 128, "k": 4096, "n": 12288, "codes": T, "scales": T}   (MatMulNBits)
         {"bits": 0, "k": 4096, "n": 32000, "weight": T}                                 (a float32 MatMul)

The function each layer computes is the decode graph's (export/graphs/decoder.py): RMSNorm (with the residual
add), the fused qkv projection, rotary embedding (halves, not interleaved) at each input's position, the keys and
values quantized into the int8 cache (`store`: round half to even, clip to +-127, as the attention kernels read
it), attention over the cache, the output projection, RMSNorm, SwiGLU through the fused gate/up projection, down.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match

from pulse_edge.errors import BundleError

FORMAT = "pulse-edge-decode-index"
VERSION = 1
STORE_RULE = "round-clip-127"
DTYPES = ("float32", "uint8")
LAYER_TENSORS = ("input_norm", "k_scale", "v_scale", "post_norm")
LAYER_LINEARS = ("qkv", "o", "gate_up", "down")

_TENSOR = {"type": "object", "required": ["name", "dtype", "shape", "offset"], "properties": {
    "name": {"type": "string"}, "dtype": {"enum": list(DTYPES)},
    "shape": {"type": "array", "items": {"type": "integer", "minimum": 1}, "maxItems": 4},
    "offset": {"type": "integer", "minimum": 0}}}
_LINEAR = {"type": "object", "required": ["bits", "k", "n"], "properties": {
    "bits": {"enum": [0, 4, 8]}, "block": {"type": "integer", "minimum": 1}, "k": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "minimum": 1}, "codes": _TENSOR, "scales": _TENSOR, "weight": _TENSOR},
    # a MatMulNBits holds its block, codes and scales; a float MatMul its weight
    "if": {"properties": {"bits": {"const": 0}}},
    "then": {"required": ["weight"]}, "else": {"required": ["block", "codes", "scales"]}}
_POSITIVE = {"type": "integer", "minimum": 1}
SCHEMA = {
    "type": "object",
    "required": ["format", "version", "data", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab", "eps",
                 "store", "rotary", "layers", "final_norm", "lm_head"],
    "properties": {
        "format": {"const": FORMAT}, "version": {"const": VERSION}, "data": {"type": "string"},
        **{key: _POSITIVE for key in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")},
        "eps": {"type": "number", "exclusiveMinimum": 0}, "store": {"const": STORE_RULE},
        "rotary": {"type": "object", "required": ["cos", "sin"], "properties": {"cos": _TENSOR, "sin": _TENSOR}},
        "layers": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": [*LAYER_TENSORS, *LAYER_LINEARS],
            "properties": {**{k: _TENSOR for k in LAYER_TENSORS}, **{k: _LINEAR for k in LAYER_LINEARS}}}},
        "final_norm": _TENSOR, "lm_head": _LINEAR,
    },
}


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Tensor:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["offset"]))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "offset": self.offset}


@dataclass(frozen=True)
class Linear:
    """A MatMulNBits (bits 4 or 8: codes [N, blocks, block * bits / 8] and scales [N * blocks]) or a float32
    MatMul (bits 0: weight [K, N])."""

    bits: int
    k: int
    n: int
    block: int = 0
    codes: Tensor | None = None
    scales: Tensor | None = None
    weight: Tensor | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Linear:
        part = {key: Tensor.from_dict(d[key]) for key in ("codes", "scales", "weight") if key in d}
        return cls(int(d["bits"]), int(d["k"]), int(d["n"]), int(d.get("block", 0)), **part)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"bits": self.bits, "k": self.k, "n": self.n}
        if self.bits:
            d["block"] = self.block
        for key in ("codes", "scales", "weight"):
            tensor = getattr(self, key)
            if tensor is not None:
                d[key] = tensor.to_dict()
        return d

    def tensors(self) -> list[Tensor]:
        return [t for t in (self.codes, self.scales, self.weight) if t is not None]


@dataclass(frozen=True)
class Layer:
    input_norm: Tensor
    qkv: Linear
    k_scale: Tensor
    v_scale: Tensor
    o: Linear
    post_norm: Tensor
    gate_up: Linear
    down: Linear

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layer:
        return cls(**{k: Tensor.from_dict(d[k]) for k in LAYER_TENSORS},
                   **{k: Linear.from_dict(d[k]) for k in LAYER_LINEARS})

    def to_dict(self) -> dict[str, Any]:
        return {**{k: getattr(self, k).to_dict() for k in LAYER_TENSORS},
                **{k: getattr(self, k).to_dict() for k in LAYER_LINEARS}}


@dataclass(frozen=True)
class DecodeIndex:
    data: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rotary: tuple[Tensor, Tensor]
    layers: tuple[Layer, ...]
    final_norm: Tensor
    lm_head: Linear

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DecodeIndex:
        return cls(data=str(d["data"]), **{k: int(d[k]) for k in ("hidden", "heads", "kv_heads", "head_dim",
                                                                   "intermediate", "vocab")},
                   eps=float(d["eps"]), rotary=(Tensor.from_dict(d["rotary"]["cos"]),
                                                Tensor.from_dict(d["rotary"]["sin"])),
                   layers=tuple(Layer.from_dict(x) for x in d["layers"]), final_norm=Tensor.from_dict(d["final_norm"]),
                   lm_head=Linear.from_dict(d["lm_head"]))

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "data": self.data, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "intermediate": self.intermediate,
                "vocab": self.vocab, "eps": self.eps, "store": STORE_RULE,
                "rotary": {"cos": self.rotary[0].to_dict(), "sin": self.rotary[1].to_dict()},
                "layers": [layer.to_dict() for layer in self.layers], "final_norm": self.final_norm.to_dict(),
                "lm_head": self.lm_head.to_dict()}

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def tensors(self) -> list[Tensor]:
        found = [*self.rotary, self.final_norm, *self.lm_head.tensors()]
        for layer in self.layers:
            found += [getattr(layer, k) for k in LAYER_TENSORS]
            found += [t for k in LAYER_LINEARS for t in getattr(layer, k).tensors()]
        return found


def read_index(path: Path) -> DecodeIndex:
    """The index at `path`, its JSON shape checked; a damaged one is one BundleError line."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} cannot be read ({e}); re-export the bundle") from e
    error = best_match(Draft202012Validator(SCHEMA).iter_errors(d))
    if error is not None:
        where = ".".join(str(p) for p in error.absolute_path) or "the top level"
        raise BundleError(f"{path}: {where}: {error.message}; re-export the bundle")
    return DecodeIndex.from_dict(d)
