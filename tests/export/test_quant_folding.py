"""Scale folding in the decoder build, the plan's guards, and the quantized graphs' scales, on the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from pulse_testing.site_scales import random_site_scales

from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, LinearPlan, build_decoder
from pulse_edge.runtime.bundle.manifest import KVLayout
from pulse_edge.runtime.engines.ort import DecoderEngine, SessionConfig


def _logits(lm, shape: DecoderShape, out: Path, plan: LinearPlan, embeds: np.ndarray) -> np.ndarray:
    out.mkdir()
    desc = build_decoder(lm, shape, out, plan=plan)
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype="float32",
                  max_length=shape.max_length)
    engine = DecoderEngine(out, desc, kv, shape.vocab, SessionConfig(prepack=False))
    first = engine.forward(embeds).copy()
    return np.concatenate([first, engine.forward(embeds[:, :1]).copy()])


def test_folded_input_scales_leave_the_float_decoder_unchanged(tiny_pipeline, tmp_path: Path) -> None:
    """Random log-normal scales on every site, schemes left at fp: the folds must cancel exactly."""
    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    rng = np.random.default_rng(0)
    scales = random_site_scales(shape, rng)
    embeds = rng.normal(size=(1, 7, shape.hidden)).astype(np.float32)
    plain = _logits(lm, shape, tmp_path / "plain", FLOAT_PLAN, embeds)
    folded = _logits(lm, shape, tmp_path / "folded", LinearPlan(input_scales=scales), embeds)
    assert np.max(np.abs(folded - plain)) <= 1e-4 * np.max(np.abs(plain))
    # and the folds did happen: the stored weights are the float ones scaled row by row
    def weight(name: str, where: str) -> np.ndarray:
        inits = onnx.load(str(tmp_path / where / "decoder.onnx")).graph.initializer
        return numpy_helper.to_array(next(i for i in inits if i.name == name))

    ratio = weight("layers.0.qkv.weight", "folded") / weight("layers.0.qkv.weight", "plain")
    np.testing.assert_allclose(ratio[:, 0], scales["layers.0.qkv"], rtol=1e-5)


def test_o_scales_need_one_v_head_per_head(tiny_pipeline) -> None:
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    gqa = DecoderShape(**{**shape.__dict__, "kv_heads": shape.heads // 2})
    with pytest.raises(ValueError, match="heads == kv_heads"):
        LinearPlan(input_scales={"layers.0.o": np.ones(shape.hidden, np.float32)}).check(gqa)
    LinearPlan(input_scales={"layers.0.qkv": np.ones(shape.hidden, np.float32)}).check(gqa)


def test_quantized_plans_are_fp32_only(tiny_pipeline, tmp_path: Path) -> None:
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    with pytest.raises(ValueError, match="fp32"):
        build_decoder(tiny_pipeline.model.language_model, shape, tmp_path, precision="fp16",
                      plan=LinearPlan(schemes={"lm_head": "w8"}))


def test_w8a8_activation_scale_is_the_smoothed_clip(tiny_pipeline, tmp_path: Path) -> None:
    """The Q/DQ scale of a smoothed site is clip(x / s) / 127, with s folded into the RMSNorm weight."""
    from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
    from pulse_edge.calibration.recipes import make_recipe
    from pulse_edge.export.quant.apply import decoder_plan

    scales = calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=3))
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    recipe = make_recipe("int8", int8_decoder="w8a8", smooth_alpha=0.5)
    plan = decoder_plan(tiny_pipeline.model, recipe, scales, shape)
    build_decoder(tiny_pipeline.model.language_model, shape, tmp_path, plan=plan)
    inits = {i.name: i for i in onnx.load(str(tmp_path / "decoder.onnx")).graph.initializer}
    site = scales.site("layers.0.qkv")
    s = plan.input_scales["layers.0.qkv"]
    expected = float(np.max(site.absmax / s)) / 127.0
    assert float(numpy_helper.to_array(inits["layers.0.qkv.x_scale"])) == pytest.approx(expected, rel=1e-6)
    gamma = tiny_pipeline.model.language_model.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(numpy_helper.to_array(inits["layers.0.input_norm.weight"]), gamma / s, rtol=1e-6)
    assert "layers.0.o" not in plan.input_scales  # o and down are not smoothed (SmoothQuant's choice)
