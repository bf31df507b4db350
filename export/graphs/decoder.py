"""The decoder graph, built directly from the weights with ONNX Runtime's fused ops.

A plain `torch.onnx` export of the LLaMA decoder gives separate MatMul /
Softmax / rotary / norm nodes and a KV cache that grows by concatenation every
step. This builder emits what ORT runs fastest instead:

    inputs_embeds [1, S, H]  (float32; Cast to fp16 inside fp16 graphs)
      layer i:
        n_i, h_i = SkipSimplifiedLayerNorm(m_{i-1}, h_{i-1}, w_in)   (layer 0: SimplifiedLayerNorm)
        qkv      = MatMul(n_i, W_qkv)                                 [1, S, (N + 2 KVN) D]
        a, K, V  = GroupQueryAttention(qkv, past K_i, past V_i, seqlens_k, total_len, cos, sin
                                       [, k_scale_i, v_scale_i: int8 cache, PER_CHANNEL [1, KVN, 1, D]])
                   (RoPE inside; past and present share one [1, KVN, max_len, D] buffer, float32 or int8)
        n'_i, h'_i = SkipSimplifiedLayerNorm(MatMul(a, W_o), h_i, w_post)
        g, u     = Split(MatMul(n'_i, W_gate_up))
        m_i      = MatMul(g * Sigmoid(g) * u, W_down)
      n = SkipSimplifiedLayerNorm(m_last, h'_last, w_norm) -> last position -> MatMul(W_lm) -> logits [1, 1, V] float32

Weights stream from the reference model one tensor at a time into a single
external-data file (offsets aligned to 4 KiB so ORT can map them), so the
7B model is never held twice and the protobuf stays far below its 2 GB limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from transformers import LlamaForCausalLM

from pulse_edge.errors import CheckpointError
from pulse_edge.export.graphs.kv_cache import (
    INT8_KV_ATTRS,
    SCATTER_OPSET,
    KVScales,
    attention_over_fp16_cache,
    attention_over_int8_cache,
    cache_positions,
    fp16_rotary_tables,
    scale_inputs,
)
from pulse_edge.export.graphs.quant_ops import FP8_MIN_OPSET, MatMulSpec, emit_matmul, graph_opt_level
from pulse_edge.export.model.config import PulseConfig
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, TensorSpec

FP16_MAX = float(np.finfo(np.float16).max)

IR_VERSION = 10  # ONNX Runtime 1.31 reads IR <= 13; 10 keeps older runtimes (Jetson builds) working
OPSET = 17  # float and int graphs; fp8 graphs need FP8_MIN_OPSET (float8 Q/DQ)
CONTRIB_OPS = frozenset({"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "MatMulNBits"})
ALIGN = 4096
# Quantized ops' scalars and shape constants stay in the graph: ORT's shape inference reads a Reshape's
# shape at load time and cannot read it from external data.
INLINE_BYTES = 64
PRECISION_DTYPES = {"fp32": (np.float32, TensorProto.FLOAT, "float32"),
                    "fp16": (np.float16, TensorProto.FLOAT16, "float16")}


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    max_length: int

    @classmethod
    def from_config(cls, cfg: PulseConfig, max_length: int) -> DecoderShape:
        t = cfg.text
        return cls(layers=t.num_layers, hidden=t.hidden_size, heads=t.num_heads, kv_heads=t.num_kv_heads,
                   head_dim=t.head_dim, intermediate=t.intermediate_size, vocab=t.vocab_size, eps=t.rms_norm_eps,
                   max_length=max_length)


@dataclass(frozen=True)
class LinearPlan:
    """How each decoder MatMul is emitted: its scheme, calibrated input range, and folded input scales.

    `input_scales[site]` = s [K] (SmoothQuant or AWQ): the weight's rows are multiplied by s and the
    input divided by s, folded into the op that produces the input (the RMSNorm weight for qkv and
    gate_up, the v rows for o, the up rows for down), so the graph gains no node.
    """

    schemes: Mapping[str, str] = field(default_factory=dict)  # absent site: "fp"
    act_amax: Mapping[str, float] = field(default_factory=dict)
    input_scales: Mapping[str, np.ndarray] = field(default_factory=dict)
    block_size: int = 128
    accuracy_level: int = 4

    def scheme(self, site: str) -> str:
        return self.schemes.get(site, "fp")

    def scale(self, site: str, size: int) -> np.ndarray:
        """The site's input scale, ones when it has none."""
        s = self.input_scales.get(site)
        return np.ones(size, np.float32) if s is None else np.asarray(s, np.float32)

    def check(self, shape: DecoderShape) -> None:
        """o's input scale folds into v's rows only when every attention head has its own v head."""
        if shape.heads != shape.kv_heads and any(site.endswith(".o") for site in self.input_scales):
            raise ValueError(f"input scales on o need heads == kv_heads (got {shape.heads} vs {shape.kv_heads})")

    @property
    def opset(self) -> int:
        return FP8_MIN_OPSET if "fp8" in self.schemes.values() else OPSET

    @property
    def ort_opt_level(self) -> str:
        return graph_opt_level(set(self.schemes.values()))


FLOAT_PLAN = LinearPlan()


class ExternalData:
    """Appends tensors to one raw file and returns initializers that point into it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._offset = 0

    def initializer(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.ascontiguousarray(array).reshape(np.shape(array))  # ascontiguousarray makes 0-d arrays 1-d
        pad = -self._offset % ALIGN
        self._file.write(b"\0" * pad)
        self._offset += pad
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", self._offset), ("length", array.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self._file.write(memoryview(array.reshape(-1).view(np.uint8)).cast("B"))  # bytes: memoryview rejects float8
        self._offset += array.nbytes
        return tensor

    def close(self) -> None:
        self._file.close()


class _Builder:
    """Collects nodes and initializers; names are unique by construction (prefix per layer)."""

    def __init__(self, data: ExternalData, np_dtype: type, plan: LinearPlan, kv: KVScales | None = None,
                 fp16_cache: bool = False) -> None:
        self.data, self.np_dtype, self.plan, self.kv, self.fp16_cache = data, np_dtype, plan, kv, fp16_cache
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self._consts: set[str] = set()
        # attending in float over an int8 cache writes it back with TensorScatter (opset 24)
        self.opset = max(plan.opset, SCATTER_OPSET) if kv is not None and kv.float_attention else plan.opset
        self.positions: tuple[str, str] | None = None  # kv_cache.cache_positions, made on first use

    def const(self, name: str, array: np.ndarray) -> str:
        """A small constant kept in the graph (shape inference reads it at load time), added once per name."""
        if name not in self._consts:
            self._consts.add(name)
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def raw(self, name: str, array: np.ndarray) -> str:
        """A tensor in external data as given (its own dtype, not the graph's float type)."""
        self.inits.append(self.data.initializer(name, array))
        return name

    def weight(self, name: str, tensor: torch.Tensor | np.ndarray) -> str:
        array = tensor.detach().float().numpy() if isinstance(tensor, torch.Tensor) else tensor
        # the largest magnitude from max and min: np.abs would copy the tensor (500 MB for the 7B's lm_head)
        peak = float(max(array.max(), -array.min())) if self.np_dtype == np.float16 and array.size else 0.0
        if peak > FP16_MAX:  # numpy's overflow warning leaked, then every check read "rel err nan": named instead
            raise CheckpointError(f"the weight {name} holds values up to {peak:.3g}, past fp16's {FP16_MAX:g}: this "
                                  "checkpoint cannot be exported at --precision fp16; export fp32 or a quantized "
                                  "recipe")
        self.inits.append(self.data.initializer(name, array.astype(self.np_dtype, copy=False)))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: Any) -> list[str]:
        domain = "com.microsoft" if op in CONTRIB_OPS else ""
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs

    def matmul(self, site: str, x: str, weight: np.ndarray) -> str:
        """x @ weight [K, N] by the plan's scheme for `site`; returns the output's name."""
        spec = MatMulSpec(site=site, x=x, y=f"{site}.out", weight=weight,
                          act_amax=self.plan.act_amax.get(site), block_size=self.plan.block_size,
                          accuracy_level=self.plan.accuracy_level, opset=self.opset)
        emitted = emit_matmul(self.plan.scheme(site), spec)
        self.nodes.extend(emitted.nodes)
        for name, array in emitted.arrays.items():
            self.weight(name, array)
        for name, array in emitted.raw.items():
            self.inits.append(self.data.initializer(name, array) if array.nbytes > INLINE_BYTES
                              else numpy_helper.from_array(array, name))
        return spec.y


def _linear_t(*linears: torch.nn.Linear) -> np.ndarray:
    """Torch Linear weights [out, in] (several packed along out) as one MatMul weight [in, sum(out)]."""
    return np.concatenate([lin.weight.detach().float().numpy() for lin in linears], axis=0).T


def _attention(b: _Builder, layer: Any, i: int, normed: str, shape: DecoderShape) -> str:
    """qkv MatMul -> GroupQueryAttention (rotary, shared KV buffer; an int8 one: export/graphs/kv_cache.py)
    -> output MatMul."""
    attn = layer.self_attn
    p = f"layers.{i}.attn"
    wqkv = _linear_t(attn.q_proj, attn.k_proj, attn.v_proj)  # [H, (N + 2 KVN) D]
    wqkv *= b.plan.scale(f"layers.{i}.qkv", shape.hidden)[:, None]
    v_cols = slice(wqkv.shape[1] - shape.kv_heads * shape.head_dim, None)
    wqkv[:, v_cols] /= b.plan.scale(f"layers.{i}.o", shape.heads * shape.head_dim)[None, :]  # LinearPlan.check
    qkv = b.matmul(f"layers.{i}.qkv", normed, wqkv)
    gqa = {"num_heads": shape.heads, "kv_num_heads": shape.kv_heads, "do_rotary": 1, "rotary_interleaved": 0,
           "scale": float(shape.head_dim ** -0.5)}
    if b.kv is not None and b.kv.float_attention:
        b.positions = b.positions or cache_positions(b)
        out = attention_over_int8_cache(b, b.kv, i, qkv, b.positions, gqa)
    elif b.fp16_cache:
        out = attention_over_fp16_cache(b, i, qkv, gqa)
    else:
        scales = ["", "", "", *scale_inputs(b, b.kv, i)] if b.kv is not None else []
        (out, _, _) = b.node(
            "GroupQueryAttention",
            [qkv, "", "", names.past_name(i, "key"), names.past_name(i, "value"), names.SEQLENS_K,
             names.TOTAL_SEQUENCE_LENGTH, "rotary.cos", "rotary.sin", *scales],
            [f"{p}.out", names.present_name(i, "key"), names.present_name(i, "value")], f"{p}/gqa",
            **gqa, **(INT8_KV_ATTRS if b.kv is not None else {}))
    wo = _linear_t(attn.o_proj) * b.plan.scale(f"layers.{i}.o", shape.heads * shape.head_dim)[:, None]
    return b.matmul(f"layers.{i}.o", out, wo)


def _mlp(b: _Builder, layer: Any, i: int, normed: str, shape: DecoderShape) -> str:
    """SwiGLU: one packed gate/up MatMul, SiLU(gate) * up, down MatMul."""
    mlp = layer.mlp
    p = f"layers.{i}.mlp"
    down_scale = b.plan.scale(f"layers.{i}.down", shape.intermediate)
    wgu = _linear_t(mlp.gate_proj, mlp.up_proj) * b.plan.scale(f"layers.{i}.gate_up", shape.hidden)[:, None]
    wgu[:, shape.intermediate:] /= down_scale[None, :]  # up / s: the down input arrives divided by s
    gu = b.matmul(f"layers.{i}.gate_up", normed, wgu)
    split = {"num_outputs": 2} if b.opset >= 18 else {}  # opset 18 made the output count explicit
    gate, up = b.node("Split", [gu], [f"{p}.gate", f"{p}.up"], f"{p}/split", axis=-1, **split)
    (sig,) = b.node("Sigmoid", [gate], [f"{p}.sig"], f"{p}/sigmoid")
    (silu,) = b.node("Mul", [gate, sig], [f"{p}.silu"], f"{p}/silu")
    (act,) = b.node("Mul", [silu, up], [f"{p}.act"], f"{p}/act")
    return b.matmul(f"layers.{i}.down", act, _linear_t(mlp.down_proj) * down_scale[:, None])


def _skip_norm(b: _Builder, x: str, skip: str, weight: torch.Tensor | np.ndarray, name: str,
               eps: float) -> tuple[str, str]:
    """RMSNorm(x + skip) and the sum itself (the new residual stream)."""
    w = b.weight(f"{name}.weight", weight)
    normed, _, _, total = b.node("SkipSimplifiedLayerNormalization", [x, skip, w],
                                 [f"{name}.out", "", "", f"{name}.sum"], f"{name}/skipnorm", epsilon=eps)
    return normed, total


def _rotary_tables(lm: LlamaForCausalLM, shape: DecoderShape) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_length, D/2] from the reference model's own rotary module (same float32 math)."""
    positions = torch.arange(shape.max_length)[None]
    probe = torch.zeros(1, dtype=torch.float32)
    with torch.inference_mode():
        cos, sin = lm.model.rotary_emb(probe, positions)  # [1, L, D] (halves repeated)
    half = shape.head_dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def build_decoder(lm: LlamaForCausalLM, shape: DecoderShape, out_dir: Path, *, precision: str = "fp32",
                  file_name: str = "decoder.onnx", plan: LinearPlan = FLOAT_PLAN,
                  label: str | None = None, kv: KVScales | None = None, fp16_cache: bool = False) -> GraphSpec:
    """Write `file_name` and `file_name.data`; return the graph's manifest entry.

    `precision` is the float type of everything the plan leaves unquantized; `label` is the
    precision the manifest records (the recipe's name for a quantized graph). `kv` makes the
    cache int8 (fp32 graphs only: ORT's CPU kernel pairs an int8 cache with float32 attention);
    `fp16_cache` makes an fp32 graph's cache fp16, attended over in fp16 (export/graphs/kv_cache.py).
    """
    np_dtype, onnx_dtype, dtype_name = PRECISION_DTYPES[precision]
    plan.check(shape)
    if precision != "fp32" and any(scheme != "fp" for scheme in plan.schemes.values()):
        raise ValueError("quantized plans are emitted with fp32 scales and activations (MatMulNBits' T1 is A's type)")
    if kv is not None:
        kv.check(shape.layers, shape.kv_heads, shape.head_dim)
        if precision != "fp32":
            raise ValueError("an int8 KV cache goes with float32 attention (ORT's CPU GroupQueryAttention)")
    if fp16_cache and (kv is not None or precision != "fp32"):
        raise ValueError("an fp16 KV cache is an fp32 graph's option (an fp16 graph's cache is fp16 already)")
    kv_dtype = "int8" if kv is not None else "float16" if fp16_cache else dtype_name
    data = ExternalData(out_dir / f"{file_name}.data")
    b = _Builder(data, np_dtype, plan, kv, fp16_cache)
    try:
        cos, sin = _rotary_tables(lm, shape)
        if fp16_cache:
            fp16_rotary_tables(b, cos, sin)
        else:
            b.weight("rotary.cos", cos)
            b.weight("rotary.sin", sin)
        hidden = names.INPUTS_EMBEDS
        if precision != "fp32":
            (hidden,) = b.node("Cast", [hidden], ["embeds.cast"], "embeds/cast", to=onnx_dtype)
        _layers(b, lm, shape, hidden)
    finally:
        data.close()
    inputs, outputs = _io_specs(shape, kv_dtype)
    graph = helper.make_graph(b.nodes, "pulse_decoder", _value_infos(inputs), _value_infos(outputs),
                              initializer=b.inits)
    opsets = [helper.make_opsetid("", b.opset), helper.make_opsetid("com.microsoft", 1)]
    ir_version = max(IR_VERSION, helper.find_min_ir_version_for(opsets[:1]))  # opset 24 (TensorScatter): IR 12
    model = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version, producer_name="pulse-edge")
    onnx.save_model(model, str(out_dir / file_name))
    return describe(shape, label or precision, kv_dtype, file_name, out_dir, opset=b.opset,
                    opt_level_limit=plan.ort_opt_level)


def _layers(b: _Builder, lm: LlamaForCausalLM, shape: DecoderShape, embeds: str) -> None:
    residual, mlp_out = embeds, None
    for i, layer in enumerate(lm.model.layers):
        gamma = _gamma(layer.input_layernorm) / b.plan.scale(f"layers.{i}.qkv", shape.hidden)
        normed, residual = _input_norm(b, mlp_out, residual, gamma, i, shape.eps)
        attn_out = _attention(b, layer, i, normed, shape)
        gamma = _gamma(layer.post_attention_layernorm) / b.plan.scale(f"layers.{i}.gate_up", shape.hidden)
        normed, residual = _skip_norm(b, attn_out, residual, gamma, f"layers.{i}.post_norm", shape.eps)
        mlp_out = _mlp(b, layer, i, normed, shape)
    final, _ = _skip_norm(b, mlp_out, residual, _gamma(lm.model.norm), "final_norm", shape.eps)
    last = _last_position(b, final)
    logits = b.matmul("lm_head", last, _linear_t(lm.lm_head))
    if b.kv is not None:
        logits = _poisoned(b, final, logits)
    b.node("Cast", [logits], [names.LOGITS], "logits/cast", to=TensorProto.FLOAT)


def _poisoned(b: _Builder, final: str, logits: str) -> str:
    """The logits made NaN where any position's final hidden state is NaN or inf (an int8 cache's graphs).

        final [1, S, H] ─ Mul 0 ─ ReduceSum (every axis) ─ poison [] (0, or NaN)
        logits [1, 1, V] ─────────────────────────────────── Add ─ logits

    An int8 cache stores a NaN or inf key or value as a finite code (the graphs' round-and-clip writes ±127 or 0,
    ORT's own quantizer in GroupQueryAttention -128, 127 or 0), so a position that went non-finite in the middle of a
    prompt would be attended to as a plausible one, and the last position's logits would stay finite: a wrong
    answer with no error. A position's residual stream, once non-finite, stays so through the final norm, and
    0 x NaN and 0 x inf are NaN, so the sum carries it into every logit, where the runtime refuses to answer
    (runtime/engines/bundle_engine.py checks every chunk). A float cache keeps NaN, which then reaches the
    logits through attention: those graphs have no such nodes. Cost: S x H multiplies and adds per run.
    """
    zero = b.const("poison.zero", np.array(0.0, np.float32))
    (zeroed,) = b.node("Mul", [final, zero], ["poison.zeroed"], "poison/zero")
    (poison,) = b.node("ReduceSum", [zeroed], ["poison.sum"], "poison/sum", keepdims=0)
    return b.node("Add", [logits, poison], ["logits.checked"], names.POISON_ADD)[0]


def _gamma(norm: torch.nn.Module) -> np.ndarray:
    return norm.weight.detach().float().numpy()


def _input_norm(b: _Builder, mlp_out: str | None, residual: str, weight: np.ndarray, i: int,
                eps: float) -> tuple[str, str]:
    """Layer 0 normalises the embeddings; later layers add the previous MLP output first."""
    name = f"layers.{i}.input_norm"
    if mlp_out is not None:
        return _skip_norm(b, mlp_out, residual, weight, name, eps)
    w = b.weight(f"{name}.weight", weight)
    (normed,) = b.node("SimplifiedLayerNormalization", [residual, w], [f"{name}.out"], f"{name}/norm",
                       epsilon=eps, axis=-1)
    return normed, residual


def _last_position(b: _Builder, hidden: str) -> str:
    """Only the last position's logits are needed: saves S x V x H MACs in every prefill."""
    for name, value in (("last.start", [-1]), ("last.end", [np.iinfo(np.int64).max]), ("last.axis", [1])):
        b.inits.append(helper.make_tensor(name, TensorProto.INT64, [1], value))
    return b.node("Slice", [hidden, "last.start", "last.end", "last.axis"], ["last_hidden"], "last/slice")[0]


def _value_infos(specs: list[TensorSpec]) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(t.name, helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), list(t.shape))
            for t in specs]


def _io_specs(shape: DecoderShape, kv_dtype: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The decoder's interface; the KV buffers hold the whole context ("max_length" positions)."""
    kv = (1, shape.kv_heads, "max_length", shape.head_dim)
    inputs = [TensorSpec(names.INPUTS_EMBEDS, "float32", (1, "sequence", shape.hidden)),
              *(TensorSpec(n, kv_dtype, kv) for n in names.kv_names(shape.layers, "past")),
              TensorSpec(names.SEQLENS_K, "int32", (1,)), TensorSpec(names.TOTAL_SEQUENCE_LENGTH, "int32", ())]
    outputs = [TensorSpec(names.LOGITS, "float32", (1, 1, shape.vocab)),
               *(TensorSpec(n, kv_dtype, kv) for n in names.kv_names(shape.layers, "present"))]
    return inputs, outputs


def describe(shape: DecoderShape, precision: str, kv_dtype: str, file_name: str, out_dir: Path, *,
             opset: int | None = None, opt_level_limit: str | None = None) -> GraphSpec:
    inputs, outputs = _io_specs(shape, kv_dtype)
    data_name = f"{file_name}.data"
    return GraphSpec(file=file_name, engine="onnx", precision=precision, inputs=tuple(inputs),
                     outputs=tuple(outputs), sizes={file_name: (out_dir / file_name).stat().st_size,
                                                    data_name: (out_dir / data_name).stat().st_size},
                     external_data=data_name, opset=opset, opt_level_limit=opt_level_limit, builder="direct",
                     kv_shared_buffer=True)
