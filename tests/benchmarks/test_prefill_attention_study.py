"""The prefill attention study (`python -m pulse_edge.benchmarks.studies.prefill_attention`) at a small scale."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.studies import prefill_attention
from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels.attention import CausalAttention


@pytest.fixture(scope="module")
def kernel(kernel_or_skip: Callable[..., CausalAttention]) -> CausalAttention:
    return kernel_or_skip(CausalAttention.load)


def test_both_forms_compute_the_same_function_before_they_are_timed(kernel: CausalAttention, quiet_host: None
                                                                    ) -> None:
    row = prefill_attention.compare(40, 70, 2, 1, 3, kernel)
    assert row["relative_error"]["ort"] < 1e-5  # ORT in float32 over the same grid: the twin's function
    assert 1e-4 < row["relative_error"]["kernel"] < 6e-3  # bf16 q and weights: rounded, but not wrong
    assert len(row["rounds"]) == 3
    per_round = sorted(r["ort_ms"] / r["kernel_ms"] for r in row["rounds"])
    assert row["speedup"] == pytest.approx(per_round[1])  # the median of the rounds' own ratios
    causal = 4 * 2 * 128 * sum(70 + i + 1 for i in range(40))
    assert row["causal_gflop_s"]["kernel"] == pytest.approx(causal / row["ms"]["kernel"] / 1e6)


def test_a_busy_host_prints_busy_not_a_ratio(kernel: CausalAttention, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.benchmarks.common.host import HostWindow

    monkeypatch.setattr(HostWindow, "busy", lambda self: "other processes used 1.00 cores")
    row = prefill_attention.compare(20, 0, 2, 1, 3, kernel)
    assert row["speedup"] is None and row["ms"]["kernel"] is None and "3 rounds" in row["busy"]
    report = {"machine": {"cpu": "x", "cores": 2}, "threads": 1, "rounds": 3, "heads": 2, "kernel": "k",
              "chunks": [row]}
    assert "| busy | busy | busy |" in prefill_attention.table(report)
    assert "busy: " + row["busy"] in prefill_attention.table(report).splitlines()[-1]  # the reason, not only the word


def test_the_study_runs_every_chunk_of_a_prompt(kernel: CausalAttention, tmp_path: Path) -> None:
    out = tmp_path / "study.json"
    result = CliRunner().invoke(prefill_attention.main, ["--scale", "0.03", "--rounds", "1", "--heads", "2",
                                                         "--threads", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [(c["rows"], c["past"]) for c in report["chunks"]] == [
        (max(1, int(s * 0.03)), int(p * 0.03)) for s, p in prefill_attention.CHUNKS]
    assert "bf16 kernel, ms" in result.output and report["kernel"].startswith("the ")
    assert "(causal_attention-" in report["kernel"]


def test_without_the_kernel_the_study_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(cls: type, cache: Path | None = None) -> CausalAttention:
        raise KernelUnavailable("the AMX-BF16 prefill attention needs CPU features this machine lacks (amx_bf16)")

    monkeypatch.setattr(CausalAttention, "load", classmethod(unavailable))
    result = CliRunner().invoke(prefill_attention.main, ["--scale", "0.03"])
    assert result.exit_code == 1 and result.output.strip().startswith("Error: the AMX-BF16 prefill attention")
    assert len(result.output.strip().splitlines()) == 1
