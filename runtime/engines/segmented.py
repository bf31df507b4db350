"""A prefill graph cut at its attentions, run with pulse-edge's CPU attention kernel between the pieces.

    embeds ─ segment 0 ─ q_0 ─ kernel(q_0, int8 cache 0) ─ out_0 ─ segment 1 ─ q_1 ─ ... ─ segment L ─ logits
               └ stores the chunk's keys and values into cache 0 in place, as the whole prefill graph does

export/graphs/segments.py says how the pieces are cut, runtime/kernels/attention.py what the kernel
computes. The cache buffers are the decoder's own OrtValues, bound to the segments as past and present and
read by the kernel in place; the activations that cross segments stay ORT values (no copies; each binding is
cleared once the last segment that reads its outputs has run); the query and attention-output buffers are
numpy arrays both sides write into.

Why it exists: ORT's CPU EP attends over a prompt chunk in float32 over the full S x T product; the kernel,
on AMX-BF16 tiles, skips the masked half (3.8-4.9x faster per chunk than ORT's form of it, docs/performance.md).
Where the kernel cannot run (no AMX-BF16, no compiler) the whole prefill graph runs as before: `kernel_for`
returns None and says why in one log line, or, asked for the kernel outright, refuses.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import BundleError, ConfigError, KernelUnavailable
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, KVLayout
from pulse_edge.runtime.engines.graph_io import check_segment_io
from pulse_edge.runtime.kernels.attention import CausalAttention
from pulse_edge.runtime.kernels.build import CPUUnsupported

log = logging.getLogger(__name__)

# ORT's pool spins after a run and then competes with the kernel for the cores: on 2 cores the kernel ran
# ~25% slower between ORT runs (90 against 68 ms per 2048-position chunk), ORT's own time the same either way
NO_SPINNING = {"session.intra_op.allow_spinning": "0"}


def _int8_view(value: Any) -> np.ndarray:
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


class SegmentedPrefill:
    """Runs inputs of many positions through the segments and the kernel, on the decoder's cache and logits."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, cache: Sequence[Any], logits: np.ndarray,
                 sessions: Sequence[Any], kernel: Any, threads: int) -> None:
        self.spec, self.kv, self.kernel, self.threads, self.logits = spec, kv, kernel, threads, logits
        self.sessions = list(sessions)
        for session, segment in zip(self.sessions, spec.segments, strict=True):
            check_segment_io(segment, session)
        self.scales = load_scales(bundle / str(spec.segment_scales), kv)
        past, present = names.kv_names(kv.layers, "past"), names.kv_names(kv.layers, "present")
        self.cache = {**dict(zip(past, cache, strict=True)), **dict(zip(present, cache, strict=True))}
        self.codes = [_int8_view(value) for value in cache]  # [kv_heads, max_length, head_dim] per layer and part
        self.width = _query_width(self.sessions[0])
        # every input resolves to the graph's inputs, an earlier output or the kernel's (runtime/bundle/checks.py)
        self.last_use = {name: k for k, seg in enumerate(spec.segments) for name in seg.inputs}
        # binding k can be cleared once every segment reading one of its outputs has run
        self.release_after = [max([k, *(self.last_use.get(o, k) for o in seg.outputs)])
                              for k, seg in enumerate(spec.segments)]
        self.bindings = [session.io_binding() for session in self.sessions]

    @property
    def layers(self) -> int:
        return self.kv.layers

    def forward(self, embeds: np.ndarray, past: int) -> None:
        """embeds [1, S, H] float32 at positions [past, past + S): the chunk cached, the logits buffer filled."""
        steps, total = embeds.shape[1], past + embeds.shape[1]
        fed = {names.INPUTS_EMBEDS: embeds, names.TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32),
               names.SEQLENS_K: np.array([total - 1], np.int32)}
        query = np.empty((1, steps, self.width), np.float32)  # [1, S, N D]
        attended = np.empty_like(query)
        carried: dict[str, Any] = {}
        try:
            for k, (session, binding) in enumerate(zip(self.sessions, self.bindings, strict=True)):
                self._bind(k, binding, {**fed, **carried}, query, attended)
                session.run_with_iobinding(binding)
                carried = self._carry(k, binding, carried)
                if k < self.layers:
                    self._attend(k, query, attended, past)
                self._release(k)
        finally:
            for binding in self.bindings:  # ORT's side lets go of this call's buffers and activations (its Python
                binding.clear_binding_inputs()  # wrapper still references the last numpy inputs it was given, ~100
                binding.clear_binding_outputs()  # MB at 2048 x 4096, until the next prefill binds new ones)

    def _bind(self, k: int, binding: Any, values: dict[str, Any], query: np.ndarray, attended: np.ndarray) -> None:
        segment = self.spec.segments[k]
        attention_in = names.attention_output_name(k - 1) if k else None
        for name in segment.inputs:
            if name in self.cache:
                binding.bind_ortvalue_input(name, self.cache[name])
            elif name == attention_in:
                binding.bind_cpu_input(name, attended)
            elif isinstance(values[name], np.ndarray):
                binding.bind_cpu_input(name, values[name])
            else:
                binding.bind_ortvalue_input(name, values[name])
        for name in segment.outputs:  # bound in the segment's order: get_outputs() answers in it
            if name in self.cache:
                binding.bind_ortvalue_output(name, self.cache[name])
            elif name == names.attention_query_name(k):
                binding.bind_output(name, "cpu", 0, np.float32, list(query.shape), query.ctypes.data)
            elif name == names.LOGITS:
                binding.bind_output(name, "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
            else:
                binding.bind_output(name, "cpu")

    def _carry(self, k: int, binding: Any, carried: dict[str, Any]) -> dict[str, Any]:
        """What later segments read: this segment's other outputs, and what is still to be read of before.
        (get_outputs() hands out a copy of the binding's values: clearing the binding later leaves them valid.)"""
        produced = dict(zip(self.spec.segments[k].outputs, binding.get_outputs(), strict=True))
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


def _query_width(session: Any) -> int:
    """N x D of the queries, as segment 0 declares its query output [1, sequence, N D]."""
    found = [o.shape[-1] for o in session.get_outputs() if o.name == names.attention_query_name(0)]
    if not found or not isinstance(found[0], int):
        raise BundleError("the first prefill segment does not declare its query's width; re-export the bundle")
    return found[0]


def kernel_for(spec: GraphSpec, mode: str, provider: str) -> CausalAttention | None:
    """The attention kernel for a cut prefill graph, or None where the whole graph runs (module doc)."""
    if mode == "graph":
        return None
    if not spec.segments:
        if mode == "kernel":
            raise ConfigError("this bundle's prefill graph is not cut for the attention kernel (it has no segments); "
                              "re-export it, or use --prefill-attention auto")
        return None
    if provider != "cpu":
        if mode == "kernel":
            raise ConfigError(f"--prefill-attention kernel: the kernel runs on the CPU, not with --provider {provider}")
        return None
    try:
        return CausalAttention.load()
    except KernelUnavailable as e:
        if mode == "kernel":
            raise ConfigError(f"--prefill-attention kernel: {e}") from e
        # a CPU without AMX is expected (one info line); a compiler or permission missing where the CPU has it
        # costs this machine its fast prefill: a warning
        log.log(logging.INFO if isinstance(e, CPUUnsupported) else logging.WARNING,
                "prefill attention: the whole prefill graph runs (%s)", e)
        return None
