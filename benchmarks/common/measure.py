"""Measuring a run: percentiles over timed runs, peak RSS, bandwidth probes, the machine's load, the workload.

Peak RSS is ru_maxrss, and Linux VmHWM reset around a stretch of work. torch and the pulse_edge runtime are
imported inside the functions that use them.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pulse_edge.benchmarks.common.machine import machine_info
from pulse_edge.benchmarks.common.roofline import Bandwidth, measure_bandwidth
from pulse_edge.benchmarks.common.tables import gib

T = TypeVar("T")
RU_MAXRSS_UNIT = {"darwin": 1}  # bytes on macOS; KiB on Linux and the BSDs


@dataclass(frozen=True)
class Stat:
    """p50 and p95 (linear interpolation, as numpy.percentile) over the timed runs."""

    p50: float
    p95: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no timed runs")
        p50, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
        return cls(p50=float(p50), p95=float(p95), values=tuple(float(v) for v in values))

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "values": list(self.values)}


def peak_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss): loading, every run, everything."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT.get(sys.platform, 1024)


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_bytes("VmHWM") is not None


def peak_since_reset(reset_worked: bool) -> int:
    """The high-water mark since `reset_peak` (VmHWM), or the process's ru_maxrss where it could not reset."""
    return (proc_status_bytes("VmHWM") if reset_worked else None) or peak_rss_bytes()


@dataclass
class PeakWatch:
    """The process's RSS high-water mark over stretches of work, leaving out what runs `aside` between them (a
    probe's arrays beside a loaded model say nothing about the model). Where the mark cannot be reset (not Linux),
    ru_maxrss: the asides included."""

    reset_works: bool
    peak: int = 0

    @classmethod
    def start(cls) -> PeakWatch:
        return cls(reset_peak())

    def aside(self, fn: Callable[[], T]) -> T:
        """fn(), its memory left out of the peak."""
        self.stop()
        result = fn()
        if self.reset_works:
            reset_peak()
        return result

    def stop(self) -> int:
        self.peak = max(self.peak, peak_since_reset(self.reset_works))
        return self.peak


def proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dir_size_bytes(path: Path) -> int:
    """Bytes on disk of a bundle or checkpoint directory (the directory itself may be a link)."""
    root = path.resolve()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def ecg_print(size: tuple[int, int], seed: int = 1) -> Any:
    """A rendered 12-lead sinus-rhythm print of the given pixel size."""
    from pulse_edge.runtime.ecg.render import render_ecg
    from pulse_edge.runtime.ecg.synthetic import synthesize_ecg

    return render_ecg(synthesize_ecg("sinus", seed=seed), width_px=size[0], height_px=size[1])


def torch_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def bandwidth_probe(array_bytes: int, progress: Callable[[str], None], when: str, copy: bool = True,
                    threads: int = 0) -> Bandwidth:
    """threads: the run's own (0: every core), so a 1-thread decode is held against what 1 thread can read."""
    progress(f"measuring memory bandwidth ({when}, {gib(array_bytes)} " + ("arrays)" if copy else "array, read only)"))
    return measure_bandwidth(array_bytes, copy=copy, threads=threads or None)


def bandwidth_report(samples: dict[str, Bandwidth]) -> tuple[Bandwidth, dict[str, Any]]:
    """The best sample is what the roofline uses (the machine did at least that); all are reported,
    since other processes on the machine move both."""
    best = max(samples.values(), key=lambda b: b.best)
    return best, {**best.to_dict(), "samples": {when: b.to_dict() for when, b in samples.items()}}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_with_load() -> dict[str, Any]:
    """ecgbench_env's description, plus the load average: a busy machine explains a slow run."""
    return {**machine_info(), "load_average": load_average()}
