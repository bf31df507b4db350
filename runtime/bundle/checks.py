"""A manifest's fields checked against each other, before any file is opened or any engine built.

The JSON shape of each field is `schema.py`'s; here the fields must describe one model: the graphs the
runtime binds by name (runtime/bundle/names.py), KV buffers for `kv.layers` layers in the decoder's IO,
`text.vocab_size` rows in the embedding table and entries in the logits, `text.hidden_size` everywhere a
hidden vector passes, a KV cache no longer than the model's positions. A damaged or hand-edited manifest
fails here with one line instead of binding a wrong buffer (a logits buffer shorter than the graph's
output would be written past its end).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.names import MANIFEST_FILE

if TYPE_CHECKING:
    from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest, TensorSpec

_FIX = "re-export the bundle"


def check_file_size(path: Path, size: int, fix: str) -> None:
    """A file the manifest names exists and has the size it records; `fix` ends the one-line error."""
    if not path.is_file():
        raise BundleError(f"{path.parent}: {path.name} named in {MANIFEST_FILE} is missing; {fix}")
    actual = path.stat().st_size
    if actual != size:
        raise BundleError(f"{path} is {actual} bytes but the manifest says {size}: the file is truncated or was "
                          f"changed; {fix}")


def _fail(problem: str) -> BundleError:
    return BundleError(f"manifest: {problem}; {_FIX}")


def check_consistency(manifest: Manifest) -> None:
    """Every cross-field rule, cheapest first; the first broken one is the error.

    The IO rules are those of the ONNX graphs the runtime binds by name (every graph's engine is "onnx": the
    manifest reader takes no other)."""
    missing = [role for role in (names.VISION, names.DECODER) if role not in manifest.graphs]
    if missing:
        raise _fail(f"graphs lacks {', '.join(map(repr, missing))} (has {sorted(manifest.graphs)})")
    _check_text(manifest)
    _check_precision(manifest)
    vision, decoder = manifest.graphs[names.VISION], manifest.graphs[names.DECODER]
    _check_vision_io(vision, manifest)
    _check_decoder_io(decoder, manifest)
    prefill = manifest.graphs.get(names.PREFILL)
    if prefill is not None:  # the decoder again, for long inputs: same IO, same cache
        _check_decoder_io(prefill, manifest)
    for key in (names.DECODER, names.PREFILL):
        graph = manifest.graphs.get(key)
        if graph is not None and (graph.segments or graph.segment_scales):
            _check_segments(key, graph, manifest)
    for key, graph in manifest.graphs.items():
        if graph.native_index and (key != names.DECODER or manifest.kv.dtype != "int8"):
            raise _fail(f"graphs.{key}.native_index: only the decode graph over an int8 cache has a decode index")
    _check_records(manifest)


def _check_text(manifest: Manifest) -> None:
    text, kv, table = manifest.text, manifest.kv, manifest.embedding
    if table.shape != (text.vocab_size, text.hidden_size):
        raise _fail(f"the embedding table is {list(table.shape)} but text.vocab_size x text.hidden_size is "
                    f"[{text.vocab_size}, {text.hidden_size}]")
    for name, token in (("bos_id", text.bos_id), ("eos_id", text.eos_id)):
        if token >= text.vocab_size:
            raise _fail(f"text.{name} {token} is outside the vocabulary of {text.vocab_size}")
    if kv.max_length > text.max_position_embeddings:
        raise _fail(f"kv.max_length {kv.max_length} exceeds the model's {text.max_position_embeddings} positions")


def _check_precision(manifest: Manifest) -> None:
    """The bundle's precision is its decoder's (and the prefill graph's): the precision the server announces, the
    benchmarks group by and the GPU checks advise on is that of the graphs that run, not a label edited apart."""
    for key in (names.DECODER, names.PREFILL):
        graph = manifest.graphs.get(key)
        if graph is not None and graph.precision != manifest.precision:
            raise _fail(f"precision is {manifest.precision!r} but graphs.{key} ({graph.file}) is "
                        f"{graph.precision!r}")


def _names(tensors: Sequence[TensorSpec]) -> list[str]:
    return [t.name for t in tensors]


def _check_names(graph: GraphSpec, kind: str, found: Sequence[TensorSpec], expected: Sequence[str]) -> None:
    if sorted(_names(found)) != sorted(expected):
        extra = sorted(set(_names(found)) - set(expected))
        missing = sorted(set(expected) - set(_names(found)))
        raise _fail(f"graph {graph.file} {kind} do not match what the runtime binds (unexpected {extra[:4]}, "
                    f"missing {missing[:4]})")


def _check_dims(graph: GraphSpec, tensor: TensorSpec, expected: Sequence[int | None], what: str) -> None:
    """Static dimensions the runtime relies on (None: any); symbolic ones are the graph's to resolve."""
    if len(tensor.shape) != len(expected):
        raise _fail(f"graph {graph.file} tensor {tensor.name} has {len(tensor.shape)} dimensions, expected "
                    f"{len(expected)} ({what})")
    for axis, (dim, want) in enumerate(zip(tensor.shape, expected, strict=True)):
        if want is not None and isinstance(dim, int) and dim != want:
            raise _fail(f"graph {graph.file} tensor {tensor.name} has {dim} at axis {axis} where {what} needs "
                        f"{want}")


def _check_vision_io(graph: GraphSpec, manifest: Manifest) -> None:
    _check_names(graph, "inputs", graph.inputs, [names.PIXEL_VALUES])
    _check_names(graph, "outputs", graph.outputs, [names.IMAGE_FEATURES])
    tile = manifest.image.tile_size
    _check_dims(graph, graph.inputs[0], [None, 3, tile, tile], f"image.tile_size {tile}")
    _check_dims(graph, graph.outputs[0], [None, None, manifest.text.hidden_size],
                f"text.hidden_size {manifest.text.hidden_size}")


def _kv_layers(tensors: Sequence[TensorSpec]) -> int:
    return sum(1 for t in tensors if t.name.startswith("past_key_values.") and t.name.endswith(".key"))


# How a decoder is told where its new positions go, by the manifest's `kv_update` (runtime/engines/ort.py binds
# one set or the other).
_POSITION_INPUTS = {
    "gqa": (names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH),
    "scatter": (names.POSITION_IDS, names.WRITE_INDEX, names.ATTENTION_MASK),
}


def _check_decoder_io(graph: GraphSpec, manifest: Manifest) -> None:
    kv, text = manifest.kv, manifest.text
    in_graph = _kv_layers(graph.inputs)
    if in_graph != kv.layers:
        raise _fail(f"kv.layers is {kv.layers} but the decoder graph {graph.file} has KV inputs for {in_graph} "
                    "layers")
    _check_names(graph, "inputs", graph.inputs, [names.INPUTS_EMBEDS, *_POSITION_INPUTS[graph.kv_update or "gqa"],
                                                 *names.kv_names(kv.layers, "past")])
    _check_names(graph, "outputs", graph.outputs, [names.LOGITS, *names.kv_names(kv.layers, "present")])
    _check_dims(graph, graph.tensor(names.INPUTS_EMBEDS), [1, None, text.hidden_size],
                f"text.hidden_size {text.hidden_size}")
    logits = graph.tensor(names.LOGITS)
    if logits.shape and isinstance(logits.shape[-1], int) and logits.shape[-1] != text.vocab_size:
        raise _fail(f"text.vocab_size is {text.vocab_size} but the decoder's logits have {logits.shape[-1]} entries")
    _check_dims(graph, logits, [1, 1, text.vocab_size], f"text.vocab_size {text.vocab_size}")
    for name in names.kv_names(kv.layers, "past") + names.kv_names(kv.layers, "present"):
        tensor = graph.tensor(name)
        if tensor.dtype != kv.dtype:
            raise _fail(f"kv.dtype is {kv.dtype} but the decoder's {name} is {tensor.dtype}")
        _check_dims(graph, tensor, [1, kv.kv_heads, None, kv.head_dim], "kv.kv_heads and kv.head_dim")


def _check_segments(key: str, graph: GraphSpec, manifest: Manifest) -> None:
    """A decoder graph cut at its attentions: one segment per layer and one after the last, over an int8 cache
    whose scales file is named; segment k reads only the whole graph's inputs, what earlier segments write and
    layer k - 1's attention output (the kernel's), and writes layer k's query (the last one the logits)."""
    segments, layers, where = graph.segments, manifest.kv.layers, f"graphs.{key}.segments"
    if manifest.kv.dtype != "int8" or not graph.segment_scales:
        raise _fail(f"{where} needs an int8 KV cache and segment_scales (the kernel's scales)")
    if len(segments) != layers + 1:
        raise _fail(f"{where} holds {len(segments)} segments for {layers} layers (needs {layers + 1})")
    readable = {t.name for t in graph.inputs}
    for k, segment in enumerate(segments):
        attention = [names.attention_output_name(k - 1)] if k else []
        unknown = [n for n in segment.inputs if n not in readable and n not in attention]
        if unknown:
            raise _fail(f"{where}[{k}] ({segment.file}) reads {unknown[0]!r}, which no earlier segment writes")
        gives = [names.attention_query_name(k)] if k < layers else [names.LOGITS]
        missing = [n for n in attention if n not in segment.inputs] + [n for n in gives if n not in segment.outputs]
        if missing:
            raise _fail(f"{where}[{k}] ({segment.file}) lacks {missing[0]!r}")
        readable.update(segment.outputs)


def _check_records(manifest: Manifest) -> None:
    """From version 2 every file the runtime opens has a size and checksum record (an empty `files` would turn
    every checksum check off while the bundle still claimed a version that has them)."""
    if not manifest.files:
        if manifest.version >= 2:
            raise _fail(f"files is empty, but a version-{manifest.version} manifest records every file's size and "
                        "checksum")
        return
    named = [manifest.tokenizer, manifest.embedding.file, *([manifest.image_newline] if manifest.image_newline else [])]
    for graph in manifest.graphs.values():
        named += [graph.file, *([graph.external_data] if graph.external_data else []),
                  *(segment.file for segment in graph.segments),
                  *([graph.segment_scales] if graph.segment_scales else []),
                  *([graph.native_index] if graph.native_index else [])]
    if manifest.calibration is not None:
        named.append(manifest.calibration.file)
    unrecorded = [name for name in named if name not in manifest.files]
    if unrecorded:
        raise _fail(f"files has no checksum for {', '.join(unrecorded)}")
    bad = [name for name in manifest.files if "/" in name or name in (".", "..")]
    if bad:
        raise _fail(f"files names {bad[0]!r}, which is not a file inside the bundle")
