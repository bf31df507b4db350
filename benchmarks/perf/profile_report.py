"""`bench profile`'s numbers and table: one phase's roles against the host's bounds, and the phase's ceiling.

    per role (benchmarks/common/ort_trace.py): ms per run and share of the phase's window
      vision, prefill  GEMMs: ops/s against the int8 GEMM probe (float GEMMs and attention: the fp32 SGEMM probe)
      decode           GEMMs: their weights' bytes/s, attention: the KV cache's bytes/s, against the read probe
    the whole phase    decode: (weights + KV) bytes/s, the others: linear-layer ops/s, against the same probes
    the ceiling        how much faster the phase would be if only its GEMMs and attention took time, and if only
                       its GEMMs did: a ratio of times, the same whatever the probes said; and the fraction of
                       the probe that would give

Each phase is held against probes taken just before and just after its window (the best of the two), not
against probes of the run's start: the host's int8 rate moves within minutes (benchmarks/common/probes.py).
A probe is kernel-and-quantization time (gemm_probe.py times whole ORT calls); a GEMM role is kernel time only,
its activations' quantization being a role of its own: a GEMM role can pass 100% of the probe.
A fraction is printed only when the phase's window was quiet (benchmarks/common/host.py), and a phase whose
linear work is not known from the traces (a GEMM whose shapes or weights the trace does not give) gets no
whole-phase rate: it says so instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pulse_edge.benchmarks.common.host import HostWindow
from pulse_edge.benchmarks.common.machine import machine_text
from pulse_edge.benchmarks.common.ort_trace import (
    ATTENTION,
    FLOAT_GEMM,
    GEMM_ROLES,
    INT8_GEMM,
    WEIGHT_ONLY_GEMM,
    NodeEvent,
    RoleTotal,
    in_window,
    role_totals,
)
from pulse_edge.benchmarks.common.probes import Probes
from pulse_edge.benchmarks.common.tables import markdown_table


@dataclass
class Phase:
    """One phase's timed window (wall clock, ns), the host meanwhile, the session runs it must hold, and the probes
    taken beside it."""

    name: str
    calls: int  # session runs per timed run
    start_ns: int = 0
    end_ns: int = 0
    host: HostWindow | None = None
    graphs: list[str] = field(default_factory=list)  # the sessions that ran in it
    probes: Probes = field(default_factory=Probes)


@dataclass(frozen=True)
class Bounds:
    """A phase's bounds; None: not probed beside it (no fraction of it is given)."""

    int8: float | None  # ops/s, the best int8 GEMM probe
    fp32: float | None  # FLOP/s, the fp32 SGEMM probe
    read: float | None  # bytes/s, the read bandwidth probe

    @classmethod
    def of(cls, probes: Probes) -> Bounds:
        return cls(int8=probes.int8_peak, fp32=probes.fp32, read=probes.read)


MIN_SHARE = 0.01  # a role under 1% of its phase gets no rate: the lm_head's one row per prefill chunk is no GEMM
# compute phases: role -> (the Bounds field it is held against, its name)
COMPUTE_BOUNDS = {INT8_GEMM: ("int8", "int8 GEMM probe"), WEIGHT_ONLY_GEMM: ("int8", "int8 GEMM probe"),
                  FLOAT_GEMM: ("fp32", "fp32 SGEMM probe"), ATTENTION: ("fp32", "fp32 SGEMM probe")}


def _rates(role: RoleTotal, bounds: Bounds, kv_bytes: float | None, *, min_seconds: float) -> dict[str, Any]:
    """A role's achieved rate and the bound it is held against ({} where it has none). kv_bytes: the KV cache
    bytes the decode phase's attention reads per run (None outside decode)."""
    if role.seconds < max(min_seconds, 1e-9):
        return {}
    if kv_bytes is not None:  # decode: the GEMMs stream their weights, attention the cache
        read = kv_bytes if role.role == ATTENTION else role.weight_bytes if role.role in GEMM_ROLES else None
        if read is None:
            return {}
        unit = "bytes/s of KV cache" if role.role == ATTENTION else "bytes/s of weights"
        return {"rate": read / role.seconds, "unit": unit, "of_bound": _ratio(read / role.seconds, bounds.read),
                "bound": "read probe"}
    if role.work is None or role.role not in COMPUTE_BOUNDS:
        return {}
    kind, name = COMPUTE_BOUNDS[role.role]
    rate, against = role.work / role.seconds, getattr(bounds, kind)
    return {"rate": rate, "unit": "FLOP/s" if kind == "fp32" else "ops/s",
            "of_bound": _ratio(rate, against), "bound": name}


@dataclass(frozen=True)
class PhaseKind:
    """How a phase is judged: decode by the bytes it streams, the others by the linear-layer ops they compute."""

    bytes_bound: bool  # True: GEMMs count their weights' bytes and the phase adds the KV cache's
    probe: str  # the Bounds field of the whole phase's bound
    probe_name: str
    work_unit: str
    what: str


BYTES_KIND = PhaseKind(True, "read", "read probe", "bytes (weights + KV)", "weights + KV")
OPS_KIND = PhaseKind(False, "int8", "int8 GEMM probe", "ops (linear layers)", "linear-layer ops")
FLOAT_OPS_KIND = PhaseKind(False, "fp32", "fp32 SGEMM probe", "ops (linear layers)", "linear-layer ops")
PHASE_KINDS = {"decode": BYTES_KIND}  # every other phase: OPS_KIND, or FLOAT_OPS_KIND (_phase_kind)


def _phase_kind(name: str, gemms: Sequence[RoleTotal]) -> PhaseKind:
    """Decode by the bytes it streams; a compute phase by the peak of the GEMMs it ran: float GEMMs only (an fp32
    bundle) against the fp32 SGEMM probe, any int8 or weight-only GEMM against the int8 one."""
    kind = PHASE_KINDS.get(name, OPS_KIND)
    if kind is OPS_KIND and gemms and all(r.role == FLOAT_GEMM for r in gemms):
        return FLOAT_OPS_KIND
    return kind


def _gemm_work(gemms: Sequence[RoleTotal], kind: PhaseKind) -> tuple[float | None, str | None]:
    """The GEMMs' work per run (their weights' bytes, or their ops), or None and why."""
    works = [r.weight_bytes if kind.bytes_bound else r.work for r in gemms]
    unknown = [r.role for r, w in zip(gemms, works, strict=True) if w is None]
    if not gemms or unknown:
        return None, (f"the trace does not give the work of its {', '.join(unknown)}" if unknown
                      else "no GEMM ran in it")
    return sum(works), None


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or not den else num / den


def phase_report(phase: Phase, events: list[NodeEvent], weights: Mapping[tuple[str, str], int], runs: int,
                 bounds: Bounds, *, kv_bytes_per_run: float) -> dict[str, Any]:
    """One phase's roles with their rates, the whole phase against its bound, and its ceiling."""
    roles = role_totals(in_window(events, phase.start_ns, phase.end_ns), runs, weights)
    gemms = [r for r in roles if r.role in GEMM_ROLES]
    kind = _phase_kind(phase.name, gemms)
    wall = (phase.end_ns - phase.start_ns) / 1e9 / runs
    kv = kv_bytes_per_run if kind.bytes_bound else None
    busy = phase.host.busy() if phase.host else "no host sample"
    gemm_s = sum(r.seconds for r in gemms)
    both_s = gemm_s + sum(r.seconds for r in roles if r.role == ATTENTION)
    gemm_work, unknown = _gemm_work(gemms, kind)
    work = None if gemm_work is None else gemm_work + (kv or 0.0)  # decode's attention streams the cache
    against = getattr(bounds, kind.probe)
    report = {
        "wall_s_per_run": wall, "kernel_s_per_run": sum(r.seconds for r in roles), "busy": busy,
        "host": phase.host.to_dict() if phase.host else None, "graphs": phase.graphs,
        "roles": [{**r.to_dict(), **_rates(r, bounds, kv, min_seconds=MIN_SHARE * wall)} for r in roles],
        "work_per_run": work, "work_unit": kind.work_unit, "work_unknown": unknown,
        "rate": _ratio(work, wall), "of_bound": _ratio(_ratio(work, wall), against), "bound": kind.probe_name,
        "ceiling_speedup": {"gemm_and_attention": _ratio(wall, both_s), "gemm_only": _ratio(wall, gemm_s)},
        # the bound's fraction each would reach: all the phase's work in the GEMMs' and attention's time; the
        # GEMMs' own work in their time (decode: their weights, not the cache attention streams)
        "ceiling_of_bound": {"gemm_and_attention": _ratio(_ratio(work, both_s), against),
                             "gemm_only": _ratio(_ratio(gemm_work, gemm_s), against)},
        # probe-free: the linear ops run at this fraction of the phase's own GEMMs' rate (and would with only the
        # GEMMs and attention taking time); a bytes-bound phase's GEMM row already says it
        "of_own_gemm_rate": None if kind.bytes_bound or not gemm_s else {"now": gemm_s / wall,
                                                                          "gemm_and_attention": gemm_s / both_s},
    }
    return _without_fractions(report) if busy else report


def _without_fractions(report: dict[str, Any]) -> dict[str, Any]:
    """A busy window's report keeps its times and rates, not a fraction of a bound nor a ceiling."""
    roles = [{**r, "of_bound": None} if "of_bound" in r else r for r in report["roles"]]
    return {**report, "roles": roles, "of_bound": None, "ceiling_speedup": None, "ceiling_of_bound": None,
            "of_own_gemm_rate": None}


# ---------------------------------------------------------------- the printed report

UNITS = {"ops/s": ("TOP/s", 1e12), "FLOP/s": ("TFLOP/s", 1e12), "bytes/s of weights": ("GB/s", 1e9),
         "bytes/s of KV cache": ("GB/s", 1e9), "bytes (weights + KV)": ("GB/s", 1e9),
         "ops (linear layers)": ("TOP/s", 1e12)}
PHASE_WORDS = {
    "vision": lambda c: f"the {c['tiles']} tiles of a letter print",
    "prefill": lambda c: f"{c['positions']} positions in chunks of {c['prefill_chunk']} on the "
                         f"{' and '.join(c['prefilled_by']) or '?'} graph",
    "decode": lambda c: f"{c['steps']} steps at {c['context']} positions of context",
}


def _rate(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    label, scale = UNITS[unit]
    return f"{value / scale:.2f} {label}"


def _percent(fraction: float | None) -> str:
    return "" if fraction is None else f"{100 * fraction:.0f}%"


def profile_table(report: dict[str, Any]) -> str:
    c, m = report["config"], report["machine"]
    lines = [f"bench profile: {c['model']} ({report['model'].get('precision', '?')}), {c['threads'] or 'all'} "
             f"threads, {c['runs']} timed runs per phase after 1 warm-up; ONNX Runtime's profiler on; times per run "
             "are means over the runs (a breakdown: `bench latency` gives medians)",
             f"machine: {machine_text(m)}; load average (1, 5, 15 min) when the report was written: "
             f"{' '.join(map(str, m['load_average']))} (each phase's own host state is in its row)",
             f"bounds: {report['probe_method']}"]
    for name, phase in report["phases"].items():
        wall, busy = phase["wall_s_per_run"], phase["busy"]
        lines += ["", f"{name}: {PHASE_WORDS[name](c)}; {wall * 1e3:.0f} ms per run; host "
                      f"{'busy (' + busy + '): no fractions printed' if busy else 'quiet'}",
                  f"bounds: {_bounds_words(phase['bounds'])}"]
        rows = [[r["role"], ", ".join(r["ops"][:3]) + (" ..." if len(r["ops"]) > 3 else ""),
                 f"{r['seconds_per_run'] * 1e3:.1f}", f"{100 * r['seconds_per_run'] / wall:.0f}%",
                 _rate(r.get("rate"), r.get("unit", "ops/s")), _of_bound_cell(r, busy)] for r in phase["roles"]]
        outside = wall - phase["kernel_s_per_run"]
        rows.append(["outside kernels", "session overhead, gaps", f"{outside * 1e3:.1f}",
                     f"{100 * outside / wall:.0f}%", "", ""])
        lines.append(markdown_table(["role", "op types", "ms / run", "share", "achieved", "of bound"], rows))
        lines.append(_phase_line(name, phase))
    return "\n".join(lines)


def _tops(value: float | None) -> str:
    return "not probed" if value is None else f"{value:.2f}"


def _bounds_words(b: dict[str, Any]) -> str:
    """The probes beside one phase: each sample, and the best that counts."""
    parts = []
    if b["bandwidth"]:
        samples = ", ".join(f"{v['read_gb_s']:.1f}" for v in b["bandwidth"].values())
        parts.append(f"read {b['read_gb_s']:.1f} GB/s (numpy; samples {samples})")
    if b["gemm"]:
        shape = "x".join(map(str, next(iter(b["gemm"].values()))["shape_mkn"]))
        samples = ", ".join(_tops(v["peak_tops"]) for v in b["gemm"].values())
        parts.append(f"int8 GEMM {_tops(b['int8_peak_tops'])} TOP/s ({b['int8_kind']}, one ORT MatMul of {shape}, "
                     f"its activation quantization included; samples {samples}), fp32 SGEMM "
                     f"{_tops(b['fp32_tflops'])} TFLOP/s")
    return "; ".join(parts) or "none probed"


def _of_bound_cell(role: dict[str, Any], busy: str | None) -> str:
    if not role.get("bound"):
        return ""
    if busy:
        return f"busy (of {role['bound']})"
    return f"{_percent(role['of_bound'])} of {role['bound']}" if role["of_bound"] is not None else f"no {role['bound']}"


def _phase_line(name: str, phase: dict[str, Any]) -> str:
    kind = PHASE_KINDS.get(name, OPS_KIND)
    if phase["rate"] is None:
        return f"whole phase: no rate ({phase['work_unknown']})"
    line = f"whole phase: {_rate(phase['rate'], phase['work_unit'])} of {kind.what}"
    if phase["busy"]:
        return line + " (busy: no fraction)"
    if phase["of_bound"] is None:
        return line + f" (no {phase['bound']}: no fraction)"
    line += f" = {_percent(phase['of_bound'])} of the {phase['bound']}"
    speed, frac, own = phase["ceiling_speedup"], phase["ceiling_of_bound"], phase["of_own_gemm_rate"] or {}
    line += f" ({_percent(own['now'])} of its own GEMMs' rate)" if own else ""
    parts = []
    for key, label in (("gemm_and_attention", "only the GEMMs and attention taking time:"),
                       ("gemm_only", "the GEMMs alone:")):
        if speed[key] is None:
            continue
        notes = [f"{_percent(frac[key])} of the probe" if frac[key] is not None else "",
                 f"{_percent(own[key])} of its own GEMMs' rate" if own.get(key) is not None else ""]
        notes = [n for n in notes if n]
        parts.append(f"{label} {speed[key]:.2f}x faster" + (f" ({', '.join(notes)})" if notes else ""))
    return line + ("; ceiling with " + "; ".join(parts) if parts else "")
