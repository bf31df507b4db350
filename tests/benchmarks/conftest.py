"""Fixtures the benchmark tests share."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture()
def small_probes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real probes at small sizes (a 64 x 256 x 256 GEMM, 8 MiB bandwidth arrays): a test checks the report
    built on them, not this host's bounds."""
    from pulse_edge.benchmarks.common import gemm_probe, measure, probes

    def gemm(threads: int = 0, kinds: tuple[str, ...] = gemm_probe.KINDS) -> gemm_probe.GemmPeak:
        return gemm_probe.measure_gemm_peak(threads=threads, repeats=1, kinds=kinds, shape=(64, 256, 256))

    def bandwidth(array_bytes: int, progress: Callable[[str], None], when: str, copy: bool = True,
                  threads: int = 0):
        return measure.bandwidth_probe(8 * 2**20, progress, when, copy=copy, threads=threads)
    monkeypatch.setattr(probes, "measure_gemm_peak", gemm)
    monkeypatch.setattr(probes, "bandwidth_probe", bandwidth)


@pytest.fixture()
def quiet_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every round quiet, whatever else this machine runs: a test checks the fractions' arithmetic, which a busy
    round would leave out (None)."""
    from pulse_edge.benchmarks.common.host import HostWindow

    monkeypatch.setattr(HostWindow, "busy", lambda self: None)
