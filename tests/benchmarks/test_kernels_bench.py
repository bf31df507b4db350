"""`pulse-edge bench projector`: the refusal without a GPU, the work it counts, and its table."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from pulse_edge.benchmarks.perf import projector as pb
from pulse_edge.cli.main import main
from pulse_edge.errors import ConfigError


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present: the benchmark would run, not refuse")
def test_refuses_without_a_gpu_in_one_line() -> None:
    res = CliRunner().invoke(main, ["bench", "projector", "--runs", "1"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0]
    assert res.stdout == ""


def test_bad_lists_are_user_errors() -> None:
    with pytest.raises(ConfigError, match="positive integers"):
        pb.parse_tokens("576,many")
    with pytest.raises(ConfigError, match="bf16, int8, fp8"):
        pb.parse_list("bf16,int4", pb.PRECISIONS)
    assert pb.parse_tokens("576, 2880") == (576, 2880)


def test_work_per_call_is_pulses_projector() -> None:
    # 2 x 2880 x (1024 x 4096 + 4096 x 4096) = 120.8 GFLOP for one 12-lead print
    assert pb.projector_flops(2880) == pytest.approx(120.8e9, rel=1e-3)
    # bf16: x and y (2880 x 5120 x 2 bytes) + 20 Mi weights x 2 bytes + two bf16 biases
    assert pb.projector_bytes(2880, "bf16") == 2 * 2880 * 5120 + 2 * 4096 * 5120 + 4 * 4096
    assert pb.projector_bytes(2880, "int8") - pb.projector_bytes(2880, "bf16") == -4096 * 5120 + 8 * 4096


def test_table_shows_every_row_and_failures() -> None:
    """Formatting only: the report below is hand-made, not a measurement."""
    peaks = {"bf16_matmul_tflops": 100.0, "copy_gbps": 1000.0, "matmul_size": 8192, "copy_bytes": 2**30}
    good = pb._row(576, "bf16", "fused", [1e-3, 2e-3, 3e-3], 1e-3, peaks)
    failed = pb._row(576, "fp8", "eager", None, None, peaks, "RuntimeError: no row-wise scaling here")
    device = {"name": "Made-up GPU", "capability": "9.0", "sms": 1, "memory_gib": 1.0, "torch": "x", "cuda": "x",
              "triton": "x"}
    table = pb.projector_table({"device": device, "peaks": peaks, "rows": [good, failed]})
    assert good["median_ms"] == pytest.approx(2.0)
    assert good["tflops"] == pytest.approx(pb.projector_flops(576) / 2e-3 / 1e12)
    assert "| 576 | bf16 | fused | 2.000 |" in table and "failed: RuntimeError" in table


def test_candidates_are_timed_round_by_round_and_the_speedup_pairs_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each candidate was timed in its own block (f f f e e e): a clock that moved between blocks set one against
    the other's minute. Now one call of each per round, the order reversed every other round; the gpu check's
    fused-vs-eager speed-up is the median of round-by-round ratios."""
    from types import SimpleNamespace

    from pulse_edge.benchmarks.perf import gpu_report as gr

    timed: list[str] = []
    seconds = {"fused": [2e-3, 1e-3, 2e-3, 1e-3], "eager": [4e-3, 1.5e-3, 4e-3, 1.5e-3]}  # a clock that swings

    def fake_time(fn, runs, warmup, flush):
        if runs:
            timed.append(fn.__name__)
            return [seconds[fn.__name__][sum(n == fn.__name__ for n in timed) - 1]]
        return []

    def fused():
        return 0

    def eager():
        return 0

    monkeypatch.setattr(pb, "make_case", lambda *a: SimpleNamespace(candidates={"fused": fused, "eager": eager},
                                                                    error=lambda out: 0.0))
    monkeypatch.setattr(pb, "time_cuda", fake_time)
    peaks = {"bf16_matmul_tflops": 700.0, "copy_gbps": 3000.0}
    config = SimpleNamespace(compile=False, warmup=1, runs=4)
    rows = pb._bench_one(2880, "bf16", config, peaks, None, lambda line: None)
    assert timed == ["fused", "eager", "eager", "fused", "fused", "eager", "eager", "fused"]
    report = {"results": {"projector": {"rows": rows, "peaks": peaks}}}
    speedup, note = gr._fused_vs_eager(report)
    assert speedup == pytest.approx(1.75) and "4 paired rounds" in note  # median of 2, 1.5, 2, 1.5
