"""The decode attention study (`python -m pulse_edge.benchmarks.studies.decode_attention`) at a small scale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.studies import decode_attention
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention


@pytest.fixture(scope="module")
def kernel(kernel_or_skip: Callable[..., CausalAttention]) -> CausalAttention:
    return kernel_or_skip(lambda: CausalAttention.load(DECODE))


def test_the_kernel_is_checked_on_the_cache_ort_wrote_then_both_are_timed(kernel: CausalAttention,
                                                                          quiet_host: None) -> None:
    row = decode_attention.compare(50, 2, 3, 1, 3, kernel)
    assert row["kernel_relative_error"] < 1e-5  # float32 against the twin, over ORT's own stores
    assert len(row["rounds"]) == 3
    per_round = sorted(r["ort_ms"] / r["kernel_ms"] for r in row["rounds"])
    assert row["speedup"] == pytest.approx(per_round[1])  # the median of the rounds' own ratios
    read = 3 * 2 * 2 * 50 * 128
    assert row["gb_s"]["kernel"] == pytest.approx(read / row["ms"]["kernel"] / 1e6)


def test_a_busy_host_prints_busy_not_a_ratio(kernel: CausalAttention, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.benchmarks.common.host import HostWindow

    monkeypatch.setattr(HostWindow, "busy", lambda self: "other processes used 1.00 cores")
    row = decode_attention.compare(20, 2, 1, 1, 3, kernel)
    assert row["speedup"] is None and row["ms"]["kernel"] is None and "3 rounds" in row["busy"]
    report = {"machine": {"cpu": "x", "cores": 2}, "threads": 1, "rounds": 3, "heads": 2, "layers": 1,
              "kernel": "k", "contexts": [row]}
    assert "| busy | busy | busy |" in decode_attention.table(report)
    assert "busy: " + row["busy"] in decode_attention.table(report).splitlines()[-1]  # the reason, not only the word


def test_the_study_runs_each_context(kernel: CausalAttention, tmp_path: Path) -> None:
    out = tmp_path / "study.json"
    result = CliRunner().invoke(decode_attention.main, ["--scale", "0.02", "--rounds", "1", "--heads", "2",
                                                        "--layers", "2", "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [c["context"] for c in report["contexts"]] == [int(c * 0.02) for c in decode_attention.CONTEXTS]
    assert "AVX-512 kernel, ms" in result.output and report["kernel"].startswith("decode_attention-")
