"""The CPU benchmarks' bounds and their refusal on a busy host: the int8 GEMM probe, the model's op count, the host's
quiet/busy verdict per round and the ratios computed from quiet rounds only."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from pulse_edge.benchmarks.common.gemm_probe import INT8_KINDS, measure_gemm_peak
from pulse_edge.benchmarks.common.host import (
    BUSY_OTHERS_CORES,
    MAX_RESOLUTION_CORES,
    MIN_QUIET_ROUNDS,
    HostSample,
    HostWindow,
    busy_reason,
    host_sample,
    quiet_rounds,
)
from pulse_edge.benchmarks.common.rounds import paired, quiet_median, round_bounds, round_fractions
from pulse_edge.benchmarks.perf.model_ops import model_ops


def _window(others: float, steal: float = 0.0) -> HostWindow:
    return HostWindow(seconds=1.0, others_cores=others, steal_fraction=steal, load_average=0.0)


def test_a_round_is_busy_when_others_or_the_hypervisor_take_the_cpu() -> None:
    assert _window(0.0).busy() is None
    assert "other processes" in _window(BUSY_OTHERS_CORES + 0.01).busy()
    assert "stole" in _window(0.0, steal=0.2).busy()
    assert HostWindow(1.0, None, None, 0.0).busy() is not None  # unknown is not quiet


def test_a_short_round_is_judged_busy_only_beyond_what_clock_ticks_can_tell() -> None:
    """/proc/stat counts 10 ms ticks per CPU: in a 60 ms round two stray ticks read as 0.33 cores. A window knows its
    resolution, and only others' use beyond the threshold plus it is busy; a round too short for a neighbour's
    whole core to show beyond that doubt is not judged at all (at 25 ms such a core passed as quiet)."""
    ticks = os.sysconf("SC_CLK_TCK")
    cpus = os.cpu_count() or 1

    def window(wall: float, others_s: float) -> HostWindow:
        before = HostSample(wall=0.0, busy_s=100.0, steal_s=1.0, total_s=400.0, own_cpu_s=5.0)
        after = HostSample(wall=wall, busy_s=100.0 + wall + others_s, steal_s=1.0, total_s=400.0 + cpus * wall,
                           own_cpu_s=5.0 + wall)  # our own `wall` seconds of one core and `others_s` of others'
        return HostWindow.between(before, after)

    long_enough = cpus / ticks / MAX_RESOLUTION_CORES + 0.005  # the shortest round judged, and a little
    stray = window(long_enough, 2 / ticks)  # two ticks of someone else's
    assert stray.others_cores > BUSY_OTHERS_CORES and stray.busy() is None
    assert stray.resolution_cores == pytest.approx(cpus / ticks / long_enough)
    whole = window(long_enough, long_enough - cpus / ticks)  # a whole core beside us, read a tick per CPU low
    assert "other processes" in whole.busy()
    long_round = HostWindow(seconds=1.0, others_cores=0.3, steal_fraction=0.0, load_average=0.0,
                            resolution_cores=0.02)
    assert long_round.busy() is not None  # a second resolves 0.3 cores
    assert "too short to judge (25.0 ms" in window(0.025, 0.025).busy()  # a whole core that could read as 0.2
    assert "too short to judge (3.0 ms" in window(0.003, 0.0).busy()  # a tick is more than a core


def test_ratios_come_from_quiet_rounds_only_or_not_at_all() -> None:
    quiet, busy = _window(0.0), _window(1.5)
    windows = [quiet, busy, quiet, quiet]
    assert quiet_rounds(windows) == [0, 2, 3] and busy_reason(windows) is None
    # the busy round's value (10) is left out of the median, and the pairs are taken round by round
    assert quiet_median([1.0, 10.0, 2.0, 3.0], windows) == 2.0
    assert paired([2.0, 50.0, 4.0, 6.0], [1.0, 1.0, 2.0, 2.0], windows) == 2.0
    mostly_busy = [quiet, busy, busy, quiet]
    assert len(quiet_rounds(mostly_busy)) < MIN_QUIET_ROUNDS
    assert busy_reason(mostly_busy).startswith("host busy: 2 of 4 rounds quiet")
    assert quiet_median([1.0, 2.0, 3.0, 4.0], mostly_busy) is None
    assert busy_reason([quiet, quiet]) is None  # fewer rounds than MIN_QUIET_ROUNDS, all quiet: judged on those
    assert busy_reason([]) is not None  # no round at all is no quiet host


def test_each_rounds_fraction_is_held_against_its_own_bound() -> None:
    """The host's rate moves between rounds: a round's rate over its own bound, not over the best probe of the run
    (which, 10 here, would read 20% for the quiet rounds the slow host ran at half its speed)."""
    quiet, busy = _window(0.0), _window(1.5)
    rates, probes = [1.0, 2.0, 2.0, 9.0], [2.0, 4.0, 4.0, 10.0]
    assert round_fractions(rates, probes, [quiet, quiet, quiet, busy]) == 0.5
    assert round_fractions([1.0, 1.0, 1.0], [1.0, 2.0, 4.0], [quiet] * 3) == 0.5  # the median of 1, 0.5, 0.25
    assert round_fractions(rates, probes, [quiet, busy, busy, quiet]) is None  # too few quiet rounds
    assert round_fractions([1.0, 1.0, 1.0], [1.0, None, 1.0], [quiet] * 3) is None  # a round without its bound


class _Bench:
    """A backend whose decode returns the next of `values` and logs the call; one with no vision."""

    def __init__(self, key: str, log: list[str], values: list[float]) -> None:
        self.key, self.name, self.vision, self._log, self._values = key, key, None, log, iter(values)

    def decode(self) -> float:
        self._log.append(self.key)
        return next(self._values)


def test_recipes_probe_each_rounds_bound_before_it_and_after_the_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.benchmarks.common.probes import READ, Probes
    from pulse_edge.benchmarks.common.roofline import Bandwidth
    from pulse_edge.benchmarks.perf.backend_runs import BackendMeter
    from pulse_edge.benchmarks.perf.backends import BackendsConfig
    from pulse_edge.benchmarks.perf.recipes import probed_rounds

    log: list[str] = []
    reads = iter([10.0, 20.0, 5.0, 8.0])

    def fake_measure(self: Probes, when: str, *args: object, what: tuple[str, ...], copy: bool, **kw: object) -> None:
        assert what == (READ,) and not copy  # decode's bound, read only beside the loaded backends
        log.append(f"probe: {when}")
        self.bandwidth[when] = Bandwidth(read=next(reads), copy=None, array_bytes=1, repeats=1, threads=1)
    monkeypatch.setattr(Probes, "measure", fake_measure)
    cfg = BackendsConfig(runs=3, warmup=1)
    benches = [_Bench("a", log, [0.0, 1.0, 2.0, 3.0]), _Bench("b", log, [0.0, 4.0, 5.0, 6.0])]
    windows: list = []
    stats, probes = probed_rounds(benches, "decode", cfg, {"a": BackendMeter(), "b": BackendMeter()}, windows,
                                  lambda _: None)
    assert log == ["a", "b",  # the warm-up, unprobed
                   "probe: decode, before round 1", "a", "b", "probe: decode, before round 2", "b", "a",
                   "probe: decode, before round 3", "b", "a", "probe: decode, after"]  # ABBA: round_order
    assert len(probes) == cfg.timed_runs + 1 and len(windows) == cfg.timed_runs
    assert stats["a"].values == (1.0, 2.0, 3.0) and stats["b"].values == (4.0, 5.0, 6.0)
    assert round_bounds(probes, "read") == [20.0, 20.0, 8.0]  # the better of the probes on either side
    assert round_bounds(probes, "int8_peak") == [None, None, None]  # not probed: no bound, no fraction


def test_host_window_takes_this_process_out_of_the_busy_time() -> None:
    before = HostSample(wall=0.0, busy_s=100.0, steal_s=1.0, total_s=400.0, own_cpu_s=5.0)
    after = HostSample(wall=2.0, busy_s=104.0, steal_s=1.0, total_s=404.0, own_cpu_s=8.0)
    window = HostWindow.between(before, after)
    assert window.others_cores == pytest.approx(0.5)  # 4 s busy, 3 of them ours, over 2 s
    assert window.steal_fraction == 0.0
    live = host_sample()  # this machine's /proc/stat read: a host's CPU time is never 0
    assert live.total_s > 0 and 0 <= live.busy_s <= live.total_s


def test_gemm_probe_measures_every_kind_and_names_the_best_int8_one() -> None:
    peak = measure_gemm_peak(threads=1, repeats=1, shape=(64, 256, 128))
    assert set(peak.ops_per_s) == {*INT8_KINDS, "fp32"} and all(v > 0 for v in peak.ops_per_s.values())
    assert peak.best_kind in INT8_KINDS and peak.peak == max(peak.ops_per_s[k] for k in INT8_KINDS)
    many = measure_gemm_peak(threads=1, repeats=5, kinds=("fp32",), shape=(64, 256, 128))
    assert many.ops_per_s["fp32"] >= many.median_ops_per_s["fp32"] > 0  # the best call counts, the median is kept
    assert many.best_kind is None and many.peak is None and json.dumps(many.to_dict())  # no int8 kind: no int8 peak
    assert json.dumps(peak.to_dict())


def test_a_probe_gives_only_the_bounds_it_measured() -> None:
    from pulse_edge.benchmarks.common.probes import READ, Probes

    probes = Probes()
    for when in ("before", "after"):
        probes.measure(when, 8 * 2**20, 1, lambda _: None, what=(READ,))
    assert probes.read == max(b.read for b in probes.bandwidth.values()) > 0
    assert probes.int8_peak is None and probes.fp32 is None and probes.int8_kind is None
    summary = probes.to_dict()
    assert summary["int8_peak_tops"] is None and list(summary["bandwidth"]) == ["before", "after"]
    assert json.dumps(summary)


def test_model_ops_of_the_7b_shape(tmp_path: Path) -> None:
    """Vicuna-7B: 6.48 G weights in the 32 decoder layers -> 12.95 GOP per prompt position; CLIP ViT-L/14-336 with
    23 layers + projector on 577 tokens -> ~0.41 TOP per tile."""
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "hidden_size": 4096,
              "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32000, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
              "mm_hidden_size": 1024,
              "mm_projector_type": "mlp2x_gelu", "mm_patch_merge_type": "flat", "image_aspect_ratio": "anyres",
              "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
              "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                                "num_attention_heads": 16, "image_size": 336, "patch_size": 14}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ops = model_ops(tmp_path)
    per_layer = 4096 * 3 * 4096 + 4096 * 4096 + 3 * 4096 * 11008
    assert ops.decoder_ops_per_position == 2 * 32 * per_layer == pytest.approx(12.95e9, rel=1e-3)
    tower = 2 * 23 * 577 * (4 * 1024**2 + 2 * 1024 * 4096)
    assert ops.vision_ops_per_tile == tower + 2 * 576 * (1024 * 4096 + 4096**2)


def test_a_peak_watch_leaves_out_what_runs_aside() -> None:
    """bench latency probes beside a loaded model: the probe's 1 GiB array must not become the model's peak RSS."""
    import numpy as np

    from pulse_edge.benchmarks.common.measure import PeakWatch

    watch = PeakWatch.start()
    if not watch.reset_works:
        pytest.skip("this process cannot reset its RSS high-water mark (Linux /proc/self/clear_refs)")
    size = 256 * 2**20

    def touch() -> None:
        np.ones(size, dtype=np.uint8).sum()  # faulted in: 256 MiB resident while it lives

    watch.aside(touch)
    aside = watch.stop()
    touch()
    assert watch.stop() >= aside + size // 2 > aside  # the same work outside counts


def test_latency_probes_the_host_only_where_the_work_runs_on_it() -> None:
    from types import SimpleNamespace

    from pulse_edge.benchmarks.perf.latency import LatencyConfig, host_bound

    def torch_on(device: str) -> SimpleNamespace:  # the torch reference: its device is its parameters'
        parameter = SimpleNamespace(device=SimpleNamespace(type=device))
        return SimpleNamespace(backend="torch", model=SimpleNamespace(parameters=lambda: iter([parameter])))

    cpu, cuda = LatencyConfig(model=Path("m")), LatencyConfig(model=Path("m"), provider="cuda")
    assert host_bound(cpu, SimpleNamespace(backend="ort")) and not host_bound(cuda, SimpleNamespace(backend="ort"))
    assert not host_bound(cpu, SimpleNamespace(backend="trt"))
    assert host_bound(cpu, torch_on("cpu")) and host_bound(cuda, torch_on("cpu"))  # --provider is ORT's
    assert not host_bound(cpu, torch_on("cuda"))


def test_latency_holds_vision_and_prefill_against_the_peak_of_the_models_own_gemms() -> None:
    from pulse_edge.benchmarks.common.gemm_probe import INT8_KINDS
    from pulse_edge.benchmarks.common.machine import CHECKPOINT_PRECISION
    from pulse_edge.benchmarks.perf.latency import compute_bound

    for precision in ("int8", "int4"):  # W8A8 vision and prefill graphs (or the decode graph at accuracy level 4)
        assert compute_bound(precision)["bound"] == "int8_peak" and compute_bound(precision)["kinds"] == INT8_KINDS
    for precision in ("fp32", "fp16", CHECKPOINT_PRECISION):  # float GEMMs: MLAS's SGEMM, not an int8 kind
        assert compute_bound(precision)["bound"] == "fp32" and compute_bound(precision)["kinds"] == ("fp32",)


def test_latency_fractions_pair_each_run_with_its_neighbouring_probes() -> None:
    """Run r against max(probe r, probe r + 1), the median over quiet runs; a busy run left out; work unknown or
    a zero time: no fraction."""
    from types import SimpleNamespace

    from pulse_edge.benchmarks.common.probes import Probes
    from pulse_edge.benchmarks.common.roofline import Bandwidth, DecoderFacts
    from pulse_edge.benchmarks.perf.latency import _fractions

    def probe(read: float, int8: float) -> Probes:
        taken = Probes(bandwidth={"x": Bandwidth(read=read, copy=None, array_bytes=1, repeats=1, threads=1)})
        taken.gemm["x"] = SimpleNamespace(peak=int8, best_kind="dqmm", ops_per_s={"dqmm": int8})
        return taken

    # read 10 40 20 5 30 -> each run's bound 40 40 20 30; int8 100 50 400 10 200 -> 100 400 400 200
    probes = [probe(r, p) for r, p in ((10.0, 100.0), (40.0, 50.0), (20.0, 400.0), (5.0, 10.0), (30.0, 200.0))]
    runs = [SimpleNamespace(timings=SimpleNamespace(vision_ms=1000.0, prefill_ms=2000.0 * (i + 1),
                                                    decode_tokens_per_s=4.0)) for i in range(4)]
    facts = DecoderFacts(weight_bytes=2, kv_bytes_per_position=0.0, layers=1, kv_heads=1, head_dim=1, kv_itemsize=1,
                         hidden_size=1, source="test")
    quiet, busy = _window(0.0), _window(1.5)
    work = {"vision": 40.0, "prefill": 800.0}
    got = _fractions(runs, [quiet] * 4, probes, facts, work, 0, "int8_peak")
    assert got["vision_of_compute_peak"] == pytest.approx(0.15)  # 40 ops/s: 0.4 0.1 0.1 0.2
    assert got["prefill_of_compute_peak"] == pytest.approx(0.5)  # 400 200 133 100 ops/s: 4 0.5 0.33 0.5
    assert got["decode_of_read"] == pytest.approx((0.2 + 8 / 30) / 2)  # 8 B/s: 0.2 0.2 0.4 0.27
    got = _fractions(runs, [busy, quiet, quiet, quiet], probes, facts, work, 0, "int8_peak")  # the first run out
    assert got["vision_of_compute_peak"] == pytest.approx(0.1) and got["decode_of_read"] == pytest.approx(8 / 30)
    got = _fractions(runs, [busy, busy, quiet, quiet], probes, facts, {"vision": None, "prefill": 800.0}, 0,
                     "int8_peak")
    assert got == {"prefill_of_compute_peak": None, "decode_of_read": None}  # too few quiet runs; no vision work
    assert _fractions(runs, [quiet] * 4, probes, facts, work, 0, "fp32")["vision_of_compute_peak"] is None  # unprobed
    runs[0].timings.prefill_ms = 0.0
    assert "prefill_of_compute_peak" not in _fractions(runs, [quiet] * 4, probes, facts, {"prefill": 800.0}, 0,
                                                       "int8_peak")


def test_interleaved_rounds_rotate_the_backends_order() -> None:
    """Each backend runs first, second and third equally often and follows each other backend equally often (a
    session's spinning threads slow whoever runs next); none always runs after the round's probe."""
    from types import SimpleNamespace

    from pulse_edge.benchmarks.perf.backend_runs import BackendMeter, interleaved

    order: list[str] = []
    benches = [SimpleNamespace(key=k, run=lambda k=k: order.append(k) or 1.0) for k in "abc"]  # ms
    meters = {k: BackendMeter() for k in "abc"}
    stats = interleaved(benches, "run", SimpleNamespace(warmup=1, timed_runs=6), meters)
    timed = [order[i:i + 3] for i in range(3, len(order), 3)]  # after the three warm-up calls
    assert len(timed) == 6 and all(sorted(r) == ["a", "b", "c"] for r in timed)
    for position in range(3):
        assert sorted(r[position] for r in timed) == ["a", "a", "b", "b", "c", "c"]
    followers = Counter((r[i], r[i + 1]) for r in timed for i in range(2))
    assert set(followers) == {(x, y) for x in "abc" for y in "abc" if x != y} and set(followers.values()) == {2}
    assert set(stats) == {"a", "b", "c"}


def test_the_bandwidth_probe_reads_with_the_runs_threads() -> None:
    """A 1-thread decode was held against what every core could read, while the GEMM probe used its 1 thread."""
    from pulse_edge.benchmarks.common.probes import READ, Probes

    probes = Probes()
    probes.measure("before", 8 * 2**20, 1, lambda _: None, what=(READ,), copy=False)
    assert probes.bandwidth["before"].threads == 1
