"""Ratios over timed rounds, each round held against the bound probed on either side of it.

    probe ─ round 1 ─ probe ─ round 2 ─ ... ─ round n ─ probe          (RoundProber: n + 1 probes)
    round r's bound = the better of probes r and r + 1                   (round_bounds)
    a fraction      = median over the quiet rounds of rate[r] / bound[r] (round_fractions; host.py says which)

A round is held against its own neighbours, not the run's best probe: on this project's 2-vCPU VM the int8
GEMM peak moved 1.9-4.0 TOP/s within 40 minutes (2026-12-06), so a probe minutes away measures another
minute's host. The better of the two neighbours counts, so a probe that caught a neighbour's burst does not
inflate the fraction. `bench recipes`, `bench backends` and `bench latency` share this.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pulse_edge.benchmarks.common.gemm_probe import INT8_KINDS
from pulse_edge.benchmarks.common.host import HostWindow, busy_reason, host_sample, quiet_rounds
from pulse_edge.benchmarks.common.probes import Probes
from pulse_edge.benchmarks.common.roofline import Bandwidth


def quiet_median(values: Sequence[float], windows: Sequence[HostWindow]) -> float | None:
    """Median over the quiet rounds, None when the host was too busy for a ratio (host.busy_reason)."""
    if busy_reason(windows) is not None:
        return None
    return float(np.median([values[i] for i in quiet_rounds(windows)]))


def abba(first: Callable[[], object], second: Callable[[], object], rounds: int
         ) -> tuple[list[float], list[float], list[HostWindow]]:
    """Each call timed once per round, in the order first, second, then second, first, ... (ABBA: neither always
    runs after the other), with each round's host window: (first's seconds, second's seconds, windows)."""
    times: tuple[list[float], list[float]] = ([], [])
    windows = []
    for r in range(rounds):
        before = host_sample()
        for which in ((0, 1) if r % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which]()
            times[which].append(time.perf_counter() - start)
        windows.append(HostWindow.between(before, host_sample()))
    return times[0], times[1], windows


def paired(a: Sequence[float], b: Sequence[float], windows: Sequence[HostWindow]) -> float | None:
    """Median over quiet rounds of a[r] / b[r]: two measurements taken in the same round share its state."""
    return quiet_median([x / y for x, y in zip(a, b, strict=True)], windows)


def round_bounds(probes: Sequence[Probes], bound: str) -> list[float | None]:
    """Round r's bound (a Probes property: read, int8_peak, fp32): the better of probes[r] and probes[r + 1]."""
    values = [getattr(p, bound) for p in probes]
    return [None if a is None or b is None else max(a, b) for a, b in itertools.pairwise(values)]


def best_read(probes: Sequence[Probes]) -> Bandwidth | None:
    """The best read sample of all the probes: the bandwidth a roofline beside the rounds is drawn at."""
    return max((b for p in probes for b in p.bandwidth.values()), key=lambda b: b.read, default=None)


def round_fractions(rates: Sequence[float], bounds: Sequence[float | None], windows: Sequence[HostWindow]
                    ) -> float | None:
    """Median over quiet rounds of each round's rate over its own bound (None: busy, or a round without its
    probes)."""
    if len(bounds) != len(rates) or any(b is None for b in bounds):
        return None
    return paired(rates, bounds, windows)


@dataclass
class RoundProber:
    """Called before each of `rounds` rounds and once after the last: each call probes `what` (probes.READ,
    probes.GEMM) beside the loaded model: read bandwidth with one array (no copy), the GEMM `kinds` (int8 ones by
    default)."""

    label: str
    what: tuple[str, ...]
    rounds: int
    bandwidth_bytes: int
    threads: int
    progress: Callable[[str], None]
    kinds: tuple[str, ...] = INT8_KINDS
    taken: list[Probes] = field(default_factory=list)

    def __call__(self) -> None:
        n = len(self.taken)
        when = f"{self.label}, before round {n + 1}" if n < self.rounds else f"{self.label}, after"
        probes = Probes()
        probes.measure(when, self.bandwidth_bytes, self.threads, self.progress, what=self.what, kinds=self.kinds,
                       copy=False)
        self.taken.append(probes)
