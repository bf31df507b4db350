"""An fp32 decoder graph with an fp16 KV cache (export/graphs/kv_cache.py): the cache's type, the reference that caches
the same way (export/validate/kv_caches.py), and a wrong graph refused under its bound."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx
import pytest

from pulse_edge.export.graphs.decoder import DecoderShape, build_decoder
from pulse_edge.export.graphs.kv_cache import ROTARY_FP16
from pulse_edge.export.validate.kv_caches import fp16_kv_cache
from pulse_edge.export.validate.parity import ValidationPlan, validate_decoder
from pulse_edge.export.validate.tolerances import FP16_KV, tolerance_level
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import KVLayout

PLAN = ValidationPlan(prefill_lengths=(5, 64), decode_steps=2)


@pytest.fixture(scope="module")
def fp16_cache_decoder(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Any, KVLayout]:
    lm = tiny_pipeline.loaded.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=192)
    out = tmp_path_factory.mktemp("fp16-cache")
    spec = build_decoder(lm, shape, out, fp16_cache=True)
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype="float16",
                  max_length=shape.max_length)
    return lm, out, spec, kv


def _worst(report: dict[str, Any]) -> float:
    return max(step["max_rel_err"] for case in report["cases"] for step in [case["prefill"], *case["decode"]])


def test_the_cache_is_fp16_and_the_graph_matches_a_reference_caching_the_same_way(fp16_cache_decoder) -> None:
    lm, out, spec, kv = fp16_cache_decoder
    assert spec.precision == "fp32" and spec.tensor(names.past_name(0, "key")).dtype == "float16"
    assert spec.tensor(names.INPUTS_EMBEDS).dtype == "float32" and spec.tensor(names.LOGITS).dtype == "float32"
    with fp16_kv_cache(lm):
        emulated = validate_decoder(lm, out, spec, kv, precision=FP16_KV, plan=PLAN)
    plain = validate_decoder(lm, out, spec, kv, precision=FP16_KV, plan=PLAN)  # the hooks are gone again
    assert emulated["pass"], emulated
    assert 1e-5 < _worst(emulated) < _worst(plain)  # the cache rounds, and the reference follows most of it


def test_a_graph_reading_the_rotary_tables_swapped_is_refused(fp16_cache_decoder, tmp_path: Path) -> None:
    lm, out, spec, kv = fp16_cache_decoder
    model = onnx.load(str(out / spec.file), load_external_data=False)
    cos, sin = ROTARY_FP16
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            node.input[7], node.input[8] = sin, cos
    onnx.save_model(model, str(out / "swapped.onnx"))  # same folder: its external data still resolves
    with fp16_kv_cache(lm):
        report = validate_decoder(lm, out, replace(spec, file="swapped.onnx"), kv, precision=FP16_KV, plan=PLAN)
    assert not report["pass"] and _worst(report) > 10 * PLAN.tolerances[FP16_KV].max_rel_err


def test_the_bound_applies_to_fp32_graphs_with_an_fp16_cache_only() -> None:
    assert tolerance_level("fp32", fp32_reference=True, fp16_cache=True) == FP16_KV
    assert tolerance_level("fp32", fp32_reference=True) == "fp32"
    assert tolerance_level("int8", fp32_reference=True, fp16_cache=True) == "int8"  # wider than the rounding
    assert tolerance_level("fp32", fp32_reference=False, fp16_cache=True) == "bf16_reference"


def test_a_reference_that_overflows_the_fp16_cache_is_named_and_nothing_is_written(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint whose keys exceed fp16's 65504 makes the reference caching in fp16 compute NaN: export said
    "the bundle may be damaged (run pulse-edge verify MODEL)", of a bundle that did not exist yet."""
    from click.testing import CliRunner

    from pulse_edge.cli.main import main
    from pulse_edge.errors import ModelOutputError
    from pulse_edge.export.build import bundle as build

    def overflowing(*args: Any, **kwargs: Any) -> None:
        raise ModelOutputError("the model's logits hold NaN or inf")

    monkeypatch.setattr(build, "validate_greedy", overflowing)
    out = tmp_path / "b"
    result = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--kv-cache", "fp16",
                                       "--validation", "quick"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "an fp16 KV cache holds values up to 65504" in result.output and "--kv-cache float" in result.output
    assert "verify" not in result.output and not out.exists()
