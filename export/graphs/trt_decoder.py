"""The TensorRT-ready decoder graph: standard ONNX only, so TensorRT's ONNX parser and ORT's CPU EP both run it.

Two forms of one interface (`ops`):

    native (opset 24: TensorRT >= 10.15, TensorRT-RTX; ORT >= 1.23)    explicit (opset 18-21: TensorRT 10.3, JetPack 6)
      RMSNormalization (stash_type 1: fp32 inside)                        Cast fp32, x / sqrt(mean x^2 + eps), Cast
      RotaryEmbedding(x, cos, sin, position_ids)                          Gather(cos|sin, position_ids), rotate-half
      TensorScatter(past, new, write_index) = present (in place)          ScatterElements at write_index + [0, S)
      Attention(q, K[:T], V[:T], bool mask)                               MatMul, fp32 Softmax + additive mask, MatMul

    inputs_embeds [1, S, H] f32 ─ Cast fp16           position_ids [1, S] i64 (= L .. L+S-1)
    write_index [1] i64 (= L)                          attention_mask [1, T] i64: only its SHAPE is read, T = L + S
    mask [1, 1, S, T] = Range(T) <= position_ids       (causal inside a chunk, and over the whole history)
      layer i:
        n       = RMSNorm(h, gamma_in / s_qkv)                                    [1, S, H]
        q, k, v = Split(MatMul(n, W_qkv * s_qkv)) -> [1, N, S, D]; q, k = RoPE(q), RoPE(k)
        K_i     = KVUpdate(past K_i [1, KVN, M, D], k, write_index) = present K_i  (same for V_i)
        a       = Attention(q, K_i[:, :, :T], V_i[:, :, :T], mask) -> [1, S, N D]
        h       = h + MatMul(a, W_o);  n = RMSNorm(h, gamma_post / s_gu)
        h       = h + MatMul(SiLU(g) * u, W_down)  with g, u = Split(MatMul(n, W_gate_up * s_gu))
      logits [1, 1, V] f32 = Cast(MatMul(RMSNorm(h[:, -1:]), W_lm))

Why this interface (docs/tensorrt.md has the measurements): TensorRT's IAttention rejects past-key inputs and
extra outputs, so the cache update is a separate op whose output *is* the graph's `present` tensor; TensorRT
turns TensorScatter into its in-place KV-cache layer, and ORT updates in place when `present` is bound to the
`past` buffer (IO binding). T comes from the shape of `attention_mask` rather than from `write_index + S`,
which would make write_index a shape tensor (TensorRT refuses that). The cache length M is static.

Quantized sites use export/graphs/qdq_ops.py (block-wise int4 DequantizeLinear, W8A8 / FP8 Q/DQ) with
fp16 scales; SmoothQuant and AWQ input scales fold into the weights and the op that produces the input,
exactly as in export/graphs/decoder.py, so a quantized graph gains no node for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from transformers import LlamaForCausalLM

from pulse_edge.export.graphs.decoder import IR_VERSION, DecoderShape, ExternalData, LinearPlan
from pulse_edge.export.graphs.qdq_ops import MIN_OPSET, emit_qdq_matmul
from pulse_edge.export.graphs.quant_ops import MatMulSpec
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, TensorSpec

# The least opset of each form: the native LLM ops arrived in 23 (Attention, RotaryEmbedding, RMSNormalization)
# and 24 (TensorScatter); the explicit form needs 18 (ReduceMean's axes as an input), so its fp16, int8 and fp8
# graphs stay within what older parsers read. Quantized sites raise it (qdq_ops.MIN_OPSET: int4 blocks need 21).
OPSETS = MappingProxyType({"native": 24, "explicit": 18})
FLOAT = TensorProto.FLOAT16  # IAttention has fp16/bf16 kernels only: every TensorRT-ready decoder is fp16
NP_FLOAT = np.float16
# ORT fuses DequantizeLinear(int4/int8) + MatMul into MatMulNBits at accuracy level 4 (int8 activations; with
# fp16 at level "extended" the result is wrong); level 0 keeps the float math of the Q/DQ graph.
QDQ_MATMULNBITS_ACCURACY_LEVEL = 0


@dataclass(frozen=True)
class TrtDecoderOptions:
    ops: str = "native"
    label: str = "fp16"  # the precision the manifest records
    file_name: str = "decoder.onnx"


class _Graph:
    """Nodes and initializers of one graph; weights stream into its external-data file."""

    def __init__(self, data: ExternalData, plan: LinearPlan) -> None:
        self.data, self.plan = data, plan
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def weight(self, name: str, array: np.ndarray, dtype: Any = NP_FLOAT) -> str:
        self.inits.append(self.data.initializer(name, np.asarray(array).astype(dtype, copy=False)))
        return name

    def const(self, name: str, values: list[int] | int, dims: list[int] | None = None) -> str:
        values = values if isinstance(values, list) else [values]
        self.inits.append(helper.make_tensor(name, TensorProto.INT64, [len(values)] if dims is None else dims,
                                             values))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, **attrs: Any) -> str:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"{outs[0]}/{op}", **attrs))
        return outs[0]

    def matmul(self, site: str, x: str, weight: np.ndarray) -> str:
        spec = MatMulSpec(site=site, x=x, y=f"{site}.out", weight=weight, act_amax=self.plan.act_amax.get(site),
                          block_size=self.plan.block_size)
        emitted = emit_qdq_matmul(self.plan.scheme(site), spec, NP_FLOAT)
        self.nodes.extend(emitted.nodes)
        for name, array in emitted.floats.items():
            self.weight(name, array)
        for name, array in emitted.raw.items():
            self.inits.append(self.data.initializer(name, array))
        for name, packed in emitted.int4.items():
            tensor = self.data.initializer(name, packed.packed)  # the bytes; the element type and dims follow
            tensor.data_type, tensor.dims[:] = TensorProto.INT4, list(packed.shape)
            self.inits.append(tensor)
        return spec.y


def _linear_t(*linears: torch.nn.Linear) -> np.ndarray:
    """Torch Linear weights [out, in] (several packed along out) as one MatMul weight [in, sum(out)] float32."""
    return np.concatenate([lin.weight.detach().float().numpy() for lin in linears], axis=0).T


def _gamma(norm: torch.nn.Module) -> np.ndarray:
    return norm.weight.detach().float().numpy()


# ----------------------------------------------------------------------------- the two forms' primitives


def _rms_norm(g: _Graph, ops: str, x: str, gamma: np.ndarray, name: str, eps: float) -> str:
    """RMSNorm over the last axis, computed in fp32 in both forms (fp16 sums of squares overflow)."""
    w = g.weight(f"{name}.weight", gamma)
    if ops == "native":
        return g.node("RMSNormalization", [x, w], f"{name}.out", axis=-1, epsilon=eps, stash_type=1)
    x32 = g.node("Cast", [x], f"{name}.x32", to=TensorProto.FLOAT)
    square = g.node("Mul", [x32, x32], f"{name}.sq")
    mean = g.node("ReduceMean", [square, "const.axis_last"], f"{name}.mean", keepdims=1)
    eps_name = g.weight(f"{name}.eps", np.array(eps, np.float32), np.float32)
    inv = g.node("Reciprocal", [g.node("Sqrt", [g.node("Add", [mean, eps_name], f"{name}.var")], f"{name}.rms")],
                 f"{name}.inv")
    normed = g.node("Cast", [g.node("Mul", [x32, inv], f"{name}.n32")], f"{name}.n16", to=FLOAT)
    return g.node("Mul", [normed, w], f"{name}.out")  # HF: weight * x.to(input dtype)


def _rope(g: _Graph, ops: str, x: str, name: str) -> str:
    """Rotary embedding of x [1, N, S, D] at position_ids (halves rotated, not interleaved)."""
    if ops == "native":
        return g.node("RotaryEmbedding", [x, "rotary.cos", "rotary.sin", names.POSITION_IDS], f"{name}.rope",
                      interleaved=0)
    first = g.node("Slice", [x, "const.zero", "const.half", "const.axis_last"], f"{name}.x1")
    second = g.node("Slice", [x, "const.half", "const.int_max", "const.axis_last"], f"{name}.x2")
    rotated = g.node("Concat", [g.node("Neg", [second], f"{name}.neg"), first], f"{name}.rot", axis=-1)
    return g.node("Add", [g.node("Mul", [x, "rope.cos"], f"{name}.xc"),
                          g.node("Mul", [rotated, "rope.sin"], f"{name}.rs")], f"{name}.rope")


def _rope_tables_explicit(g: _Graph) -> None:
    """cos/sin [1, 1, S, D] gathered at position_ids (halves repeated), once for every layer."""
    for part in ("cos", "sin"):
        half = g.node("Gather", [f"rotary.{part}", names.POSITION_IDS], f"rope.{part}.half", axis=0)  # [1, S, D/2]
        full = g.node("Concat", [half, half], f"rope.{part}.full", axis=-1)
        g.node("Unsqueeze", [full, "const.axis_1"], f"rope.{part}")


def _kv_update(g: _Graph, ops: str, past: str, new: str, present: str) -> str:
    """Write new [1, KVN, S, D] into the cache at write_index; the op's output is the graph output itself."""
    if ops == "native":
        return g.node("TensorScatter", [past, new, names.WRITE_INDEX], present, axis=2)
    return g.node("ScatterElements", [past, "kv.index", new], present, axis=2)


def _kv_index_explicit(g: _Graph, shape: DecoderShape) -> None:
    """ScatterElements' indices [1, KVN, S, D]: write_index + 0..S-1 along the cache axis."""
    steps = g.node("Range", ["const.scalar_zero", "seq.len_scalar", "const.scalar_one"], "kv.steps")
    positions = g.node("Add", [steps, names.WRITE_INDEX], "kv.positions")  # [S]
    column = g.node("Reshape", [positions, "const.col4"], "kv.column")  # [1, 1, S, 1]
    target = g.node("Concat", ["const.one", g.const("kv.heads", shape.kv_heads), "seq.len",
                               g.const("kv.dim", shape.head_dim)], "kv.shape", axis=0)
    g.node("Expand", [column, target], "kv.index")


def _attention(g: _Graph, ops: str, q: str, k: str, v: str, name: str, head_dim: int) -> str:
    """softmax(q K^T / sqrt(D) masked) V over the T positions held: [1, N, S, D]."""
    scale = float(head_dim ** -0.5)
    if ops == "native":
        return g.node("Attention", [q, k, v, "mask.bool"], f"{name}.attn", scale=scale)
    kt = g.node("Transpose", [k], f"{name}.kt", perm=[0, 1, 3, 2])
    scores = g.node("Cast", [g.node("MatMul", [q, kt], f"{name}.qk")], f"{name}.qk32", to=TensorProto.FLOAT)
    scaled = g.node("Mul", [scores, g.weight(f"{name}.scale", np.array(scale, np.float32), np.float32)],
                    f"{name}.scaled")
    probs = g.node("Softmax", [g.node("Add", [scaled, "mask.add"], f"{name}.masked")], f"{name}.p32", axis=-1)
    return g.node("MatMul", [g.node("Cast", [probs], f"{name}.p", to=FLOAT), v], f"{name}.attn")


def _masks(g: _Graph, ops: str) -> None:
    """mask [1, 1, S, T]: key position t is visible to the query at position p when t <= p."""
    g.node("Shape", [names.ATTENTION_MASK], "seq.total", start=1, end=2)  # [1] = T
    g.node("Shape", [names.POSITION_IDS], "seq.len", start=1, end=2)  # [1] = S
    g.node("Squeeze", ["seq.len", "const.zero"], "seq.len_scalar")
    total = g.node("Squeeze", ["seq.total", "const.zero"], "seq.total_scalar")
    keys = g.node("Range", ["const.scalar_zero", total, "const.scalar_one"], "mask.keys")  # [T]
    queries = g.node("Unsqueeze", [names.POSITION_IDS, "const.axes_1_3"], "mask.queries")  # [1, 1, S, 1]
    visible = g.node("LessOrEqual", [keys, queries], "mask.bool")
    if ops == "explicit":
        g.node("Where", [visible, "const.f32_zero", "const.f32_min"], "mask.add")


def _constants(g: _Graph, ops: str, shape: DecoderShape) -> None:
    for name, value in (("const.zero", 0), ("const.int_max", int(np.iinfo(np.int64).max)), ("const.axis_1", 1),
                        ("const.cache_axis", 2)):
        g.const(name, value)
    g.const("const.scalar_zero", 0, dims=[])
    g.const("const.scalar_one", 1, dims=[])
    g.const("const.axes_1_3", [1, 3])
    g.const("const.flat3", [1, 0, shape.heads * shape.head_dim])
    if ops == "explicit":
        for name, value in (("const.one", 1), ("const.half", shape.head_dim // 2), ("const.axis_last", -1)):
            g.const(name, value)
        g.const("const.col4", [1, 1, -1, 1])
        g.weight("const.f32_zero", np.array(0, np.float32), np.float32)
        g.weight("const.f32_min", np.array(np.finfo(np.float32).min, np.float32), np.float32)


# ----------------------------------------------------------------------------- layers


def _heads(g: _Graph, x: str, name: str, heads: int, head_dim: int) -> str:
    """[1, S, heads * D] -> [1, heads, S, D]."""
    shaped = g.node("Reshape", [x, g.const(f"{name}.shape", [1, 0, heads, head_dim])], f"{name}.4d")
    return g.node("Transpose", [shaped], f"{name}.bnsh", perm=[0, 2, 1, 3])


def _attention_block(g: _Graph, ops: str, layer: Any, i: int, normed: str, shape: DecoderShape) -> str:
    attn, p = layer.self_attn, f"layers.{i}.attn"
    n_q, n_kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    wqkv = _linear_t(attn.q_proj, attn.k_proj, attn.v_proj) * g.plan.scale(f"layers.{i}.qkv", shape.hidden)[:, None]
    wqkv[:, n_q + n_kv:] /= g.plan.scale(f"layers.{i}.o", n_q)[None, :]  # o's input scale folds into v (plan.check)
    qkv = g.matmul(f"layers.{i}.qkv", normed, wqkv)
    sizes = g.const(f"{p}.split", [n_q, n_kv, n_kv])
    q, k, v = (f"{p}.{part}" for part in "qkv")
    g.node("Split", [qkv, sizes], [q, k, v], axis=-1)
    q = _rope(g, ops, _heads(g, q, f"{p}.q", shape.heads, shape.head_dim), f"{p}.q")
    k = _rope(g, ops, _heads(g, k, f"{p}.k", shape.kv_heads, shape.head_dim), f"{p}.k")
    v = _heads(g, v, f"{p}.v", shape.kv_heads, shape.head_dim)
    held = []
    for part, new in (("key", k), ("value", v)):
        present = _kv_update(g, ops, names.past_name(i, part), new, names.present_name(i, part))
        held.append(g.node("Slice", [present, "const.zero", "seq.total", "const.cache_axis"], f"{p}.{part}_held"))
    out = _attention(g, ops, q, held[0], held[1], p, shape.head_dim)
    flat = g.node("Reshape", [g.node("Transpose", [out], f"{p}.bsnh", perm=[0, 2, 1, 3]), "const.flat3"],
                  f"{p}.flat")
    wo = _linear_t(attn.o_proj) * g.plan.scale(f"layers.{i}.o", n_q)[:, None]
    return g.matmul(f"layers.{i}.o", flat, wo)


def _mlp_block(g: _Graph, layer: Any, i: int, normed: str, shape: DecoderShape) -> str:
    mlp, p = layer.mlp, f"layers.{i}.mlp"
    down_scale = g.plan.scale(f"layers.{i}.down", shape.intermediate)
    wgu = _linear_t(mlp.gate_proj, mlp.up_proj) * g.plan.scale(f"layers.{i}.gate_up", shape.hidden)[:, None]
    wgu[:, shape.intermediate:] /= down_scale[None, :]  # up / s: the down input arrives divided by s
    gu = g.matmul(f"layers.{i}.gate_up", normed, wgu)
    gate, up = f"{p}.gate", f"{p}.up"
    g.node("Split", [gu, g.const(f"{p}.split", [shape.intermediate, shape.intermediate])], [gate, up], axis=-1)
    silu = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{p}.sig")], f"{p}.silu")
    act = g.node("Mul", [silu, up], f"{p}.act")
    return g.matmul(f"layers.{i}.down", act, _linear_t(mlp.down_proj) * down_scale[:, None])


def _layers(g: _Graph, ops: str, lm: LlamaForCausalLM, shape: DecoderShape) -> None:
    hidden = g.node("Cast", [names.INPUTS_EMBEDS], "embeds.fp16", to=FLOAT)
    for i, layer in enumerate(lm.model.layers):
        gamma = _gamma(layer.input_layernorm) / g.plan.scale(f"layers.{i}.qkv", shape.hidden)
        normed = _rms_norm(g, ops, hidden, gamma, f"layers.{i}.input_norm", shape.eps)
        hidden = g.node("Add", [hidden, _attention_block(g, ops, layer, i, normed, shape)], f"layers.{i}.h_attn")
        gamma = _gamma(layer.post_attention_layernorm) / g.plan.scale(f"layers.{i}.gate_up", shape.hidden)
        normed = _rms_norm(g, ops, hidden, gamma, f"layers.{i}.post_norm", shape.eps)
        hidden = g.node("Add", [hidden, _mlp_block(g, layer, i, normed, shape)], f"layers.{i}.h_mlp")
    # Only the last position's logits are needed: slicing before the norm saves S x V x H MACs per prefill.
    last = g.node("Slice", [hidden, g.const("last.start", -1), "const.int_max", "const.axis_1"], "last_hidden")
    final = _rms_norm(g, ops, last, _gamma(lm.model.norm), "final_norm", shape.eps)
    logits = g.matmul("lm_head", final, _linear_t(lm.lm_head))
    g.node("Cast", [logits], names.LOGITS, to=TensorProto.FLOAT)


def _rotary_tables(lm: LlamaForCausalLM, length: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [length, D/2] from the reference model's own rotary module (same float32 math)."""
    with torch.inference_mode():
        cos, sin = lm.model.rotary_emb(torch.zeros(1, dtype=torch.float32), torch.arange(length)[None])
    half = head_dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


# ----------------------------------------------------------------------------- the graph and its description


def io_specs(shape: DecoderShape) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The interface: positions and the cache as explicit tensors; the cache holds max_length positions."""
    kv = (1, shape.kv_heads, shape.max_length, shape.head_dim)
    inputs = [TensorSpec(names.INPUTS_EMBEDS, "float32", (1, "sequence", shape.hidden)),
              TensorSpec(names.POSITION_IDS, "int64", (1, "sequence")),
              TensorSpec(names.WRITE_INDEX, "int64", (1,)),
              TensorSpec(names.ATTENTION_MASK, "int64", (1, "total")),
              *(TensorSpec(n, "float16", kv) for n in names.kv_names(shape.layers, "past"))]
    outputs = [TensorSpec(names.LOGITS, "float32", (1, 1, shape.vocab)),
               *(TensorSpec(n, "float16", kv) for n in names.kv_names(shape.layers, "present"))]
    return inputs, outputs


def _value_infos(specs: list[TensorSpec]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape))
            for t in specs]


def graph_opset(ops: str, plan: LinearPlan) -> int:
    return max([OPSETS[ops], *(MIN_OPSET[s] for s in plan.schemes.values())])


def build_trt_decoder(lm: LlamaForCausalLM, shape: DecoderShape, out_dir: Path, *, plan: LinearPlan,
                      options: TrtDecoderOptions = TrtDecoderOptions()) -> GraphSpec:
    """Write `file_name` and `file_name.data` (weights streamed tensor by tensor); return the manifest entry."""
    if options.ops not in OPSETS:
        raise ValueError(f"ops {options.ops!r} is not one of {', '.join(OPSETS)}")
    plan.check(shape)
    data = ExternalData(out_dir / f"{options.file_name}.data")
    g = _Graph(data, plan)
    try:
        cos, sin = _rotary_tables(lm, shape.max_length, shape.head_dim)
        g.weight("rotary.cos", cos)  # RotaryEmbedding wants the tables in the activations' type
        g.weight("rotary.sin", sin)
        _constants(g, options.ops, shape)
        _masks(g, options.ops)
        if options.ops == "explicit":
            _rope_tables_explicit(g)
            _kv_index_explicit(g, shape)
        _layers(g, options.ops, lm, shape)
    finally:
        data.close()
    inputs, outputs = io_specs(shape)
    graph = helper.make_graph(g.nodes, "pulse_decoder_trt", _value_infos(inputs), _value_infos(outputs),
                              initializer=g.inits)
    opset = graph_opset(options.ops, plan)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION,
                              producer_name="pulse-edge")
    onnx.save_model(model, str(out_dir / options.file_name))
    return describe(shape, options, out_dir, opset=opset, plan=plan)


def describe(shape: DecoderShape, options: TrtDecoderOptions, out_dir: Path, *, opset: int,
             plan: LinearPlan) -> GraphSpec:
    inputs, outputs = io_specs(shape)
    file_name, data_name = options.file_name, f"{options.file_name}.data"
    quantized = any(s != "fp" for s in plan.schemes.values())
    return GraphSpec(file=file_name, engine="onnx", precision=options.label, inputs=tuple(inputs),
                     outputs=tuple(outputs), sizes={name: (out_dir / name).stat().st_size
                                                    for name in (file_name, data_name)},
                     external_data=data_name, opset=opset, ir_version=IR_VERSION, builder="direct",
                     kv_shared_buffer=True, kv_update="scatter", target="tensorrt", trt_ops=options.ops,
                     ort_qdq_matmulnbits_accuracy_level=QDQ_MATMULNBITS_ACCURACY_LEVEL if quantized else None,
                     matmul_schemes=_scheme_counts(plan, shape))


def _scheme_counts(plan: LinearPlan, shape: DecoderShape) -> dict[str, int]:
    from pulse_edge.calibration.recipes import decoder_sites

    counts: dict[str, int] = {}
    for site in decoder_sites(shape.layers):
        scheme = plan.scheme(site)
        counts[scheme] = counts.get(scheme, 0) + 1
    return counts
