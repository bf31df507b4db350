"""The CPU recipes' pieces on the tiny model: the per-token W8A8 MatMul, the int8 KV cache and its scales, the prefill
graph beside the decode graph on one cache, and the manifest's record of them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
from pulse_edge.calibration.kv import KVObserver, kv_scales, observing_kv, pair_lengths
from pulse_edge.calibration.recipes import make_recipe
from pulse_edge.calibration.scales import Scales
from pulse_edge.errors import ConfigError
from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, build_decoder
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.graphs.prefill import build_prefill, kv_scales_for
from pulse_edge.export.graphs.quant_ops import MatMulSpec, emit_matmul
from pulse_edge.runtime.bundle.manifest import BundleError, KVLayout
from pulse_edge.runtime.engines.ort import PREFILL_GRAPH_MIN_POSITIONS, DecoderEngine, SessionConfig


def _one_matmul(scheme: str, weight: np.ndarray, opset: int = 17) -> ort.InferenceSession:
    emitted = emit_matmul(scheme, MatMulSpec(site="s", x="x", y="y", weight=weight, opset=opset))
    k, n = weight.shape
    graph = helper.make_graph(emitted.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", n])],
                              initializer=[numpy_helper.from_array(a, name)
                                           for name, a in {**emitted.arrays, **emitted.raw}.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", opset),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("opset", [17, 20])
def test_w8a8dyn_quantizes_each_token_on_its_own(opset: int) -> None:
    """A token 1000x larger than the rest (LLaMA's first position) must not coarsen the others' grid: with one
    scale per call the small tokens would round to ~0 (relative error ~1); per token they stay at int8's ~1%."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((1, 6, 64)).astype(np.float32)
    x[0, 0] *= 1000
    x[0, 3] = 0  # an all-zero token divides safely
    y = _one_matmul("w8a8dyn", weight, opset).run(None, {"x": x})[0]
    ref = x @ weight
    errors = np.linalg.norm(y - ref, axis=-1) / np.maximum(np.linalg.norm(ref, axis=-1), 1e-12)
    assert np.all(errors[0, [0, 1, 2, 4, 5]] < 0.03) and errors[0, 3] == 0
    # the same tokens through one per-call scale lose the small ones: what per-token quantization avoids
    scale = np.abs(x).max() / 127
    per_call = (np.clip(np.rint(x / scale), -127, 127) * scale) @ weight
    assert np.linalg.norm(per_call[0, 1] - ref[0, 1]) / np.linalg.norm(ref[0, 1]) > 0.3


def test_pair_lengths_bound_every_rotation() -> None:
    """The cached key is the key turned by its position's angles: the pair length bounds it at any angle."""
    rng = np.random.default_rng(1)
    k = rng.standard_normal((50, 2, 8))  # [rows, heads, D]
    bound = pair_lengths(k).max(axis=0)
    angles = rng.uniform(0, 2 * np.pi, (50, 1, 4))
    cos, sin = np.cos(angles), np.sin(angles)
    rotated = np.concatenate([k[..., :4] * cos - k[..., 4:] * sin, k[..., 4:] * cos + k[..., :4] * sin], axis=-1)
    assert np.all(np.abs(rotated).max(axis=0) <= bound + 1e-12)
    assert np.all(np.abs(k).max(axis=0) <= bound + 1e-12)


@pytest.fixture(scope="module")
def tiny_scales(tiny_pipeline) -> Scales:
    return calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=2))


def test_calibration_records_the_kv_ranges_and_they_round_trip(tiny_pipeline, tiny_scales: Scales,
                                                               tmp_path: Path) -> None:
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    assert set(tiny_scales.kv) == {f"layers.{i}.{p}" for i in range(shape.layers) for p in ("key", "value")}
    assert all(v.shape == (shape.kv_heads, shape.head_dim) and np.all(v > 0) for v in tiny_scales.kv.values())
    again = Scales.load(tiny_scales.save(tmp_path / "s.npz"))
    np.testing.assert_array_equal(again.kv["layers.1.key"], tiny_scales.kv["layers.1.key"].astype(np.float32))
    # the statistic is what the reference's cache holds: its keys (after rotary) never exceed the recorded bound
    lm = tiny_pipeline.model.language_model
    embeds = lm.get_input_embeddings().weight[torch.arange(3, 40)][None].float()
    observer = KVObserver(head_dim=shape.head_dim)
    with torch.inference_mode(), observing_kv(tiny_pipeline.model, observer):
        cache = lm(inputs_embeds=embeds, use_cache=True).past_key_values
    keys = cache.layers[0].keys[0].float().numpy()  # [kv_heads, S, D], rotated
    assert np.all(np.abs(keys).max(axis=1) <= observer.absmax["layers.0.key"] * (1 + 1e-5))
    values = cache.layers[0].values[0].float().numpy()
    np.testing.assert_allclose(np.abs(values).max(axis=1), observer.absmax["layers.0.value"], rtol=1e-5)


def _engine(out: Path, lm, shape: DecoderShape, kv_scales_: KVScales | None, prefill: bool = False,
            recipe=None, plan=FLOAT_PLAN) -> DecoderEngine:
    out.mkdir()
    desc = build_decoder(lm, shape, out, plan=plan, kv=kv_scales_)
    pre = build_prefill(lm, shape, out, recipe, plan, kv_scales_, label="int8") if prefill else None
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                  dtype="int8" if kv_scales_ else "float32", max_length=shape.max_length,
                  scales="per_channel" if kv_scales_ else None)
    return DecoderEngine(out, desc, kv, shape.vocab, SessionConfig(prepack=False), prefill=pre)


def _run(engine: DecoderEngine, embeds: np.ndarray, steps: int = 3, chunk: int | None = None) -> np.ndarray:
    """Logits after each prompt chunk (all of it at once when `chunk` is None), then after each of `steps` steps."""
    engine.reset()
    chunk = chunk or embeds.shape[1]
    logits = [engine.forward(embeds[:, s:s + chunk]).copy() for s in range(0, embeds.shape[1], chunk)]
    logits += [engine.forward(embeds[:, i:i + 1]).copy() for i in range(steps)]
    return np.stack(logits)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_int8_kv_cache_keeps_the_logits_and_a_wrong_scale_does_not(tiny_pipeline, tiny_scales: Scales,
                                                                  tmp_path: Path) -> None:
    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    recipe = make_recipe("int8")
    scales = kv_scales_for(recipe, tiny_scales, shape, FLOAT_PLAN)
    embeds = lm.get_input_embeddings().weight[torch.arange(5, 45)][None].detach().float().numpy()
    float_kv = _run(_engine(tmp_path / "f", lm, shape, None), embeds)
    int8_kv = _engine(tmp_path / "q", lm, shape, scales)
    assert int8_kv._cache[0].data_type() == "tensor(int8)"
    got = _run(int8_kv, embeds)
    assert _cosine(got, float_kv) > 0.999
    # scales 20x too small saturate the cache: the check above can fail
    tiny = KVScales(key=tuple(s / 20 for s in scales.key), value=tuple(s / 20 for s in scales.value))
    assert _cosine(_run(_engine(tmp_path / "w", lm, shape, tiny), embeds), float_kv) < 0.999
    assert KVLayout(layers=1, kv_heads=4, head_dim=16, dtype="int8", max_length=8, scales="per_channel"
                    ).bytes_per_token * 4 == KVLayout(1, 4, 16, "float32", 8).bytes_per_token


def test_prefill_graph_shares_the_cache_with_the_decode_graph(tiny_pipeline, tiny_scales: Scales,
                                                              tmp_path: Path) -> None:
    from pulse_edge.export.quant.apply import decoder_plan

    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    recipe = make_recipe("int8")
    plan = decoder_plan(tiny_pipeline.model, recipe, tiny_scales, shape)
    scales = kv_scales_for(recipe, tiny_scales, shape, plan)
    engine = _engine(tmp_path / "both", lm, shape, scales, prefill=True, recipe=recipe, plan=plan)
    assert engine.runner(PREFILL_GRAPH_MIN_POSITIONS)[0] is engine.prefill_session
    assert engine.runner(PREFILL_GRAPH_MIN_POSITIONS - 1)[0] is engine.session
    embeds = lm.get_input_embeddings().weight[torch.arange(5, 45)][None].detach().float().numpy()
    # 2 chunks of 20 positions on the prefill graph (the second reads the first's int8 cache), then 3 steps on
    # the decode graph, which agree only if it reads the cache the prefill graph wrote (one set of buffers)
    both = _run(engine, embeds, chunk=20)
    engine.prefill_session = None  # everything on the decode graph
    decode_only = _run(engine, embeds, chunk=20)
    for got, ref in zip(both, decode_only, strict=True):
        assert _cosine(got, ref) > 0.999


def test_the_prefill_graph_is_left_out_where_memory_cannot_hold_it(tiny_pipeline, tiny_scales: Scales,
                                                                   tmp_path: Path, monkeypatch, caplog) -> None:
    """runtime/engines/memory.py: measured MemAvailable after the decode graph decides; one warning line says so;
    --prefill-graph on/off override it."""
    import pulse_edge.runtime.engines.ort as ort_engines
    from pulse_edge.export.quant.apply import decoder_plan

    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=64)
    recipe = make_recipe("int8")
    plan = decoder_plan(tiny_pipeline.model, recipe, tiny_scales, shape)
    scales = kv_scales_for(recipe, tiny_scales, shape, plan)
    decode = build_decoder(lm, shape, tmp_path, plan=plan, kv=scales)
    prefill = build_prefill(lm, shape, tmp_path, recipe, plan, scales, label="int8")
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype="int8",
                  max_length=shape.max_length, scales="per_channel")

    def loaded(free: int, **config) -> bool:
        monkeypatch.setattr(ort_engines, "mem_available_bytes", lambda: free)
        caplog.clear()
        engine = DecoderEngine(tmp_path, decode, kv, shape.vocab, SessionConfig(**config), prefill=prefill)
        return engine.prefill_session is not None

    assert loaded(64 << 30)
    assert not loaded(1 << 29)  # the tiny graph's weights are small; the margin left to the machine is not
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert "needs ~1.0 GiB more memory but 0.5 GiB is available" in record.getMessage()
    assert loaded(1 << 29, prefill_graph="on")
    assert not loaded(64 << 30, prefill_graph="off") and not caplog.records
    with pytest.raises(ConfigError, match="prefill graph 'maybe' is not one of auto, on, off"):
        SessionConfig(prefill_graph="maybe")


def test_manifest_kv_layout_needs_scales_exactly_for_int8() -> None:
    with pytest.raises(BundleError, match="int8 cache needs"):
        KVLayout(layers=1, kv_heads=1, head_dim=8, dtype="int8", max_length=8)
    with pytest.raises(BundleError):
        KVLayout(layers=1, kv_heads=1, head_dim=8, dtype="float32", max_length=8, scales="per_channel")
    layout = KVLayout(layers=1, kv_heads=1, head_dim=8, dtype="int8", max_length=8, scales="per_channel")
    assert KVLayout.from_dict({**layout.__dict__}) == layout


def test_int8_kv_needs_scales_with_kv_ranges(tiny_pipeline, tiny_scales: Scales) -> None:
    from dataclasses import replace

    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    with pytest.raises(ConfigError, match="re-run pulse-edge calibrate"):
        kv_scales_for(make_recipe("int8"), replace(tiny_scales, kv={}), shape, FLOAT_PLAN)
    assert kv_scales_for(make_recipe("int8", kv_cache="float"), replace(tiny_scales, kv={}), shape,
                         FLOAT_PLAN) is None
    key, value = kv_scales(tiny_scales.kv, shape.layers, headroom=1.0)
    np.testing.assert_allclose(key[0] * 127, tiny_scales.kv["layers.0.key"], rtol=1e-6)
    np.testing.assert_allclose(value[1] * 127, tiny_scales.kv["layers.1.value"], rtol=1e-6)


def test_the_value_scales_follow_the_awq_scale_folded_into_v(tiny_pipeline, tiny_scales: Scales,
                                                             tmp_path: Path) -> None:
    """int4 folds o's AWQ scale s into v's columns, so the cache holds v / s: its value scales are the recorded
    ones / s. Shown on the caches the decode graph writes: with them, the int4 graph's value codes are the float
    graph's (v / s over scale / s), where the recorded scales left as they were clip some and coarsen others."""
    from dataclasses import replace

    from pulse_edge.export.quant.apply import decoder_plan

    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=64)
    recipe = make_recipe("int4")
    plan = decoder_plan(tiny_pipeline.model, recipe, tiny_scales, shape)
    s_o = plan.input_scales["layers.0.o"].reshape(shape.kv_heads, shape.head_dim)
    assert not np.allclose(s_o, 1.0)  # AWQ moved o's channels: the case this test is about
    recorded = kv_scales_for(recipe, tiny_scales, shape, FLOAT_PLAN)
    scales = kv_scales_for(recipe, tiny_scales, shape, plan)
    np.testing.assert_allclose(scales.value[0], recorded.value[0] / s_o, rtol=1e-6)
    assert all(np.array_equal(a, b) for a, b in zip(scales.key, recorded.key, strict=True))  # keys: no fold
    embeds = lm.get_input_embeddings().weight[torch.arange(5, 45)][None].detach().float().numpy()

    def value_codes(name: str, kv: KVScales, linear_plan) -> np.ndarray:
        engine = _engine(tmp_path / name, lm, shape, kv, plan=linear_plan)
        _run(engine, embeds)
        return engine._cache[1].numpy()[0, :, :40].astype(np.int32)  # layer 0's values [kv_heads, 40, D]

    float_codes = value_codes("float", recorded, FLOAT_PLAN)
    only_v = replace(plan, schemes={}, input_scales={"layers.0.o": plan.input_scales["layers.0.o"]})  # v / s, fp
    fixed, stale = value_codes("fixed", scales, only_v), value_codes("stale", recorded, only_v)
    assert np.abs(fixed - float_codes).max() <= 1  # one float rounding from a boundary at most
    assert np.abs(stale - float_codes).max() > 1


def test_recipe_prefill_scheme_keeps_lm_head_and_kept_sites() -> None:
    recipe = make_recipe("int4", keep=("layers.1",))
    assert recipe.prefill_scheme("layers.0.qkv") == "w8a8dyn"
    assert recipe.prefill_scheme("layers.1.down") == "fp"
    assert recipe.prefill_scheme("lm_head") == "w4"
    assert make_recipe("int8", prefill=False).prefill is None
    assert make_recipe("int8").to_dict()["kv_cache"] == "int8"


def test_tensorrt_recipes_leave_out_the_cpu_forms() -> None:
    """--target tensorrt: Q/DQ vision, no prefill graph, a float cache; an int8 cache is refused in one line."""
    for precision in ("int8", "int4"):
        recipe = make_recipe(precision, target="tensorrt")
        assert (recipe.vision, recipe.prefill, recipe.kv_cache) == ("w8a8", None, "float")
    assert make_recipe("fp8", target="tensorrt").vision == "fp8"
    with pytest.raises(ConfigError, match="--target tensorrt keeps a float"):
        make_recipe("int8", kv_cache="int8", target="tensorrt")


def test_prefill_graph_file_holds_int8_weights(tiny_pipeline, tiny_scales: Scales, tmp_path: Path) -> None:
    from pulse_edge.export.quant.apply import decoder_plan

    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    recipe = make_recipe("int4")
    spec = build_prefill(lm, shape, tmp_path, recipe, decoder_plan(tiny_pipeline.model, recipe, tiny_scales, shape),
                         None, label="int4")
    proto = onnx.load(str(tmp_path / spec.file), load_external_data=False)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 * shape.layers and ops.count("MatMulNBits") == 1
    assert spec.file == "prefill.onnx" and spec.tensor("past_key_values.0.key").dtype == "float32"


def test_ort_scales_a_bias_by_the_row_scale_so_w8a8dyn_never_passes_one() -> None:
    """Why per-token w8a8dyn keeps each Linear's bias as an Add after the MatMul: MatMulIntegerToFloat multiplies
    its bias input by the per-row activation scale (ORT 1.32); w8a8u8's one static scale makes folding it exact.
    If ORT fixes that, this test fails and w8a8dyn can fold the bias too."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((64, 32)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(32).astype(np.float32)
    emitted = emit_matmul("w8a8dyn", MatMulSpec(site="s", x="x", y="y", weight=weight))
    matmul = next(n for n in emitted.nodes if n.op_type == "MatMulIntegerToFloat")
    matmul.input.extend(["", "s.bias"])
    graph = helper.make_graph(emitted.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", 32])],
                              initializer=[numpy_helper.from_array(a, n) for n, a in
                                           {**emitted.raw, "s.bias": bias}.items()])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 17),
                                                                   helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((1, 4, 64)).astype(np.float32) * 10
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    row_scale = np.abs(x).max(axis=-1, keepdims=True) / 127

    def rel(ref: np.ndarray) -> float:
        return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    assert rel(x @ weight + bias * row_scale) < 0.03 < rel(x @ weight + bias)


def _export_bf16(cpu_int8_bundle: Path, tiny_checkpoint: Path, out: Path) -> Path:
    """The tiny int8 CPU bundle exported again, judged against its emulated reference in bf16 (a model too big for
    fp32 here is): the prefill graph's checks run under the measured prefill+bf16 bound."""
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle
    from pulse_edge.export.quant.context import QuantSettings
    from pulse_edge.export.validate.parity import ValidationPlan

    settings = QuantSettings(make_recipe("int8"), scales=cpu_int8_bundle.parent / "scales.npz", held_out=1)
    plan = ValidationPlan(prefill_lengths=(5, 64), decode_steps=1, greedy_runs=0)
    return export_bundle(tiny_checkpoint, out, ExportOptions(precision="int8", quant=settings, plan=plan,
                                                             reference=torch.bfloat16))


def test_a_bf16_reference_judges_the_prefill_graph_by_its_bound_and_still_refuses_a_wrong_one(
        cpu_int8_bundle: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The bound a 32-layer model needs against a bf16 oracle (per-token codes flip on both sides) is wider than the
    sum of the two errors, but not blind: a prefill graph with sin and cos swapped passes every site (rotary is
    no MatMul) and must still be refused end to end, with nothing written."""
    import pulse_edge.export.build.bundle as bundle_module
    from pulse_edge.export.build.bundle import ExportValidationError
    from pulse_edge.export.build.segments import bound_text
    from pulse_edge.export.graphs import decoder as decoder_graph
    from pulse_edge.export.validate.tolerances import TOLERANCES
    from pulse_edge.runtime.bundle.manifest import read_manifest

    good = read_manifest(_export_bf16(cpu_int8_bundle, tiny_checkpoint, tmp_path / "good")).validation
    record = good["decoder"]["prefill_graph"]
    assert good["pass"] and good["reference_dtype"] == "bfloat16" and record["pass"]
    assert record["tolerance_level"] == "int8 prefill+bf16_reference"
    assert record["tolerance"]["min_cosine"] == TOLERANCES["int8 prefill+bf16_reference"].min_cosine < 0.997

    real_build, real_tables = bundle_module.build_prefill, decoder_graph._rotary_tables

    def swapped_prefill(*args, **kwargs):
        with monkeypatch.context() as patch:  # the prefill graph only: the decode graph stays right
            patch.setattr(decoder_graph, "_rotary_tables", lambda lm, shape: real_tables(lm, shape)[::-1])
            return real_build(*args, **kwargs)

    monkeypatch.setattr(bundle_module, "build_prefill", swapped_prefill)
    with pytest.raises(ExportValidationError, match="prefill graph") as refused:
        _export_bf16(cpu_int8_bundle, tiny_checkpoint, tmp_path / "wrong")
    assert f"(its bound: {bound_text(record['tolerance'])})" in str(refused.value)
    assert not (tmp_path / "wrong").exists()


def test_a_chunk_too_short_for_the_loaded_prefill_graph_is_refused(cpu_int8_bundle: Path) -> None:
    """Chunks under 16 positions run on the decode path: with the prefill graph loaded (and a kernel asked for
    it) nothing would run where the reports say it does. One line instead; without the graph, any chunk."""
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.pipeline import Pipeline

    with pytest.raises(ConfigError, match="--prefill-chunk 8: chunks under 16 positions never reach"):
        Pipeline.from_bundle(cpu_int8_bundle, prefill_chunk=8)
    assert Pipeline.from_bundle(cpu_int8_bundle, prefill_chunk=16).engine.prefill_chunk == 16
    without = Pipeline.from_bundle(cpu_int8_bundle, prefill_chunk=8, session=SessionConfig(prefill_graph="off"))
    assert without.engine.prefill_chunk == 8


def test_on_a_cpu_without_vnni_the_runtime_counts_the_u8_copies_and_warns_at_a_lowered_level(
        cpu_int8_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Such a CPU (stood in for: ORT makes the u8 rewrite on any x86 where the entry is set): at the default level
    the prefill graph's memory check counts the u8 copies and nothing is said; at "basic", where ORT keeps the
    saturating kernel, one warning for the bundle."""
    import pulse_edge.runtime.engines.ort as ort_engines
    import pulse_edge.runtime.engines.sessions as sessions
    from pulse_edge.runtime.pipeline import Pipeline

    monkeypatch.setattr(sessions, "int8_products_saturate", lambda flags=None: True)
    copies: list[bool] = []
    choose = ort_engines.choose_prefill_graph
    monkeypatch.setattr(ort_engines, "choose_prefill_graph",
                        lambda *args, **kw: copies.append(kw["u8_copies"]) or choose(*args, **kw))
    for level, counted, warned in (("all", True, 0), ("basic", False, 1)):
        copies.clear()
        caplog.clear()
        with caplog.at_level("WARNING"), Pipeline.from_bundle(cpu_int8_bundle, session=SessionConfig(opt_level=level)):
            pass
        assert copies == [counted]
        assert sum("saturates on this CPU (x86 without VNNI)" in r.getMessage() for r in caplog.records) == warned


def test_smoothing_is_kept_only_where_it_beats_plain_w8a8(tiny_pipeline, tiny_scales: Scales,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """SmoothQuant's alpha 0 is not s = 1: where no alpha beats the unscaled error, the site keeps plain W8A8."""
    from pulse_edge.calibration import calibrate as calibrate_module
    from pulse_edge.calibration.quant_math import search_smooth_alpha

    searched = {name: site for name, site in tiny_scales.sites.items() if site.search.get("smooth_errors")}
    assert searched and all(site.smooth is not None for site in searched.values())  # on these, smoothing wins

    def losing(*args, **kwargs):  # the same search, its best alpha no better than no scaling
        result = search_smooth_alpha(*args, **kwargs)
        return replace(result, baseline_error=result.error)

    monkeypatch.setattr(calibrate_module, "search_smooth_alpha", losing)
    plain = calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=2))
    for name in searched:
        site = plain.sites[name]
        assert site.smooth is None and site.smooth_alpha is None and site.smooth_amax == {}, name


def test_int4_folds_awq_into_every_decoder_layer_and_rtn_into_none(tiny_pipeline, tiny_scales: Scales) -> None:
    """AWQ's scales never applied would pass parity (the graph and its emulation share the plan)."""
    from pulse_edge.export.quant.apply import decoder_plan

    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=64)
    awq = decoder_plan(tiny_pipeline.model, make_recipe("int4"), tiny_scales, shape)
    layers = {f"layers.{i}.{part}" for i in range(shape.layers) for part in ("qkv", "o", "gate_up", "down")}
    assert layers <= set(awq.input_scales)
    np.testing.assert_array_equal(awq.input_scales["layers.0.down"], tiny_scales.sites["layers.0.down"].awq)
    rtn = decoder_plan(tiny_pipeline.model, make_recipe("int4", int4_method="rtn"), tiny_scales, shape)
    assert not layers & set(rtn.input_scales)


def test_a_smoothed_input_is_clipped_at_its_exact_maximum_under_every_method(tiny_scales: Scales) -> None:
    """The sampled rows miss the rare tokens whose x / s is largest: a percentile, entropy or MSE clip of them cut
    the attention-sink token of every prompt. Every method takes x / s's maximum, from the channel maxima."""
    smoothed = {name: site for name, site in tiny_scales.sites.items() if site.smooth is not None}
    assert smoothed, "the tiny calibration smooths some site"
    for name, site in smoothed.items():
        exact = float(np.max(site.absmax / site.smooth))
        assert site.smooth_amax == {m: exact for m in ("minmax", "percentile", "entropy", "mse")}, name


def test_each_site_is_clipped_by_the_calibration_method_asked(tiny_scales: Scales) -> None:
    """--method chooses each activation's clip: a graph built with another method's ranges would pass parity
    (its reference reads the same table) and serve other scales than the ones asked for."""
    from pulse_edge.export.quant.apply import _act_amax

    site = next(name for name, s in tiny_scales.sites.items() if s.smooth is None and len(set(s.amax.values())) > 1)
    stats = tiny_scales.site(site)
    for method in stats.amax:
        assert _act_amax(replace(tiny_scales, method=method), site, "w8a8", None) == stats.amax[method]
    for method in stats.amax_fp8:
        assert _act_amax(replace(tiny_scales, method=method), site, "fp8", None) == stats.amax_fp8[method]
    assert _act_amax(replace(tiny_scales, method="entropy"), site, "fp8", None) == stats.amax_fp8["mse"]


def test_int4_scales_searched_for_another_block_size_are_refused(tiny_scales: Scales) -> None:
    """AWQ's scales are searched for one block size: applied to another they scale the wrong groups, in silence."""
    from pulse_edge.calibration.recipes import make_recipe
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.quant.apply import check_scales

    assert tiny_scales.awq_block_size == 128
    check_scales(make_recipe("int4", block_size=128), tiny_scales)  # the same size: taken
    with pytest.raises(ConfigError, match="the scales' AWQ search assumed int4 blocks of 128; pass --block-size 128"):
        check_scales(make_recipe("int4", block_size=32), tiny_scales)
    check_scales(make_recipe("int8"), tiny_scales)  # no int4 AWQ: the block size is not read
