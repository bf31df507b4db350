"""`manifest.json`: the whole contract between `pulse-edge export` and the runtime.

The runtime reads nothing else from a bundle's producer (never an HF config): graphs and their tensors, the
KV layout, the embedding table, image preprocessing, the prompt template and special ids, the tokenizer
file, the source checkpoint, and the calibration and validation records. Export constructs these dataclasses
and writes `Manifest.to_dict()`; the runtime reads `Manifest.from_dict()`, which checks every field (a value
outside the allowed set names the allowed ones). The `validation` record and calibration's `recipe`,
`samples` and `fidelity` are reports for people and tools; the runtime decides one thing from them: the native
decode step is taken by default only where `validation.decoder.native_decode.pass` is true
(`native_validated`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pulse_edge.choices import EXPORT_TARGETS, GRAPH_PRECISIONS, KV_UPDATES, OPT_LEVELS, TENSOR_DTYPES, TRT_OPS
from pulse_edge.errors import BundleError, ConfigError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.runtime.bundle.checks import check_consistency, check_file_size
from pulse_edge.runtime.bundle.names import FORMAT, MANIFEST_FILE
from pulse_edge.runtime.bundle.schema import check_manifest_json
from pulse_edge.runtime.bundle.seal import SEALED_FROM_VERSION, seal
from pulse_edge.runtime.image.preprocess import ImageLayout
from pulse_edge.runtime.text.prompt import PromptTemplate

# What a bundle's graphs are: ONNX, whatever runs them (TensorRT engines are built from them into an engine set of
# their own, runtime/bundle/engines.py). "tensorrt" was allowed and never written: such a graph skipped the IO
# checks, then ONNX Runtime opened it.
ENGINES = ("onnx",)
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}
# Version-1 manifests written before the graph fields were typed kept them in an "extra" object.
_LEGACY_GRAPH_KEYS = {"ort_opt_level": "opt_level_limit"}


def _choice(value: Any, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise BundleError(f"manifest: {what} {value!r} is not one of {', '.join(allowed)}: the manifest was edited "
                          "or written by another tool; re-export the bundle")
    return str(value)


def _need(d: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in d:
        raise BundleError(f"manifest: {what} lacks {key!r}")
    return d[key]


def _optional_choice(value: Any, allowed: tuple[str, ...], what: str) -> str | None:
    return None if value is None else _choice(value, allowed, what)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(name=str(_need(d, "name", "a tensor")), dtype=_choice(d.get("dtype"), TENSOR_DTYPES, "tensor dtype"),
                   shape=tuple(_need(d, "shape", "a tensor")))


@dataclass(frozen=True)
class SegmentSpec:
    """One piece of a prefill graph cut at every layer's attention (export/graphs/segments.py): a graph file
    and the names of its inputs and outputs, in order. Segment i ends with layer i's query and starts from
    layer i - 1's attention output (runtime/bundle/names.py), which the CPU attention kernel computes."""

    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SegmentSpec:
        return cls(file=str(_need(d, "file", "a segment")), inputs=tuple(map(str, _need(d, "inputs", "a segment"))),
                   outputs=tuple(map(str, _need(d, "outputs", "a segment"))))


@dataclass(frozen=True)
class GraphSpec:
    """One graph file. `sizes` holds the byte size of it and its external data, to catch truncation;
    `opt_level_limit` caps ONNX Runtime's optimisation level (ORT's level-"all" int8 fusions reject fp8
    Q/DQ graphs); `fusions` counts ORT contrib ops fused in; `matmul_schemes` counts quantized MatMuls.

    `target` is the runtime the graph was written for: "ort" (may hold ORT's contrib ops) or "tensorrt"
    (standard ONNX only, which ORT runs too). A decoder's `kv_update` says how it takes positions and writes
    its cache ("gqa": GroupQueryAttention at seqlens_k; "scatter": position_ids, write_index and
    attention_mask); `trt_ops` the form of a TensorRT-ready decoder ("native" opset-24 ops or "explicit"
    opset-18..21 ones). `ort_qdq_matmulnbits_accuracy_level`, when set, is the session config entry
    `session.qdq_matmulnbits_accuracy_level` ORT must be opened with (its DequantizeLinear + MatMul fusion
    otherwise quantizes the activations to int8, and is wrong at level "extended" in fp16)."""

    file: str
    engine: str
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    sizes: Mapping[str, int] = field(default_factory=dict)
    external_data: str | None = None
    opset: int | None = None
    ir_version: int | None = None
    opt_level_limit: str | None = None
    builder: str = "torch.onnx"  # "torch.onnx" (the exporter) or "direct" (written from the weights)
    kv_shared_buffer: bool = False  # past and present KV bound to one preallocated buffer per layer
    fusions: Mapping[str, int] = field(default_factory=dict)
    matmul_schemes: Mapping[str, int] = field(default_factory=dict)
    target: str = "ort"
    kv_update: str | None = None
    trt_ops: str | None = None
    ort_qdq_matmulnbits_accuracy_level: int | None = None
    # a prefill graph over an int8 cache may come cut at its attentions too (SegmentSpec), with the cache's
    # scales for the kernel in `segment_scales` (names.SEGMENT_SCALES_FILE); its own file stays whole
    segments: tuple[SegmentSpec, ...] = ()
    segment_scales: str | None = None
    # a decode graph the native decode step computes (runtime/engines/native.py): where its weights lie
    # (names.DECODE_INDEX_FILE, runtime/bundle/decode_index.py)
    native_index: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GraphSpec:
        legacy = {_LEGACY_GRAPH_KEYS.get(k, k): v for k, v in dict(d.get("extra", {})).items()}
        d = {**legacy, **{k: v for k, v in d.items() if k != "extra"}}
        return cls(
            file=str(_need(d, "file", "a graph")), engine=_choice(d.get("engine"), ENGINES, "graph engine"),
            precision=_choice(d.get("precision"), GRAPH_PRECISIONS, "graph precision"),
            inputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "inputs", "a graph")),
            outputs=tuple(TensorSpec.from_dict(t) for t in _need(d, "outputs", "a graph")),
            sizes={str(k): int(v) for k, v in d.get("sizes", {}).items()},
            external_data=d.get("external_data"), opset=d.get("opset"), ir_version=d.get("ir_version"),
            opt_level_limit=_optional_choice(d.get("opt_level_limit"), OPT_LEVELS, "graph opt_level_limit"),
            builder=str(d.get("builder", "torch.onnx")), kv_shared_buffer=bool(d.get("kv_shared_buffer", False)),
            fusions={str(k): int(v) for k, v in d.get("fusions", {}).items()},
            matmul_schemes={str(k): int(v) for k, v in d.get("matmul_schemes", {}).items()},
            target=_choice(d.get("target", "ort"), EXPORT_TARGETS, "graph target"),
            kv_update=_optional_choice(d.get("kv_update"), KV_UPDATES, "graph kv_update"),
            trt_ops=_optional_choice(d.get("trt_ops"), TRT_OPS, "graph trt_ops"),
            ort_qdq_matmulnbits_accuracy_level=_optional_int(d.get("ort_qdq_matmulnbits_accuracy_level")),
            segments=tuple(SegmentSpec.from_dict(x) for x in d.get("segments", ())),
            segment_scales=d.get("segment_scales"), native_index=d.get("native_index"),
        )

    @property
    def scatter_kv(self) -> bool:
        """The decoder takes position_ids / write_index / attention_mask (else GroupQueryAttention's inputs)."""
        return self.kv_update == "scatter"

    def tensor(self, name: str) -> TensorSpec:
        found = [t for t in (*self.inputs, *self.outputs) if t.name == name]
        if not found:
            raise BundleError(f"manifest: graph {self.file} has no tensor {name!r}")
        return found[0]


KV_SCALES = ("per_channel",)  # an int8 cache: static scales per (kv head, channel), inside the decoder graphs


@dataclass(frozen=True)
class KVLayout:
    """The decoder's cache: one key and one value buffer per layer, [1, kv_heads, max_length, head_dim].
    `scales` says how an int8 cache is scaled (None for a float cache)."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: str
    max_length: int
    layout: str = "BNSH"
    scales: str | None = None

    def __post_init__(self) -> None:
        if (self.dtype == "int8") != (self.scales is not None):
            raise BundleError(f"manifest: a {self.dtype} KV cache with scales {self.scales!r} (an int8 cache needs "
                              f"them: {', '.join(KV_SCALES)}; a float one has none)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KVLayout:
        return cls(layers=int(_need(d, "layers", "kv")), kv_heads=int(_need(d, "kv_heads", "kv")),
                   head_dim=int(_need(d, "head_dim", "kv")), dtype=_choice(d.get("dtype"), TENSOR_DTYPES, "kv dtype"),
                   max_length=int(_need(d, "max_length", "kv")),
                   layout=_choice(d.get("layout", "BNSH"), ("BNSH",), "kv layout"),
                   scales=_optional_choice(d.get("scales"), KV_SCALES, "kv scales"))

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    vocab_size: int
    bos_id: int
    eos_id: int
    max_position_embeddings: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TextSpec:
        return cls(**{f.name: int(_need(d, f.name, "text")) for f in fields(cls)})


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding table as a .npy file (memory-mapped by the runtime)."""

    file: str
    dtype: str
    shape: tuple[int, int]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingSpec:
        rows, cols = _need(d, "shape", "embedding")
        return cls(file=str(_need(d, "file", "embedding")), dtype=_choice(d.get("dtype"), TENSOR_DTYPES,
                                                                           "embedding dtype"),
                   shape=(int(rows), int(cols)))


@dataclass(frozen=True)
class SourceSpec:
    """Where the bundle came from: the checkpoint's path, layout, sha256 over its config and weights."""

    checkpoint: str
    layout: str
    sha256: str
    vision_tower: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SourceSpec:
        return cls(checkpoint=str(d.get("checkpoint", "")), layout=str(d.get("layout", "")),
                   sha256=str(d.get("sha256", "")), vision_tower=d.get("vision_tower"))


@dataclass(frozen=True)
class CalibrationSpec:
    """A quantized bundle's calibration: the scales file and how it was made, what the recipe quantized, the
    device it needs, and the fidelity report ("is the recipe good enough?": the bundle as served against the
    fp32 reference on held-out ECG samples; export/validate/fidelity.py): `summary` (the figures
    --accuracy-gate checks), `vision`, `decoder`, `greedy` (per sample and step), `sizes`, `held_out` (ids),
    `recommended` (`levels` for the recipe and the `below` misses, which export warns about) and
    `ort_session`. Its parity record ("is the graph right?") is Manifest.validation."""

    recipe: Mapping[str, Any]
    file: str
    scales_source: str
    method: str
    samples: Mapping[str, Any]
    decoder_schemes: Mapping[str, int]
    smoothed_or_scaled_sites: tuple[str, ...] = ()
    awq_block_size: int | None = None
    requires_compute_capability: str | None = None  # fp8: a GPU of at least this capability
    fidelity: Mapping[str, Any] | None = None
    fp8_method: str | None = None  # the clip method fp8 sites used: `method`, or mse where E4M3 has none of it

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CalibrationSpec:
        return cls(recipe=dict(_need(d, "recipe", "calibration")), file=str(_need(d, "file", "calibration")),
                   scales_source=str(d.get("scales_source", "")), method=str(d.get("method", "")),
                   samples=dict(d.get("samples", {})),
                   decoder_schemes={str(k): int(v) for k, v in d.get("decoder_schemes", {}).items()},
                   smoothed_or_scaled_sites=tuple(d.get("smoothed_or_scaled_sites", ())),
                   awq_block_size=d.get("awq_block_size"),
                   requires_compute_capability=d.get("requires_compute_capability"), fidelity=d.get("fidelity"),
                   fp8_method=d.get("fp8_method"))


@dataclass(frozen=True)
class FileRecord:
    """One file of the bundle as export wrote it: its size, its sha256, and the sha256 of a fixed sample of
    its pages (checked at every load; the whole file only by `pulse-edge verify` and `--verify`)."""

    size: int
    sha256: str
    sampled_sha256: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FileRecord:
        return cls(size=int(d["size"]), sha256=str(d["sha256"]), sampled_sha256=str(d["sampled_sha256"]))


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
    source: SourceSpec
    created_by: str
    # Parity ("is the graph right?", export/build/bundle.py bundle_parity): `reference` (the torch reference,
    # or the emulated recipe for a quantized bundle), `tolerance_level`, `vision` (`shapes`, `merge`),
    # `decoder` (`cases`), `greedy`, quantized: `sites` (every MatMul and folded norm on the graph's own
    # input), `ort_session`, and the verdict `pass`; each check carries its numbers and its `tolerance`.
    validation: Mapping[str, Any] = field(default_factory=dict)
    calibration: CalibrationSpec | None = None
    image_newline: str | None = None  # spatial_unpad only: a .npy file, float32 [hidden_size]
    files: Mapping[str, FileRecord] = field(default_factory=dict)  # every file but the manifest; empty in v1

    def __post_init__(self) -> None:
        _choice(self.precision, GRAPH_PRECISIONS, "precision")
        _check_image_newline(self.image_newline, self.image)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        check_manifest_json(d)  # the JSON shape of every field, format and version first
        calibration = d.get("calibration")
        return cls(
            version=int(d["version"]), precision=str(d.get("precision")),
            graphs={k: GraphSpec.from_dict(v) for k, v in _need(d, "graphs", "the manifest").items()},
            kv=KVLayout.from_dict(_need(d, "kv", "the manifest")),
            text=TextSpec.from_dict(_need(d, "text", "the manifest")),
            embedding=EmbeddingSpec.from_dict(_need(d, "embedding", "the manifest")),
            image=ImageLayout.from_dict(_need(d, "image", "the manifest")),
            prompt=PromptTemplate.from_dict(_need(d, "prompt", "the manifest")),
            tokenizer=str(_need(d, "tokenizer", "the manifest")),
            source=SourceSpec.from_dict(d.get("source", {})), created_by=str(d.get("created_by", "")),
            validation=dict(d.get("validation", {})),
            calibration=None if calibration is None else CalibrationSpec.from_dict(calibration),
            image_newline=d.get("image_newline"),
            files={str(k): FileRecord.from_dict(v) for k, v in d.get("files", {}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image"] = self.image.to_dict()
        d["prompt"] = self.prompt.to_dict()
        if self.image_newline is None:
            del d["image_newline"]  # a flat bundle's manifest stays as it was before the field existed
        if self.version < 2:
            del d["files"]
        if self.kv.scales is None:
            del d["kv"]["scales"]  # likewise a float cache's
        for graph in d["graphs"].values():  # and a graph that is not cut in segments
            if not graph["segments"] and graph["segment_scales"] is None:
                del graph["segments"], graph["segment_scales"]
            if graph["native_index"] is None:
                del graph["native_index"]
        plain = json.loads(json.dumps({"format": FORMAT, **d}, default=_json_default))  # numpy scalars in reports
        return seal(plain) if self.version >= SEALED_FROM_VERSION else plain

    def write(self, bundle: Path) -> None:
        (bundle / MANIFEST_FILE).write_text(json.dumps(self.to_dict(), indent=2))


def native_validated(manifest: Manifest) -> bool:
    """Did the export validate this bundle's native decode step (runtime/engines/native.py), and keep it? False for a
    bundle without the record (older ones), whose record is not the export's shape, or whose step the export dropped
    (`kept` false: its rounding too coarse for the model; export/build/native.py)."""
    decoder = manifest.validation.get("decoder") if isinstance(manifest.validation, dict) else None
    record = decoder.get("native_decode") if isinstance(decoder, dict) else None
    return isinstance(record, dict) and record.get("pass") is True and record.get("kept", True) is True


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars in reports
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _check_image_newline(name: Any, image: ImageLayout) -> None:
    """The newline file: required by spatial_unpad (it ends every feature row), meaningless for flat."""
    if image.merge == "spatial_unpad" and not name:
        raise BundleError("manifest: the spatial_unpad merge needs 'image_newline' (the .npy file of the vector "
                          "that ends each feature row); re-export the bundle")
    if image.merge != "spatial_unpad" and name is not None:
        raise BundleError(f"manifest: 'image_newline' belongs to the spatial_unpad merge, not {image.merge!r}")


def read_manifest(bundle: Path) -> Manifest:
    """Load and check a bundle's manifest (its JSON shape, then its fields against each other), and that every
    file it names is there; the arrays and checksums are `integrity.check_bundle`'s."""
    path = bundle / MANIFEST_FILE
    if not bundle.is_dir():
        raise BundleError(f"{bundle} {'is not a directory' if bundle.exists() else 'does not exist'}: a bundle is the "
                          "directory `pulse-edge export` writes")
    if not path.is_file():
        raise BundleError(f"{bundle} is not a pulse-edge bundle: it has no {MANIFEST_FILE}")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"{path} cannot be read as JSON ({e}); re-export the bundle") from e
    except JSON_TEXT_ERRORS as e:  # nested too deeply, a 5000-digit number: no traceback, no interpreter advice
        raise BundleError(f"{path} cannot be read as JSON ({json_error_reason(e)}); re-export the bundle") from e
    try:
        manifest = Manifest.from_dict(data)
    except (TypeError, ValueError, ConfigError) as e:  # ConfigError: a layout's own checks (ImageLayout)
        raise BundleError(f"{path} has a malformed field ({e}); re-export the bundle") from e
    check_consistency(manifest)
    check_files(bundle, manifest)
    return manifest


def check_files(bundle: Path, manifest: Manifest) -> None:
    named = [manifest.tokenizer, manifest.embedding.file, *([manifest.image_newline] if manifest.image_newline else [])]
    for graph in manifest.graphs.values():
        named.append(graph.file)
        for name, size in graph.sizes.items():
            check_file_size(bundle / name, size, "re-export or re-copy the bundle")
    for name in named:
        if not (bundle / name).is_file():
            raise BundleError(f"{bundle}: {name} named in {MANIFEST_FILE} is missing; re-export the bundle")
