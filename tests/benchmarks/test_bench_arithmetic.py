"""The arithmetic behind every ratio the benchmarks print, on numbers chosen by hand: which samples count (the best
probe, the median call), how busy a host was, what one decode step reads, and how the cells print. A mutation round
changed each of these with every other benchmark test still passing."""

from __future__ import annotations

import os
import pathlib

import pytest

from pulse_edge.benchmarks.common import gemm_probe, host, measure, roofline, rounds, tables
from pulse_edge.benchmarks.common.probes import Probes
from pulse_edge.benchmarks.common.roofline import Bandwidth, DecoderFacts

TICK = os.sysconf("SC_CLK_TCK")


def _bandwidth(read: float, copy: float | None = None) -> Bandwidth:
    return Bandwidth(read=read, copy=copy, array_bytes=1, repeats=1, threads=1)


def test_proc_stat_counts_nice_neighbours_as_busy_and_iowait_as_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neighbours under `nice` (a CI job, these tests) are busy; iowait is time the CPUs had, not steal's share."""
    real = pathlib.Path.read_text
    # user nice system idle iowait irq softirq steal
    line = "cpu  100 50 30 1000 20 5 5 10 0 0\ncpu0 1 1 1 1 1 1 1 1 0 0\n"
    monkeypatch.setattr(pathlib.Path, "read_text",
                        lambda self, *a, **k: line if str(self) == "/proc/stat" else real(self, *a, **k))
    busy, steal, total = host._proc_stat_seconds()
    assert (busy * TICK, steal * TICK, total * TICK) == pytest.approx((200, 10, 1220))


def test_steal_is_a_fraction_of_all_cpus_time_not_of_wall_time() -> None:
    """Steal is summed over every CPU: over wall time a 16-CPU host's 5% read as 80%, and every round was busy."""
    before = host.HostSample(wall=0.0, busy_s=0.0, steal_s=0.0, total_s=0.0, own_cpu_s=0.0)
    after = host.HostSample(wall=1.0, busy_s=0.5, steal_s=0.08, total_s=2.0, own_cpu_s=0.25)
    window = host.HostWindow.between(before, after)
    assert window.steal_fraction == pytest.approx(0.04) and window.others_cores == pytest.approx(0.25)


def test_the_int8_peak_is_the_best_call_and_its_median_the_median(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemm_probe, "call_seconds", lambda fn, repeats, warmup: [1.0, 2.0, 3.0])
    m, k, n = 4, 8, 16
    peak = gemm_probe.measure_gemm_peak(kinds=("fp32",), shape=(m, k, n), repeats=3)
    assert peak.ops_per_s["fp32"] == 2.0 * m * k * n / 1.0 and peak.median_ops_per_s["fp32"] == 2.0 * m * k * n / 2.0


def test_calls_are_warmed_up_then_timed_and_the_median_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    times = roofline.call_seconds(lambda: calls.append(1), repeats=4, warmup=3)
    assert len(calls) == 7 and len(times) == 4 and gemm_probe.WARMUP >= 1
    calls.clear()
    roofline._median_seconds(lambda: calls.append(1), 3)
    assert len(calls) == 4  # one warm-up first: it faults the pages in
    durations = iter([5.0, 1.0, 2.0])  # the median, not the best or the mean, of the timed calls
    monkeypatch.setattr(roofline, "call_seconds", lambda fn, repeats, warmup=1: [next(durations) for _ in range(3)])
    assert roofline._median_seconds(lambda: None, 3) == 2.0


def test_bandwidth_is_probed_on_every_usable_core_and_copy_counts_both_arrays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roofline, "usable_cpus", lambda: 3)
    monkeypatch.setattr(roofline, "_median_seconds", lambda fn, repeats: (fn(), 1.0)[1])
    probed = roofline.measure_bandwidth(1 << 12, repeats=1)
    assert probed.threads == 3 and probed.read == probed.array_bytes and probed.copy == 2 * probed.array_bytes


def test_the_roofline_is_drawn_at_the_best_sample_of_read_or_copy() -> None:
    assert _bandwidth(1.0, 2.0).best == 2.0 and _bandwidth(3.0, None).best == 3.0
    slow, fast = _bandwidth(1.0), _bandwidth(2.0)
    assert rounds.best_read([Probes(bandwidth={"before": slow}), Probes(bandwidth={"after": fast})]) is fast
    assert measure.bandwidth_report({"before": slow, "after": fast})[0] is fast
    facts = DecoderFacts(weight_bytes=1000, kv_bytes_per_position=10.0, layers=1, kv_heads=1, head_dim=1,
                         kv_itemsize=1, hidden_size=1, source="by hand")
    entry = roofline.roofline_entry(facts, _bandwidth(1.0, 2200.0), 2.6, None)
    assert entry["context"] == 2.6 and entry["bytes_per_token"] == 1030.0  # 3 positions: rounded, not cut
    assert entry["roofline_tokens_per_s"] == pytest.approx(2200.0 / 1030.0)  # the copy sample, the better one


def test_an_int8_cache_reads_one_byte_per_element() -> None:
    assert roofline.KV_ITEMSIZE["int8"] == 1 and roofline.KV_ITEMSIZE["float16"] == 2


def test_a_checkpoints_decode_bytes_leave_the_embedding_table_out() -> None:
    torch = pytest.importorskip("torch")

    class Config:
        num_hidden_layers, num_key_value_heads, num_attention_heads, hidden_size = 1, 2, 2, 4

    class LM(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.embed_tokens = torch.nn.Embedding(100, 4)
            self.proj = torch.nn.Linear(4, 4, bias=False)

    facts = roofline.torch_decoder_facts(LM())
    assert facts.weight_bytes == 16 * 4 and facts.kv_bytes_per_position == 2 * 1 * 2 * 2 * 4


def test_memory_set_aside_keeps_the_peak_before_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's high-water mark (100) is kept; the probe's arrays beside it (500) are not; after the reset the
    mark is the RSS then (50)."""
    mark = {"high": 100}
    monkeypatch.setattr(measure, "peak_since_reset", lambda reset_worked: mark["high"])
    monkeypatch.setattr(measure, "reset_peak", lambda: mark.update(high=50) or True)
    watch = measure.PeakWatch(reset_works=True)
    watch.aside(lambda: mark.update(high=500))
    assert watch.stop() == 100


def test_cells_print_percent_and_binary_units() -> None:
    assert tables.percent(0.43) == "43%" and tables.percent(None) == "n/a"
    assert tables.gib(5 * 2**20) == "5.0 MiB" and tables.gib(3 * 2**29) == "1.50 GiB"
