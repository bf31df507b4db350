"""TensorRT-ready graphs (export --target tensorrt): standard ONNX only, parity on ORT's CPU EP, the runtime."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from pulse_testing.graph_surgery import edit_initializers
from pulse_testing.trt import quantized_trt_bundle, trt_emulation

from pulse_edge.calibration.recipes import decoder_sites
from pulse_edge.cli.main import main
from pulse_edge.errors import ConfigError
from pulse_edge.export.build import tensorrt as trt_build
from pulse_edge.export.build.bundle import ExportOptions
from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, LinearPlan
from pulse_edge.export.graphs.qdq_ops import int4_blocks, pack_int4
from pulse_edge.export.graphs.trt_decoder import TrtDecoderOptions, build_trt_decoder
from pulse_edge.export.validate.parity import ValidationPlan, validate_decoder
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import KVLayout, read_manifest
from pulse_edge.runtime.engines.ort import SessionConfig, decoder_engine
from pulse_edge.runtime.pipeline import Pipeline

NATIVE_OPS = {"Attention", "RotaryEmbedding", "RMSNormalization", "TensorScatter"}
PLAN = ValidationPlan(prefill_lengths=(5, 40), decode_steps=3)


def _ops(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path), load_external_data=False)
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node), "a contrib op in a TensorRT-ready graph"
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_the_fp16_bundle_is_standard_onnx_and_validated(trt_fp16_bundle: Path) -> None:
    manifest = read_manifest(trt_fp16_bundle)
    decoder, vision = manifest.graphs[names.DECODER], manifest.graphs[names.VISION]
    assert (decoder.target, decoder.kv_update, decoder.trt_ops, decoder.opset) == ("tensorrt", "scatter", "native", 24)
    assert vision.target == "tensorrt" and not vision.fusions and manifest.kv.dtype == "float16"
    ops = _ops(trt_fp16_bundle / decoder.file)
    assert {op: ops[op] for op in NATIVE_OPS} == {"Attention": 2, "RotaryEmbedding": 4, "RMSNormalization": 5,
                                                   "TensorScatter": 4}
    _ops(trt_fp16_bundle / vision.file)
    validation = manifest.validation
    assert validation["pass"] and validation["tolerance_level"] == "fp16" and validation["greedy"]["all_equal"]


def test_ort_serves_the_tensorrt_ready_bundle_like_the_reference(trt_fp16_bundle: Path, tiny_pipeline,
                                                                  ecg_png: Path) -> None:
    from pulse_edge.runtime.inputs.images import load_image

    image = load_image(ecg_png)
    ours = Pipeline.from_bundle(trt_fp16_bundle).generate(image, "What is the rhythm?", max_new_tokens=12)
    ref = tiny_pipeline.generate(image, "What is the rhythm?", max_new_tokens=12)
    assert ours.token_ids == ref.token_ids and ours.backend == "ort"


@pytest.mark.parametrize("ops", ["native", "explicit"])
def test_both_forms_match_the_reference_over_chunks_and_decode_steps(tiny_pipeline, tmp_path: Path, ops: str) -> None:
    loaded = tiny_pipeline.loaded
    shape = DecoderShape.from_config(loaded.config, max_length=256)
    spec = build_trt_decoder(loaded.model.language_model, shape, tmp_path, plan=FLOAT_PLAN,
                             options=TrtDecoderOptions(ops=ops))
    counts = _ops(tmp_path / spec.file)
    assert spec.opset == {"native": 24, "explicit": 18}[ops]
    assert bool(NATIVE_OPS & set(counts)) == (ops == "native")
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype="float16",
                  max_length=256)
    report = validate_decoder(loaded.model.language_model, tmp_path, spec, kv, precision="fp16", plan=PLAN,
                              session=SessionConfig(prepack=False))
    assert report["pass"], report
    worst = max(s["max_rel_err"] for c in report["cases"] for s in [c["prefill"], *c["decode"]])
    assert worst < 5e-3  # fp16 rounding (measured ~1e-3); a wrong position or cache slot is O(1)


def _trt_parity(bundle: Path, loaded, precision: str, scales=None) -> dict:
    manifest = read_manifest(bundle)
    with trt_emulation(loaded, bundle, precision, scales):
        return validate_decoder(loaded.model.language_model, bundle, manifest.graphs[names.DECODER], manifest.kv,
                                precision=trt_build.parity_level(precision), plan=PLAN,
                                session=trt_build.validation_session())


def test_quantized_trt_graphs_are_judged_against_their_emulated_recipe(trt_fp16_bundle: Path, tiny_pipeline,
                                                                       tmp_path: Path) -> None:
    """A correct W8A8 TensorRT-ready decoder passes parity against its emulated recipe (fp16 scales); with one
    site's weight scales x3 or its activation scale x3 the same graph is refused."""
    loaded = tiny_pipeline.loaded
    assert trt_build.parity_level("int8") == "int8 tensorrt" and trt_build.parity_level("fp16") == "fp16"
    bundle = quantized_trt_bundle(trt_fp16_bundle, tmp_path / "int8", "int8", loaded)
    report = _trt_parity(bundle, loaded, "int8")
    assert report["pass"], report
    for name in ("layers.0.qkv.w_scale", "layers.1.down.x_scale"):
        broken = Path(shutil.copytree(bundle, tmp_path / name))
        edit_initializers(broken / "decoder.onnx", {name: lambda a: a * np.float16(3)})
        assert not _trt_parity(broken, loaded, "int8")["pass"], name


@pytest.mark.slow  # calibration and three parity runs: ~1 min on an idle 2-core machine
@pytest.mark.parametrize("precision", ["int4", "int8", "fp8"])
def test_quantized_graphs_hold_their_recipe_and_pass_its_bound(precision: str, trt_fp16_bundle: Path, tiny_pipeline,
                                                               tiny_scales, tmp_path: Path) -> None:
    loaded = tiny_pipeline.loaded
    bundle = quantized_trt_bundle(trt_fp16_bundle, tmp_path / precision, precision, loaded, tiny_scales)
    manifest = read_manifest(bundle)
    decoder = manifest.graphs[names.DECODER]
    ops = _ops(bundle / decoder.file)
    sites = 4 * manifest.kv.layers + 1
    weight_dq = {"int4": sites, "int8": 2 * sites, "fp8": 2 * sites}[precision]
    assert ops["DequantizeLinear"] == weight_dq and ops.get("QuantizeLinear", 0) == weight_dq - sites
    assert decoder.ort_qdq_matmulnbits_accuracy_level == 0
    proto = onnx.load(str(bundle / decoder.file), load_external_data=False)
    types = {t.data_type for t in proto.graph.initializer}
    wanted = {"int4": onnx.TensorProto.INT4, "int8": onnx.TensorProto.INT8,
              "fp8": onnx.TensorProto.FLOAT8E4M3FN}[precision]
    assert wanted in types and onnx.TensorProto.FLOAT not in types  # scales and weights are fp16
    with trt_emulation(loaded, bundle, precision, tiny_scales):
        report = validate_decoder(loaded.model.language_model, bundle, decoder, manifest.kv,
                                  precision=trt_build.parity_level(precision), plan=PLAN,
                                  session=trt_build.validation_session())
    assert report["pass"], report
    vision_ops = _ops(bundle / manifest.graphs[names.VISION].file)
    assert vision_ops["QuantizeLinear"] == vision_ops["MatMul"] - 4  # attention's 2 MatMuls in each of 2 layers


def test_the_runtime_opens_int4_graphs_as_their_manifest_says(tiny_pipeline, tmp_path: Path) -> None:
    """ORT fuses DequantizeLinear(int4) + MatMul into MatMulNBits with int8 activations; at level "extended" on an
    fp16 graph that is wrong. The manifest's accuracy-level entry keeps the float math, at every level."""
    loaded = tiny_pipeline.loaded
    shape = DecoderShape.from_config(loaded.config, max_length=64)
    plan = LinearPlan(schemes=dict.fromkeys(decoder_sites(shape.layers), "w4"))
    spec = build_trt_decoder(loaded.model.language_model, shape, tmp_path, plan=plan, options=TrtDecoderOptions())
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype="float16",
                  max_length=64)
    embeds = np.random.default_rng(0).standard_normal((1, 9, shape.hidden)).astype(np.float32) * 0.02

    def logits(graph, level: str) -> np.ndarray:
        engine = decoder_engine(tmp_path, graph, kv, shape.vocab, SessionConfig(opt_level=level))
        return engine.forward(embeds).copy()

    exact = logits(spec, "disable")
    for level in ("basic", "extended", "all"):
        assert np.abs(logits(spec, level) - exact).max() <= 1e-2 * np.abs(exact).max()
    unhonoured = replace(spec, ort_qdq_matmulnbits_accuracy_level=None)
    assert np.abs(logits(unhonoured, "extended") - exact).max() > 0.1 * np.abs(exact).max()


def test_int4_blocks_pack_and_round_trip() -> None:
    w = np.random.default_rng(1).standard_normal((200, 6)).astype(np.float32)  # K not a multiple of the block
    codes, scales = int4_blocks(w, 128)
    assert codes.shape == (200, 6) and scales.shape == (2, 6) and codes.min() >= -8 and codes.max() <= 7
    recon = codes * np.repeat(scales, 128, axis=0)[:200]
    from pulse_edge.calibration.quant_math import dequantize_blockwise, quantize_blockwise

    # the ORT bundle's numbers (int4's clip search included: a clipped weight is more than half a step off)
    np.testing.assert_array_equal(recon, dequantize_blockwise(quantize_blockwise(w, 4, 128)))
    packed = pack_int4(codes)
    low, high = (packed & 0x0F).astype(np.int8), (packed >> 4).astype(np.int8)
    unpacked = np.stack([low, high], -1).reshape(-1)[: codes.size]
    assert np.array_equal(np.where(unpacked > 7, unpacked - 16, unpacked), codes.reshape(-1))


def test_target_tensorrt_refusals(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fp16 graphs"):
        ExportOptions(precision="fp32", target="tensorrt")
    with pytest.raises(ConfigError, match="goes with --target tensorrt"):
        ExportOptions(precision="fp16", trt_ops="explicit")
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--precision", "int8",
                               "--target", "tensorrt", "--int8-decoder", "weight-only"])
    assert res.exit_code == 2 and "W8A8 with SmoothQuant" in res.output and len(res.output.splitlines()) == 1
    assert not (tmp_path / "b").exists()
