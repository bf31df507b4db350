"""ONNX Runtime engines for a bundle: the vision graph and the decoder with a preallocated KV cache.

The decoder's cache is one key and one value buffer per layer, each
[1, kv_heads, max_length, head_dim], allocated once. GroupQueryAttention
reads the past from the same buffer it writes the present into (the buffers
are bound as both input and output through IO binding), so no step copies
or reallocates the cache. Only the new embeddings, two int32 scalars and the
logits move per step; the logits land in a preallocated buffer too.

A bundle may hold a second decoder graph for long inputs ("prefill": the same
function with int8 activations, on the CPU's fastest int8 GEMM). Both sessions are
bound to the same cache buffers and logits buffer; `forward` runs the prefill graph
for inputs of PREFILL_GRAPH_MIN_POSITIONS positions or more and the decoder graph
for the rest (a decode step reads every weight once, where weight-only int8/int4
streams the fewest bytes).

Either graph may come cut at its attentions for a CPU kernel (engines/segmented.py); where the kernel runs,
the segments replace the whole graph's session (the same weights, mapped or prepacked once):

    input positions   prefill graph loaded      runs
    >= 16             cut, kernel runs          prefill segments + bf16 prefill kernel (AMX or AVX-512 BF16)
    >= 16             whole                     the prefill graph
    any other input   decode index, kernels     the native decode step (engines/native.py): pulse-edge's own
                                                GEMV and decode attention over the decode graph's weights
    any other input   decode graph cut, kernel  decode segments + AVX-512 decode kernel
    any other input   decode graph whole        the decode graph
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import BundleError, GraphSpec, KVLayout, Manifest, native_validated
from pulse_edge.runtime.engines.bundle_engine import (
    AUTO_CHUNK,
    GPU_FIX,
    PREFILL_GRAPH_MIN_POSITIONS,
    BundleEngine,
    check_servable,
    positions_to_run,
)
from pulse_edge.runtime.engines.graph_io import check_graph_io
from pulse_edge.runtime.engines.memory import choose_prefill_graph, mem_available_bytes
from pulse_edge.runtime.engines.native import NativeDecoder, native_for, open_native
from pulse_edge.runtime.engines.segmented import NO_SPINNING, SegmentedDecoder, kernel_for
from pulse_edge.runtime.engines.sessions import ORT_PROVIDERS as ORT_PROVIDERS  # re-exported: the engines' API
from pulse_edge.runtime.engines.sessions import SessionConfig as SessionConfig
from pulse_edge.runtime.engines.sessions import default_trt_cache as default_trt_cache
from pulse_edge.runtime.engines.sessions import graph_cache_key as graph_cache_key
from pulse_edge.runtime.engines.sessions import (
    graph_config_entries,
    load_onnxruntime,
    make_session,
    ort_run_errors,
    saturation_warning,
    usable_cpus,
)
from pulse_edge.runtime.engines.sessions import provider_chain as provider_chain
from pulse_edge.runtime.engines.sessions import require_provider as require_provider
from pulse_edge.runtime.engines.sessions import session_settings as session_settings

log = logging.getLogger(__name__)

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


class VisionEngine:
    """Tiles [K, 3, T, T] float32 -> features [K, P, H] float32."""

    def __init__(self, bundle: Path, spec: GraphSpec, config: SessionConfig) -> None:
        self.session = make_session(bundle / spec.file, config, graph_limit=spec.opt_level_limit,
                                    fp16=spec.precision == "fp16", entries=graph_config_entries(spec))
        check_graph_io(spec, self.session)
        self.file, self.provider = spec.file, config.provider

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        feed = {names.PIXEL_VALUES: pixel_values.astype(np.float32, copy=False)}
        with ort_run_errors(self.file, self.provider):
            return self.session.run([names.IMAGE_FEATURES], feed)[0]


class DecoderEngine:
    """The decoder with its KV cache: `forward` appends positions and returns the last logits.

    `prefill` (a bundle's prefill graph) runs inputs of PREFILL_GRAPH_MIN_POSITIONS or more positions
    on the same cache."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig, *,
                 prefill: GraphSpec | None = None, graph: str = names.DECODER, native_validated: bool = False) -> None:
        if prefill is None and config.prefill_graph == "on" and graph == names.DECODER:  # before any session
            raise ConfigError("--prefill-graph on: this bundle has no prefill graph (an int8 or int4 CPU bundle has "
                              "one); its decoder graph prefills: use --prefill-graph auto")
        ort = load_onnxruntime()
        self.kv = kv
        self.length = 0  # positions of the cache that hold the current conversation
        self.files = (spec.file, prefill.file if prefill is not None else None)  # decode, prefill: named in errors
        self.provider = config.provider
        device = "cuda" if config.provider in ("cuda", "tensorrt") else "cpu"
        shape = [1, kv.kv_heads, kv.max_length, kv.head_dim]
        self._cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, NP_DTYPES[kv.dtype], device, config.device_id)
                       for _ in names.kv_names(kv.layers, "past")]
        self._logits = np.zeros((1, 1, vocab), np.float32)
        # decode steps on pulse-edge's own kernels where they run, else the decode graph in segments with the decode
        # kernel, else whole. `graph`: which of the bundle's graphs `spec` is (validation opens the prefill graph in
        # this place too, and checks it whole)
        # auto: only beside a prefill graph that takes long prompts (below); off means none will be loaded
        wanted = graph == names.DECODER and (config.decode_step == "native"
                                             or (prefill is not None and config.prefill_graph != "off"))
        self.native = (_open_native(bundle, spec, kv, self._cache, self._logits, config, native_validated)
                       if wanted else None)
        self.decode_segments = (_open_segmented(names.DECODER, bundle, spec, kv, self._cache, self._logits, config)
                                if graph == names.DECODER and self.native is None else None)
        self.session, self._binding = ((None, None) if self.native or self.decode_segments
                                       else self._open(bundle / spec.file, spec, config))
        self.prefill_session, self._prefill_binding, self.segmented = None, None, None
        if prefill is None and config.prefill_attention == "kernel":
            raise ConfigError("--prefill-attention kernel: this bundle has no prefill graph, so none is cut for the "
                              "attention kernel (an int8 or int4 CPU bundle has one); use --prefill-attention auto")
        if prefill is not None and _prefill_graph_fits(bundle, prefill, config):
            self.segmented = _open_segmented(names.PREFILL, bundle, prefill, kv, self._cache, self._logits, config)
            if self.segmented is None:
                self.prefill_session, self._prefill_binding = self._open(bundle / prefill.file, prefill, config)
        if config.prefill_attention == "kernel" and self.segmented is None:  # asked outright: never a quiet fallback
            raise ConfigError("--prefill-attention kernel: the prefill graph is not loaded (--prefill-graph off, or "
                              "this machine's memory does not hold it); use --prefill-attention auto")
        if self.native is not None and prefill is not None and self.segmented is None and self.prefill_session is None:
            self._without_prefill_graph(bundle, spec, config)  # a bundle with a prefill graph, not loaded here

    def _without_prefill_graph(self, bundle: Path, spec: GraphSpec, config: SessionConfig) -> None:
        """The prefill graph was not loaded: the native step would take a long prompt 4 positions at a time (every
        weight read once per 4), where the decode graph takes it in one run. auto: the decode graph decodes (as
        without the step); native asked outright: refused."""
        if config.decode_step == "native":
            raise ConfigError("--decode-step native: the prefill graph is not loaded (--prefill-graph off, or this "
                              "machine's memory does not hold it), and the native step would take a long prompt 4 "
                              "positions at a time; use --decode-step auto")
        self.native = None
        self.decode_segments = _open_segmented(names.DECODER, bundle, spec, self.kv, self._cache, self._logits, config)
        if self.decode_segments is None:
            self.session, self._binding = self._open(bundle / spec.file, spec, config)

    def _open(self, path: Path, spec: GraphSpec, config: SessionConfig) -> tuple[Any, Any]:
        """A session of one decoder graph, bound to the shared cache and logits buffers."""
        session = make_session(path, config, graph_limit=spec.opt_level_limit, fp16=spec.precision == "fp16",
                               entries=graph_config_entries(spec), shapes_vary=True)
        check_graph_io(spec, session)
        binding = session.io_binding()
        for past, present, buffer in zip(names.kv_names(self.kv.layers, "past"),
                                         names.kv_names(self.kv.layers, "present"), self._cache, strict=True):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_output(names.LOGITS, "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)
        return session, binding

    @property
    def room(self) -> int:
        return self.kv.max_length - self.length

    def reset(self) -> None:
        """Start a new conversation; stale cache contents are never read (GQA masks by length)."""
        self.length = 0

    def runner(self, steps: int) -> tuple[Any, Any]:
        """What runs an input of `steps` positions (module doc): a segmented graph, or a session and its binding."""
        long = steps >= PREFILL_GRAPH_MIN_POSITIONS
        if long and self.segmented is not None:
            return self.segmented, None
        if long and self.prefill_session is not None:
            return self.prefill_session, self._prefill_binding
        if self.native is not None:
            return self.native, None
        if self.decode_segments is not None:
            return self.decode_segments, None
        return self.session, self._binding

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """embeds [1, S, H] float32 at positions [length, length + S) -> logits [V] of the last one."""
        steps = positions_to_run(embeds, self.room, self.kv.max_length)
        total = self.length + steps
        runner, binding = self.runner(steps)
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        if binding is None:
            runner.forward(embeds, self.length)
        else:
            binding.bind_cpu_input(names.INPUTS_EMBEDS, embeds)
            binding.bind_cpu_input(names.SEQLENS_K, np.array([total - 1], np.int32))
            binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
            with ort_run_errors(self.files[runner is self.prefill_session], self.provider):
                runner.run_with_iobinding(binding)
        self.length = total
        return self._logits[0, -1]


def _open_segmented(key: str, bundle: Path, graph: GraphSpec, kv: KVLayout, cache: list[Any], logits: np.ndarray,
                    config: SessionConfig) -> SegmentedDecoder | None:
    """Graph `key`'s segments with its attention kernel (engines/segmented.py), or None: the whole graph."""
    mode = config.prefill_attention if key == names.PREFILL else config.decode_attention
    kernel = kernel_for(key, graph, mode, config.provider)
    if kernel is None:
        return None
    entries = {**graph_config_entries(graph), **NO_SPINNING, **(_shared_cpu_arena() if config.mem_arena else {})}
    sessions = [make_session(bundle / segment.file, config, graph_limit=graph.opt_level_limit, entries=entries,
                             shapes_vary=True) for segment in graph.segments]
    return SegmentedDecoder(bundle, graph, kv, cache, logits, sessions, kernel, config.threads or usable_cpus())


def _open_native(bundle: Path, spec: GraphSpec, kv: KVLayout, cache: list[Any], logits: np.ndarray,
                 config: SessionConfig, validated: bool) -> NativeDecoder | None:
    """The native decode step (engines/native.py) over the decode graph's weights, or None: ONNX Runtime decodes.
    Its weights are copied into memory when ORT would prepack them, else read from the mapped file."""
    kernels = native_for(spec, config.decode_step, config.decode_attention, config.provider, validated)
    if kernels is None:
        return None
    return open_native(bundle, spec, kv, cache, logits, kernels, config.threads or usable_cpus(), config.prepack,
                       asked=config.decode_step == "native")


def _shared_cpu_arena() -> dict[str, str]:
    """One CPU arena for all of a prefill's segment sessions (ORT's environment allocator, registered in the
    process's ORT environment; registering it again is harmless). Each session's own arena would hold the
    largest activations of its segment: measured on the real-width 4-layer int8 bundle (5 segments), resident
    memory after a 2950-position prefill 4.73 GiB with their own arenas, 3.10 GiB with the shared one, the
    same speed (2.68 against 2.62 s); a 32-layer bundle has 33 segments."""
    ort = load_onnxruntime()
    try:
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT), None)
    except Exception as e:  # ORT before 1.2x refuses a second registration; the first one is then shared
        if "already been registered" not in str(e):
            raise
    return {"session.use_env_allocators": "1"}


def _prefill_graph_fits(bundle: Path, prefill: GraphSpec, config: SessionConfig) -> bool:
    """Load the prefill graph? Asked after the vision and decode graphs are loaded, so MemAvailable is what
    is left for it (runtime/engines/memory.py)."""
    weights = sum(prefill.sizes.values()) if prefill.sizes else (bundle / prefill.file).stat().st_size
    cpu = config.provider == "cpu"
    choice = choose_prefill_graph(config.prefill_graph, weights, prepacked=config.prepack and cpu,
                                  available=mem_available_bytes(),
                                  u8_copies=session_settings(config, prefill.opt_level_limit)["u8u8_matmul"])
    if choice.warning:
        log.warning(choice.warning)
    return choice.load


class ScatterDecoderEngine(DecoderEngine):
    """A TensorRT-ready decoder (standard ONNX, export --target tensorrt) on ONNX Runtime.

    Same preallocated cache, bound as both `past` and `present` of each layer: the graph's TensorScatter (or
    ScatterElements) writes the new positions at `write_index` in place. Per step it is fed the positions,
    the write index and an attention_mask whose length is the positions held after the step."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig) -> None:
        if config.decode_step == "native":
            raise ConfigError("--decode-step native: a TensorRT-ready decoder has no decode index (it is a CPU "
                              "int8/int4 bundle's); use --decode-step auto")
        super().__init__(bundle, spec, kv, vocab, config)  # no prefill graph: TensorRT-ready bundles have one
        self._ones = np.ones((1, kv.max_length), np.int64)  # attention_mask: only its shape is read

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        steps = positions_to_run(embeds, self.room, self.kv.max_length)
        start, total = self.length, self.length + steps
        self._binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=np.float32))
        self._binding.bind_cpu_input(names.POSITION_IDS, np.arange(start, total, dtype=np.int64)[None])
        self._binding.bind_cpu_input(names.WRITE_INDEX, np.array([start], np.int64))
        self._binding.bind_cpu_input(names.ATTENTION_MASK, self._ones[:, :total])
        with ort_run_errors(self.files[0], self.provider):
            self.session.run_with_iobinding(self._binding)
        self.length = total
        return self._logits[0, -1]


def decoder_engine(bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig, *,
                   prefill: GraphSpec | None = None, graph: str = names.DECODER,
                   native_validated: bool = False) -> DecoderEngine:
    """The ORT runner for the decoder's interface (GroupQueryAttention's, with the CPU recipes' prefill graph
    when the bundle has one, or the TensorRT-ready one)."""
    if spec.scatter_kv:
        if prefill is not None:
            raise BundleError("manifest: a TensorRT-ready decoder (scatter KV) with a prefill graph is not a bundle "
                              "pulse-edge writes; re-export it")
        return ScatterDecoderEngine(bundle, spec, kv, vocab, config)
    return DecoderEngine(bundle, spec, kv, vocab, config, prefill=prefill, graph=graph,
                         native_validated=native_validated)


def check_device(manifest: Manifest, config: SessionConfig) -> None:
    """Refuse a bundle the chosen provider cannot run natively, before any session is made."""
    needs = manifest.calibration.requires_compute_capability if manifest.calibration else None
    if needs and config.provider == "cpu" and not config.emulate:
        raise ConfigError(f"this {manifest.precision} bundle needs a GPU of compute capability >= {needs} (Ada, "
                          "Hopper) through TensorRT or CUDA; ONNX Runtime's CPU EP only emulates it, for "
                          "validation. Use an int8 or int4 bundle on this device")
    # ORT registers GroupQueryAttention for CUDA in fp16 and bf16 only: an fp32 decoder would run attention
    # on the CPU EP, with the whole KV cache copied between host and device in every layer of every step.
    # (An int8 cache goes with fp32 attention in the bundles pulse-edge writes: CPU only as well.)
    if config.provider in ("cuda", "tensorrt") and manifest.kv.dtype != "float16":
        fix = GPU_FIX.get(manifest.precision, "export it with --precision fp16 for a GPU")
        raise ConfigError(f"this {manifest.precision} bundle computes attention in fp32, which ONNX Runtime's CUDA "
                          f"kernels do not run (GroupQueryAttention is fp16/bf16 there); {fix}")


def _warn_if_int8_saturates(manifest: Manifest, config: SessionConfig) -> None:
    """Once per bundle: its int8 GEMM ops are the vision graph's (w8a8u8) and the prefill graph's (w8a8dyn)."""
    for role, spec in manifest.graphs.items():
        schemes = {names.VISION: spec.matmul_schemes, names.PREFILL: ("w8a8dyn",)}.get(role, ())
        if warning := saturation_warning(config, spec.opt_level_limit, schemes):
            log.warning(warning)
            return


def open_ort_engine(bundle: Path, manifest: Manifest, config: SessionConfig, *,
                    prefill_chunk: int | str | None = AUTO_CHUNK) -> BundleEngine:
    """The bundle's graphs in ONNX Runtime sessions on exactly the asked provider, behind `BundleEngine`
    (prefill_chunk AUTO_CHUNK: chosen for the graph that prefills, bundle_engine.resolve_chunk)."""
    check_servable(manifest, prefill_chunk)
    require_provider(config)  # first: on a machine without the provider, that is the whole story
    check_device(manifest, config)
    _warn_if_int8_saturates(manifest, config)
    vision = VisionEngine(bundle, manifest.graphs[names.VISION], config)
    decoder = decoder_engine(bundle, manifest.graphs[names.DECODER], manifest.kv, manifest.text.vocab_size, config,
                             prefill=manifest.graphs.get(names.PREFILL), native_validated=native_validated(manifest))
    return BundleEngine(bundle, manifest, vision, decoder, prefill_chunk=prefill_chunk)  # it resolves AUTO_CHUNK
