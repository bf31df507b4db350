"""A decoder graph cut at every layer's attention, so a CPU attention kernel (runtime/kernels) can run there.

ONNX Runtime's CPU EP attends over a prompt chunk in float32 and computes the masked half too; pulse-edge's
bf16 kernel does the same attention about 4x faster on AMX tiles, 2.2x on AVX-512 BF16
(benchmarks/studies/prefill_attention.py). A decode
step's attention in ORT reads the int8 cache at about 40% of the read bandwidth; pulse-edge's AVX-512 decode
kernel streams it at about 80% (docs/performance.md). ORT cannot
call it from inside a graph (its wheel ships no custom-op headers; onnxruntime-extensions' Python ops copy
every input, 966 ms a call for one layer's cache), and it runs every node of a graph whatever outputs are
asked for. So the prefill graph is cut into one graph per layer boundary and the runtime runs
segment, kernel, segment, ...:

    prefill.onnx, layer i (as exported):
        qkv ─ GQA(cached positions dequantized; rotary inside) ─ out
              present ─ Slice the new positions ─ quantize ─ store

    prefill.segNN.onnx, written beside it:
        segment i:    ... qkv ─ Split ─ q ─ RotaryEmbedding ─ q_i ▶
                                    ├ k ─ RotaryEmbedding ─ BNSH ─ quantize ─ store (present.i.key)
                                    └ v ─ BNSH ─ quantize ─ store (present.i.value)
        the kernel:   q_i, the int8 cache (the chunk stored) ─ out_i
        segment i+1:  ▶ out_i ─ o_proj ─ ... ─ layer i+1's qkv ...

    decoder.onnx, layer i (as exported): qkv ─ GQA(int8 cache in place, its own quantize; rotary inside) ─ out
    decoder.segNN.onnx: as above, the quantize-and-store nodes written by the cut (the prefill graph's rule:
        round, clip to +-127), and the shape nodes (kv/) the prefill graph has, added once

Only nodes change: the segments are small protobufs whose initializers point into the graph's own external
data, and the whole graph stays as it was: a machine without the kernel runs it. The shape
nodes every layer uses (`kv/`: positions cached before, the total, position ids) are copied into each
segment that needs them, so only float32 activations cross between segments. The static KV scales the
kernel needs go to names.segment_scales_file(graph). Works on a written bundle as well (no weights are read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.export.graphs.kv_cache import INT8_KV_ATTRS, SCATTER_OPSET, cache_positions, store_int8
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import SegmentSpec

CONTRIB = "com.microsoft"
SHARED_PREFIX = "kv/"  # the shape nodes every layer reads (export/graphs/kv_cache.py cache_positions)
POSITION_IDS = "kv.position_ids"
PAST_LEN = "kv.past_len"
# GroupQueryAttention over its own int8 cache (the decode graph): the quantization the cut's stores reproduce
NATIVE_INT8 = INT8_KV_ATTRS


def _cache_position_nodes() -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """past_len and total as int64 [1] from the graph's inputs, as export/graphs/kv_cache.py cache_positions makes
    them in the prefill graph (the decode graph's GQA computes them inside)."""
    b = _Nodes()
    cache_positions(b)
    return b.nodes, list(b.inits.values())


def _store_nodes(i: int, scales: tuple[str, str]) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Layer i's new keys and values [1, KVN, S, D] quantized into the cache buffer at past_len, by the prefill
    graph's own rule (export/graphs/kv_cache.py store_int8)."""
    b = _Nodes()
    for part, scale in zip(names.KV_PARTS, scales, strict=True):
        store_int8(b, part, i, f"layers.{i}.attn.{part}_new", scale, PAST_LEN)
    return b.nodes, list(b.inits.values())


class _Nodes:
    """export/graphs/kv_cache.py's GraphBuilder face over plain lists: the cut writes nodes with that module's own
    emitters, so the decode graph's segments store the cache exactly as the prefill graph does."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.setdefault(name, numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object) -> list[str]:
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, **attrs))
        return outputs

    def weight(self, name: str, tensor: object) -> str:  # the emitters used here add no weights
        raise NotImplementedError(name)

    raw = weight


def _position_nodes() -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """position ids [1, S] = past_len + [0, S), from the shared kv/ shape nodes."""
    consts = [numpy_helper.from_array(np.array(1, np.int64), "kv.step"),
              numpy_helper.from_array(np.array([0], np.int64), "kv.axis0")]
    nodes = [helper.make_node("Squeeze", ["kv.past_len", "kv.axis0"], ["kv.past0"], name="kv/past0"),
             helper.make_node("Squeeze", ["kv.total", "kv.axis0"], ["kv.total0"], name="kv/total0"),
             helper.make_node("Range", ["kv.past0", "kv.total0", "kv.step"], ["kv.positions"], name="kv/positions"),
             helper.make_node("Unsqueeze", ["kv.positions", "kv.axis0"], [POSITION_IDS], name="kv/position_ids")]
    return nodes, consts


def _open_attention(gqa: onnx.NodeProto, i: int, kv_heads: int, head_dim: int) -> tuple[list[onnx.NodeProto],
                                                                                      list[TensorProto]]:
    """Layer i's GQA replaced by what the kernel needs before it (module doc): rotary q out, k and v to the store."""
    attrs = {a.name: helper.get_attribute_value(a) for a in gqa.attribute}
    heads, p = int(attrs["num_heads"]), f"layers.{i}.attn"
    _check_attention(gqa.name, attrs, kv_heads, head_dim)
    if any(gqa.input[9:12]):  # position_ids, attention_bias, head_sink: attention the kernel does not compute
        raise ValueError(f"{gqa.name}: inputs beyond the rotary tables ({[x for x in gqa.input[9:12] if x]}); not cut")
    native = _native_int8_scales(gqa, attrs)
    qkv, cos, sin = gqa.input[0], gqa.input[7], gqa.input[8]
    widths = numpy_helper.from_array(np.array([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim],
                                              np.int64), f"{p}.split_widths")
    bnsh = numpy_helper.from_array(np.array([1, -1, kv_heads, head_dim], np.int64), f"{p}.bsnh_shape")
    nodes = [helper.make_node("Split", [qkv, widths.name], [f"{p}.q_raw", f"{p}.k_raw", f"{p}.v_raw"],
                              name=f"{p}/split", axis=-1),
             helper.make_node("RotaryEmbedding", [f"{p}.q_raw", POSITION_IDS, cos, sin],
                              [names.attention_query_name(i)], name=f"{p}/rotary_q", domain=CONTRIB,
                              interleaved=0, num_heads=heads),
             helper.make_node("RotaryEmbedding", [f"{p}.k_raw", POSITION_IDS, cos, sin], [f"{p}.k_rot"],
                              name=f"{p}/rotary_k", domain=CONTRIB, interleaved=0, num_heads=kv_heads)]
    for part, source in (("key", f"{p}.k_rot"), ("value", f"{p}.v_raw")):  # [1, S, KVN D] -> [1, KVN, S, D]
        nodes += [helper.make_node("Reshape", [source, bnsh.name], [f"{p}.{part}_bsnh"], name=f"{p}/{part}_bsnh"),
                  helper.make_node("Transpose", [f"{p}.{part}_bsnh"], [f"{p}.{part}_new"], name=f"{p}/{part}_bnsh",
                                   perm=[0, 2, 1, 3])]
    if native is None:  # the prefill graph: its own quantize-and-store nodes read {part}_new
        return nodes, [widths, bnsh]
    stores, consts = _store_nodes(i, native)
    return nodes + stores, [widths, bnsh, *consts]


def _native_int8_scales(gqa: onnx.NodeProto, attrs: dict) -> tuple[str, str] | None:
    """The k and v scales of a GQA that keeps its own int8 cache (the decode graph), None for one attending over
    a dequantized cache (the prefill graph). Only per-channel 8-bit quantization is what the cut's stores write."""
    scales = tuple(gqa.input[12:14])
    if not any(scales):
        return None
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}  # string attributes are bytes
    if len(scales) != 2 or not all(scales) or any(text.get(k) != v for k, v in NATIVE_INT8.items()):
        raise ValueError(f"{gqa.name}: its int8 cache is not {NATIVE_INT8} with both scales; not cut")
    return scales[0], scales[1]


def _check_attention(name: str, attrs: dict, kv_heads: int, head_dim: int) -> None:
    """The attention the kernel computes (runtime/kernels/attention.py): half-split rotary inside, scale
    head_dim^-0.5, no softcap, no local window, `kv_heads` kv heads. Anything else would change silently."""
    wanted = {"do_rotary": 1, "rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0,
              "kv_num_heads": kv_heads}
    defaults = {"rotary_interleaved": 0, "softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0}
    for key, value in wanted.items():
        if attrs.get(key, defaults.get(key)) != value:
            raise ValueError(f"{name}: {key} {attrs.get(key)!r}, the attention kernel computes {value!r}; not cut")
    if abs(float(attrs.get("scale", head_dim ** -0.5)) - head_dim ** -0.5) > 1e-6 * head_dim ** -0.5:
        raise ValueError(f"{name}: scale {attrs['scale']}, the attention kernel computes head_dim^-0.5; not cut")


def _removed(i: int) -> set[str]:
    """Layer i's nodes the kernel replaces: the cached positions' dequantize, GQA, and the new positions' Slice."""
    p = f"layers.{i}.attn"
    return {f"{p}/gqa", *(f"{p}/{part}_{step}" for part in names.KV_PARTS
                           for step in ("cached", "to_float", "dequantize", "new"))}


def open_graph(model: onnx.ModelProto, layers: int, kv_heads: int, head_dim: int
               ) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Every layer's attention opened; returns the nodes in order and the added initializers."""
    position_nodes, added = _position_nodes()
    by_layer = {f"layers.{i}.attn/gqa": i for i in range(layers)}
    missing = [name for name in by_layer if name not in {n.name for n in model.graph.node}]
    if missing:
        raise ValueError(f"the graph has no {missing[0]}: not a graph export/graphs/decoder.py wrote")
    nodes: list[onnx.NodeProto] = []
    if not any(PAST_LEN in n.output for n in model.graph.node):  # the decode graph: its GQA counted them inside
        shape_nodes, consts = _cache_position_nodes()
        nodes, added = [*shape_nodes, *position_nodes], [*added, *consts]
    drop = set().union(*(_removed(i) for i in range(layers)))
    for node in model.graph.node:
        if node.name in by_layer:
            opened, consts = _open_attention(node, by_layer[node.name], kv_heads, head_dim)
            nodes += opened
            added += consts
        elif node.name not in drop:
            nodes.append(node)
            if PAST_LEN in node.output:  # in topological order: right after what they read
                nodes += position_nodes
    return nodes, added


def _cut(nodes: list[onnx.NodeProto], layers: int) -> tuple[list[onnx.NodeProto], list[list[onnx.NodeProto]]]:
    """The shared shape nodes, and the rest split after each layer's value store: layers + 1 groups."""
    shared = [n for n in nodes if n.name.startswith(SHARED_PREFIX)]
    ends = {f"layers.{i}.attn/value_store" for i in range(layers)}
    groups: list[list[onnx.NodeProto]] = [[]]
    for node in (n for n in nodes if not n.name.startswith(SHARED_PREFIX)):
        groups[-1].append(node)
        if node.name in ends:
            groups.append([])
    if len(groups) != layers + 1:
        raise ValueError(f"found {len(groups) - 1} of {layers} layers' cache stores: not a decoder graph over an "
                         "int8 cache")
    return shared, groups


def _with_shared(group: list[onnx.NodeProto], shared: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The group after the shared nodes it reads, transitively, in their order."""
    producer = {out: n for n in shared for out in n.output}
    wanted = [x for n in group for x in n.input if x in producer]
    picked: set[str] = set()
    while wanted:
        node = producer[wanted.pop()]
        if node.name not in picked:
            picked.add(node.name)
            wanted += [x for x in node.input if x in producer]
    return [n for n in shared if n.name in picked] + group


def _at_scatter_opset(node: onnx.NodeProto) -> onnx.NodeProto:
    """`node` as it reads at SCATTER_OPSET. Of the ops the decoder graphs write, an even Split without sizes
    changed form at 18 (it states its number of outputs from then: added here); a Reduce* with an `axes`
    attribute (an activation-quantizing recipe's, export/quant) takes them as an input from 18: refused, not
    rewritten. Shape, elementwise ops, Cast of non-float8 types, Reshape, Transpose, Round, Clip, Q/DQ and the
    contrib ops read the same."""
    if node.op_type.startswith("Reduce") and any(a.name == "axes" for a in node.attribute):
        raise ValueError(f"{node.name}: {node.op_type} with an axes attribute reads otherwise at opset "
                         f"{SCATTER_OPSET}; not cut")
    if node.op_type != "Split" or node.domain not in ("", "ai.onnx") or len(node.input) > 1 or any(
            a.name == "num_outputs" for a in node.attribute):
        return node
    even = onnx.NodeProto()
    even.CopyFrom(node)
    even.attribute.append(helper.make_attribute("num_outputs", len(node.output)))
    return even


def _ordered(names_: list[str]) -> list[str]:
    return list(dict.fromkeys(n for n in names_ if n))


def _float_info(name: str, attention_width: int) -> onnx.ValueInfoProto:
    """A float32 activation between segments; the kernel's query and output declare their width, which the
    runtime sizes its buffers from."""
    kernel_side = name.startswith("layers.") and name.endswith((".attn.q", ".attn.out"))
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "sequence", attention_width] if kernel_side
                                         else None)


def build_segments(model: onnx.ModelProto, layers: int, kv_heads: int, head_dim: int, graph_key: str = names.PREFILL
                   ) -> list[tuple[onnx.ModelProto, SegmentSpec]]:
    """The opened graph as layers + 1 models (module doc), named after the graph's key in the manifest."""
    nodes, added = open_graph(model, layers, kv_heads, head_dim)
    gqa = next(n for n in model.graph.node if n.name == "layers.0.attn/gqa")
    width = int(next(helper.get_attribute_value(a) for a in gqa.attribute if a.name == "num_heads")) * head_dim
    shared, groups = _cut(nodes, layers)
    inits = {t.name: t for t in [*model.graph.initializer, *added]}
    graph_in = {v.name: v for v in model.graph.input}
    graph_out = {v.name: v for v in model.graph.output}
    shared_out = {out for n in shared for out in n.output}
    consumed = [{x for n in g for x in n.input} for g in groups]
    # the cut's stores are TensorScatter (opset 24); the decode graph may be older: its ops then move to 24
    opsets = [helper.make_opsetid(o.domain, max(o.version, SCATTER_OPSET)) if o.domain in ("", "ai.onnx") else o
              for o in model.opset_import]
    groups = [[_at_scatter_opset(n) for n in g] for g in groups]
    shared = [_at_scatter_opset(n) for n in shared]
    result = []
    for k, group in enumerate(groups):
        body = _with_shared(group, shared)
        produced = _ordered([o for n in body for o in n.output])
        later = set().union(*consumed[k + 1:])
        inputs = [x for x in _ordered([x for n in body for x in n.input]) if x not in inits and x not in produced]
        outputs = [o for o in produced if o not in shared_out and (o in graph_out or o in later
                                                                   or o == names.attention_query_name(k))]
        graph = helper.make_graph(
            body, f"pulse_{graph_key}_segment_{k}", [graph_in.get(x) or _float_info(x, width) for x in inputs],
            [graph_out.get(o) or _float_info(o, width) for o in outputs],
            initializer=[inits[x] for x in _ordered([x for n in body for x in n.input]) if x in inits])
        ir_version = max(model.ir_version, helper.find_min_ir_version_for(  # opset 24: IR 12
            [o for o in opsets if o.domain in ("", "ai.onnx")]))
        segment_model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version,
                                          producer_name="pulse-edge")
        result.append((segment_model, SegmentSpec(names.segment_file(graph_key, k), tuple(inputs), tuple(outputs))))
    return result


def _array(tensor: TensorProto, base_dir: Path) -> np.ndarray:
    """An initializer's values, read from its external data by offset and length where it has some."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    if Path(info["location"]).name != info["location"]:
        raise ValueError(f"{tensor.name}: external data outside the bundle ({info['location']})")
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    with open(base_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        raw = f.read(int(info["length"]))
    return np.frombuffer(raw, dtype).reshape(tuple(tensor.dims))


def kv_scales(model: onnx.ModelProto, layers: int, base_dir: Path) -> np.ndarray:
    """The int8 cache's static scales from the graph, [layers, 2, kv_heads, head_dim] float32."""
    inits = {t.name: t for t in model.graph.initializer}
    try:
        scales = [[_array(inits[f"layers.{i}.attn.{part}_scale"], base_dir) for part in ("k", "v")]
                  for i in range(layers)]  # each [1, kv_heads, 1, head_dim]
    except KeyError as e:
        raise ValueError(f"the graph has no {e.args[0]}: not a graph over an int8 cache") from e
    return np.asarray(scales, np.float32)[:, :, 0, :, 0, :]


def write_segments(directory: Path, graph_file: str, layers: int, kv_heads: int, head_dim: int,
                   graph_key: str = names.PREFILL) -> tuple[SegmentSpec, ...]:
    """Write the segments and the scales file beside `graph_file` (its external data shared)."""
    model = onnx.load(str(directory / graph_file), load_external_data=False)
    np.save(directory / names.segment_scales_file(graph_key), kv_scales(model, layers, directory))
    written = []
    for segment_model, segment in build_segments(model, layers, kv_heads, head_dim, graph_key):
        onnx.save_model(segment_model, str(directory / segment.file))
        written.append(segment)
    return tuple(written)
