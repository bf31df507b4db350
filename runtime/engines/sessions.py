"""ONNX Runtime sessions as pulse-edge opens them: the asked provider exactly, the settings chosen on purpose
(`SessionConfig`), the load and run errors as one line. The engines (runtime/engines/ort.py, segmented.py) build on
it."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pulse_edge.choices import ATTENTION_MODES, DECODE_STEPS, OPT_LEVELS, PREFILL_GRAPH_MODES, PROVIDERS
from pulse_edge.errors import ConfigError, DeviceMemoryError, EngineRunError
from pulse_edge.runtime.bundle.manifest import GraphSpec
from pulse_edge.runtime.engines.trt_cache import cache_folder, hold_folder, keep_and_prune, keep_held
from pulse_edge.runtime.engines.trt_cache import default_trt_cache as default_trt_cache  # re-exported
from pulse_edge.runtime.engines.trt_cache import graph_cache_key as graph_cache_key
from pulse_edge.runtime.kernels.build import cpu_flags

# ONNX Runtime's names for pulse-edge's providers (pulse_edge.choices.PROVIDERS, in that order).
ORT_PROVIDERS = dict(zip(PROVIDERS, ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"),
                         strict=True))
NODE_ORDERS = {"default": "DEFAULT", "priority": "PRIORITY_BASED"}  # ours -> ort.ExecutionOrder
# ONNX Runtime's `run` raises its own exception types (Fail, RuntimeException, InvalidArgument...), all from this
# module and all plain Exception subclasses; `run_with_iobinding` (every decoder call) raises a builtin RuntimeError
# whose text starts with IOBINDING_FAILURE instead (onnxruntime 1.32, both checked on a failing graph in the tests).
ORT_ERRORS_MODULE = "onnxruntime.capi.onnxruntime_pybind11_state"
IOBINDING_FAILURE = "Error in execution: "
# An allocation that failed says so in one of these phrases. C++'s bad_alloc is always the host's; CUDA's are always
# the GPU's; ORT's arena says the same for either, so it is the device's where the provider has one.
HOST_OUT_OF_MEMORY = ("bad_alloc", "bad allocation")
GPU_OUT_OF_MEMORY = ("CUDA failure 2", "cudaErrorMemoryAllocation", "CUDA_ERROR_OUT_OF_MEMORY", "out of memory",
                     "ALLOC_FAILED")  # the last: cuBLAS's and cuDNN's STATUS_ALLOC_FAILED
ARENA_OUT_OF_MEMORY = ("Failed to allocate memory",)


def load_onnxruntime() -> Any:
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
    whose RAM barely holds the model once; except the int8 GEMMs' weights on an x86
    CPU without VNNI, which ORT copies to u8 (U8U8_ENTRY). `mem_pattern` lets ORT plan one block for
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
    decode_attention: str = "auto"  # the same for a decode graph cut for the CPU decode-attention kernel
    # a decode graph with a decode index: decode steps on pulse-edge's own kernels (engines/native.py) where they run
    decode_step: str = "auto"
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
        for what, mode in (("prefill", self.prefill_attention), ("decode", self.decode_attention)):
            if mode not in ATTENTION_MODES:
                raise ConfigError(f"{what} attention {mode!r} is not one of {', '.join(ATTENTION_MODES)}")
        if self.decode_step not in DECODE_STEPS:
            raise ConfigError(f"decode step {self.decode_step!r} is not one of {', '.join(DECODE_STEPS)}")
        if self.decode_step == "native" and self.decode_attention != "auto":
            raise ConfigError(f"--decode-step native computes the decode attention itself (on the decode kernel); "
                              f"--decode-attention {self.decode_attention} chooses for the decode graph: use one")
        if self.provider == "cpu" and (self.provider_options or self.device_id):  # the CPU EP reads neither
            raise ConfigError("provider_options and device_id are for the cuda and tensorrt providers; the cpu "
                              "provider takes neither: leave them out")
        if self.node_order not in (None, *NODE_ORDERS):
            raise ConfigError(f"node order {self.node_order!r} is not one of {', '.join(NODE_ORDERS)}")
        check_threads(self.threads)


def check_threads(threads: int) -> None:
    """0 (one per core) up to this process's cores; each thread has its own arena and scratch: 100000 of them OOM."""
    if threads < 0:
        raise ConfigError(f"threads must be >= 0 (0 = one per core), got {threads}")
    if threads > usable_cpus():
        raise ConfigError(f"threads {threads} is more than the {usable_cpus()} CPU cores this process may use; give "
                          "at most that many (0 = one per core)")


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
    ort = load_onnxruntime()
    wanted = ORT_PROVIDERS[config.provider]
    if wanted not in ort.get_available_providers():
        raise ConfigError(f"provider {config.provider!r} ({wanted}) is not available in this onnxruntime "
                          f"(available: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu "
                          "for cuda/tensorrt, or use --provider cpu")
    return wanted


def engine_cache_dir(path: Path, config: SessionConfig, *, fp16: bool, onnxruntime: str) -> Path:
    """Where TensorRT's engines for the graph at `path`, built with these settings, are cached."""
    return cache_folder(path, {"onnxruntime": onnxruntime, "fp16": fp16, "options": dict(config.provider_options)})


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
            "node_order": config.node_order or ("priority" if mapped else "default"),
            "u8u8_matmul": (config.provider == "cpu" and int8_products_saturate()
                            and effective_opt_level(config.opt_level, graph_limit) in U8U8_LEVELS)}


# x86 CPUs without VNNI multiply ORT's u8 x s8 MatMulIntegerToFloat / DynamicQuantizeMatMul (the vision graph's
# w8a8u8, the prefill graph's w8a8dyn) with vpmaddubsw, whose pair sums saturate at int16: codes near 255 against
# weights near 127 (2 x 255 x 127 = 64770) come out clipped, a silent error the emulated reference (exact int32
# products) does not have. ORT's session.x64quantprecision rewrites those weights to u8 (exactly: code + 128 at
# zero point 128) and multiplies u8 x u8 without the saturation. VNNI's vpdpbusd sums in int32: nothing to do there.
EXACT_INT8_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})
U8U8_ENTRY = "session.x64quantprecision"
# ORT rewrites the weights in a level-2 graph transformer: at "basic" or "disable" the entry does nothing, and such
# a session keeps the saturating kernel (recorded as u8u8_matmul false; the int8 bundles run at "all")
U8U8_LEVELS = ("extended", "all")


# The schemes written as ORT's int8 GEMM ops (MatMulIntegerToFloat, DynamicQuantizeMatMul), which a session at
# "basic" runs on the saturating kernel. Not `w8a8` (Q/DQ): ORT fuses it into MatMulIntegerToFloat at level 2 only,
# where the u8 rewrite applies too; at "basic" it stays a float MatMul.
INT8_GEMM_SCHEMES = frozenset({"w8a8u8", "w8a8dyn"})


def saturation_warning(config: SessionConfig, graph_limit: str | None, schemes: Iterable[str]) -> str | None:
    """The line to warn with when a graph's int8 GEMMs (`schemes`: the scheme of each quantized MatMul) will run
    on the saturating kernel: this CPU needs the u8 x u8 rewrite and the session's level is below where ORT
    makes it (an --opt-level the user lowered)."""
    if (config.provider != "cpu" or not int8_products_saturate() or not INT8_GEMM_SCHEMES & set(schemes)
            or session_settings(config, graph_limit)["u8u8_matmul"]):
        return None
    return (f"at --opt-level {effective_opt_level(config.opt_level, graph_limit)} onnxruntime multiplies this "
            "bundle's int8 activations and weights with a kernel that saturates on this CPU (x86 without VNNI), so "
            "its answers may differ from the validated ones; use --opt-level extended or all")


def cpu_precision_entries() -> dict[str, str]:
    """The config entries a CPU session of a quantized graph needs on this machine (for the sessions export
    validation and the benchmarks open themselves; make_session adds them from session_settings)."""
    return {U8U8_ENTRY: "1"} if int8_products_saturate() else {}


def int8_products_saturate(flags: frozenset[str] | None = None) -> bool:
    """Would ORT's u8 x s8 GEMMs saturate on this CPU (x86 without VNNI)? Not on other architectures."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return not (cpu_flags() if flags is None else flags) & EXACT_INT8_FLAGS


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
        return ConfigError(f"{path.name} does not fit in memory when onnxruntime copies its weights; run `infer` "
                           "or `serve` with --no-prepack (the weights stay mapped from the file) or use a machine "
                           "with more memory")
    return ConfigError(f"{path.name} does not fit in this machine's memory even with its weights mapped; use a "
                       "smaller bundle (int8, int4) or a machine with more memory")


def ort_settings_given(session: SessionConfig | None) -> list[str]:
    """The ONNX Runtime settings in `session` that differ from the defaults, as the command line spells them (the
    Python API's others as SessionConfig fields): what a backend without ONNX Runtime (TensorRT engines, the torch
    reference) would ignore in silence."""
    if session is None:
        return []
    default = SessionConfig()
    return [CLI_FLAGS.get(f.name, f"SessionConfig.{f.name}") for f in fields(SessionConfig)
            if getattr(session, f.name) != getattr(default, f.name)]


# SessionConfig fields that `infer`, `serve` and `bench latency` set from a flag, and that flag
CLI_FLAGS = MappingProxyType({
    "provider": "--provider", "threads": "--threads", "opt_level": "--opt-level", "prepack": "--no-prepack",
    "prefill_graph": "--prefill-graph", "prefill_attention": "--prefill-attention",
    "decode_attention": "--decode-attention", "decode_step": "--decode-step"})


def graph_config_entries(spec: GraphSpec) -> dict[str, str]:
    """The session config entries a graph's manifest entry demands (TensorRT-ready Q/DQ graphs: see GraphSpec)."""
    level = spec.ort_qdq_matmulnbits_accuracy_level
    return {} if level is None else {"session.qdq_matmulnbits_accuracy_level": str(level)}


def make_session(path: Path, config: SessionConfig, *, graph_limit: str | None = None, fp16: bool = False,
                 entries: Mapping[str, str] | None = None, shapes_vary: bool = False) -> Any:
    """An InferenceSession on exactly the asked provider; `entries`: session config entries the graph needs;
    `shapes_vary`: see session_settings."""
    ort = load_onnxruntime()
    require_provider(config)
    settings = session_settings(config, graph_limit, shapes_vary=shapes_vary)
    options = _session_options(ort, config, settings)
    if settings["u8u8_matmul"]:
        options.add_session_config_entry(U8U8_ENTRY, "1")
    for key, value in (entries or {}).items():
        options.add_session_config_entry(key, value)
    if config.profile_dir is not None:  # ORT writes no trace, and says nothing, into a folder that is not there
        Path(config.profile_dir).mkdir(parents=True, exist_ok=True)
        options.enable_profiling = True
        options.profile_file_prefix = os.fspath(Path(config.profile_dir) / path.stem)
    tensorrt = config.provider == "tensorrt"
    cache = engine_cache_dir(path, config, fp16=fp16, onnxruntime=ort.__version__) if tensorrt else None
    providers = provider_chain(config, fp16=fp16, cache_dir=cache)
    if tensorrt:  # ORT creates only the last folder of the cache path
        Path(providers[0][1]["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    ours = cache is not None and Path(providers[0][1]["trt_engine_cache_path"]) == cache  # not a path the caller chose
    held = hold_folder(cache) if ours else None
    try:
        session = _started_session(ort, path, options, providers, config)
    except BaseException:
        if held is not None:
            os.close(held)
        raise
    keep_held(held, session)
    if ours:
        keep_and_prune(cache, path, ort.__version__)
    return session


def _started_session(ort: Any, path: Path, options: Any, providers: list, config: SessionConfig) -> Any:
    try:
        session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types, all Exception subclasses
        raise _load_error(path, config, e) from e
    check_session_provider(session, config, path)
    return session


def check_session_provider(session: Any, config: SessionConfig, path: Path) -> None:
    """The session runs on the asked provider first. get_available_providers names CUDA and TensorRT wherever
    onnxruntime-gpu is installed; a provider that then fails to start (no libnvinfer, no cuDNN) makes ORT fall back
    to the next one, CPU at the end, with a log line the session's severity hides: a --provider tensorrt run served
    and timed on CUDA or the CPU as TensorRT."""
    wanted = ORT_PROVIDERS[config.provider]
    running = list(session.get_providers())
    if not running or running[0] != wanted:
        instead = "cuda" if config.provider == "tensorrt" else "cpu"
        raise ConfigError(f"{path.name}: onnxruntime could not start {wanted} (the session fell back to "
                          f"{', '.join(running) or 'nothing'}): check that its CUDA/TensorRT libraries are installed "
                          f"and found (LD_LIBRARY_PATH), or use --provider {instead}")


@contextmanager
def ort_run_errors(graph: str, provider: str = "cpu") -> Iterator[None]:
    """ONNX Runtime's failures while running `graph` as one line: out of memory as the machine's state (the host's
    MemoryError, or on a GPU provider a DeviceMemoryError, whose remedy is not the host's RAM), anything else as an
    EngineRunError (no answer; the bundle passed its load checks, so the fault is ours or the engine's). Only ORT's
    own failures are translated; any other error passes through as it is."""
    try:
        yield
    except Exception as e:
        text = ort_failure_text(e)
        if text is None:
            raise
        first = text.splitlines()[0] if text else type(e).__name__
        if provider != "cpu" and _says(text, GPU_OUT_OF_MEMORY + ARENA_OUT_OF_MEMORY) and not _says(
                text, HOST_OUT_OF_MEMORY):
            raise DeviceMemoryError(f"the GPU's memory is full running {graph} ({first}); export the bundle with a "
                                    "shorter context (export --max-context) or a smaller precision, or free the "
                                    "GPU") from e
        if _says(text, HOST_OUT_OF_MEMORY + ARENA_OUT_OF_MEMORY + GPU_OUT_OF_MEMORY):
            raise MemoryError(f"onnxruntime could not allocate memory running {graph} ({first})") from e
        raise EngineRunError(f"onnxruntime failed running {graph} ({first}); the bundle passed its load checks, so "
                             "this is a fault in pulse-edge or onnxruntime: please report it with the output of "
                             "`pulse-edge --version` and the bundle's manifest.json") from e


def ort_failure_text(error: BaseException) -> str | None:
    """The text of an error ONNX Runtime raised running a graph, without the binding's prefix; None for any other."""
    if type(error).__module__ == ORT_ERRORS_MODULE:
        return str(error).strip()
    if type(error) is RuntimeError and str(error).startswith(IOBINDING_FAILURE):
        return str(error).removeprefix(IOBINDING_FAILURE).strip()
    return None


def _says(text: str, phrases: tuple[str, ...]) -> bool:
    return any(phrase in text for phrase in phrases)
