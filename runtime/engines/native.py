"""The decode step on pulse-edge's own CPU kernels: the decode graph's function computed from its weights in place,
without ONNX Runtime.

    embeds ─┬─ RMSNorm ─ qkv (block GEMV) ─ rotary ─ store k, v (int8) ─ attention (decode kernel) ─ o ─ + ─┐
            └────────────────────────────────────────────────────────────────────────────────────────────┘
              ─┬─ RMSNorm ─ gate_up ─ SiLU(gate) * up ─ down ─ + ─ ... next layer ... ─ RMSNorm ─ lm_head ─ logits
               └──────────────────────────────────────────────┘

Why: a decode step streams every weight once. ONNX Runtime's MatMulNBits read 4-bit weights at ~60% of the read
bandwidth inside a 7B decode step on the 2-core VM of docs/performance.md (8-bit ones at ~83%), and a decode
graph cut for the attention kernel paid 33 ORT runs a step. Here each projection is one call of
runtime/kernels/block_gemv.c (the same function as MatMulNBits at accuracy level 4), attention one call of the
decode kernel (runtime/kernels/decode_attention.c), and the elementwise work between them (RMSNorm and the
residual, rotary and the cache store, SiLU) one call each of runtime/kernels/layer_ops.c.

What it reads: the decode index (runtime/bundle/decode_index.py), written by the export beside a decode graph it
checked node by node, and the decode graph's data file it points into; the cache buffers are the decoder's own
(the prefill graph writes them, this reads and extends them). The export validates this step against the
reference like any graph (export/build/native.py); where the kernels cannot run here, or the bundle has no index,
the decode graph runs on ONNX Runtime as before (`native_for` says why in one line, or refuses when asked
outright: `--decode-step native`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import BundleError, ConfigError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.decode_index import DecodeIndex, Linear, Tensor, read_index
from pulse_edge.runtime.bundle.manifest import GraphSpec, KVLayout
from pulse_edge.runtime.engines.segmented import cpu_kernel, int8_view
from pulse_edge.runtime.kernels.attention import D_MULTIPLE, DECODE, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import MAX_ROWS, BlockGemv, BlockWeight, LinearScratch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Kernels:
    gemv: BlockGemv
    attention: Any  # CausalAttention, or a checked one (export/validate/parity.py)
    ops: LayerOps


class _Weights:
    """The index's tensors as numpy arrays over the data file: copied into memory (`resident`, as ORT's
    prepacking does: the step then never waits on the page cache) or views of the mapped file."""

    def __init__(self, path: Path, resident: bool) -> None:
        try:
            self.data = np.memmap(path, np.uint8, "r")
        except (OSError, ValueError) as e:
            raise BundleError(f"{path} cannot be mapped ({e}); re-export the bundle") from e
        self.resident = resident

    def array(self, t: Tensor) -> np.ndarray:
        count = math.prod(t.shape)  # Python ints: a huge shape cannot wrap round to a small count
        end = t.offset + count * np.dtype(t.dtype).itemsize
        if end > self.data.size:
            raise BundleError(f"the decode index places {t.name} past the end of {Path(self.data.filename).name}; "
                              "re-export the bundle")
        view = np.frombuffer(self.data, t.dtype, count, t.offset).reshape(t.shape)
        return np.array(view) if self.resident else view

    def linear(self, lin: Linear, k: int, n: int, what: str) -> BlockWeight | np.ndarray:
        if (lin.k, lin.n) != (k, n):
            raise BundleError(f"the decode index's {what} is [{lin.k}, {lin.n}], not [{k}, {n}]; re-export the bundle")
        if lin.bits == 0:
            if lin.weight is None or lin.weight.dtype != "float32":
                raise BundleError(f"the decode index's {what} has no float32 weight; re-export the bundle")
            weight = self.array(lin.weight)
            if weight.shape != (k, n):
                raise BundleError(f"the decode index's {what} has no float32 [{k}, {n}] weight; re-export the bundle")
            return weight
        if lin.codes is None or lin.scales is None:
            raise BundleError(f"the decode index's {what} lacks its codes or scales; re-export the bundle")
        codes, scales = self.array(lin.codes), self.array(lin.scales).reshape(-1)
        try:
            return BlockWeight(codes, scales, lin.k, lin.n, lin.bits, lin.block)  # checks the layout
        except ValueError as e:
            raise BundleError(f"the decode index's {what}: {e}; re-export the bundle") from e


@dataclass(frozen=True)
class _Layer:
    input_norm: np.ndarray  # [H]
    qkv: BlockWeight | np.ndarray  # [H] -> [(N + 2 KVN) D]
    k_scale: np.ndarray  # [KVN, D]
    v_scale: np.ndarray
    o: BlockWeight | np.ndarray  # [N D] -> [H]
    post_norm: np.ndarray
    gate_up: BlockWeight | np.ndarray  # [H] -> [2 I]
    down: BlockWeight | np.ndarray  # [I] -> [H]


def _vector(weights: _Weights, t: Tensor, shape: tuple[int, ...], what: str, positive: bool = False) -> np.ndarray:
    array = weights.array(t)
    if array.size != int(np.prod(shape)) or array.dtype != np.float32:
        raise BundleError(f"the decode index's {what} is {array.dtype} {list(array.shape)}, not float32 {list(shape)}; "
                          "re-export the bundle")
    array = np.ascontiguousarray(array.reshape(shape))
    if not np.isfinite(array).all() or (positive and not (array > 0).all()):
        raise BundleError(f"the decode index's {what} holds non-finite{' or non-positive' if positive else ''} "
                          "values: the bundle is damaged; re-export it")
    return array


class NativeDecoder:
    """Runs inputs through the decode step (module doc) on the decoder's cache and logits buffer."""

    def __init__(self, bundle: Path, index: DecodeIndex, kv: KVLayout, cache: list[Any], logits: np.ndarray,
                 kernels: Kernels, threads: int, resident: bool = True) -> None:
        if (index.kv_heads, index.head_dim, len(index.layers)) != (kv.kv_heads, kv.head_dim, kv.layers):
            raise BundleError(f"the decode index holds {len(index.layers)} layers of {index.kv_heads} x "
                              f"{index.head_dim} kv heads, the manifest's cache {kv.layers} of {kv.kv_heads} x "
                              f"{kv.head_dim}; re-export the bundle")
        if index.heads % index.kv_heads or logits.shape[-1] != index.vocab:
            raise BundleError("the decode index's heads or vocabulary do not match the manifest; re-export the bundle")
        limit = DECODE.max_head_dim or index.head_dim
        if index.head_dim % D_MULTIPLE or index.head_dim > limit:  # export indexes no such graph
            raise BundleError(f"the decode index's heads of {index.head_dim} channels are not a multiple of "
                              f"{D_MULTIPLE} up to {limit}, which the decode attention kernel takes; re-export the "
                              "bundle")
        self.index, self.kv, self.kernels, self.threads, self.logits = index, kv, kernels, threads, logits
        self.codes = [int8_view(value) for value in cache]  # [kv_heads, max_length, head_dim] per layer and part
        self.pool = kernels.gemv.pool(threads)  # the attention kernel runs on the projections' worker threads
        w = _Weights(bundle / index.data, resident)
        h, d, half = index.hidden, index.head_dim, index.head_dim // 2
        self.cos, self.sin = (_vector(w, t, (t.shape[0], half), "rotary table") for t in index.rotary)
        if self.cos.shape[0] < kv.max_length:
            raise BundleError(f"the rotary tables hold {self.cos.shape[0]} positions, the cache {kv.max_length}; "
                              "re-export the bundle")
        width = (index.heads + 2 * index.kv_heads) * d
        self.layers = [_Layer(
            _vector(w, x.input_norm, (h,), f"layer {i} input norm"),
            w.linear(x.qkv, h, width, f"layer {i} qkv"),
            _vector(w, x.k_scale, (index.kv_heads, d), f"layer {i} key scales", positive=True),
            _vector(w, x.v_scale, (index.kv_heads, d), f"layer {i} value scales", positive=True),
            w.linear(x.o, index.heads * d, h, f"layer {i} o"),
            _vector(w, x.post_norm, (h,), f"layer {i} post norm"),
            w.linear(x.gate_up, h, 2 * index.intermediate, f"layer {i} gate_up"),
            w.linear(x.down, index.intermediate, h, f"layer {i} down")) for i, x in enumerate(index.layers)]
        self.final_norm = _vector(w, index.final_norm, (h,), "final norm")
        self.lm_head = w.linear(index.lm_head, h, index.vocab, "lm_head")
        projections = (self.lm_head, *(p for x in self.layers for p in (x.qkv, x.o, x.gate_up, x.down)))
        quantized = [p for p in projections if isinstance(p, BlockWeight)]
        self.scratch = LinearScratch(*quantized) if quantized else None  # the quantized activations' room

    def forward(self, embeds: np.ndarray, past: int) -> None:
        """embeds [1, S, H] float32 at positions [past, past + S): cached, the last one's logits in the buffer.
        Up to MAX_ROWS positions share each pass over the weights; a longer input goes in groups, each through
        every layer before the next (its keys then in the cache for the next group to attend to)."""
        rows = embeds[0]
        finite = True
        for start in range(0, rows.shape[0], MAX_ROWS):
            # a copy: the residual stream is added to in place, the caller's embeddings are not
            hidden = self._rows(np.array(rows[start:start + MAX_ROWS], np.float32, order="C"), past + start)
            finite = finite and bool(np.isfinite(hidden).all())
        last = hidden[-1:]
        self.logits.reshape(-1)[:] = self._linear(self._norm(last, None, self.final_norm), self.lm_head)[0]
        if not finite:  # the graphs' rule (export/graphs/decoder.py `_poisoned`): the int8 cache hid a NaN position
            self.logits.fill(np.nan)

    def _rows(self, hidden: np.ndarray, past: int) -> np.ndarray:
        """hidden [r, H] at positions [past, past + r) through every layer, in place; the residual stream after the
        last."""
        mlp = None
        for i, layer in enumerate(self.layers):
            attended = self._attention(i, layer, self._norm(hidden, mlp, layer.input_norm), past)
            mlp = self._mlp(layer, self._norm(hidden, self._linear(attended, layer.o), layer.post_norm))
        hidden += mlp
        return hidden

    def _attention(self, i: int, layer: _Layer, normed: np.ndarray, past: int) -> np.ndarray:
        """[r, H] -> [r, N D]: the fused projection, rotary, the new keys and values stored, attention."""
        x, rows, d = self.index, normed.shape[0], self.index.head_dim
        qkv = self._linear(normed, layer.qkv)  # [r, (N + 2 KVN) D]
        keys, values = self.codes[2 * i], self.codes[2 * i + 1]  # [KVN, capacity, D] each
        q = self.kernels.ops.rotary_store(qkv, self.cos, self.sin, layer.k_scale, layer.v_scale, keys, values, past,
                                          x.heads, np.empty((rows, x.heads, d), np.float32))  # [r, N, D] rotated
        out = self.kernels.attention(q, keys, values, layer.k_scale, layer.v_scale, past=past, threads=self.threads,
                                     pool=self.pool)  # [r, N, D]
        return out.reshape(rows, x.heads * d)

    def _mlp(self, layer: _Layer, normed: np.ndarray) -> np.ndarray:
        gate_up = self._linear(normed, layer.gate_up)  # [r, 2 I]
        activated = np.empty((gate_up.shape[0], self.index.intermediate), np.float32)
        return self._linear(self.kernels.ops.silu_mul(gate_up, activated), layer.down)

    def _norm(self, hidden: np.ndarray, delta: np.ndarray | None, weight: np.ndarray) -> np.ndarray:
        """hidden += delta (in place, where given), then RMSNorm as SimplifiedLayerNormalization."""
        return self.kernels.ops.add_rms_norm(hidden, delta, weight, self.index.eps, np.empty_like(hidden))

    def _linear(self, x: np.ndarray, weight: BlockWeight | np.ndarray) -> np.ndarray:
        if isinstance(weight, np.ndarray):
            return x @ weight
        return self.kernels.gemv.linear(x, weight, threads=self.threads, scratch=self.scratch)


def native_for(spec: GraphSpec, mode: str, decode_attention: str, provider: str, validated: bool) -> Kernels | None:
    """The kernels of the native decode step for this decode graph, or None where ONNX Runtime decodes (module doc).
    `auto` takes it only with `--decode-attention auto` (an explicit attention choice is a choice of the graph) and
    where the manifest records the step's validation; `native` takes an unvalidated one with a warning."""
    flag = "--decode-step native"
    refuse = mode == "native"
    if mode == "onnx" or (mode == "auto" and decode_attention != "auto"):
        return None
    if not spec.native_index:
        if refuse:
            raise ConfigError(f"{flag}: this bundle has no decode index (an int8 or int4 CPU bundle exported by this "
                              "version has one); re-export it, or use --decode-step auto")
        return None
    if not validated:
        if not refuse:  # said at -v: the export's own record (an older export, or a step it dropped) decides
            log.info("the native decode step: this bundle's export did not validate it, or dropped it; ONNX Runtime "
                     "decodes")
            return None
        log.warning("%s: the manifest records no validation of the native decode step for this bundle; it runs "
                    "because it was asked for", flag)
    return cpu_kernel(lambda: Kernels(BlockGemv.load(), CausalAttention.load(DECODE), LayerOps.load()), provider,
                      flag if refuse else None, "the native decode step", "native decode step: ONNX Runtime decodes")


def open_native(bundle: Path, spec: GraphSpec, kv: KVLayout, cache: list[Any], logits: np.ndarray, kernels: Kernels,
                threads: int, resident: bool, asked: bool) -> NativeDecoder | None:
    """The step over the bundle's index, which must point into the decode graph's own data file and take its input
    width. Memory or threads refused: None (ONNX Runtime decodes, one warning), or a ConfigError line where the step
    was `asked` for outright."""
    path = bundle / str(spec.native_index)
    index = read_index(path)
    if index.data != spec.external_data:
        raise BundleError(f"{path} points into {index.data!r}, not the decode graph's data file "
                          f"{spec.external_data!r}; re-export the bundle")
    width = spec.tensor(names.INPUTS_EMBEDS).shape[-1]
    if index.hidden != width:
        raise BundleError(f"{path} describes a hidden size of {index.hidden}, the decode graph's input {width}; "
                          "re-export the bundle")
    try:
        return NativeDecoder(bundle, index, kv, cache, logits, kernels, threads, resident)
    except MemoryError as e:
        if asked:
            raise ConfigError(f"--decode-step native: {e}; use --decode-step onnx, or fewer --threads") from e
        log.warning("native decode step: ONNX Runtime decodes (%s)", e)
        return None
