"""The host's bounds a benchmark holds its rates against, probed more than once: the best sample counts.

    measure("start") ... the timed work ... measure("end")
      read / copy bandwidth (numpy, measure.bandwidth_probe) and the GEMM peaks per kind (ORT, gemm_probe.py)
    read: the best read probe; int8_peak: the best int8 kind of the best probe; fp32: the best fp32 SGEMM probe

The host did at least what its best sample says; the other samples stay in the report, since other
processes on a shared machine move them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pulse_edge.benchmarks.common.gemm_probe import GemmPeak, measure_gemm_peak
from pulse_edge.benchmarks.common.measure import bandwidth_probe
from pulse_edge.benchmarks.common.roofline import GB, Bandwidth


@dataclass(frozen=True)
class Probes:
    bandwidth: dict[str, Bandwidth] = field(default_factory=dict)
    gemm: dict[str, GemmPeak] = field(default_factory=dict)

    def measure(self, when: str, bandwidth_bytes: int, threads: int, progress: Callable[[str], None]) -> None:
        self.bandwidth[when] = bandwidth_probe(bandwidth_bytes, progress, when)
        progress(f"measuring the GEMM peaks ({when})")
        self.gemm[when] = measure_gemm_peak(threads=threads)

    @property
    def read(self) -> float:
        return max(b.read for b in self.bandwidth.values())

    @property
    def int8_peak(self) -> float:
        return max(g.peak for g in self.gemm.values())

    @property
    def int8_kind(self) -> str:
        return max(self.gemm.values(), key=lambda g: g.peak).best_kind

    @property
    def fp32(self) -> float:
        return max(g.ops_per_s.get("fp32", 0.0) for g in self.gemm.values())

    def to_dict(self) -> dict[str, Any]:
        return {"read_gb_s": self.read / GB, "int8_peak_tops": self.int8_peak / 1e12,
                "bandwidth": {k: b.to_dict() for k, b in self.bandwidth.items()},
                "gemm": {k: g.to_dict() for k, g in self.gemm.items()}}
