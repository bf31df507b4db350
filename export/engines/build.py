"""`pulse-edge build-engines BUNDLE`: the vision and decoder engines of a TensorRT-ready bundle.

    manifest.json ─ checks (TensorRT-ready graphs? FP8 on this target? ops this TensorRT parses?)
      for vision, decoder:
        OnnxParser.parse_from_file (external data stays mapped) ─ profiles (export/engines/profiles.py)
        ─ compute capabilities (rtx) / workspace / timing cache (standard TensorRT) ─ build, streamed to the file
      engines.json (runtime/bundle/engines.py) ─ rename into place

Written into a hidden directory and renamed into place at the end (pulse_edge/staging.py): an interrupted
or failed build leaves nothing under the output's name. TensorRT-RTX builds on any machine without a GPU;
standard TensorRT builds on (and for) the GPU it runs on, so a Jetson engine is built on the Jetson.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge import __version__
from pulse_edge.choices import RTX_COMPUTE_CAPABILITIES
from pulse_edge.errors import ConfigError, PulseEdgeError
from pulse_edge.export.engines.graphs import prepared_graph
from pulse_edge.export.engines.profiles import PROFILES, BuildLimits, resolve_limits
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.engines import ENGINE_SUFFIX, EngineSet, EngineSpec, ProfileSpec, manifest_sha256
from pulse_edge.runtime.bundle.integrity import check_bundle as check_files_intact
from pulse_edge.runtime.bundle.integrity import file_record
from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest, TensorSpec, read_manifest
from pulse_edge.runtime.engines.ort import default_trt_cache
from pulse_edge.runtime.engines.tensorrt_api import TensorRT, load_tensorrt
from pulse_edge.staging import staged_directory, staged_file

log = logging.getLogger(__name__)

# RTX GPUs by generation: Ampere 8.6 (RTX 30), Ada 8.9 (RTX 40), Blackwell 12.0 (RTX 50). FP8 needs 8.9.
DEFAULT_RTX_CAPABILITIES = ("8.6", "8.9", "12.0")
FP8_MIN_CAPABILITY = (8, 9)
HEARTBEAT_S = 30.0  # a 7B engine builds for minutes: say that it is still going
SAMPLE_S = 0.05


class EngineBuildError(PulseEdgeError):
    """TensorRT refused a graph or failed to build it."""


@dataclass(frozen=True)
class EngineBuildOptions:
    target: str = "auto"
    max_context: int | None = None
    max_tiles: int | None = None
    max_chunk: int | None = None  # positions per prefill run (profiles.BuildLimits)
    workspace_gib: float | None = None
    compute_capabilities: tuple[str, ...] | None = None  # rtx only; default DEFAULT_RTX_CAPABILITIES
    output: Path | None = None


def _capability(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def uses_fp8(manifest: Manifest) -> bool:
    return any(g.precision == "fp8" or g.matmul_schemes.get("fp8") for g in manifest.graphs.values())


def check_bundle(manifest: Manifest, bundle: Path) -> None:
    """Only graphs written for TensorRT (standard ONNX) can be parsed."""
    if any(graph.target != "tensorrt" or graph.fusions for graph in manifest.graphs.values()):
        raise ConfigError(f"{bundle} was exported for ONNX Runtime (its decoder's GroupQueryAttention, "
                          "SkipSimplifiedLayerNormalization and MatMulNBits have no TensorRT layer): export the "
                          "checkpoint with --target tensorrt")


def compute_capabilities(trt: TensorRT, asked: tuple[str, ...] | None, fp8: bool) -> tuple[str, ...]:
    """The capabilities TensorRT-RTX compiles for; () for standard TensorRT (its own GPU's)."""
    if not trt.targets_compute_capabilities:
        if asked:
            raise ConfigError("standard TensorRT builds for the GPU it runs on; --compute-capability is for "
                              "--target rtx")
        return ()
    if asked is None:
        asked = tuple(c for c in DEFAULT_RTX_CAPABILITIES if not fp8 or _capability(c) >= FP8_MIN_CAPABILITY)
    for capability in asked:
        if capability == "8.7":
            raise ConfigError("TensorRT-RTX cannot target Jetson Orin (8.7): build on the Jetson with --target "
                              "jetson (JetPack's TensorRT)")
        if capability not in RTX_COMPUTE_CAPABILITIES:
            raise ConfigError(f"compute capability {capability} is not one TensorRT-RTX targets "
                              f"({', '.join(RTX_COMPUTE_CAPABILITIES)})")
        if fp8 and _capability(capability) < FP8_MIN_CAPABILITY:
            raise ConfigError(f"this bundle is FP8, which needs compute capability >= 8.9 (Ada, Blackwell); "
                              f"{capability} cannot run it: drop it from --compute-capability or use an int8 bundle")
    return tuple(asked)


def check_target(manifest: Manifest, trt: TensorRT) -> None:
    """What the chosen TensorRT cannot build from this bundle, said before any engine is started."""
    if trt.flavour == "standard" and uses_fp8(manifest):
        raise ConfigError("this bundle is FP8, which pulse-edge builds with TensorRT-RTX only (--target rtx: Ada and "
                          "Blackwell); standard TensorRT builds no FP8 engines here (Jetson Orin, compute capability "
                          "8.7, has no FP8; Hopper is not a target): export an int8 or int4 bundle for this GPU")
    decoder = manifest.graphs[names.DECODER]
    if decoder.trt_ops == "native" and not trt.reads_native_ops():
        raise ConfigError(f"{trt.name} {trt.version} cannot parse the decoder's opset-24 attention/RoPE/RMSNorm/KV "
                          "ops (they need TensorRT >= 10.15): export with --target tensorrt --trt-ops explicit")


class _PeakMemory:
    """Samples this process's resident set while a build runs; also says every HEARTBEAT_S that it runs."""

    def __init__(self, heartbeat: Callable[[float], None]) -> None:
        self.peak, self._stop, self._heartbeat = 0, threading.Event(), heartbeat
        self._thread = threading.Thread(target=self._run, name="pulse-edge-build-memory", daemon=True)

    def _run(self) -> None:
        start, beats = time.monotonic(), 0
        while not self._stop.wait(SAMPLE_S):
            self.peak = max(self.peak, rss_bytes())
            elapsed = time.monotonic() - start
            if elapsed >= HEARTBEAT_S * (beats + 1):
                beats += 1
                self._heartbeat(elapsed)

    def __enter__(self) -> _PeakMemory:
        self.peak = rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    """VmRSS of this process (0 where /proc is absent)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class _Build:
    """One engine's TensorRT objects and messages."""

    trt: TensorRT
    builder: Any
    network: Any
    config: Any
    messages: list[str]
    keep: list[Any]  # the logger, parser (it owns the weights the network points into), monitor, cache


def _parse(trt: TensorRT, graph: Path, messages: list[str]) -> _Build:
    logger = trt.logger(lambda severity, text: messages.append(f"{severity}: {text}"))
    builder = trt.module.Builder(logger)
    network = trt.create_network(builder)
    parser = trt.module.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(graph)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)] or messages[-1:]
        first = (errors[0] if errors else "no message").strip().splitlines()[0]
        raise EngineBuildError(f"{trt.name} cannot parse {graph.name}: {first}")
    return _Build(trt, builder, network, builder.create_builder_config(), messages, [logger, parser])


def _configure(build: _Build, profiles: tuple[ProfileSpec, ...], capabilities: tuple[str, ...],
               workspace_gib: float | None, on_phase: Callable[[str], None]) -> str | None:
    """Profiles, target GPUs, workspace and timing cache; returns the timing cache file used, if any."""
    trt, config = build.trt.module, build.config
    for spec in profiles:
        profile = build.builder.create_optimization_profile()
        for name, (low, opt, high) in spec.shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    if capabilities:
        build.trt.set_compute_capabilities(config, capabilities)
    if workspace_gib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    monitor = build.trt.progress_monitor(on_phase)
    config.progress_monitor = monitor
    build.keep.append(monitor)
    if build.trt.flavour == "standard":  # TensorRT-RTX's timing cache is a no-op (deprecated there)
        return _timing_cache(build)
    return None


def _timing_cache(build: _Build) -> str:
    path = default_trt_cache() / f"timing-{build.trt.name}-{build.trt.version}.cache"
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:
        data = b""  # an unreadable cache costs build time, nothing else
    cache = build.config.create_timing_cache(data)
    if cache is None:  # a damaged file (one cut short by the writes before they were staged): start empty
        log.warning("the timing cache %s is damaged; this build measures its tactics anew", path)
        cache = build.config.create_timing_cache(b"")
    if not build.config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU's: built without it
        log.warning("the timing cache %s was made on another GPU; this build measures its tactics anew", path)
        build.config.set_timing_cache(build.config.create_timing_cache(b""), ignore_mismatch=False)
    build.keep.append(cache)
    return os.fspath(path)


def _save_timing_cache(build: _Build, path: str | None) -> None:
    """Written whole or not at all (two builds at once each replace it whole); a cache that cannot be written
    (a read-only home) costs the next build time, never this build's engines."""
    if path is None:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with staged_file(Path(path)) as partial:
            partial.write_bytes(bytes(build.config.get_timing_cache().serialize()))
    except OSError as e:
        log.warning("the timing cache %s could not be saved (%s); the next build measures its tactics anew", path,
                    e.strerror or e)


def _serialize(build: _Build, out: Path) -> None:
    """Stream the plan to `out` (never the whole plan in memory where the module can stream)."""
    with open(out, "wb") as f:
        writer = build.trt.stream_writer(f.write)
        if writer is not None and hasattr(build.builder, "build_serialized_network_to_stream"):
            ok = build.builder.build_serialized_network_to_stream(build.network, build.config, writer)
        else:
            plan = build.builder.build_serialized_network(build.network, build.config)
            ok = plan is not None
            if ok:
                f.write(memoryview(plan))
    if not ok or out.stat().st_size == 0:
        errors = [m for m in build.messages if m.startswith(("ERROR", "INTERNAL_ERROR"))] or build.messages[-1:]
        raise EngineBuildError(f"{build.trt.name} could not build {out.name}: "
                               f"{(errors[-1] if errors else 'no message').splitlines()[0]}")


def _network_io(build: _Build) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    net, trt = build.network, build.trt

    def spec(tensor: Any) -> TensorSpec:
        return TensorSpec(tensor.name, trt.dtype_name(tensor.dtype), tuple(int(d) for d in tensor.shape))

    return (tuple(spec(net.get_input(i)) for i in range(net.num_inputs)),
            tuple(spec(net.get_output(i)) for i in range(net.num_outputs)))


def _layer_counts(build: _Build) -> dict[str, int]:
    net = build.network
    return dict(sorted(Counter(str(net.get_layer(i).type).rsplit(".", 1)[-1] for i in range(net.num_layers)).items()))


def check_io(role: str, graph: GraphSpec, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
    """The network TensorRT parsed must have the manifest's tensors, names and element types."""
    for ours, theirs in ((graph.inputs, inputs), (graph.outputs, outputs)):
        want = {t.name: t.dtype for t in ours}
        have = {t.name: t.dtype for t in theirs}
        if want != have:
            raise EngineBuildError(f"the {role} network's IO {have} differs from the manifest's {want}; re-export "
                                   "the bundle")


def _kv_aliases(role: str, manifest: Manifest) -> dict[str, str]:
    if role != names.DECODER:
        return {}
    layers = manifest.kv.layers
    return dict(zip(names.kv_names(layers, "present"), names.kv_names(layers, "past"), strict=True))


@dataclass(frozen=True)
class _Job:
    role: str
    graph: GraphSpec
    profiles: tuple[ProfileSpec, ...]


def build_one(trt: TensorRT, bundle: Path, manifest: Manifest, job: _Job, work: Path, limits: BuildLimits,
              capabilities: tuple[str, ...], workspace_gib: float | None,
              progress: Callable[[str], None]) -> tuple[EngineSpec, str | None]:
    """Parse, configure, build and describe one engine."""
    out = work / f"{job.role}{ENGINE_SUFFIX}"
    start = time.monotonic()
    with prepared_graph(bundle, job.graph, manifest, limits.max_context, work) as graph:
        build = _parse(trt, graph, [])
        inputs, outputs = _network_io(build)
        check_io(job.role, job.graph, inputs, outputs)
        cache = _configure(build, job.profiles, capabilities, workspace_gib, lambda p: progress(f"  {p}"))
        with _PeakMemory(lambda s: progress(f"  ... {s:.0f} s")) as memory:
            _serialize(build, out)
        _save_timing_cache(build, cache)
        layers = _layer_counts(build)
    record = file_record(out)  # what the runtime checks at every load (sampled) and a copy's first (whole)
    spec = EngineSpec(file=out.name, graph=job.graph.file, precision=job.graph.precision, inputs=inputs,
                      outputs=outputs, profiles=job.profiles, size=record.size,
                      build_seconds=round(time.monotonic() - start, 3), peak_rss_bytes=memory.peak, layers=layers,
                      kv_aliases=_kv_aliases(job.role, manifest), sha256=record.sha256,
                      sampled_sha256=record.sampled_sha256)
    return spec, cache


def _describe_target(trt: TensorRT, capabilities: tuple[str, ...]) -> str:
    where = f"compute capabilities {', '.join(capabilities)}" if capabilities else "this machine's GPU"
    return f"{trt.name} {trt.version} for {where}"


def build_engines(bundle: str | Path, options: EngineBuildOptions = EngineBuildOptions(),
                  progress: Callable[[str], None] = print) -> Path:
    """Build both engines into options.output (default BUNDLE/engines-<target>); returns that directory."""
    bundle = Path(bundle)
    manifest = read_manifest(bundle)
    check_bundle(manifest, bundle)
    check_files_intact(bundle, manifest)  # sizes and sampled checksums: engines of a damaged copy would load later
    trt = load_tensorrt(options.target)
    check_target(manifest, trt)
    capabilities = compute_capabilities(trt, options.compute_capabilities, uses_fp8(manifest))
    limits = resolve_limits(manifest, options.max_context, options.max_tiles, options.max_chunk)
    if options.workspace_gib is not None and options.workspace_gib <= 0:
        raise ConfigError(f"--workspace must be > 0 GiB, got {options.workspace_gib}")
    target = "rtx" if trt.flavour == "rtx" else "jetson"
    out = options.output or bundle / f"engines-{target}"
    jobs = [_Job(role, manifest.graphs[role], PROFILES[role](manifest, limits)) for role in (names.VISION,
                                                                                               names.DECODER)]
    with staged_directory(out, what="engine") as work:
        specs, cache = {}, None
        for job in jobs:
            target_text = _describe_target(trt, capabilities)
            progress(f"building the {job.role} engine ({job.graph.precision}) with {target_text}")
            specs[job.role], cache = build_one(trt, bundle, manifest, job, work, limits, capabilities,
                                               options.workspace_gib, progress)
            spec = specs[job.role]
            progress(f"{spec.file}: {spec.size / 2**20:.1f} MiB in {spec.build_seconds:.1f} s, peak RSS "
                     f"{spec.peak_rss_bytes / 2**30:.2f} GiB")
        EngineSet(target=target, tensorrt=trt.name, tensorrt_version=trt.version, compute_capabilities=capabilities,
                  max_context=limits.max_context, max_tiles=limits.max_tiles,
                  bundle_manifest_sha256=manifest_sha256(bundle), engines=specs,
                  created_by=f"pulse-edge {__version__}",
                  workspace_bytes=None if options.workspace_gib is None else int(options.workspace_gib * 2**30),
                  timing_cache=cache).write(work)
    return out
