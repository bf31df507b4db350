"""`pulse-edge bench profile`: where a bundle's time goes on this CPU, op by op, against the host's bounds.

    probes: read bandwidth (numpy) and the int8 / fp32 GEMM peaks (ORT, gemm_probe.py)
    bundle ─ the runtime's sessions with ONNX Runtime's profiler on (SessionConfig.profile_dir)
      warm-up: each phase once, untimed
      timed, one window per phase on the wall clock (the clock ORT's profiler starts from):
        vision   the tiles of a letter print, `runs` times
        prefill  `positions` positions in the runtime's chunks, on the graph the runtime picks, `runs` times
        decode   `steps` steps at `context` positions of context, `runs` times
    each session's trace ─ the node events inside each window (benchmarks/common/ort_trace.py)
    per phase: time per role (int8 GEMM, attention, activation quantization, ...) and its share; the GEMMs' ops/s
    against the int8 probe (vision, prefill) or their weights' bytes/s against the read probe (decode); attention's
    FLOP/s against the fp32 SGEMM probe; and the phase's ceiling if only its GEMMs and attention took time.

The ceiling answers "how far can this graph go with these kernels": a phase whose GEMMs already run at
the probe and whose attention runs at the fp32 peak can only gain by dropping the other roles' time.
Kernel times are ORT's own (the profiler adds a few microseconds per node: ~1% of a decode step); the
gap between the window and the kernels is the session's own overhead, shown as "outside kernels".
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.benchmarks.common.gemm_probe import measure_gemm_peak
from pulse_edge.benchmarks.common.host import HostWindow, host_sample
from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.measure import bandwidth_probe, ecg_print, machine_with_load
from pulse_edge.benchmarks.common.ort_trace import (
    ATTENTION,
    GEMM_ROLES,
    NodeEvent,
    RoleTotal,
    in_window,
    onnx_weight_bytes,
    read_trace,
    role_totals,
)
from pulse_edge.benchmarks.common.roofline import GB, bundle_decoder_facts
from pulse_edge.errors import ConfigError

PHASES = ("vision", "prefill", "decode")
BENCH_IMAGE = (2200, 1700)  # letter at 200 dpi: 5 tiles


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


@dataclass
class _Phase:
    name: str
    start_ns: int = 0
    end_ns: int = 0
    host: HostWindow | None = None


class _Runner:
    """The bundle's engine as the runtime opens it, with the profiler on, and one callable per phase."""

    def __init__(self, cfg: ProfileConfig, trace_dir: Path) -> None:
        from pulse_edge.runtime.engines.ort import SessionConfig
        from pulse_edge.runtime.image.preprocess import preprocess
        from pulse_edge.runtime.pipeline import Pipeline

        chunk = {} if cfg.prefill_chunk is None else {"prefill_chunk": cfg.prefill_chunk or None}  # 0: one pass
        self.pipeline = Pipeline.from_bundle(cfg.model, session=SessionConfig(threads=cfg.threads,
                                                                              profile_dir=trace_dir), **chunk)
        self.engine = self.pipeline.engine
        rng = np.random.default_rng(cfg.seed)
        table = self.engine.table
        self.pixels = preprocess(ecg_print(BENCH_IMAGE), self.pipeline.manifest.image).pixel_values
        self.prompt = np.asarray(table[rng.integers(3, table.shape[0], cfg.positions)], np.float32)[None]
        self.steps = np.asarray(table[rng.integers(3, table.shape[0], cfg.steps)], np.float32)
        self.context = cfg.context
        self.chunk = self.engine.prefill_chunk or cfg.positions

    def sessions(self) -> dict[str, Any]:
        decoder = self.engine.decoder
        found = {"vision": self.engine.vision.session, "decoder": decoder.session,
                 "prefill": getattr(decoder, "prefill_session", None)}
        return {name: s for name, s in found.items() if s is not None}

    def vision(self) -> None:
        self.engine.vision.run(self.pixels)

    def prefill(self) -> None:
        decoder = self.engine.decoder
        decoder.reset()
        for start in range(0, self.prompt.shape[1], self.chunk):
            decoder.forward(self.prompt[:, start:start + self.chunk])

    def decode(self) -> None:
        decoder = self.engine.decoder
        for row in self.steps:
            decoder.length = self.context - 1  # a step's cost depends on the cache length, not its content
            decoder.forward(row[None, None])


def _timed(phase: _Phase, fn: Callable[[], None], runs: int) -> None:
    before = host_sample()
    phase.start_ns = time.time_ns()
    for _ in range(runs):
        fn()
    phase.end_ns = time.time_ns()
    phase.host = HostWindow.between(before, host_sample())


def _collect(runner: _Runner, bundle: Path) -> tuple[list[NodeEvent], dict[str, dict[str, int]]]:
    """End every session's profiling: its node events and, per graph, node name -> weight bytes."""
    events, weights = [], {}
    for graph, session in runner.sessions().items():
        start = session.get_profiling_start_time_ns()
        events += read_trace(Path(session.end_profiling()), graph, start)
        weights[graph] = onnx_weight_bytes(bundle / runner.pipeline.manifest.graphs[graph].file)
    return events, weights


def _check(cfg: ProfileConfig) -> None:
    """Before the probes: a bundle, whose cache holds what is asked."""
    from pulse_edge.runtime.bundle.manifest import read_manifest

    if not (cfg.model / "manifest.json").is_file():
        raise ConfigError(f"--model {cfg.model} is not a bundle (no manifest.json); bench profile reads a bundle's "
                          "ONNX graphs")
    room = read_manifest(cfg.model).kv.max_length
    if max(cfg.positions, cfg.context) > room:
        raise ConfigError(f"--positions {cfg.positions} / --context {cfg.context}: this bundle's cache holds {room} "
                          "positions; ask for at most that many")


def run_profile(cfg: ProfileConfig, progress: Callable[[str], None]) -> dict[str, Any]:
    _check(cfg)
    bandwidth = bandwidth_probe(cfg.bandwidth_bytes, progress, "start")
    progress("measuring the int8 and fp32 GEMM peaks (gemm_probe)")
    gemm = measure_gemm_peak(threads=cfg.threads)
    with tempfile.TemporaryDirectory(prefix="pulse-edge-profile-") as tmp:
        trace_dir = cfg.traces or Path(tmp)
        trace_dir.mkdir(parents=True, exist_ok=True)
        progress(f"loading {cfg.model} with ONNX Runtime's profiler on")
        runner = _Runner(cfg, trace_dir)
        phases = {name: _Phase(name) for name in PHASES}
        for name in PHASES:
            fn = getattr(runner, name)
            progress(f"{name}: 1 warm-up, {cfg.runs} timed")
            fn()
            _timed(phases[name], fn, cfg.runs)
        events, weights = _collect(runner, cfg.model)
    facts = bundle_decoder_facts(cfg.model)
    bound = _Bounds(int8=gemm.peak, fp32=gemm.ops_per_s.get("fp32", 0.0), read=bandwidth.read)
    return {
        "config": {"model": str(cfg.model), "runs": cfg.runs, "positions": cfg.positions, "context": cfg.context,
                   "steps": cfg.steps, "threads": cfg.threads, "prefill_chunk": runner.chunk,
                   "prefilled_by": "prefill" if "prefill" in runner.sessions() else "decoder",
                   "traces": str(cfg.traces) if cfg.traces else None},
        "machine": machine_with_load(), "model": model_info(cfg.model),
        "bounds": {"read_gb_s": bandwidth.read / GB, "int8_peak_tops": gemm.peak / 1e12,
                   "int8_kind": gemm.best_kind, "fp32_tflops": gemm.ops_per_s.get("fp32", 0.0) / 1e12,
                   "gemm": gemm.to_dict(), "bandwidth": bandwidth.to_dict()},
        "phases": {name: _phase_report(p, events, weights, cfg, bound, facts.kv_bytes_per_position * cfg.context)
                   for name, p in phases.items()},
    }


def _phase_report(phase: _Phase, events: list[NodeEvent], weights: dict[str, dict[str, int]], cfg: ProfileConfig,
                  bound: _Bounds, kv_bytes_per_step: float) -> dict[str, Any]:
    """One phase's roles with their rates, the whole phase against its bound, and its ceiling."""
    mine = in_window(events, phase.start_ns, phase.end_ns)
    names = {w: b for graph in {e.graph for e in mine} for w, b in weights.get(graph, {}).items()}
    roles = role_totals(mine, cfg.runs, names)
    wall = (phase.end_ns - phase.start_ns) / 1e9 / cfg.runs
    decode = phase.name == "decode"
    kv = kv_bytes_per_step * cfg.steps if decode else None
    gemms = [r for r in roles if r.role in GEMM_ROLES]
    gemm_s = sum(r.seconds for r in gemms)
    attention_s = sum(r.seconds for r in roles if r.role == ATTENTION)
    # the phase's useful work against its bound: decode's bytes (weights + KV), the others' linear-layer ops
    gemm_work = sum((r.weight_bytes if decode else r.work) or 0.0 for r in gemms)
    work = gemm_work + (kv or 0.0)
    against = bound.read if decode else bound.int8
    return {
        "wall_s_per_run": wall, "kernel_s_per_run": sum(r.seconds for r in roles),
        "busy": phase.host.busy() if phase.host else "not timed",
        "host": phase.host.to_dict() if phase.host else None,
        "roles": [{**r.to_dict(), **_rates(r, bound, kv, min_seconds=MIN_SHARE * wall)} for r in roles],
        "work_per_run": work, "work_unit": "bytes (weights + KV)" if decode else "ops (linear layers)",
        "achieved": {"rate": work / wall, "of_bound": work / wall / against} if work else None,
        "ceiling": {"gemm_and_attention": work / (gemm_s + attention_s) / against if gemm_s + attention_s else None,
                    "gemm_only": gemm_work / gemm_s / against if gemm_s else None} if work else None,
    }


@dataclass(frozen=True)
class _Bounds:
    int8: float  # ops/s
    fp32: float  # FLOP/s
    read: float  # bytes/s


MIN_SHARE = 0.01  # a role under 1% of its phase gets no rate: the lm_head's one row per prefill chunk is no GEMM
# compute phases: role -> (the bound's field in _Bounds, its name); in decode every rate is bytes against the read probe
COMPUTE_BOUNDS = {"int8 GEMM": ("int8", "int8 GEMM probe"), "weight-only GEMM": ("int8", "int8 GEMM probe"),
                  "float GEMM": ("fp32", "fp32 SGEMM probe"), ATTENTION: ("fp32", "fp32 SGEMM probe")}


def _rates(role: RoleTotal, bound: _Bounds, kv_bytes: float | None, *, min_seconds: float) -> dict[str, Any]:
    """A role's achieved rate and the bound it is held against ({} where it has none). kv_bytes: the KV cache
    bytes the decode phase's attention reads per run (None outside decode)."""
    if role.seconds < max(min_seconds, 1e-9):
        return {}
    if kv_bytes is not None:  # decode: the GEMMs stream their weights, attention the cache
        read = kv_bytes if role.role == ATTENTION else role.weight_bytes if role.role in GEMM_ROLES else None
        if read is None:
            return {}
        unit = "bytes/s of KV cache" if role.role == ATTENTION else "bytes/s of weights"
        return {"rate": read / role.seconds, "unit": unit, "of_bound": read / role.seconds / bound.read,
                "bound": "read probe"}
    if role.work is None or role.role not in COMPUTE_BOUNDS:
        return {}
    field, name = COMPUTE_BOUNDS[role.role]
    rate, against = role.work / role.seconds, getattr(bound, field)
    return {"rate": rate, "unit": "FLOP/s" if field == "fp32" else "ops/s",
            "of_bound": rate / against if against else None, "bound": name}


# ---------------------------------------------------------------- the printed report

UNITS = {"ops/s": ("TOP/s", 1e12), "FLOP/s": ("TFLOP/s", 1e12), "bytes/s of weights": ("GB/s", 1e9),
         "bytes/s of KV cache": ("GB/s", 1e9), "bytes (weights + KV)": ("GB/s", 1e9),
         "ops (linear layers)": ("TOP/s", 1e12)}
PHASE_WORDS = {
    "vision": lambda c: "the 5 tiles of a letter print",
    "prefill": lambda c: (f"{c['positions']} positions in chunks of {c['prefill_chunk']} on the "
                          f"{c['prefilled_by']} graph"),
    "decode": lambda c: f"{c['steps']} steps at {c['context']} positions of context",
}


def _rate(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    label, scale = UNITS[unit]
    return f"{value / scale:.2f} {label}"


def _of(fraction: float | None, busy: str | None) -> str:
    if fraction is None:
        return ""
    return "busy" if busy else f"{100 * fraction:.0f}%"


def profile_table(report: dict[str, Any]) -> str:
    from pulse_edge.benchmarks.common.tables import markdown_table

    c, b, m = report["config"], report["bounds"], report["machine"]
    lines = [f"bench profile: {c['model']} ({report['model'].get('precision', '?')}), {c['threads'] or 'all'} "
             f"threads, {c['runs']} timed runs per phase after 1 warm-up; ONNX Runtime's profiler on",
             f"machine: {m['cpu']}, {m['cores']} cores; load average {' '.join(map(str, m['load_average']))}",
             f"bounds: read {b['read_gb_s']:.1f} GB/s (numpy); int8 GEMM {b['int8_peak_tops']:.2f} TOP/s "
             f"({b['int8_kind']}); fp32 SGEMM {b['fp32_tflops']:.2f} TFLOP/s (one ORT MatMul of "
             f"{'x'.join(map(str, b['gemm']['shape_mkn']))})"]
    for name, phase in report["phases"].items():
        busy = phase["busy"]
        wall = phase["wall_s_per_run"]
        lines += ["", f"{name}: {PHASE_WORDS[name](c)}; {wall * 1e3:.0f} ms per run; host "
                      f"{'busy (' + busy + '): no fractions printed' if busy else 'quiet'}"]
        rows = [[r["role"], ", ".join(r["ops"][:3]) + (" ..." if len(r["ops"]) > 3 else ""),
                 f"{r['seconds_per_run'] * 1e3:.1f}", f"{100 * r['seconds_per_run'] / wall:.0f}%",
                 _rate(r.get("rate"), r.get("unit", "ops/s")),
                 f"{_of(r.get('of_bound'), busy)} of {r['bound']}" if r.get("bound") else ""]
                for r in phase["roles"]]
        outside = wall - phase["kernel_s_per_run"]
        rows.append(["outside kernels", "session overhead, gaps", f"{outside * 1e3:.1f}",
                     f"{100 * outside / wall:.0f}%", "", ""])
        lines.append(markdown_table(["role", "op types", "ms / run", "share", "achieved", "of bound"], rows))
        lines.append(_phase_line(name, phase, busy))
    return "\n".join(lines)


def _phase_line(name: str, phase: dict[str, Any], busy: str | None) -> str:
    a, ceiling = phase["achieved"], phase["ceiling"]
    if a is None:
        return "whole phase: no linear-layer work recorded"
    probe = "read probe" if name == "decode" else "int8 GEMM probe"
    what = "weights + KV" if name == "decode" else "linear-layer ops"
    line = f"whole phase: {_rate(a['rate'], phase['work_unit'])} of {what} = {_of(a['of_bound'], busy)} of the {probe}"
    parts = [f"{label} {_of(value, busy)}" for label, value in (
        ("only the GEMMs and attention taking time:", ceiling["gemm_and_attention"]),
        ("the GEMMs alone:", ceiling["gemm_only"])) if value is not None]
    return line + ("; ceiling with " + "; ".join(parts) if parts else "")
