"""The CPU kernel study (`python -m pulse_edge.benchmarks.studies.cpu_kernels`) at a small scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.benchmarks.studies.cpu_kernels import DECODE_BUFFERS, GEMV_VARIANTS, GQA_SHAPES, main


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
    # decode attention: both caches, at 1 thread (--threads 1: one count), every buffer length; the int8 cache
    # moves a quarter of the fp32 one's bytes for the same context, so its GB/s per ms is a quarter
    decode = report["decode"]
    assert [(r["cache"], r["threads"]) for r in decode] == [("int8", 1)] * 3 + [("fp32", 1)] * 3
    assert len({r["buffer"] for r in decode}) == len(DECODE_BUFFERS)
    by = {(r["cache"], r["buffer"]): r for r in decode}
    for b in {r["buffer"] for r in decode}:
        int8_bytes, fp32_bytes = (by[c, b]["gb_s"] * by[c, b]["ms"] for c in ("int8", "fp32"))
        assert int8_bytes == pytest.approx(fp32_bytes / 4)
    assert "decode attention" in result.output
    assert report["machine"]["cores"] >= 1 and f"{report['machine']['cores']} cores" in result.output
    assert set(report["host"]) == {"attention", "causal", "gemv", "vision", "decode"}
    assert result.output.count("(host quiet)") + result.output.count("(host BUSY over this section") == 5
    assert [r["op"] for r in report["causal"]] == ["GroupQueryAttention", "Attention (opset 23, is_causal)"]


def test_a_busy_sections_timings_are_marked_in_each_cell() -> None:
    """The heading alone said a section was busy: a table copied without it read as quiet."""
    from pulse_edge.benchmarks.common.machine import machine_info
    from pulse_edge.benchmarks.studies.cpu_kernels import _tables

    row = {"ms": 1.0, "gflop_s": 2.0}
    report = {"date": "d", "machine": machine_info(), "threads": 2, "repeats": 3, "gemv_shape": "g",
              "vision_shape": "v", "decode_shape": "x",
              "host": {name: {"busy": "load 3.1" if name == "gemv" else ""} for name in
                       ("attention", "gemv", "vision", "causal", "decode")},
              "attention": [{"s": 1, "p": 0, **row}], "vision": [{"form": "f", **row}],
              "causal": [{"op": "o", "s": 1, **row}],
              "gemv": [{"bits": 4, "accuracy_level": 4, "block": 128, "mib": 1.0, "ms": 1.0, "gb_s": 3.0}],
              "decode": [{"cache": "int8", "threads": 1, "buffer": 8, "ms": 1.0, "gb_s": 3.0}]}
    text = _tables(report)
    assert "| 1.0 (busy) | 3.0 (busy) |" in text  # the gemv row
    assert text.count("(busy)") == 2 and "| 1.0 | 2 |" in text  # quiet sections unmarked
