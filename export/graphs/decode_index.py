"""The decode index (runtime/bundle/decode_index.py) of a written decode graph: read off the graph node by node.

The runtime's own decode step computes the decode graph's function from its weights alone, so the index is
written only for a graph whose nodes are exactly the form it computes (export/graphs/decoder.py over an int8
cache with per-channel scales, every projection a MatMulNBits at accuracy level 4 or a float32 MatMul):

    [Skip]SimplifiedLayerNormalization ─ qkv ─ GroupQueryAttention(rotary, int8 cache) ─ o
      ─ SkipSimplifiedLayerNormalization ─ gate_up ─ Split ─ Sigmoid ─ Mul ─ Mul ─ down       (per layer)
    SkipSimplifiedLayerNormalization ─ Slice(last) ─ lm_head ─ Cast

Anything else (another op, a fused pattern, an fp16 cache, QDQ sites, rotary interleaved) gives no index and
one line saying why: the bundle then decodes on ONNX Runtime as before.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.decode_index import DecodeIndex, Layer, Linear, Tensor
from pulse_edge.runtime.kernels.attention import D_MULTIPLE, DECODE
from pulse_edge.runtime.kernels.linear import BLOCK_MULTIPLE

MLAS_INT8_LEVEL = 4  # MatMulNBits quantizes its activations per block only at this level (docs/quantization.md)
GQA_SCALE_INPUTS = (12, 13)  # k_scale, v_scale
ROTARY = ("rotary.cos", "rotary.sin")  # export/graphs/decoder.py: one pair of tables, every layer's


class NotIndexable(ValueError):
    """The graph is not of the form the runtime's decode step computes; the message says where."""


class _Graph:
    """The graph's nodes in order, its initializers, and where each external one lies in the data file."""

    def __init__(self, path: Path) -> None:
        model = onnx.load(str(path), load_external_data=False)
        self.nodes = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.data = f"{path.name}.data"  # the one data file the index points into (export/graphs/decoder.py)
        self.at = 0

    def next(self, op: str) -> onnx.NodeProto:
        if self.at >= len(self.nodes) or self.nodes[self.at].op_type != op:
            found = self.nodes[self.at].op_type if self.at < len(self.nodes) else "the graph's end"
            raise NotIndexable(f"node {self.at}: {found} where the decode step expects {op}")
        self.at += 1
        return self.nodes[self.at - 1]

    def tensor(self, name: str, dtype: str) -> Tensor:
        t = self.inits.get(name)
        if t is None or t.data_location != onnx.TensorProto.EXTERNAL:
            raise NotIndexable(f"{name!r} is not a weight in the graph's data file")
        if np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name != dtype:
            raise NotIndexable(f"{name!r} is {helper.tensor_dtype_to_np_dtype(t.data_type)}, not {dtype}")
        entry = {e.key: e.value for e in t.external_data}
        if entry.get("location") != self.data or "offset" not in entry:
            raise NotIndexable(f"{name!r} lies in {entry.get('location')!r}, not at an offset of {self.data}")
        return Tensor(name, dtype, tuple(int(d) for d in t.dims), int(entry["offset"]))


def _constant(g: _Graph, name: str) -> list[int] | None:
    """An int64 initializer kept in the graph, as a list (None where it is not one)."""
    t = g.inits.get(name)
    if t is None or t.data_location == onnx.TensorProto.EXTERNAL or t.data_type != onnx.TensorProto.INT64:
        return None
    return [int(v) for v in numpy_helper.to_array(t).reshape(-1)]


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _linear(g: _Graph, x: str) -> tuple[Linear, str]:
    """The projection reading `x`: a MatMulNBits at level 4 or a float32 MatMul; returns it and its output."""
    node = g.nodes[g.at] if g.at < len(g.nodes) else None
    if node is not None and node.op_type == "MatMul":
        g.next("MatMul")
        weight = g.tensor(node.input[1], "float32")
        return Linear(0, weight.shape[0], weight.shape[1], weight=weight), _reads(node, x)
    node = g.next("MatMulNBits")
    a = _attrs(node)
    bits, block = a["bits"], a["block_size"]
    if len(node.input) > 3 and any(node.input[3:]):
        raise NotIndexable(f"{node.name}: zero points or a bias")
    if a.get("accuracy_level", 0) != MLAS_INT8_LEVEL or bits not in BLOCK_MULTIPLE or block % BLOCK_MULTIPLE[bits]:
        raise NotIndexable(f"{node.name}: {bits} bits in blocks of {block} at accuracy level "
                           f"{a.get('accuracy_level', 0)} (the kernel takes level {MLAS_INT8_LEVEL}, 4 bits in "
                           "blocks of 128k, 8 bits of 64k)")
    return Linear(bits, a["K"], a["N"], block, codes=g.tensor(node.input[1], "uint8"),
                  scales=g.tensor(node.input[2], "float32")), _reads(node, x)


def _reads(node: onnx.NodeProto, x: str) -> str:
    if node.input[0] != x:
        raise NotIndexable(f"{node.name} reads {node.input[0]!r}, not {x!r}")
    return node.output[0]


def _norm(g: _Graph, first: bool) -> tuple[onnx.NodeProto, Tensor]:
    node = g.next("SimplifiedLayerNormalization" if first else "SkipSimplifiedLayerNormalization")
    return node, g.tensor(node.input[-1] if first else node.input[2], "float32")


def _heads(gqa: onnx.NodeProto) -> tuple[int, int, float]:
    a = _attrs(gqa)
    return a["num_heads"], a["kv_num_heads"], float(a.get("scale", 0.0))


# GroupQueryAttention's attributes the step computes as given, and those it computes only at their defaults
GQA_REQUIRED = {"do_rotary": 1, "rotary_interleaved": 0, "k_quant_type": b"PER_CHANNEL", "v_quant_type": b"PER_CHANNEL",
                "kv_cache_bit_width": 8}
GQA_DEFAULTS = {"softcap": 0.0, "local_window_size": -1, "smooth_softmax": 0, "qk_output": 0}


def _attention(g: _Graph, i: int, qkv: str, heads: tuple[int, int, float] | None
               ) -> tuple[onnx.NodeProto, Tensor, Tensor]:
    """Layer i's GroupQueryAttention: over layer i's own cache buffers, rotary from the graph's one pair of tables."""
    node = g.next("GroupQueryAttention")
    a = _attrs(node)
    off = [k for k, v in GQA_REQUIRED.items() if a.get(k) != v]
    off += [k for k, v in GQA_DEFAULTS.items() if a.get(k, v) != v]
    cache = [names.past_name(i, "key"), names.past_name(i, "value")]
    if list(node.input[3:5]) != cache or list(node.input[7:9]) != list(ROTARY):
        off.append(f"reads {list(node.input[3:5])} and {list(node.input[7:9])}, not {cache} and {list(ROTARY)}")
    if any(node.input[9:12]) or any(node.input[14:]):  # position ids, attention bias, head sink, ...
        off.append("inputs the step does not take")
    if list(node.output[1:3]) != [names.present_name(i, "key"), names.present_name(i, "value")]:
        off.append(f"writes {list(node.output[1:3])}, not layer {i}'s cache")
    if off or node.input[0] != qkv or any(node.input[1:3]):
        raise NotIndexable(f"{node.name}: not rotary attention over an int8 per-channel cache from the fused qkv "
                           f"({', '.join(off) or 'inputs'})")
    if heads is not None and _heads(node) != heads:
        raise NotIndexable(f"{node.name}: other head counts than layer 0's")
    k_scale, v_scale = (g.tensor(node.input[j], "float32") for j in GQA_SCALE_INPUTS)
    return node, k_scale, v_scale


def _skip(g: _Graph, x: str, residual: str) -> tuple[onnx.NodeProto, Tensor, str]:
    """RMSNorm(x + residual): the node, its weight and the new residual stream (the sum it outputs)."""
    node, weight = _norm(g, False)
    if (list(node.input[:2]) != [x, residual] or (len(node.input) > 3 and any(node.input[3:]))
            or len(node.output) < 4 or not node.output[3]):
        raise NotIndexable(f"{node.name} does not normalise {x!r} + the residual stream")
    return node, weight, node.output[3]


def _at(g: _Graph, ahead: int, op: str) -> bool:
    return g.at + ahead < len(g.nodes) and g.nodes[g.at + ahead].op_type == op


def _poison(g: _Graph, final: str, logits: str) -> str:
    """An int8 cache's graphs add 0 x the sum of the final hidden states to the logits (export/graphs/decoder.py
    `_poisoned`); the native step does the same check its own way (runtime/engines/native.py). The logits' name
    after it."""
    if not _at(g, 0, "Mul"):
        return logits
    mul, total, add = g.next("Mul"), g.next("ReduceSum"), g.next("Add")
    zero = g.inits.get(mul.input[1])
    if (mul.input[0] != final or zero is None or numpy_helper.to_array(zero).size != 1
            or float(numpy_helper.to_array(zero).reshape(-1)[0]) != 0.0 or total.input[0] != mul.output[0]
            or sorted(add.input) != sorted([logits, total.output[0]])):
        raise NotIndexable(f"{add.name}: not the logits plus 0 x the final hidden states")
    return add.output[0]


def _layers(g: _Graph) -> list[tuple[Layer, onnx.NodeProto, list[onnx.NodeProto], str]]:
    """Each layer as the runtime reads it, with its GroupQueryAttention, its two norm nodes and the residual
    stream after it; every node checked to read what the one before wrote."""
    mlp_out, residual, heads = None, None, None
    read: list[tuple[Layer, onnx.NodeProto, list[onnx.NodeProto], str]] = []
    while _at(g, 2, "GroupQueryAttention"):
        if mlp_out is None:
            norm, input_norm = _norm(g, True)
            residual = norm.input[0]
        else:
            norm, input_norm, residual = _skip(g, mlp_out, str(residual))
        qkv, out = _linear(g, norm.output[0])
        gqa, k_scale, v_scale = _attention(g, len(read), out, heads)
        heads = _heads(gqa)
        o, out = _linear(g, gqa.output[0])
        post, post_norm, residual = _skip(g, out, residual)
        gate_up, out = _linear(g, post.output[0])
        split = g.next("Split")
        sig, silu, act = g.next("Sigmoid"), g.next("Mul"), g.next("Mul")
        halves = _attrs(split).get("axis") in (-1, 2) and len(split.output) == 2 and not any(split.input[1:])
        if (not halves or gate_up.n % 2 or split.input[0] != out or sig.input[0] != split.output[0]
                or list(silu.input) != [split.output[0], sig.output[0]]
                or list(act.input) != [silu.output[0], split.output[1]]):
            raise NotIndexable(f"{split.name}: not SiLU(gate) * up of the fused gate/up projection")
        down, mlp_out = _linear(g, act.output[0])
        read.append((Layer(input_norm, qkv, k_scale, v_scale, o, post_norm, gate_up, down), gqa, [norm, post],
                     residual))
    return read


def read_decode_graph(path: Path) -> DecodeIndex:
    """The index of the decode graph at `path` (its data file beside it), or NotIndexable saying why not."""
    g = _Graph(path)
    read = _layers(g)
    if not read:
        raise NotIndexable("no layer of the decode step's form")
    layers = [layer for layer, _, _, _ in read]
    norms = [norm for _, _, pair, _ in read for norm in pair]
    _, gqa, _, residual = read[-1]
    mlp_out = g.nodes[g.at - 1].output[0]  # the last layer's down projection
    final, final_norm, _ = _skip(g, mlp_out, residual)
    last = g.next("Slice")
    if ([_constant(g, name) for name in last.input[1:4]] != [[-1], [np.iinfo(np.int64).max], [1]]
            or any(last.input[4:])):
        raise NotIndexable(f"{last.name} does not take the last position")
    lm_head, out = _linear(g, last.output[0])
    out = _poison(g, final.output[0], out)
    cast = g.next("Cast")
    if last.input[0] != final.output[0] or cast.input[0] != out or g.at != len(g.nodes):
        raise NotIndexable("the graph does not end in final norm, last position, lm_head, logits")
    eps = {float(_attrs(n).get("epsilon", 1e-5)) for n in (*norms, final)}  # ONNX's default where not set
    if len(eps) != 1:
        raise NotIndexable(f"the norms' epsilons differ ({sorted(eps)})")
    a = _attrs(gqa)
    cos, sin = (g.tensor(name, "float32") for name in ROTARY)
    first = layers[0]
    head_dim = cos.shape[1] * 2
    if head_dim % D_MULTIPLE or head_dim > (DECODE.max_head_dim or head_dim):
        raise NotIndexable(f"head dim {head_dim}: the decode attention kernel takes multiples of {D_MULTIPLE} up to "
                           f"{DECODE.max_head_dim}")
    scale = _heads(gqa)[2]
    if scale and not np.isclose(scale, head_dim ** -0.5, rtol=1e-6):
        raise NotIndexable(f"attention scale {scale}, not 1/sqrt({head_dim}) (the attention kernel's)")
    return DecodeIndex(data=g.data, hidden=first.qkv.k, heads=a["num_heads"], kv_heads=a["kv_num_heads"],
                       head_dim=head_dim, intermediate=first.down.k, vocab=lm_head.n, eps=eps.pop(),
                       rotary=(cos, sin), layers=tuple(layers), final_norm=final_norm, lm_head=lm_head)
