"""The CPU kernel study (`python -m pulse_edge.benchmarks.studies.cpu_kernels`) at a small scale."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from pulse_edge.benchmarks.studies.cpu_kernels import GEMV_VARIANTS, GQA_SHAPES, main


def test_the_kernel_study_times_every_variant_it_names(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    result = CliRunner().invoke(main, ["--scale", "0.02", "--repeats", "1", "--heads", "2", "--threads", "1",
                                       "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert len(report["attention"]) == len(GQA_SHAPES) and len(report["gemv"]) == len(GEMV_VARIANTS)
    assert [(r["bits"], r["accuracy_level"], r["block"]) for r in report["gemv"]] == GEMV_VARIANTS
    # the packed weights' size follows the recipe: 4-bit is about half of 8-bit at the same block
    sizes = {(r["bits"], r["block"]): r["mib"] for r in report["gemv"]}
    assert 0.45 < sizes[(4, 128)] / sizes[(8, 128)] < 0.6
    assert {r["form"] for r in report["vision"]} == {"MatMul / Softmax / MatMul", "MultiHeadAttention"}
    assert all(r["gflop_s"] > 0 for r in (*report["attention"], *report["vision"]))
    assert "GroupQueryAttention" in result.output and "MatMulNBits at M = 1" in result.output
