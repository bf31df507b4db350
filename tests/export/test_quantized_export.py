"""int8 / int4 / fp8 bundles of the tiny model: graphs, validation, runtime, fidelity report, gate, scales."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
from pulse_edge.calibration.fidelity import AccuracyGate
from pulse_edge.calibration.recipes import make_recipe
from pulse_edge.calibration.scales import Scales, ScalesError
from pulse_edge.errors import ConfigError
from pulse_edge.export.build.bundle import ExportOptions, ExportValidationError, export_bundle
from pulse_edge.export.quant.context import AccuracyGateError, QuantSettings
from pulse_edge.export.validate.parity import ValidationPlan
from pulse_edge.runtime.bundle.manifest import read_manifest
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def scales_file(tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    scales = calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=6))
    return scales.save(tmp_path_factory.mktemp("scales") / "scales.npz")


def _export(checkpoint: Path, out: Path, precision: str, scales: Path | None, **recipe) -> Path:
    gate = recipe.pop("gate", None)
    settings = QuantSettings(make_recipe(precision, **recipe), scales=scales, held_out=2,
                             gate=AccuracyGate.from_string(gate) if gate else None)
    options = ExportOptions(precision=precision, plan=ValidationPlan.quick(), quant=settings)
    return export_bundle(checkpoint, out, options)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoint: Path, scales_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("qbundles")
    return {p: _export(tiny_checkpoint, root / p, p, scales_file) for p in ("int8", "int4", "fp8")}


def _ops(path: Path) -> dict[str, int]:
    proto = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_each_recipe_writes_its_own_kernels(bundles: dict[str, Path]) -> None:
    layers = 2  # the tiny decoder: 4 MatMuls per layer + lm_head
    int8, int4 = _ops(bundles["int8"] / "decoder.onnx"), _ops(bundles["int4"] / "decoder.onnx")
    assert int8.get("MatMulNBits") == int4.get("MatMulNBits") == 4 * layers + 1
    assert "MatMul" not in int8 and "MatMul" not in int4
    fp8 = onnx.load(str(bundles["fp8"] / "decoder.onnx"), load_external_data=False)
    assert next(o.version for o in fp8.opset_import if o.domain == "") >= 19
    assert _ops(bundles["fp8"] / "decoder.onnx")["QuantizeLinear"] == 4 * layers + 1
    vision_int8 = _ops(bundles["int8"] / "vision.onnx")
    # every Linear becomes a uint8 x int8 product; the 2 attention MatMuls of each of the 2 layers stay float
    assert vision_int8["QuantizeLinear"] == vision_int8["MatMulIntegerToFloat"] == 6 * 2 + 2
    assert vision_int8["MatMul"] == 4 and "DequantizeLinear" not in vision_int8
    # each Linear's bias Add is folded into its MatMulIntegerToFloat (the bias input, the 7th)
    vision = onnx.load(str(bundles["int8"] / "vision.onnx"), load_external_data=False)
    assert all(len(n.input) == 7 and n.input[6] for n in vision.graph.node if n.op_type == "MatMulIntegerToFloat")
    # the CPU recipes' prefill graph: every decoder layer site W8A8 per token, lm_head as in the decode graph
    for precision in ("int8", "int4"):
        prefill = _ops(bundles[precision] / "prefill.onnx")
        assert prefill["MatMulIntegerToFloat"] == 4 * layers and prefill["MatMulNBits"] == 1


def test_int4_weights_are_4_bit_with_the_asked_block(bundles: dict[str, Path]) -> None:
    proto = onnx.load(str(bundles["int4"] / "decoder.onnx"), load_external_data=False)
    node = next(n for n in proto.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == 128 and attrs["accuracy_level"] == 4


def test_manifests_record_validation_recipe_and_requirements(bundles: dict[str, Path]) -> None:
    for precision, path in bundles.items():
        manifest = read_manifest(path)
        assert manifest.precision == precision
        assert manifest.validation["pass"] and manifest.validation["tolerance_level"] == precision
        calibration = manifest.calibration
        assert calibration.recipe["name"] == precision
        assert (path / calibration.file).is_file()
        assert calibration.requires_compute_capability == ("8.9" if precision == "fp8" else None)
        assert calibration.fp8_method == ("minmax" if precision == "fp8" else None)  # what its fp8 sites used
    from pulse_edge.calibration.calibrate import fp8_method

    assert [fp8_method(m) for m in ("minmax", "percentile", "mse", "entropy")] == ["minmax", "percentile", "mse",
                                                                                  "mse"]  # E4M3 has no entropy clip
    assert read_manifest(bundles["fp8"]).graphs["decoder"].opt_level_limit == "basic"


def test_int8_and_int4_bundles_answer_in_the_runtime(bundles: dict[str, Path], ecg_png: Path) -> None:
    from pulse_edge.runtime.inputs.images import load_image

    for precision in ("int8", "int4"):
        result = Pipeline.from_bundle(bundles[precision]).generate(load_image(ecg_png), "What is the rhythm?",
                                                                  max_new_tokens=6)
        assert result.generated_tokens >= 1


def test_fp8_bundle_is_refused_on_the_cpu_unless_emulated(bundles: dict[str, Path], ecg_png: Path) -> None:
    from pulse_edge.runtime.inputs.images import load_image

    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9"):
        Pipeline.from_bundle(bundles["fp8"])
    emulated = Pipeline.from_bundle(bundles["fp8"], session=SessionConfig(emulate=True))
    assert emulated.generate(load_image(ecg_png), "Rhythm?", max_new_tokens=3).generated_tokens >= 1


def test_fidelity_report_vision_figures_match_an_independent_computation(bundles: dict[str, Path],
                                                                       tiny_pipeline) -> None:
    """Recompute the first held-out sample's vision cosine and SQNR with ORT directly and numpy formulas."""
    from pulse_edge.calibration.calibrate import prepare_all
    from pulse_edge.calibration.samples import load_samples

    report = read_manifest(bundles["int8"]).calibration.fidelity
    first = report["vision"]["samples"][0]
    pool = {s.id: s for s in load_samples("synthetic:64")}
    (prep,) = prepare_all(tiny_pipeline.loaded, tiny_pipeline.tokenizer, [pool[first["id"]]], 4096)
    session = ort.InferenceSession(str(bundles["int8"] / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": prep.pixel_values})[0].astype(np.float64).ravel()
    with torch.no_grad():
        ref = tiny_pipeline.model.vision_features(torch.from_numpy(prep.pixel_values)).double().numpy().ravel()
    cosine = got @ ref / np.sqrt((got @ got) * (ref @ ref))
    sqnr = 10 * np.log10((ref @ ref) / ((got - ref) @ (got - ref)))
    assert first["cosine"] == pytest.approx(cosine, abs=1e-9)
    assert first["sqnr_db"] == pytest.approx(sqnr, abs=1e-6)


def test_fidelity_report_sizes_and_summary(bundles: dict[str, Path]) -> None:
    for precision, path in bundles.items():
        report = read_manifest(path).calibration.fidelity
        sizes = report["sizes"]
        for name, size in sizes.items():
            if name != "total":
                assert (path / name).stat().st_size == size
        assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
        steps = report["decoder"]["steps"]
        assert report["summary"]["kl"] == pytest.approx(np.mean([s["kl"] for s in steps]))
        assert report["summary"]["cosine"] == pytest.approx(np.mean([s["cosine"] for s in steps]))
        assert 0.0 <= report["summary"]["agreement"] <= 1.0, precision
    int4 = read_manifest(bundles["int4"]).calibration.fidelity
    int8 = read_manifest(bundles["int8"]).calibration.fidelity
    assert int4["sizes"]["decoder.onnx.data"] < int8["sizes"]["decoder.onnx.data"]


def test_accuracy_gate_refuses_and_writes_nothing(tiny_checkpoint: Path, scales_file: Path, tmp_path: Path) -> None:
    with pytest.raises(AccuracyGateError, match="kl"):
        _export(tiny_checkpoint, tmp_path / "gated", "int4", scales_file, gate="kl<=0")
    assert not (tmp_path / "gated").exists()
    assert [p for p in tmp_path.iterdir()] == []


def test_a_broken_quantized_graph_fails_validation(tiny_checkpoint: Path, scales_file: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Block scales off by 3x make a graph that still runs: parity (against the emulated int8 reference, which
    quantizes with the untouched functions) must refuse the export, naming a site, and write nothing."""
    import pulse_edge.export.graphs.quant_ops as onnx_quant
    from pulse_edge.calibration.quant_math import BlockQuantized, quantize_blockwise

    def wrong(w: np.ndarray, bits: int, block_size: int) -> BlockQuantized:
        bq = quantize_blockwise(w, bits, block_size)
        return BlockQuantized(bq.packed, bq.scales * 3, bq.k, bq.n, bq.bits, bq.block_size)

    monkeypatch.setattr(onnx_quant, "quantize_blockwise", wrong)
    with pytest.raises(ExportValidationError, match=r"emulated int8 reference beyond the int8 parity bounds "
                                                    r"\((vision|decoder) \S+ \(.*\) on the graph's own input"):
        _export(tiny_checkpoint, tmp_path / "broken", "int8", scales_file)
    assert not (tmp_path / "broken").exists()


def test_scales_round_trip_and_refusals(scales_file: Path, tmp_path: Path, tiny_checkpoint: Path) -> None:
    scales = Scales.load(scales_file)
    again = Scales.load(scales.save(tmp_path / "again.npz"))
    assert again.sites.keys() == scales.sites.keys()
    site = "layers.0.qkv"
    np.testing.assert_array_equal(again.site(site).absmax, scales.site(site).absmax.astype(np.float32))
    assert again.site(site).amax == scales.site(site).amax
    assert again.samples["ids"] == scales.samples["ids"] and len(scales.samples["ids"]) == 6
    meta_bad = dict(np.load(scales_file))
    meta = json.loads(meta_bad["__meta__"].tobytes())
    meta["version"] = 99
    meta_bad["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "v99.npz", **meta_bad)
    with pytest.raises(ScalesError, match="version 99"):
        Scales.load(tmp_path / "v99.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ScalesError, match="not a pulse-edge scales file"):
        Scales.load(tmp_path / "junk.npz")
    with pytest.raises(ScalesError, match="another checkpoint"):
        scales.check_model("0" * 64, scales_file)
    with pytest.raises(ConfigError, match="blocks of 128"):
        _export(tiny_checkpoint, tmp_path / "bs", "int4", scales_file, block_size=32)


def _edited_scales(scales_file: Path, out: Path, edit_meta=None, edit_arrays=None) -> Path:
    arrays = dict(np.load(scales_file))
    meta = json.loads(arrays["__meta__"].tobytes())
    meta = edit_meta(meta) if edit_meta else meta
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(out, **(edit_arrays(arrays) if edit_arrays else arrays))
    return out


def _site_meta(meta: dict, field: str, value: object) -> dict:
    """One calibration method's range of one site set to `value` (each site keeps one amax per method)."""
    site = meta["sites"]["layers.0.qkv"]
    site[field] = {**site[field], "minmax": value}
    return meta


@pytest.mark.parametrize(("edit_meta", "edit_arrays", "expected"), [
    (lambda m: _site_meta(m, "amax", 0.0), None, r"layers.0.qkv amax\['minmax'\] holds 0.0, not a finite number"),
    (lambda m: _site_meta(m, "amax", -3.0), None, r"layers.0.qkv amax\['minmax'\] holds -3.0"),
    (lambda m: _site_meta(m, "amax_fp8", float("nan")), None, r"layers.0.qkv amax_fp8\['minmax'\] holds nan"),
    (lambda m: _site_meta(m, "amax", "big"), None, r"layers.0.qkv amax\['minmax'\] holds 'big'"),
    (None, lambda a: {**a, "layers.0.qkv/absmax": a["layers.0.qkv/absmax"] * np.inf}, r"absmax holds"),
    (lambda m: _site_meta(m, "smooth_amax", 0.0), None, r"layers.0.qkv smooth_amax\['minmax'\] holds 0.0"),
    (lambda m: {**m, "sites": {**m["sites"], "layers.0.qkv": {**m["sites"]["layers.0.qkv"], "smooth_amax": {}}}},
     None, r"layers.0.qkv smooth_amax is \{\}, not a map from calibration method"),
    (lambda m: [m], None, r"its metadata is a JSON list, not an object"),
    (lambda m: {**m, "sites": []}, None, r"is damaged or incomplete"),
    (None, lambda a: {**a, "layers.0.qkv/smooth": a["layers.0.qkv/smooth"] * 0}, r"layers.0.qkv smooth holds 0.0"),
    (None, lambda a: {**a, "layers.0.o/awq": a["layers.0.o/awq"] * np.nan}, r"layers.0.o awq holds nan"),
    (None, lambda a: {**a, "kv/layers.0.key": -a["kv/layers.0.key"]}, r"kv layers.0.key holds -"),
], ids=["amax 0", "amax negative", "amax_fp8 NaN", "amax a string", "absmax inf", "smoothed clip 0",
        "smoothed clips missing", "meta a list", "sites a list", "smoothing 0", "awq NaN", "kv negative"])
def test_a_scales_file_with_unusable_ranges_is_one_line(scales_file: Path, tmp_path: Path, edit_meta, edit_arrays,
                                                        expected: str) -> None:
    """A zero amax would be floored to 1e-12 by the graph and the emulated reference alike: parity would pass a
    bundle that saturates every activation. Refused when the file is read, naming the site."""
    with pytest.raises(ScalesError, match=expected):
        Scales.load(_edited_scales(scales_file, tmp_path / "bad.npz", edit_meta, edit_arrays))


def test_export_options_require_a_recipe_exactly_for_quantized_precisions() -> None:
    with pytest.raises(ConfigError):
        ExportOptions(precision="int8")
    with pytest.raises(ConfigError):
        ExportOptions(precision="fp32", quant=QuantSettings(make_recipe("int8")))
    assert ExportOptions.for_precision("int4").quant.recipe.decoder == "w4"
    with pytest.raises(ConfigError, match="block size 48 is not one of"):
        make_recipe("int4", block_size=48)


def test_keep_leaves_named_sites_at_fp(tiny_checkpoint: Path, scales_file: Path, tmp_path: Path) -> None:
    path = _export(tiny_checkpoint, tmp_path / "mixed", "int4", scales_file, keep=("lm_head", "layers.0", "vision"))
    ops = _ops(path / "decoder.onnx")
    assert ops["MatMulNBits"] == 4 and ops["MatMul"] == 5  # layer 1 quantized; layer 0 and lm_head kept
    assert "QuantizeLinear" not in _ops(path / "vision.onnx")
    assert read_manifest(path).graphs["vision"].precision == "fp32"
    init_names = {i.name for i in onnx.load(str(path / "decoder.onnx"), load_external_data=False).graph.initializer}
    assert "lm_head.weight" in init_names and "layers.1.qkv.qweight" in init_names


def test_int8_vision_weights_are_per_channel_int8(bundles: dict[str, Path]) -> None:
    proto = onnx.load(str(bundles["int8"] / "vision.onnx"))
    weights = [numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith(".qweight")]
    scales = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name.endswith(".w_scale")}
    assert weights and all(w.dtype == np.int8 and np.abs(w).max() == 127 for w in weights)
    assert all(s.ndim == 1 for s in scales.values())


@pytest.fixture(scope="module")
def outlier_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny checkpoint with 4 hidden dims 80x larger at the q/k/v and gate/up inputs, and its scales."""
    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint
    from pulse_edge.export.model.torch_backend import TorchPipeline

    root = tmp_path_factory.mktemp("outliers")
    checkpoint = make_tiny_checkpoint(root / "ckpt", TinySpec(outliers=4, outlier_scale=80.0))
    pipe = TorchPipeline.from_checkpoint(checkpoint, dtype="fp32", device="cpu")
    scales = calibrate(pipe.loaded, pipe.tokenizer, CalibrationOptions(samples=8)).save(root / "scales.npz")
    return checkpoint, scales


def test_smoothquant_rescues_w8a8_on_outlier_channels(outlier_checkpoint: tuple[Path, Path], tmp_path: Path) -> None:
    """Plain W8A8 (one per-tensor scale for the 80x channels and the rest) is a correct graph of a poor recipe:
    it passes parity and its fidelity falls below 0.99 (and below the recommended level); smoothing moves the
    outliers into the weights and keeps the logits' cosine above 0.99 (measured 0.9997)."""
    checkpoint, scales = outlier_checkpoint
    smoothed = _export(checkpoint, tmp_path / "smooth", "int8", scales, int8_decoder="w8a8")
    fidelity = read_manifest(smoothed).calibration.fidelity
    assert fidelity["summary"]["cosine"] >= 0.99
    assert set(read_manifest(smoothed).calibration.smoothed_or_scaled_sites) >= {"layers.0.qkv", "layers.1.qkv"}
    plain = read_manifest(_export(checkpoint, tmp_path / "plain", "int8", scales, int8_decoder="w8a8", smooth=False))
    assert plain.validation["pass"] and plain.validation["sites"]["pass"]
    assert plain.calibration.fidelity["summary"]["cosine"] < 0.99
    assert any(m.startswith("cosine ") for m in plain.calibration.fidelity["recommended"]["below"])


def test_bench_outliers_ranks_the_recipes(outlier_checkpoint: tuple[Path, Path]) -> None:
    from pulse_edge.benchmarks.studies.outliers import OutliersConfig, outliers_table, run_outliers

    checkpoint, scales = outlier_checkpoint
    report = run_outliers(OutliersConfig(checkpoint=checkpoint, scales=scales, samples=1, steps=4),
                          progress=lambda _: None)
    r = report["recipes"]
    assert r["fp32"]["cosine"] > 0.99999
    assert r["w8a8-smooth"]["cosine"] >= 0.99 > r["w8a8-plain"]["cosine"]
    assert r["int8"]["cosine"] > r["int8-plain"]["cosine"]
    assert r["int8"]["scaled_sites"] == 4 and r["int8-plain"]["scaled_sites"] == 0  # qkv, gate_up x 2 layers
    assert r["int4-awq"]["decoder_bytes"] < r["int8"]["decoder_bytes"] < r["fp32"]["decoder_bytes"]
    assert report["outlier_ratio"] > 20
    assert "W8A8 + SmoothQuant" in outliers_table(report)


def test_benchmarks_count_the_same_linear_work_in_every_graph_form(bundles: dict[str, Path], tiny_bundle: Path,
                                                                    tiny_checkpoint: Path) -> None:
    """bench latency counts a bundle's work from its graphs (a cart has no checkpoint): fp32 MatMuls, int8 and int4
    MatMulNBits, W8A8 vision Q/DQ all give the checkpoint config's count (vision: + the projector on the CLS
    token); the lm_head is left out."""
    from pulse_edge.benchmarks.perf.model_ops import bundle_ops, model_ops, ops_of

    reference = model_ops(tiny_checkpoint)
    assert ops_of(tiny_checkpoint) == reference
    for bundle in (tiny_bundle, bundles["int8"], bundles["int4"]):
        counted = ops_of(bundle)
        assert counted.decoder_ops_per_position == reference.decoder_ops_per_position, bundle.name
        assert counted.tiles((2200, 1700)) == reference.tiles((2200, 1700)) == 5  # the base view + a 2 x 2 grid
        assert 0 < counted.vision_ops_per_tile - reference.vision_ops_per_tile < 1e-3 * reference.vision_ops_per_tile
    assert bundle_ops(tiny_bundle) == ops_of(tiny_bundle)


def test_a_calibration_whose_samples_never_moved_a_site_is_refused_before_it_is_used(tiny_pipeline,
                                                                                    monkeypatch) -> None:
    """What Scales.load refuses in a file is refused in a calibration just run too (export calibrates itself
    without --scales): an amax of 0 would quantize every activation of that site to its extreme code."""
    from pulse_edge.calibration import calibrate as calibration
    from pulse_edge.calibration.calibrate import CalibrationOptions
    from pulse_edge.calibration.histogram import AbsHistogram

    real = AbsHistogram.amax
    monkeypatch.setattr(AbsHistogram, "amax", lambda self, method, **kw: 0.0 if method == "mse" else
                        real(self, method, **kw))
    with pytest.raises(ScalesError, match=r"^the calibration on 1 sample: \S+ amax\['mse'\] holds 0\.0, not a "
                                          r"finite number above 0; calibrate on more or other ECG samples$"):
        calibration.calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=1))
