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
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.choices import OPT_LEVELS, PREFILL_ATTENTION_MODES, PREFILL_GRAPH_MODES, PROVIDERS
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import BundleError, GraphSpec, KVLayout, Manifest
from pulse_edge.runtime.engines.bundle_engine import (
    AUTO_CHUNK,
    GPU_FIX,
    BundleEngine,
    check_servable,
)
from pulse_edge.runtime.engines.graph_io import check_graph_io
from pulse_edge.runtime.engines.memory import choose_prefill_graph, mem_available_bytes
from pulse_edge.runtime.engines.segmented import NO_SPINNING, SegmentedPrefill, kernel_for

log = logging.getLogger(__name__)

# ONNX Runtime's names for pulse-edge's providers (pulse_edge.choices.PROVIDERS, in that order).
ORT_PROVIDERS = dict(zip(PROVIDERS, ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"),
                         strict=True))
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
# Inputs at least this long run on a bundle's prefill graph (when it has one).
PREFILL_GRAPH_MIN_POSITIONS = 16
NODE_ORDERS = {"default": "DEFAULT", "priority": "PRIORITY_BASED"}  # ours -> ort.ExecutionOrder


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError as e:
        raise ConfigError("onnxruntime is not installed: pip install 'pulse-edge[cpu]' "
                          "(or 'pulse-edge[gpu]' for CUDA / TensorRT)") from e
    return onnxruntime


@dataclass(frozen=True)
class SessionConfig:
    """Session options, chosen on purpose and exposed (`infer --threads/--opt-level`).

    threads 0 means one per physical core as ORT counts them; decode is memory-bound,
    so more threads than cores only add contention. The memory arena stays on: the
    decoder's per-step temporaries have the same sizes every step and reuse it.
    `prepack` lets ORT repack MatMul weights into its own layout: measured ~10-20%
    faster decode on the real-width decoder here, but it is a second, anonymous copy
    of every weight. Without it the weights stay memory-mapped from the bundle
    (loads in no time, pages are shared and reclaimable): the choice for a cart
    whose RAM barely holds the model once. `mem_pattern` lets ORT plan one block for
    the graph's tensors up front; that plan reserves address space for every weight
    too, so a graph whose weights exceed RAM + swap fails to load with bad_alloc
    (measured: 26 GB of mapped fp32 weights on this 23.5 GiB machine) unless it is off.
    None (the default) turns it off exactly when the weights are mapped (no prepacking,
    CPU EP).
    `node_order` None likewise runs mapped sessions in ORT's priority-based order ("priority")
    and others in its default one ("default"): in the default order
    the Casts that the CPU EP puts after every fp16 weight have no inputs to wait for
    and all run first, holding an fp32 copy of every weight at once (measured: the 7B
    fp16 decoder passed 12 GiB of anonymous memory on a 5-token prefill; 0.8 GiB in
    priority order). Neither costs speed: real-width 2-layer fp32 decoder, mapped, 3 rounds
    interleaved, decode 28.8 vs 28.5 tok/s and a 512-position prefill 916 vs 919 ms.
    """

    provider: str = "cpu"
    threads: int = 0
    opt_level: str = "all"
    mem_arena: bool = True
    prepack: bool = True
    mem_pattern: bool | None = None
    node_order: str | None = None
    device_id: int = 0
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    emulate: bool = False  # run an fp8 bundle on the CPU EP as an exact Q/DQ emulation (validation only)
    prefill_graph: str = "auto"  # a CPU bundle's prefill graph: loaded where memory holds it (engines/memory.py)
    # a prefill graph cut for the CPU attention kernel: run so where the kernel runs (engines/segmented.py)
    prefill_attention: str = "auto"
    # ONNX Runtime's profiler: each session writes a trace of every node it runs to DIR/<graph stem>_<time>.json
    # when `end_profiling()` is called on it (`pulse-edge bench profile` reads them); None: off
    profile_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.provider not in ORT_PROVIDERS:
            raise ConfigError(f"provider {self.provider!r} is not one of {', '.join(PROVIDERS)}")
        if self.opt_level not in OPT_LEVELS:
            raise ConfigError(f"optimisation level {self.opt_level!r} is not one of {', '.join(OPT_LEVELS)}")
        if self.prefill_graph not in PREFILL_GRAPH_MODES:
            raise ConfigError(f"prefill graph {self.prefill_graph!r} is not one of {', '.join(PREFILL_GRAPH_MODES)}")
        if self.prefill_attention not in PREFILL_ATTENTION_MODES:
            raise ConfigError(f"prefill attention {self.prefill_attention!r} is not one of "
                              f"{', '.join(PREFILL_ATTENTION_MODES)}")
        if self.node_order not in (None, *NODE_ORDERS):
            raise ConfigError(f"node order {self.node_order!r} is not one of {', '.join(NODE_ORDERS)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0 (0 = one per core), got {self.threads}")
        if self.threads > usable_cpus():  # each thread has its own arena and scratch: 100000 of them OOM
            raise ConfigError(f"threads {self.threads} is more than the {usable_cpus()} CPU cores this process "
                              "may use; give at most that many (0 = one per core)")


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def effective_opt_level(asked: str, graph_limit: str | None) -> str:
    """The lower of the asked level and the graph's own limit (fp8 Q/DQ graphs run only at "basic" in ORT)."""
    if graph_limit is None:
        return asked
    return OPT_LEVELS[min(OPT_LEVELS.index(asked), OPT_LEVELS.index(graph_limit))]


def require_provider(config: SessionConfig) -> str:
    """ORT's name for the asked provider; an absent provider is an error, never a fallback."""
    ort = _ort()
    wanted = ORT_PROVIDERS[config.provider]
    if wanted not in ort.get_available_providers():
        raise ConfigError(f"provider {config.provider!r} ({wanted}) is not available in this onnxruntime "
                          f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                          "for cuda/tensorrt, or use --provider cpu")
    return wanted


def default_trt_cache() -> Path:
    """Where TensorRT engines built from bundles are kept: building a 7B engine takes minutes, once."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "pulse-edge" / "tensorrt"


def graph_cache_key(path: Path) -> str:
    """One engine-cache folder per graph file as written: ORT names cached engines by the model's name,
    inputs and nodes, not its weights, and every bundle's decoder is called decoder.onnx."""
    parts = [os.fspath(path.resolve())]
    for file in (path, path.with_name(path.name + ".data")):
        if file.is_file():
            stat = file.stat()
            parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def provider_chain(config: SessionConfig, *, fp16: bool, cache_dir: Path | None = None) -> list[Any]:
    """The providers in ORT's order of preference. TensorRT takes the subgraphs it can build; the contrib ops
    it has no layer for (GroupQueryAttention, SkipSimplifiedLayerNormalization, MatMulNBits) go to the CUDA
    EP behind it rather than to the CPU. Written against ORT's documented provider options; not run here
    (no GPU): the options the caller passes win."""
    if config.provider == "cpu":
        return [ORT_PROVIDERS["cpu"]]
    cuda = ("CUDAExecutionProvider", {"device_id": config.device_id})
    if config.provider == "cuda":
        return [(ORT_PROVIDERS["cuda"], {**cuda[1], **config.provider_options})]
    trt = {"device_id": config.device_id, "trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
           "trt_engine_cache_path": os.fspath(cache_dir or default_trt_cache())}
    return [(ORT_PROVIDERS["tensorrt"], {**trt, **config.provider_options}), cuda]


def session_settings(config: SessionConfig, graph_limit: str | None = None, *,
                     shapes_vary: bool = False) -> dict[str, Any]:
    """What a session is made with once the automatic choices are resolved (recorded by validation).

    Mapped weights (no prepacking on the CPU EP) turn the memory pattern off and order nodes by priority
    (see SessionConfig); on a GPU provider the weights live in device memory, so the defaults stay.
    `shapes_vary` (the decoder graphs: every step and every prefill chunk sees a longer context) turns the
    memory pattern off on the CPU EP too: a pattern is planned for one set of input shapes, so these
    graphs gain no reuse from it, only arena growth. Measured on the real-width 4-layer int8 bundle
    (2 threads, two 3024-position prefills in chunks of 512, ORT 1.32): with it +1.0 GiB, then +0.6 GiB
    more on the identical second prefill; without it +0.86 GiB, then nothing; same speed (7.1 vs 7.2 s,
    16.2 tok/s decode)."""
    mapped = not config.prepack and config.provider == "cpu"
    planned = not mapped and not (shapes_vary and config.provider == "cpu")
    return {"opt_level": effective_opt_level(config.opt_level, graph_limit), "prepack": config.prepack,
            "mem_arena": config.mem_arena,
            "mem_pattern": planned if config.mem_pattern is None else config.mem_pattern,
            "node_order": config.node_order or ("priority" if mapped else "default")}


def _session_options(ort: Any, config: SessionConfig, settings: Mapping[str, Any]) -> Any:
    options = ort.SessionOptions()
    level = settings["opt_level"]
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level.upper()}"
                                               if level != "disable" else "ORT_DISABLE_ALL")
    options.intra_op_num_threads = config.threads
    options.inter_op_num_threads = 1  # one graph at a time: parallelism is inside the ops
    options.enable_cpu_mem_arena = config.mem_arena
    options.enable_mem_pattern = settings["mem_pattern"]
    options.execution_order = getattr(ort.ExecutionOrder, NODE_ORDERS[settings["node_order"]])
    if not config.prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    return options


def _load_error(path: Path, config: SessionConfig, error: Exception) -> ConfigError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "bad_alloc" not in first:
        return ConfigError(f"{path.name} cannot be loaded by onnxruntime ({first}); re-export the bundle")
    # the bundle is fine: this machine's memory is not enough for this way of loading it
    if config.prepack:
        return ConfigError(f"{path.name} does not fit in memory when onnxruntime copies its weights; serve it "
                           "with --no-prepack (the weights stay mapped from the file) or on a machine with more "
                           "memory")
    return ConfigError(f"{path.name} does not fit in this machine's memory even with its weights mapped; use a "
                       "smaller bundle (int8, int4) or a machine with more memory")


def graph_config_entries(spec: GraphSpec) -> dict[str, str]:
    """The session config entries a graph's manifest entry demands (TensorRT-ready Q/DQ graphs: see GraphSpec)."""
    level = spec.ort_qdq_matmulnbits_accuracy_level
    return {} if level is None else {"session.qdq_matmulnbits_accuracy_level": str(level)}


def make_session(path: Path, config: SessionConfig, *, graph_limit: str | None = None, fp16: bool = False,
                 entries: Mapping[str, str] | None = None, shapes_vary: bool = False) -> Any:
    """An InferenceSession on exactly the asked provider; `entries`: session config entries the graph needs;
    `shapes_vary`: see session_settings."""
    ort = _ort()
    require_provider(config)
    options = _session_options(ort, config, session_settings(config, graph_limit, shapes_vary=shapes_vary))
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    if config.profile_dir is not None:  # ORT writes no trace, and says nothing, into a folder that is not there
        Path(config.profile_dir).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = os.fspath(Path(config.profile_dir) / path.stem)
    tensorrt = config.provider == "tensorrt"
    providers = provider_chain(config, fp16=fp16,
                               cache_dir=default_trt_cache() / graph_cache_key(path) if tensorrt else None)
    if tensorrt:  # ORT creates only the last folder of the cache path
        Path(providers[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    try:
        return ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types, all Exception subclasses
        raise _load_error(path, config, e) from e


class VisionEngine:
    """Tiles [K, 3, T, T] float32 -> features [K, P, H] float32."""

    def __init__(self, bundle: Path, spec: GraphSpec, config: SessionConfig) -> None:
        self.session = make_session(bundle / spec.file, config, graph_limit=spec.opt_level_limit,
                                    fp16=spec.precision == "fp16", entries=graph_config_entries(spec))
        check_graph_io(spec, self.session)

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        feed = {names.PIXEL_VALUES: pixel_values.astype(np.float32, copy=False)}
        return self.session.run([names.IMAGE_FEATURES], feed)[0]


class DecoderEngine:
    """The decoder with its KV cache: `forward` appends positions and returns the last logits.

    `prefill` (a bundle's prefill graph) runs inputs of PREFILL_GRAPH_MIN_POSITIONS or more positions
    on the same cache."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig, *,
                 prefill: GraphSpec | None = None) -> None:
        ort = _ort()
        self.kv = kv
        self.length = 0  # positions of the cache that hold the current conversation
        device = "cuda" if config.provider in ("cuda", "tensorrt") else "cpu"
        shape = [1, kv.kv_heads, kv.max_length, kv.head_dim]
        self._cache = [ort.OrtValue.ortvalue_from_shape_and_type(shape, NP_DTYPES[kv.dtype], device, config.device_id)
                       for _ in names.kv_names(kv.layers, "past")]
        self._logits = np.zeros((1, 1, vocab), np.float32)
        self.session, self._binding = self._open(bundle / spec.file, spec, config)
        self.prefill_session, self._prefill_binding, self.segmented = None, None, None
        if prefill is None and config.prefill_attention == "kernel":
            raise ConfigError("--prefill-attention kernel: this bundle has no prefill graph, so none is cut for the "
                              "attention kernel (an int8 or int4 CPU bundle has one); use --prefill-attention auto")
        if prefill is not None and _prefill_graph_fits(bundle, prefill, config):
            self.segmented = _open_segmented(bundle, prefill, kv, self._cache, self._logits, config)
            if self.segmented is None:
                self.prefill_session, self._prefill_binding = self._open(bundle / prefill.file, prefill, config)
        if config.prefill_attention == "kernel" and self.segmented is None:  # asked outright: never a quiet fallback
            raise ConfigError("--prefill-attention kernel: the prefill graph is not loaded (--prefill-graph off, or "
                              "this machine's memory does not hold it); use --prefill-attention auto")

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
        """The session (and its binding) that runs an input of `steps` positions."""
        if self.prefill_session is not None and steps >= PREFILL_GRAPH_MIN_POSITIONS:
            return self.prefill_session, self._prefill_binding
        return self.session, self._binding

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """embeds [1, S, H] float32 at positions [length, length + S) -> logits [V] of the last one."""
        steps = embeds.shape[1]
        if steps > self.room:
            raise ValueError(f"{steps} positions do not fit: {self.room} left of {self.kv.max_length}")
        total = self.length + steps
        if self.segmented is not None and steps >= PREFILL_GRAPH_MIN_POSITIONS:
            self.segmented.forward(np.ascontiguousarray(embeds, dtype=np.float32), self.length)
            self.length = total
            return self._logits[0, -1]
        session, binding = self.runner(steps)
        binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input(names.SEQLENS_K, np.array([total - 1], np.int32))
        binding.bind_cpu_input(names.TOTAL_SEQUENCE_LENGTH, np.array(total, np.int32))
        session.run_with_iobinding(binding)
        self.length = total
        return self._logits[0, -1]


def _open_segmented(bundle: Path, prefill: GraphSpec, kv: KVLayout, cache: list[Any], logits: np.ndarray,
                    config: SessionConfig) -> Any:
    """The prefill graph's segments with the attention kernel (engines/segmented.py), or None: the whole graph."""
    kernel = kernel_for(prefill, config.prefill_attention, config.provider)
    if kernel is None:
        return None
    entries = {**graph_config_entries(prefill), **NO_SPINNING, **(_shared_cpu_arena() if config.mem_arena else {})}
    sessions = [make_session(bundle / segment.file, config, graph_limit=prefill.opt_level_limit, entries=entries,
                             shapes_vary=True) for segment in prefill.segments]
    return SegmentedPrefill(bundle, prefill, kv, cache, logits, sessions, kernel, config.threads or usable_cpus())


def _shared_cpu_arena() -> dict[str, str]:
    """One CPU arena for all of a prefill's segment sessions (ORT's environment allocator, registered in the
    process's ORT environment; registering it again is harmless). Each session's own arena would hold the
    largest activations of its segment: measured on the real-width 4-layer int8 bundle (5 segments), resident
    memory after a 2950-position prefill 4.73 GiB with their own arenas, 3.10 GiB with the shared one, the
    same speed (2.68 against 2.62 s); a 32-layer bundle has 33 segments."""
    ort = _ort()
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
    choice = choose_prefill_graph(config.prefill_graph, weights, prepacked=config.prepack and config.provider == "cpu",
                                  available=mem_available_bytes())
    if choice.warning:
        log.warning(choice.warning)
    return choice.load


class ScatterDecoderEngine(DecoderEngine):
    """A TensorRT-ready decoder (standard ONNX, export --target tensorrt) on ONNX Runtime.

    Same preallocated cache, bound as both `past` and `present` of each layer: the graph's TensorScatter (or
    ScatterElements) writes the new positions at `write_index` in place. Per step it is fed the positions,
    the write index and an attention_mask whose length is the positions held after the step."""

    def __init__(self, bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig) -> None:
        super().__init__(bundle, spec, kv, vocab, config)  # no prefill graph: TensorRT-ready bundles have one
        self._ones = np.ones((1, kv.max_length), np.int64)  # attention_mask: only its shape is read

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        steps = embeds.shape[1]
        if steps > self.room:
            raise ValueError(f"{steps} positions do not fit: {self.room} left of {self.kv.max_length}")
        start, total = self.length, self.length + steps
        self._binding.bind_cpu_input(names.INPUTS_EMBEDS, np.ascontiguousarray(embeds, dtype=np.float32))
        self._binding.bind_cpu_input(names.POSITION_IDS, np.arange(start, total, dtype=np.int64)[None])
        self._binding.bind_cpu_input(names.WRITE_INDEX, np.array([start], np.int64))
        self._binding.bind_cpu_input(names.ATTENTION_MASK, self._ones[:, :total])
        self.session.run_with_iobinding(self._binding)
        self.length = total
        return self._logits[0, -1]


def decoder_engine(bundle: Path, spec: GraphSpec, kv: KVLayout, vocab: int, config: SessionConfig, *,
                   prefill: GraphSpec | None = None) -> DecoderEngine:
    """The ORT runner for the decoder's interface (GroupQueryAttention's, with the CPU recipes' prefill graph
    when the bundle has one, or the TensorRT-ready one)."""
    if spec.scatter_kv:
        if prefill is not None:
            raise BundleError("manifest: a TensorRT-ready decoder (scatter KV) with a prefill graph is not a bundle "
                              "pulse-edge writes; re-export it")
        return ScatterDecoderEngine(bundle, spec, kv, vocab, config)
    return DecoderEngine(bundle, spec, kv, vocab, config, prefill=prefill)


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


def open_ort_engine(bundle: Path, manifest: Manifest, config: SessionConfig, *,
                    prefill_chunk: int | str | None = AUTO_CHUNK) -> BundleEngine:
    """The bundle's graphs in ONNX Runtime sessions on exactly the asked provider, behind `BundleEngine`
    (prefill_chunk AUTO_CHUNK: chosen for the graph that prefills, bundle_engine.resolve_chunk)."""
    check_servable(manifest, prefill_chunk)
    require_provider(config)  # first: on a machine without the provider, that is the whole story
    check_device(manifest, config)
    vision = VisionEngine(bundle, manifest.graphs[names.VISION], config)
    decoder = decoder_engine(bundle, manifest.graphs[names.DECODER], manifest.kv, manifest.text.vocab_size, config,
                             prefill=manifest.graphs.get(names.PREFILL))
    return BundleEngine(bundle, manifest, vision, decoder, prefill_chunk=prefill_chunk)  # it resolves AUTO_CHUNK
