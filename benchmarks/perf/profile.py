"""`pulse-edge bench profile`: where a bundle's time goes on this CPU, op by op, against the host's bounds.

    what is asked, checked against the manifest; the load's own checks of the bundle, before anything is measured
    bundle ─ the runtime's sessions with ONNX Runtime's profiler on (SessionConfig.profile_dir)
    per phase: warm-up (once, untimed) ─ probe ─ timed window ─ probe
      the probes are the phase's bounds, the best of the two (probes.PHASE_BOUNDS): int8 / fp32 GEMM (gemm_probe) for
      vision and prefill (the whole phase against the int8 peak, or the fp32 one where all its GEMMs are float:
      profile_report._phase_kind), read bandwidth (numpy, one array) for decode; they run beside the loaded model,
      outside the window
    timed, one window per phase on the wall clock (the clock ORT's profiler starts from):
      vision   the tiles of a letter print, `runs` times
      prefill  `positions` positions in the runtime's chunks, on the graph the runtime picks, `runs` times
      decode   `steps` steps at `context` positions of context, `runs` times
    each session's trace ─ the node events inside each window (benchmarks/common/ort_trace.py)
      every window must hold all of its session runs (ORT's profiler stops recording after 1M events; a platform
      whose profiler clock is not the wall clock would leave the windows empty): otherwise one line, no numbers
    per phase: profile_report.py

Kernel times are ORT's own; the profiler's cost did not show (a decode step of the 4-layer int8 bundle at 3000
positions, profiler on against off in one process, 6 interleaved rounds of 16 steps: +0.1%). The gap between the
window and the kernels is the session's own overhead, shown as "outside kernels".
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.gemm_probe import require_onnx
from pulse_edge.benchmarks.common.host import HostWindow, host_sample
from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.measure import machine_with_load
from pulse_edge.benchmarks.common.ort_trace import Trace, onnx_weight_bytes, read_trace, runs_in_window
from pulse_edge.benchmarks.common.probes import PHASE_BOUNDS
from pulse_edge.benchmarks.common.roofline import bundle_decoder_facts
from pulse_edge.benchmarks.perf.backend_runs import OrtBench, bench_inputs
from pulse_edge.benchmarks.perf.backends import BackendsConfig
from pulse_edge.benchmarks.perf.profile_report import Bounds, Phase, phase_report
from pulse_edge.errors import ConfigError

PHASES = ("vision", "prefill", "decode")


@dataclass(frozen=True)
class ProfileConfig:
    model: Path
    runs: int = 3
    positions: int = 2950  # a letter print's prompt: 2880 image tokens and the text around them
    context: int = 3000
    steps: int = 8
    threads: int = 0
    prefill_chunk: int | None = None  # None: the runtime's choice; 0: one pass
    traces: Path | None = None  # keep the traces here (Perfetto / chrome://tracing open them)
    bandwidth_bytes: int = 2**30
    seed: int = 0


class _Runner:
    """The bundle's engine as `bench backends` drives it (backend_runs.OrtBench, the same inputs), with the
    profiler on; the phases are its vision, prefill and decode."""

    def __init__(self, cfg: ProfileConfig, trace_dir: Path) -> None:
        from pulse_edge.runtime.engines.ort import SessionConfig

        base = BackendsConfig(context=cfg.context, decode_tokens=cfg.steps, prefill_positions=cfg.positions,
                              threads=cfg.threads, seed=cfg.seed)
        chunk = {} if cfg.prefill_chunk is None else {"prefill_chunk": cfg.prefill_chunk or None}  # 0: one pass
        self.opened = time.time_ns()
        # the whole decoder graphs, also where the bundle cuts them for the CPU attention kernels: a kernel runs
        # outside ONNX Runtime, so no trace would hold its time (runtime/engines/segmented.py)
        self.bench = OrtBench(cfg.model, bench_inputs(cfg.model, base), base,
                              session=SessionConfig(threads=cfg.threads, profile_dir=trace_dir,
                                                    prefill_attention="graph",
                                                    decode_attention="graph"), **chunk)
        self.loaded = time.time_ns()
        self.engine = self.bench.engine
        self.tiles = len(self.bench.inputs.pixel_values)
        self.chunk = self.engine.prefill_chunk or cfg.positions
        self.phases = {"vision": self.bench.vision, "prefill": self.bench.prefill, "decode": self.bench.decode}

    def sessions(self) -> dict[str, Any]:
        decoder = self.engine.decoder
        found = {"vision": self.engine.vision.session, "decoder": decoder.session,
                 "prefill": getattr(decoder, "prefill_session", None)}
        return {name: s for name, s in found.items() if s is not None}

    def calls(self) -> dict[str, int]:
        positions = self.bench.inputs.prompt.shape[1]
        return {"vision": 1, "prefill": math.ceil(positions / self.chunk), "decode": len(self.bench.steps)}


TRACE_SLACK_NS = 2_000  # trace times are whole microseconds: the first run may read as starting just before the window


def _timed(phase: Phase, fn: Callable[[], object], runs: int) -> None:
    before = host_sample()
    phase.start_ns = time.time_ns() - TRACE_SLACK_NS
    for _ in range(runs):
        fn()
    phase.end_ns = time.time_ns()
    phase.host = HostWindow.between(before, host_sample())


def _traces(runner: _Runner) -> dict[str, Trace]:
    """End every session's profiling and read its trace; a profiler whose clock is not the wall clock is refused."""
    traces = {}
    for graph, session in runner.sessions().items():
        start = session.get_profiling_start_time_ns()
        if not runner.opened <= start <= runner.loaded:
            raise ConfigError("ONNX Runtime's profiler does not count time on the wall clock here (its start is "
                              "outside the load); bench profile cannot place its events in the timed windows")
        traces[graph] = read_trace(Path(session.end_profiling()), graph, start)
    return traces


def _check_complete(phase: Phase, traces: dict[str, Trace], runs: int) -> None:
    """The window must hold every session run it timed, or its sums would be silently short."""
    seen = {g: runs_in_window(t.runs, phase.start_ns, phase.end_ns) for g, t in traces.items()}
    phase.graphs = [g for g, n in seen.items() if n]
    if sum(seen.values()) != runs * phase.calls:
        raise ConfigError(f"ONNX Runtime's trace holds {sum(seen.values())} of the {runs * phase.calls} session runs "
                          f"of the {phase.name} window (its profiler stops after 1M events): ask for fewer --runs "
                          "or --steps")


def _check(cfg: ProfileConfig) -> None:
    """Before the load: a bundle whose cache holds what is asked, and a folder for the traces (the load checks the
    bundle's files itself, before anything is timed)."""
    from pulse_edge.runtime.bundle.manifest import read_manifest
    from pulse_edge.runtime.engines.bundle_engine import check_servable

    require_onnx()  # the GEMM probe beside vision and prefill, and the traces' weight sizes
    if not (cfg.model / "manifest.json").is_file():
        raise ConfigError(f"--model {cfg.model} is not a bundle (no manifest.json); bench profile reads a bundle's "
                          "ONNX graphs")
    manifest = read_manifest(cfg.model)
    check_servable(manifest, cfg.prefill_chunk or None)
    room = manifest.kv.max_length
    if max(cfg.positions, cfg.context) > room:
        raise ConfigError(f"--positions {cfg.positions} / --context {cfg.context}: this bundle's cache holds {room} "
                          "positions; ask for at most that many")
    if cfg.traces is not None:
        try:
            cfg.traces.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=cfg.traces).close()
        except OSError as e:
            raise ConfigError(f"--traces {cfg.traces}: cannot write there ({e.strerror or e}); name a folder this "
                              "user can write") from e


def _probe(phase: Phase, when: str, cfg: ProfileConfig, progress: Callable[[str], None]) -> None:
    phase.probes.measure(f"{phase.name} {when}", cfg.bandwidth_bytes, cfg.threads, progress,
                         what=(PHASE_BOUNDS[phase.name],), copy=False)  # beside the model: one array, not two


def _profiled(cfg: ProfileConfig, progress: Callable[[str], None], trace_dir: Path
              ) -> tuple[dict[str, Phase], dict[str, Trace], dict[tuple[str, str], int], int, int]:
    """Load; per phase: warm up, probe, time, probe; read the traces. The engine is released when this returns."""
    progress(f"loading {cfg.model} with ONNX Runtime's profiler on")
    runner = _Runner(cfg, trace_dir)
    phases = {name: Phase(name, calls=runner.calls()[name]) for name in PHASES}
    for name, phase in phases.items():
        fn = runner.phases[name]
        progress(f"{name}: 1 warm-up, a probe, {cfg.runs} timed, a probe")
        fn()
        _probe(phase, "before", cfg, progress)
        _timed(phase, fn, cfg.runs)
        _probe(phase, "after", cfg, progress)
    traces = _traces(runner)
    graphs = runner.bench.pipeline.manifest.graphs
    weights = {(graph, node): size for graph in traces
               for node, size in onnx_weight_bytes(cfg.model / graphs[graph].file).items()}
    return phases, traces, weights, runner.chunk, runner.tiles


def run_profile(cfg: ProfileConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    _check(cfg)
    with tempfile.TemporaryDirectory(prefix="pulse-edge-profile-") as tmp:
        phases, traces, weights, chunk, tiles = _profiled(cfg, progress, cfg.traces or Path(tmp))
    for phase in phases.values():
        _check_complete(phase, traces, cfg.runs)
    facts = bundle_decoder_facts(cfg.model)
    events = [e for t in traces.values() for e in t.nodes]
    return {
        "config": {"model": str(cfg.model), "runs": cfg.runs, "positions": cfg.positions, "context": cfg.context,
                   "steps": cfg.steps, "threads": cfg.threads, "prefill_chunk": chunk, "tiles": tiles,
                   "prefilled_by": phases["prefill"].graphs, "traces": str(cfg.traces) if cfg.traces else None},
        "machine": machine_with_load(), "model": model_info(cfg.model),
        "probe_method": "per phase, a probe just before and just after its window; the best of the two counts",
        "phases": {name: {**phase_report(p, events, weights, cfg.runs, Bounds.of(p.probes),
                                         kv_bytes_per_run=facts.kv_bytes_per_position * cfg.context * cfg.steps),
                          "bounds": p.probes.to_dict()}
                   for name, p in phases.items()},
    }
