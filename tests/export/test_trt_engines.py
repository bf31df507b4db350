"""`build-engines`: TensorRT engines of the tiny model in every recipe TensorRT-RTX builds, checked against the
bundle's manifest through the builder's own network and profile objects (no GPU needed to build)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from pulse_testing.trt import quantized_trt_bundle

from pulse_edge.cli.main import main
from pulse_edge.export.engines.build import EngineBuildOptions, build_engines
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.engines import read_engines
from pulse_edge.runtime.bundle.integrity import bundle_file_records
from pulse_edge.runtime.bundle.manifest import read_manifest

PRECISIONS = ("fp16", "int4", "int8", "fp8")
CONTEXT = 2048  # under the bundle's 4096 (the engine cache is rewritten to it), over the smallest image's 1984


@pytest.fixture(scope="module")
def built(trt_fp16_bundle: Path, tiny_pipeline, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("engines")
    bundles = {"fp16": trt_fp16_bundle}
    for precision in PRECISIONS[1:]:
        bundles[precision] = quantized_trt_bundle(trt_fp16_bundle, root / precision, precision, tiny_pipeline.loaded)
    for precision, bundle in bundles.items():
        build_engines(bundle, EngineBuildOptions(target="rtx", max_context=CONTEXT, output=root / f"e-{precision}"),
                      progress=lambda line: None)
    return {p: root / f"e-{p}" for p in PRECISIONS} | {f"bundle-{p}": b for p, b in bundles.items()}


def _network(graph: Path):
    import tensorrt_rtx as trt

    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(graph))
    return builder, network, parser


@pytest.mark.tensorrt
@pytest.mark.parametrize("precision", PRECISIONS)
def test_engines_match_the_manifest_and_the_builders_network(built: dict[str, Path], precision: str) -> None:
    import tensorrt_rtx as trt

    bundle, directory = built[f"bundle-{precision}"], built[precision]
    manifest, engines = read_manifest(bundle), read_engines(directory, bundle)
    assert engines.target == "rtx" and engines.tensorrt == "tensorrt_rtx" and engines.max_context == CONTEXT
    assert engines.compute_capabilities == (("8.9", "12.0") if precision == "fp8" else ("8.6", "8.9", "12.0"))
    for role, graph in manifest.graphs.items():
        spec = engines.engines[role]
        assert (directory / spec.file).stat().st_size == spec.size > 0 and spec.precision == graph.precision
        assert [(t.name, t.dtype) for t in spec.inputs] == [(t.name, t.dtype) for t in graph.inputs]
        assert [(t.name, t.dtype) for t in spec.outputs] == [(t.name, t.dtype) for t in graph.outputs]
        builder, network, _parser = _network(bundle / graph.file)
        io = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
        assert {n: str(t.dtype).rsplit(".", 1)[-1] for n, t in io.items()} == {
            t.name: {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}[t.dtype] for t in spec.inputs}
        for profile_spec in spec.profiles:  # the recorded profiles are ones TensorRT accepts and reads back
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profile_spec.shapes.items():
                profile.set_shape(name, low, opt, high)
                assert [tuple(s) for s in profile.get_shape(name)] == [low, opt, high]
            assert bool(profile)
    decoder = engines.engines[names.DECODER]
    assert [p.name for p in decoder.profiles] == ["decode", "prefill"]
    assert decoder.tensor(names.past_name(0, "key")).shape[2] == CONTEXT
    layers = decoder.layers
    assert layers["KV_CACHE_UPDATE"] == 2 * manifest.kv.layers and layers["ATTENTION_INPUT"] == manifest.kv.layers
    assert (layers.get("DEQUANTIZE", 0) > 0) == (precision != "fp16")
    assert decoder.kv_aliases[names.present_name(1, "value")] == names.past_name(1, "value")
    assert trt.__version__ == engines.tensorrt_version


@pytest.mark.tensorrt
def test_the_explicit_form_builds_too(trt_fp16_bundle: Path, tiny_pipeline, tmp_path: Path) -> None:
    from pulse_edge.export.build import tensorrt as trt_build
    from pulse_edge.export.graphs.decoder import DecoderShape

    bundle = tmp_path / "explicit"
    shutil.copytree(trt_fp16_bundle, bundle)
    manifest = read_manifest(bundle)
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=manifest.kv.max_length)
    decoder, _ = trt_build.write_decoder(tiny_pipeline.loaded, bundle, shape, None, label="fp16", ops="explicit")
    graphs = {**manifest.graphs, names.DECODER: decoder}
    replace(manifest, graphs=graphs, files=bundle_file_records(bundle)).write(bundle)
    out = build_engines(bundle, EngineBuildOptions(target="rtx", max_context=CONTEXT), progress=lambda line: None)
    layers = read_engines(out, bundle).engines[names.DECODER].layers
    assert "KV_CACHE_UPDATE" not in layers and layers["SCATTER"] == 2 * manifest.kv.layers


@pytest.mark.tensorrt
def test_build_engines_refusals_are_one_line(built: dict[str, Path], tmp_path: Path) -> None:
    cases = [([str(built["bundle-fp8"]), "--target", "rtx", "--compute-capability", "8.6,8.9"],
              "needs compute capability >= 8.9"),
             ([str(built["bundle-fp16"]), "--target", "rtx", "--compute-capability", "8.7"],
              "cannot target Jetson Orin"),
             ([str(built["bundle-fp16"]), "--max-context", "99999"], "--max-context must be between"),
             # an empty CI variable: it built for the build machine's GPU, which an ahead-of-time host has not
             ([str(built["bundle-fp16"]), "--compute-capability", " , "], "names no capability")]
    for args, expected in cases:
        res = CliRunner().invoke(main, ["build-engines", *args, "-o", str(tmp_path / "x")])
        assert res.exit_code == 2 and expected in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists(), res.output
    data = json.loads((built["fp16"] / "engines.json").read_text())
    assert data["engines"]["vision"]["profiles"][0]["shapes"]["pixel_values"][2][0] == 5  # PULSE: 4 tiles + base
    import hashlib

    for engine in data["engines"].values():  # recorded for every load's check (runtime/bundle/engines.py)
        assert engine["sha256"] == hashlib.sha256((built["fp16"] / engine["file"]).read_bytes()).hexdigest()
    from pulse_edge.runtime.bundle.engines import read_engines

    assert read_engines(built["fp16"], built["bundle-fp16"], verify=True).engines.keys() == data["engines"].keys()


def test_an_ort_bundle_is_refused_before_any_tensorrt_import(trt_fp16_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "ort"
    shutil.copytree(trt_fp16_bundle, bundle)
    manifest = read_manifest(bundle)
    graphs = {role: replace(graph, target="ort") for role, graph in manifest.graphs.items()}
    replace(manifest, graphs=graphs).write(bundle)
    res = CliRunner().invoke(main, ["build-engines", str(bundle)])
    assert res.exit_code == 2 and "exported for ONNX Runtime" in res.output and "--target tensorrt" in res.output


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="standard TensorRT is installed here")
def test_jetson_target_without_jetpack_tensorrt_says_how(trt_fp16_bundle: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["build-engines", str(trt_fp16_bundle), "--target", "jetson",
                                    "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "comes with JetPack" in res.output


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_trt_engines_answer_like_onnx_runtime(built: dict[str, Path], ecg_png: Path) -> None:
    """On an NVIDIA GPU: the fp16 engines' greedy tokens equal ONNX Runtime's on the same bundle."""
    from pulse_edge.runtime.inputs.images import load_image
    from pulse_edge.runtime.pipeline import Pipeline

    image, bundle = load_image(ecg_png), built["bundle-fp16"]
    ort = Pipeline.from_bundle(bundle).generate(image, "What is the rhythm?", max_new_tokens=16)
    trt = Pipeline.from_bundle(bundle, backend="trt", engines=built["fp16"]).generate(
        image, "What is the rhythm?", max_new_tokens=16)
    assert trt.token_ids == ort.token_ids and trt.backend == "trt"


def test_profiles_cover_pulse_shapes_and_limits_are_checked(trt_fp16_bundle: Path) -> None:
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.engines.profiles import decoder_profiles, resolve_limits, vision_profiles

    manifest = read_manifest(trt_fp16_bundle)
    limits = resolve_limits(manifest, None, None)
    assert (limits.max_context, limits.max_tiles, limits.max_chunk) == (manifest.kv.max_length, 5, 512)
    (tiles,) = vision_profiles(manifest, limits)
    assert tiles.limits(names.PIXEL_VALUES, 0) == (1, 5)
    decode, prefill = decoder_profiles(manifest, resolve_limits(manifest, 3072, 2))
    # runs of the runtime's 512-position chunk at most: TensorRT sizes the context's scratch for the largest run
    assert decode.limits(names.INPUTS_EMBEDS, 1) == (1, 2) and prefill.limits(names.INPUTS_EMBEDS, 1) == (1, 512)
    assert prefill.shapes[names.INPUTS_EMBEDS][1] == (1, 512, manifest.text.hidden_size)
    assert decode.limits(names.ATTENTION_MASK, 1) == prefill.limits(names.ATTENTION_MASK, 1) == (1, 3072)
    _, whole = decoder_profiles(manifest, resolve_limits(manifest, 3072, 2, 3072))  # one-pass prefills
    assert whole.limits(names.INPUTS_EMBEDS, 1) == (1, 3072) and whole.shapes[names.INPUTS_EMBEDS][1][1] == 512
    for bad in ((manifest.kv.max_length + 1, None), (None, 0), (None, 6), (3072, None, 3073), (3072, None, 1)):
        with pytest.raises(ConfigError, match="must be"):
            resolve_limits(manifest, *bad)
    with pytest.raises(ConfigError, match="must be between 1984 \\(the smallest image's tokens"):
        resolve_limits(manifest, 600, None)  # engines no print fits in: refused before minutes of building


def test_a_context_under_the_runtime_chunk_caps_the_chunk_and_engines_are_tuned_at_half_of_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A layout whose smallest image fits in fewer than 512 positions (not PULSE's, 1984 at least): the default
    chunk is the context, where 512 refused every such bundle; TensorRT tunes for half the context, the length
    most answers run at, not the longest."""
    from types import SimpleNamespace

    from pulse_edge.export.engines import profiles

    monkeypatch.setattr(profiles, "min_context", lambda image: 100)
    monkeypatch.setattr(profiles, "layout_max_tiles", lambda image: 5)
    manifest = SimpleNamespace(kv=SimpleNamespace(max_length=400), image=None, text=SimpleNamespace(hidden_size=8))
    limits = profiles.resolve_limits(manifest, None, None)
    assert limits.max_chunk == 400
    for profile in profiles.decoder_profiles(manifest, limits):
        assert profile.shapes[names.ATTENTION_MASK] == ((1, 1), (1, 200), (1, 400))


def test_a_damaged_bundle_is_refused_before_any_engine_is_built(trt_fp16_bundle: Path, tmp_path: Path) -> None:
    """Engines are tied to the manifest's sha256 only: engines built from a damaged copy would load later."""
    bundle = Path(shutil.copytree(trt_fp16_bundle, tmp_path / "copy"))
    data = bundle / "decoder.onnx.data"
    damaged = bytearray(data.read_bytes())
    damaged[:4096] = bytes(4096)
    data.write_bytes(bytes(damaged))
    res = CliRunner().invoke(main, ["build-engines", str(bundle), "-o", str(tmp_path / "engines")])
    assert res.exit_code == 2 and "decoder.onnx.data is not the file export wrote" in res.output, res.output
    assert not (tmp_path / "engines").exists()


class _Config:
    """A builder config's timing-cache calls, for the standard TensorRT path (TensorRT-RTX has none)."""

    def __init__(self, takes: bool) -> None:
        self.takes, self.set = takes, []

    def create_timing_cache(self, data: bytes) -> bytes | None:
        return None if data == b"damaged" else data  # TensorRT gives None for a file it cannot parse

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        self.set.append(cache)
        return self.takes or cache == b""

    def get_timing_cache(self):
        return type("Cache", (), {"serialize": lambda self: b"tactics"})()


def test_a_timing_cache_of_another_gpu_or_one_that_cannot_be_saved_costs_time_not_engines(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from types import SimpleNamespace

    import pulse_edge.export.engines.build as build

    monkeypatch.setattr(build, "default_trt_cache", lambda: tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "timing-tensorrt-10.3.0.cache").write_bytes(b"other gpu")
    job = SimpleNamespace(trt=SimpleNamespace(name="tensorrt", version="10.3.0"), config=_Config(takes=False), keep=[])
    path = build._timing_cache(job)
    assert job.config.set == [b"other gpu", b""] and "made on another GPU" in caplog.text
    build._save_timing_cache(job, path)
    assert Path(path).read_bytes() == b"tactics" and not list((tmp_path / "cache").glob(".*partial*"))
    Path(path).write_bytes(b"damaged")
    fresh = SimpleNamespace(trt=job.trt, config=_Config(takes=True), keep=[])
    build._timing_cache(fresh)
    assert fresh.config.set == [b""] and "is damaged" in caplog.text
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    build._save_timing_cache(job, str(blocked / "timing.cache"))  # its folder cannot be made: warned, not raised
    assert "could not be saved" in caplog.text
