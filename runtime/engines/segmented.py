"""A decoder graph cut at its attentions, run with one of pulse-edge's CPU attention kernels between the pieces.

    embeds ─ segment 0 ─ q_0 ─ kernel(q_0, int8 cache 0) ─ out_0 ─ segment 1 ─ q_1 ─ ... ─ segment L ─ logits
               └ stores the chunk's keys and values into cache 0 in place, as the whole prefill graph does

export/graphs/segments.py says how the pieces are cut, runtime/kernels/attention.py what the kernel
computes. The cache buffers are the decoder's own OrtValues, bound to the segments as past and present and
read by the kernel in place; the activations that cross segments stay ORT values (no copies; each binding is
cleared once the last segment that reads its outputs has run); the query and attention-output buffers are
numpy arrays both sides write into.

Why it exists: ORT's CPU EP attends over a prompt chunk in float32 over the full S x T product; the prefill
kernel, in bf16 on AMX tiles or AVX-512 BF16, skips the masked half (3.8-4.9x faster per chunk than ORT's form of
it on AMX, 2.2-2.7x on AVX-512 BF16). A decode
step's attention in ORT is compute-bound at about 40% of the read bandwidth; the decode kernel streams the int8
cache at about 80% of it (docs/performance.md). The prefill graph's segments run with the prefill kernel, the
decode graph's with the decode kernel. Where a kernel cannot run (no AVX-512 BF16 or AVX-512, no compiler) the whole
graph runs as before: `kernel_for` returns None and says why in one log line, or, asked for the kernel
outright, refuses.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pulse_edge.errors import BundleError, ConfigError, KernelUnavailable
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, KVLayout
from pulse_edge.runtime.engines.graph_io import check_segment_io
from pulse_edge.runtime.engines.sessions import ort_run_errors
from pulse_edge.runtime.kernels.attention import D_MULTIPLE, DECODE, PREFILL, CausalAttention, KernelKind
from pulse_edge.runtime.kernels.build import CPUUnsupported

log = logging.getLogger(__name__)
T = TypeVar("T")

# ORT's pool spins after a run and then competes with the kernel for the cores: on 2 cores the kernel ran
# ~25% slower between ORT runs (90 against 68 ms per 2048-position chunk), ORT's own time the same either way
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


def int8_view(value: Any) -> np.ndarray:
    """A cache OrtValue [1, kv_heads, max_length, head_dim] int8 as a numpy array over the same memory."""
    shape = tuple(value.shape())[1:]
    buffer = (ctypes.c_int8 * int(np.prod(shape))).from_address(value.data_ptr())
    return np.ctypeslib.as_array(buffer).reshape(shape)


def load_scales(path: Path, kv: KVLayout) -> np.ndarray:
    """The kernel's cache scales [layers, 2, kv_heads, head_dim]: positive and finite, or the bundle is damaged."""
    try:
        scales = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} cannot be read ({e}); re-export the bundle") from e
    wanted = (kv.layers, 2, kv.kv_heads, kv.head_dim)
    if scales.shape != wanted or scales.dtype != np.float32 or not (np.isfinite(scales).all() and (scales > 0).all()):
        raise BundleError(f"{path} holds {scales.dtype} {list(scales.shape)}, not positive finite float32 "
                          f"{list(wanted)}; re-export the bundle")
    return scales


# ORT's element types of what crosses segments, as numpy's (OrtValue.data_type(): no copy, where .numpy() copies)
ORT_DTYPES = {f"tensor({name})": np.dtype(dtype) for name, dtype in (
    ("float", np.float32), ("float16", np.float16), ("int64", np.int64), ("int32", np.int32), ("int8", np.int8))}

# Which kernel runs between a graph's segments (the first of the kinds this machine runs: AMX, else AVX-512
# BF16 for the prefill), and the flag that chooses; by the manifest's graph key
KERNELS: dict[str, tuple[tuple[KernelKind, ...], str]] = {names.PREFILL: (PREFILL, "--prefill-attention"),
                                                          names.DECODER: ((DECODE,), "--decode-attention")}


class SegmentedDecoder:
    """Runs inputs through the segments and the kernel, on the decoder's cache and logits."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, cache: Sequence[Any], logits: np.ndarray,
                 sessions: Sequence[Any], kernel: Any, threads: int) -> None:
        self.spec, self.kv, self.kernel, self.threads, self.logits = spec, kv, kernel, threads, logits
        limit = getattr(getattr(kernel, "kind", None), "max_head_dim", None) or kv.head_dim
        if kv.head_dim % D_MULTIPLE or kv.head_dim > limit:  # export cuts no such graph (export/build/segments.py)
            raise BundleError(f"the bundle's segments attend over heads of {kv.head_dim} channels, which the CPU "
                              "kernel does not compute; re-export the bundle")
        self.sessions = list(sessions)
        for session, segment in zip(self.sessions, spec.segments, strict=True):
            check_segment_io(segment, session)
        self.scales = load_scales(bundle / str(spec.segment_scales), kv)
        past, present = names.kv_names(kv.layers, "past"), names.kv_names(kv.layers, "present")
        self.cache = {**dict(zip(past, cache, strict=True)), **dict(zip(present, cache, strict=True))}
        self.codes = [int8_view(value) for value in cache]  # [kv_heads, max_length, head_dim] per layer and part
        self.width = _query_width(self.sessions[0])
        # every input resolves to the graph's inputs, an earlier output or the kernel's (runtime/bundle/checks.py)
        self.last_use = {name: k for k, seg in enumerate(spec.segments) for name in seg.inputs}
        # binding k can be cleared once every segment reading one of its outputs has run
        self.release_after = [max([k, *(self.last_use.get(o, k) for o in seg.outputs)])
                              for k, seg in enumerate(spec.segments)]
        self.bindings = [session.io_binding() for session in self.sessions]
        # one-position inputs (decode steps) run on bindings made once, after the first such input showed the
        # shapes of what crosses segments: a step then only runs (Python's rebinding cost ~0.17 ms a segment,
        # 5.7 ms of a 7B step)
        self.step: _StepBindings | None = None
        self._shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    @property
    def layers(self) -> int:
        return self.kv.layers

    def forward(self, embeds: np.ndarray, past: int) -> None:
        """embeds [1, S, H] float32 at positions [past, past + S): the chunk cached, the logits buffer filled."""
        if embeds.shape[1] == 1 and self.step is not None:
            self.step.run(self, embeds, past)
            return
        self._shapes = {} if embeds.shape[1] == 1 else None  # this one-position run records them
        self._forward(embeds, past)
        if self._shapes is not None:
            self.step = _StepBindings(self, self._shapes, embeds.shape[-1])
            self._shapes = None

    def _forward(self, embeds: np.ndarray, past: int) -> None:
        steps, total = embeds.shape[1], past + embeds.shape[1]
        fed = {names.INPUTS_EMBEDS: embeds, names.TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32),
               names.SEQLENS_K: np.array([total - 1], np.int32)}
        query = np.empty((1, steps, self.width), np.float32)  # [1, S, N D]
        attended = np.empty_like(query)
        carried: dict[str, Any] = {}
        try:
            for k, (session, binding) in enumerate(zip(self.sessions, self.bindings, strict=True)):
                self._bind(k, binding, {**fed, **carried}, query, attended)
                with ort_run_errors(self.spec.segments[k].file):
                    session.run_with_iobinding(binding)
                carried = self._carry(k, binding, carried)
                if k < self.layers:
                    self._attend(k, query, attended, past)
                self._release(k)
        finally:
            for binding in self.bindings:  # ORT lets go of this call's activations (~100 MB at 2048 x 4096) and of
                binding.clear_binding_inputs()  # the pointers into this call's numpy buffers, which go with it
                binding.clear_binding_outputs()

    def _bind(self, k: int, binding: Any, values: Mapping[str, Any], query: np.ndarray, attended: np.ndarray,
              outputs: Mapping[str, np.ndarray] | None = None) -> None:
        """Segment k's inputs and outputs: the cache's OrtValues; numpy buffers by their memory (the kernel's query
        and attention output, the logits, numpy `values`); other inputs from `values` (OrtValues); other outputs
        into `outputs`' buffers, or (None) where ORT allocates them."""
        segment = self.spec.segments[k]
        own = {names.attention_query_name(k): query, names.LOGITS: self.logits}
        if k:
            own[names.attention_output_name(k - 1)] = attended
        for name in segment.inputs:
            value = self.cache[name] if name in self.cache else own.get(name, values.get(name))
            if isinstance(value, np.ndarray):  # its memory, no copy: it outlives the run
                binding.bind_input(name, "cpu", 0, value.dtype.type, list(value.shape), value.ctypes.data)
            else:
                binding.bind_ortvalue_input(name, value)
        for name in segment.outputs:  # bound in the segment's order: get_outputs() answers in it
            array = own.get(name, (outputs or {}).get(name))
            if name in self.cache:
                binding.bind_ortvalue_output(name, self.cache[name])
            elif array is not None:
                binding.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)
            else:
                binding.bind_output(name, "cpu")

    def _carry(self, k: int, binding: Any, carried: dict[str, Any]) -> dict[str, Any]:
        """What later segments read: this segment's other outputs, and what is still to be read of before.
        (get_outputs() hands out a copy of the binding's values: clearing the binding later leaves them valid.)"""
        produced = dict(zip(self.spec.segments[k].outputs, binding.get_outputs(), strict=True))
        if self._shapes is not None:  # what crosses segments (not the cache, the query or the logits: bound apart)
            self._shapes.update({n: (tuple(v.shape()), ORT_DTYPES[v.data_type()]) for n, v in produced.items()
                                 if n not in self.cache and n not in (names.attention_query_name(k), names.LOGITS)})
        kept = {n: v for n, v in carried.items() if self.last_use.get(n, -1) > k}
        return {**kept, **{n: v for n, v in produced.items() if self.last_use.get(n, -1) > k}}

    def _release(self, k: int) -> None:
        """Clear the bindings whose outputs no later segment reads: the arena gets their activations back."""
        self.bindings[k].clear_binding_inputs()
        for j in range(k + 1):
            if self.release_after[j] == k:
                self.bindings[j].clear_binding_outputs()

    def _attend(self, layer: int, query: np.ndarray, attended: np.ndarray, past: int) -> None:
        steps = query.shape[1]
        heads = self.width // self.kv.head_dim
        self.kernel(query.reshape(steps, heads, self.kv.head_dim), self.codes[2 * layer], self.codes[2 * layer + 1],
                    self.scales[layer, 0], self.scales[layer, 1], past=past, threads=self.threads,
                    out=attended.reshape(steps, heads, self.kv.head_dim))


class _StepBindings:
    """Every segment's binding for a one-position input, made once (SegmentedDecoder._bind): the embeddings, the
    two position scalars and every activation crossing segments live in numpy buffers of their own, the query,
    attention output, cache and logits in theirs; a step writes its inputs in place and runs."""

    def __init__(self, graph: SegmentedDecoder, shapes: dict[str, tuple[tuple[int, ...], np.dtype]],
                 hidden: int) -> None:
        self.embeds = np.zeros((1, 1, hidden), np.float32)
        self.total, self.seqlens = np.zeros((), np.int32), np.zeros(1, np.int32)
        self.query, self.attended = (np.zeros((1, 1, graph.width), np.float32) for _ in range(2))
        crossing = {n: np.zeros(shape, dtype) for n, (shape, dtype) in shapes.items()}
        self.arrays = {names.INPUTS_EMBEDS: self.embeds, names.TOTAL_SEQUENCE_LENGTH: self.total,
                       names.SEQLENS_K: self.seqlens, **crossing}
        self.bindings = []  # the bindings point into the arrays above, which live as long as this object
        for k, session in enumerate(graph.sessions):
            self.bindings.append(session.io_binding())
            graph._bind(k, self.bindings[-1], self.arrays, self.query, self.attended, outputs=self.arrays)

    def run(self, graph: SegmentedDecoder, embeds: np.ndarray, past: int) -> None:
        self.embeds[...] = embeds
        self.total[...], self.seqlens[...] = past + 1, past
        for k, (session, binding) in enumerate(zip(graph.sessions, self.bindings, strict=True)):
            with ort_run_errors(graph.spec.segments[k].file):
                session.run_with_iobinding(binding)
            if k < graph.layers:
                graph._attend(k, self.query, self.attended, past)


def _query_width(session: Any) -> int:
    """N x D of the queries, as segment 0 declares its query output [1, sequence, N D]."""
    found = [o.shape[-1] for o in session.get_outputs() if o.name == names.attention_query_name(0)]
    if not found or not isinstance(found[0], int):
        raise BundleError("the first segment does not declare its query's width; re-export the bundle")
    return found[0]


def kernel_for(key: str, spec: GraphSpec, mode: str, provider: str) -> CausalAttention | None:
    """The attention kernel for graph `key` (names.PREFILL, names.DECODER) cut in segments, or None where the whole
    graph runs (module doc)."""
    kinds, flag = KERNELS[key]
    if mode == "graph":
        return None
    if not spec.segments:
        if mode == "kernel":
            raise ConfigError(f"{flag} kernel: this bundle's {key} graph is not cut for the attention kernel (it has "
                              f"no segments); re-export it, or use {flag} auto")
        return None
    asked = f"{flag} kernel" if mode == "kernel" else None
    return cpu_kernel(lambda: CausalAttention.load(kinds), provider, asked, "the kernel",
                      f"{key} attention: the whole {key} graph runs")


def cpu_kernel(load: Callable[[], T], provider: str, asked: str | None, what: str, fallback: str) -> T | None:
    """`load()`: a CPU kernel (or kernels) of pulse-edge's own, or None where ONNX Runtime's run instead. `asked`: the
    flag that asked for it outright, which makes every reason a ConfigError line starting so (None: auto); `what`
    names the kernel in the provider refusal; `fallback` says what runs instead in the log line."""
    if provider != "cpu":
        if asked:
            raise ConfigError(f"{asked}: {what} runs on the CPU, not with --provider {provider}")
        return None
    try:
        return load()
    except KernelUnavailable as e:
        if asked:
            raise ConfigError(f"{asked}: {e}") from e
        # a CPU without the instructions is expected (one info line); a compiler or permission missing where the
        # CPU has them costs this machine its fast kernel: a warning
        log.log(logging.INFO if isinstance(e, CPUUnsupported) else logging.WARNING, "%s (%s)", fallback, e)
        return None
