"""The host's bounds a benchmark holds its rates against, probed more than once: the best sample counts.

    measure("before", ...) ... the timed work ... measure("after", ...)
      read / copy bandwidth (numpy, measure.bandwidth_probe) and the GEMM peaks per kind (ORT, gemm_probe.py)
    read: the best read probe; int8_peak: the best int8 kind of the best probe; fp32: the best fp32 SGEMM probe

The host did at least what its best sample says; the other samples stay in the report, since other
processes on a shared machine move them. A bound that was not probed is None, and so is any fraction of it.
Probe next to the work it bounds: on this project's 2-vCPU VM the int8 GEMM probe moved 1.9-4.0 TOP/s within
40 minutes (2026-12-06), so a probe minutes away from the work gives a fraction of another hour's machine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pulse_edge.benchmarks.common.gemm_probe import KINDS, GemmPeak, measure_gemm_peak
from pulse_edge.benchmarks.common.measure import bandwidth_probe
from pulse_edge.benchmarks.common.roofline import GB, Bandwidth

READ, GEMM = "read", "gemm"  # what a probe measures: read bandwidth, the GEMM peaks
# what bounds each phase of a run: vision and prefill compute (GEMMs, attention), decode streams weights and cache
PHASE_BOUNDS = {"vision": GEMM, "prefill": GEMM, "decode": READ}


@dataclass(frozen=True)
class Probes:
    bandwidth: dict[str, Bandwidth] = field(default_factory=dict)
    gemm: dict[str, GemmPeak] = field(default_factory=dict)

    def measure(self, when: str, bandwidth_bytes: int, threads: int, progress: Callable[[str], None],
                what: tuple[str, ...] = (READ, GEMM), kinds: tuple[str, ...] = KINDS, copy: bool = True) -> None:
        """Probe `what`: the GEMM `kinds` (gemm_probe.KINDS; INT8_KINDS leaves the fp32 SGEMM out); copy=False leaves
        the copy bandwidth out (and its second array: a probe beside a loaded model adds one array, not two)."""
        if READ in what:
            self.bandwidth[when] = bandwidth_probe(bandwidth_bytes, progress, when, copy=copy, threads=threads)
        if GEMM in what:
            progress(f"measuring the GEMM peaks ({when})")
            self.gemm[when] = measure_gemm_peak(threads=threads, kinds=kinds)

    @property
    def read(self) -> float | None:
        return max((b.read for b in self.bandwidth.values()), default=None)

    @property
    def int8_peak(self) -> float | None:
        return max((g.peak for g in self.gemm.values() if g.peak is not None), default=None)

    @property
    def int8_kind(self) -> str | None:
        timed = [g for g in self.gemm.values() if g.peak is not None]
        return max(timed, key=lambda g: g.peak).best_kind if timed else None

    @property
    def fp32(self) -> float | None:
        return max((g.ops_per_s["fp32"] for g in self.gemm.values() if "fp32" in g.ops_per_s), default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"read_gb_s": _scaled(self.read, GB), "int8_peak_tops": _scaled(self.int8_peak, 1e12),
                "int8_kind": self.int8_kind, "fp32_tflops": _scaled(self.fp32, 1e12),
                "bandwidth": {k: b.to_dict() for k, b in self.bandwidth.items()},
                "gemm": {k: g.to_dict() for k, g in self.gemm.items()}}


def _scaled(value: float | None, unit: float) -> float | None:
    return None if value is None else value / unit
