"""Was the host quiet while a round ran? Other processes' CPU time and the hypervisor's steal, from /proc/stat.

    before a round: HostSample (all CPUs' busy and steal jiffies, this process's CPU seconds, the clock)
    after it:       HostSample -> HostWindow(others_cores, steal_fraction, load average) -> busy() -> reason | None

A ratio between two measurements (a speedup, a fraction of a probed bound) means something only
when both were taken on the same machine in the same state. On a shared VM the state moves
within minutes, so each interleaved round is judged on its own, and a benchmark computes its
ratios from quiet rounds only; with fewer than MIN_QUIET_ROUNDS of them (every round, where fewer
were run) it prints why instead of a number (mixing quiet and busy rounds gives a ratio of neither).

`others_cores` counts what every other process used (and what the hypervisor stole) in cores,
averaged over the round; this process's own threads (ORT's spinning workers included) are
taken out. Memory traffic from other VMs on the same host does not show in either; the
bandwidth probes beside the rounds are what catch that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# A round is busy when others used more than this many cores on average, or the hypervisor stole more
# than this fraction of the CPU time: on 2 cores, 0.25 cores is an eighth of the machine.
BUSY_OTHERS_CORES = 0.25
BUSY_STEAL_FRACTION = 0.05
MIN_QUIET_ROUNDS = 3
# A window is judged only where a neighbour using a whole core shows beyond doubt: read at most one tick per CPU
# low (1 - r cores) it must still exceed the threshold plus that doubt (0.25 + r), so r < 0.375 cores (rounds of
# 54 ms and more on 2 CPUs at 100 Hz). A shorter one is not judged quiet: at r = 1 (20 ms) a study's rounds read
# quiet beside a busy loop and printed a 0.07x "speedup", and at 0.75-1 (20-27 ms) a whole core went unseen.
MAX_RESOLUTION_CORES = (1.0 - BUSY_OTHERS_CORES) / 2


@dataclass(frozen=True)
class HostSample:
    wall: float
    busy_s: float | None  # every CPU's non-idle time so far, steal included (None: no /proc/stat)
    steal_s: float | None
    total_s: float | None
    own_cpu_s: float


def _proc_stat_seconds() -> tuple[float, float, float] | None:
    """(busy, steal, total) CPU seconds over all CPUs since boot, from /proc/stat's first line."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, steal / tick, (busy + idle + iowait) / tick


def host_sample() -> HostSample:
    stat = _proc_stat_seconds()
    busy, steal, total = stat if stat is not None else (None, None, None)
    return HostSample(wall=time.perf_counter(), busy_s=busy, steal_s=steal, total_s=total,
                      own_cpu_s=time.process_time())


@dataclass(frozen=True)
class HostWindow:
    """The host between two samples: others' cores, the steal fraction, the 1-minute load average at the end."""

    seconds: float
    others_cores: float | None
    steal_fraction: float | None
    load_average: float
    # /proc/stat counts whole clock ticks per CPU (10 ms each at USER_HZ 100), so over a short round the busy time
    # is known to within one tick per CPU: 0.6 cores over a 34 ms round on 2 CPUs, 0.02 over a second. A round is
    # judged busy only beyond that, never on a tick that happened to land inside it.
    resolution_cores: float = 0.0

    @classmethod
    def between(cls, before: HostSample, after: HostSample) -> HostWindow:
        wall = max(after.wall - before.wall, 1e-9)
        if before.busy_s is None or after.busy_s is None:
            others = steal = None
        else:
            own = after.own_cpu_s - before.own_cpu_s
            others = max(after.busy_s - before.busy_s - own, 0.0) / wall
            total = max(after.total_s - before.total_s, 1e-9)
            steal = (after.steal_s - before.steal_s) / total
        resolution = (os.cpu_count() or 1) / os.sysconf("SC_CLK_TCK") / wall
        return cls(seconds=wall, others_cores=others, steal_fraction=steal, load_average=os.getloadavg()[0],
                   resolution_cores=resolution)

    def busy(self) -> str | None:
        """Why this window was busy, or None when it was quiet (unknown counts as busy: no /proc/stat)."""
        if self.others_cores is None or self.steal_fraction is None:
            return "no /proc/stat to tell"
        if self.resolution_cores > MAX_RESOLUTION_CORES:
            return (f"the round was too short to judge ({1e3 * self.seconds:.1f} ms: /proc/stat counts 10 ms ticks "
                    f"on each of {os.cpu_count() or 1} CPUs)")
        if self.others_cores > BUSY_OTHERS_CORES + self.resolution_cores:
            return f"other processes used {self.others_cores:.2f} cores"
        if self.steal_fraction > BUSY_STEAL_FRACTION:
            return f"the hypervisor stole {100 * self.steal_fraction:.0f}% of the CPU time"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "busy": self.busy()}


def quiet_rounds(windows: Sequence[HostWindow]) -> list[int]:
    """The indices of the quiet rounds."""
    return [i for i, w in enumerate(windows) if w.busy() is None]


def busy_reason(windows: Sequence[HostWindow]) -> str | None:
    """None when enough rounds were quiet to compute a ratio from them, else the reason to print instead."""
    quiet, need = quiet_rounds(windows), min(MIN_QUIET_ROUNDS, len(windows))
    if len(quiet) >= need and windows:
        return None
    reasons = [w.busy() for w in windows if w.busy() is not None]
    return (f"host busy: {len(quiet)} of {len(windows)} rounds quiet (need {need or 1}); "
            f"e.g. {reasons[0] if reasons else 'no rounds'}")
