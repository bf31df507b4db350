"""`manifest.json`: the whole contract between `pulse-edge export` and the runtime.

The runtime reads nothing else from a bundle's producer (never an HF config):
graphs and their tensors, the KV layout, the embedding table, image
preprocessing, the prompt template and special ids, the tokenizer file, and
the calibration and validation results. Every field is checked on load; a
value outside the allowed set names the allowed ones.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pulse_edge.errors import InputError
from pulse_edge.runtime.preprocess import ImageLayout
from pulse_edge.runtime.prompt import PromptTemplate

FORMAT = "pulse-edge-bundle"
MANIFEST_VERSION = 1
MANIFEST_FILE = "manifest.json"
ENGINES = ("onnx", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4", "fp8")
DTYPES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "int8")


class BundleError(InputError):
    """A bundle that cannot be served: wrong version, missing or truncated files, bad fields."""


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise BundleError(f"manifest: {what} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _need(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise BundleError(f"manifest: {what} lacks {key!r}")
    return d[key]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(_need(d, "name", "a tensor")), dtype=_choice(d.get("dtype"), DTYPES, "tensor dtype"),
                   shape=tuple(_need(d, "shape", "a tensor")))


@dataclass(frozen=True)
class GraphSpec:
    """One engine file; `sizes` holds the byte size of it and its external data, to catch truncation."""

    file: str
    engine: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphSpec:
        return cls(
            file=str(_need(d, "file", "a graph")), engine=_choice(d.get("engine"), ENGINES, "graph engine"),
            precision=_choice(d.get("precision"), PRECISIONS, "graph precision"),
            inputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "inputs", "a graph")),
            outputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "outputs", "a graph")),
            sizes=dict(d.get("sizes", {})), extra=dict(d.get("extra", {})),
        )


@dataclass(frozen=True)
class KVLayout:
    """The decoder's cache: one key and one value buffer per layer, [1, kv_heads, max_length, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_length: int
    layout: str = "BNSH"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVLayout:
        return cls(layers=int(_need(d, "layers", "kv")), kv_heads=int(_need(d, "kv_heads", "kv")),
                   head_dim=int(_need(d, "head_dim", "kv")), dtype=_choice(d.get("dtype"), DTYPES, "kv dtype"),
                   max_length=int(_need(d, "max_length", "kv")), layout=_choice(d.get("layout", "BNSH"), ("BNSH",),
                                                                                "kv layout"))

    @property
    def bytes_per_token(self) -> int:
        itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}[self.dtype]
        return 2 * self.layers * self.kv_heads * self.head_dim * itemsize


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    vocab_size: int
    bos_id: int
    eos_id: int
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextSpec:
        return cls(**{k: int(_need(d, k, "text")) for k in
                      ("hidden_size", "vocab_size", "bos_id", "eos_id", "max_position_embeddings")})


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding table as a .npy file (memory-mapped by the runtime)."""

    file: str
    dtype: str
    shape: tuple[int, int]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingSpec:
        rows, cols = _need(d, "shape", "embedding")
        return cls(file=str(_need(d, "file", "embedding")), dtype=_choice(d.get("dtype"), DTYPES, "embedding dtype"),
                   shape=(int(rows), int(cols)))


@dataclass(frozen=True)
class Manifest:
    version: int
    precision: str
    graphs: Mapping[str, GraphSpec]
    kv: KVLayout
    text: TextSpec
    embedding: EmbeddingSpec
    image: ImageLayout
    prompt: PromptTemplate
    tokenizer: str
    source: Mapping[str, Any]
    created_by: str
    validation: Mapping[str, Any] = field(default_factory=dict)
    calibration: Mapping[str, Any] | None = None
    image_newline: str | None = None  # spatial_unpad only: a .npy file, float32 [hidden_size]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        if d.get("format") != FORMAT:
            raise BundleError(f"manifest: format is {d.get('format')!r}, not {FORMAT!r}: not a pulse-edge bundle")
        version = d.get("version")
        if version != MANIFEST_VERSION:
            raise BundleError(f"bundle manifest version {version!r} is not supported by this pulse-edge (reads "
                              f"version {MANIFEST_VERSION}); re-export the bundle with this version")
        graphs = _need(d, "graphs", "the manifest")
        image = ImageLayout.from_dict(_need(d, "image", "the manifest"))
        return cls(
            version=MANIFEST_VERSION, precision=_choice(d.get("precision"), PRECISIONS, "precision"),
            graphs={k: GraphSpec.from_dict(v) for k, v in graphs.items()},
            kv=KVLayout.from_dict(_need(d, "kv", "the manifest")),
            text=TextSpec.from_dict(_need(d, "text", "the manifest")),
            embedding=EmbeddingSpec.from_dict(_need(d, "embedding", "the manifest")),
            image=image,
            prompt=PromptTemplate.from_dict(_need(d, "prompt", "the manifest")),
            tokenizer=str(_need(d, "tokenizer", "the manifest")), source=dict(d.get("source", {})),
            created_by=str(d.get("created_by", "")), validation=dict(d.get("validation", {})),
            calibration=d.get("calibration"), image_newline=_image_newline(d.get("image_newline"), image),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image"] = self.image.to_dict()
        d["prompt"] = self.prompt.to_dict()
        if self.image_newline is None:
            del d["image_newline"]  # a flat bundle's manifest stays as it was before the field existed
        return {"format": FORMAT, **d}


def _image_newline(name: Any, image: ImageLayout) -> str | None:
    """The newline file: required by spatial_unpad (it ends every feature row), meaningless for flat."""
    if image.merge == "spatial_unpad" and not name:
        raise BundleError("manifest: the spatial_unpad merge needs 'image_newline' (the .npy file of the vector "
                          "that ends each feature row); re-export the bundle")
    if image.merge != "spatial_unpad" and name is not None:
        raise BundleError(f"manifest: 'image_newline' belongs to the spatial_unpad merge, not {image.merge!r}")
    return None if name is None else str(name)


def read_manifest(bundle: Path) -> Manifest:
    """Load and check a bundle's manifest, and that every file it names is there, whole."""
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{bundle} is not a pulse-edge bundle: it has no {MANIFEST_FILE}")
    try:
        manifest = Manifest.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path} cannot be read as JSON ({e}); re-export the bundle") from e
    except (TypeError, ValueError) as e:
        raise BundleError(f"{path} has a malformed field ({e}); re-export the bundle") from e
    check_files(bundle, manifest)
    return manifest


def check_files(bundle: Path, manifest: Manifest) -> None:
    named = [manifest.tokenizer, manifest.embedding.file, *([manifest.image_newline] if manifest.image_newline else [])]
    for graph in manifest.graphs.values():
        named.append(graph.file)
        for name, size in graph.sizes.items():
            _check_size(bundle / name, size)
    for name in named:
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle}: {name} named in {MANIFEST_FILE} is missing; re-export the bundle")


def _check_size(path: Path, size: int) -> None:
    if not path.is_file():
        raise BundleError(f"{path.parent}: {path.name} named in {MANIFEST_FILE} is missing; re-export the bundle")
    actual = path.stat().st_size
    if actual != size:
        raise BundleError(f"{path} is {actual} bytes but the manifest says {size}: the file is truncated or "
                          "was changed; re-export or re-copy the bundle")
