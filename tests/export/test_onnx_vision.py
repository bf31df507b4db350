"""The vision graph (tower + projector in one ONNX graph): interface, dynamic tiles, parity, fusions."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pulse_edge.benchmarks.perf.vision_graphs import time_vision_graphs
from pulse_edge.export.fixtures.tiny import FULL_VOCAB, TinySpec, model_config, random_tensor
from pulse_edge.export.graphs.vision import INPUT_NAME, MAX_IR_VERSION, OUTPUT_NAME, export_vision_graph
from pulse_edge.export.model.checkpoint import load_checkpoint, parameters_on_meta
from pulse_edge.export.model.reference import PulseReference
from pulse_edge.export.validate.tolerances import FP16_TOLERANCE, FP32_TOLERANCE, TOLERANCES
from pulse_edge.export.validate.vision import compare_features, random_pixel_values, validate_vision_graph
from pulse_edge.runtime.bundle.manifest import TensorSpec

pytest.importorskip("onnxscript", reason="torch's dynamo ONNX exporter needs onnxscript")

KEYS = ("fp32", "fp16", "fp32-fused", "fp16-fused")


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint: Path) -> PulseReference:
    return load_checkpoint(tiny_checkpoint).model


@pytest.fixture(scope="module")
def graphs(tiny_model: PulseReference, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """{key: (graph path, description)}: "fp32"/"fp16" plain (the default), "fp32-fused"/"fp16-fused" optimized."""
    out: dict[str, tuple[Path, dict]] = {}
    for key in KEYS:
        folder = tmp_path_factory.mktemp(f"vision-{key}")
        description = export_vision_graph(tiny_model, folder, precision=key[:4], optimize=key.endswith("fused"))
        out[key] = (folder / description.file, description)
    return out


def _run(path: Path, pixels: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]


@pytest.mark.parametrize("key", KEYS)
def test_description_matches_the_file(graphs: dict[str, tuple[Path, dict]], tiny_model: PulseReference,
                                      key: str) -> None:
    path, description = graphs[key]
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    hidden = tiny_model.cfg.text.hidden_size
    assert description.file == path.name == "vision.onnx"
    assert description.precision == key[:4]
    assert description.external_data is None  # the tiny model stays inline
    assert description.inputs == (TensorSpec(INPUT_NAME, "float32", ("tiles", 3, 336, 336)),)
    assert description.outputs == (TensorSpec(OUTPUT_NAME, "float32", ("tiles", 576, hidden)),)
    assert [i.name for i in proto.graph.input] == [INPUT_NAME]
    assert [o.name for o in proto.graph.output] == [OUTPUT_NAME]
    assert proto.ir_version == description.ir_version <= MAX_IR_VERSION
    assert description.opset >= 17


def test_optimized_graphs_carry_ort_fusions_and_plain_ones_none(graphs: dict[str, tuple[Path, dict]],
                                                                tiny_model: PulseReference) -> None:
    layers = tiny_model.cfg.vision.layers_used
    for precision in ("fp32", "fp16"):
        fused, plain = graphs[f"{precision}-fused"][1], graphs[precision][1]
        assert fused.fusions
        assert fused.fusions["Attention"] == layers
        assert fused.fusions["QuickGelu"] == layers
        assert fused.fusions["BiasGelu"] == 1  # the projector's bias + GELU(erf)
        assert plain.fusions == {}
        domains = {n.domain for n in onnx.load(str(graphs[precision][0])).graph.node}
        assert domains <= {""}, "the plain graph must use standard ops only (TensorRT parses it)"


@pytest.mark.parametrize("key", ["fp16", "fp16-fused"])
def test_fp16_graph_computes_in_fp16_behind_float32_casts(graphs: dict[str, tuple[Path, dict]], key: str) -> None:
    graph = onnx.load(str(graphs[key][0])).graph
    float_weights = {t.data_type for t in graph.initializer if t.data_type in (onnx.TensorProto.FLOAT,
                                                                               onnx.TensorProto.FLOAT16)}
    assert float_weights == {onnx.TensorProto.FLOAT16}
    consumers = [n for n in graph.node if INPUT_NAME in n.input and n.op_type != "Shape"]  # Shape reads dims only
    producer = next(n for n in graph.node if OUTPUT_NAME in n.output)
    assert [n.op_type for n in consumers] == ["Cast"]
    assert onnx.helper.get_attribute_value(consumers[0].attribute[0]) == onnx.TensorProto.FLOAT16
    assert producer.op_type == "Cast"
    assert onnx.helper.get_attribute_value(producer.attribute[0]) == onnx.TensorProto.FLOAT


@pytest.mark.parametrize("key", KEYS)
def test_one_graph_serves_any_number_of_tiles(graphs: dict[str, tuple[Path, dict]], tiny_model: PulseReference,
                                              key: str) -> None:
    session = ort.InferenceSession(str(graphs[key][0]), providers=["CPUExecutionProvider"])
    for tiles in (1, 2, 5):
        out = session.run([OUTPUT_NAME], {INPUT_NAME: random_pixel_values(tiles, tiny_model.cfg.image, seed=1)})[0]
        assert out.dtype == np.float32
        assert out.shape == (tiles, 576, tiny_model.cfg.text.hidden_size)


@pytest.mark.parametrize("key", KEYS)
def test_parity_with_the_torch_reference(graphs: dict[str, tuple[Path, dict]], tiny_model: PulseReference,
                                         key: str) -> None:
    report = validate_vision_graph(tiny_model, graphs[key][0], tile_counts=(1, 2, 5))
    tolerance = FP16_TOLERANCE if key.startswith("fp16") else FP32_TOLERANCE
    assert report["pass"] is True, report
    assert report["tolerance"] == {"max_rel_err": tolerance.max_rel_err, "min_cosine": tolerance.min_cosine}
    assert [s["tiles"] for s in report["shapes"]] == [1, 2, 5]
    for shape in report["shapes"]:
        assert shape["max_rel_err"] <= tolerance.max_rel_err and shape["cosine"] >= tolerance.min_cosine
        assert shape["max_abs_err"] > 0  # a real comparison, not a graph compared with itself


def test_a_bf16_model_is_validated_against_an_fp32_copy_of_its_weights(tiny_model: PulseReference,
                                                                         tmp_path: Path) -> None:
    """The bundle loads big checkpoints in bf16; the fp32 graph of those weights must still pass fp32 parity."""
    bf16 = copy.deepcopy(tiny_model).to(torch.bfloat16)
    export_vision_graph(bf16, tmp_path)
    report = validate_vision_graph(bf16, tmp_path / "vision.onnx", tile_counts=(2,))
    assert report["pass"] is True, report
    assert report["precision"] == "fp32" and report["reference"] == "fp32 copy of the torch.bfloat16 weights"
    assert bf16.dtype == torch.bfloat16


def test_fp16_tolerance_is_looser_than_fp32() -> None:
    assert TOLERANCES["fp16"].max_rel_err > TOLERANCES["fp32"].max_rel_err
    assert TOLERANCES["fp16"].min_cosine < TOLERANCES["fp32"].min_cosine


def test_validation_catches_a_wrong_graph(graphs: dict[str, tuple[Path, dict]], tiny_model: PulseReference) -> None:
    """The graph of the original weights, checked against a model whose projector was perturbed."""
    perturbed = copy.deepcopy(tiny_model)
    weight = perturbed.mm_projector[2].weight
    with torch.no_grad():
        weight.add_(0.05 * weight.abs().mean() * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    report = validate_vision_graph(perturbed, graphs["fp32"][0], tile_counts=(1, 2))
    assert report["pass"] is False
    assert all(not s["pass"] for s in report["shapes"])


def test_a_wrong_shape_fails_without_raising() -> None:
    ref = np.ones((2, 576, 8), dtype=np.float32)
    verdict = compare_features(ref, ref[:1], FP32_TOLERANCE)
    assert verdict["pass"] is False and "shape" in verdict["error"]


def test_external_data_when_forced_and_no_stale_file_after(tiny_model: PulseReference, tmp_path: Path,
                                                           graphs: dict[str, tuple[Path, dict]]) -> None:
    external = export_vision_graph(tiny_model, tmp_path, external_data_threshold=0)
    graph, data = tmp_path / "vision.onnx", tmp_path / "vision.onnx.data"
    assert external.external_data == "vision.onnx.data" and data.is_file()
    assert data.stat().st_size > graph.stat().st_size
    assert data.stat().st_mode & 0o777 == graph.stat().st_mode & 0o777  # not onnx's private 0600
    pixels = random_pixel_values(2, tiny_model.cfg.image, seed=3)
    np.testing.assert_allclose(_run(graph, pixels), _run(graphs["fp32"][0], pixels), rtol=0, atol=1e-6)
    inline = export_vision_graph(tiny_model, tmp_path)  # same folder, now small enough
    assert inline.external_data is None and not data.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx"]  # no temporary folder left


def test_export_leaves_the_model_as_it_was(tiny_model: PulseReference, tmp_path: Path) -> None:
    before = tiny_model.vision_features(torch.from_numpy(random_pixel_values(1, tiny_model.cfg.image, seed=4)))
    export_vision_graph(tiny_model, tmp_path, precision="fp16", optimize=False)
    assert tiny_model.vision_tower.config._attn_implementation == "sdpa"
    assert not any(m.training for m in tiny_model.modules())
    assert tiny_model.dtype == torch.float32
    after = tiny_model.vision_features(torch.from_numpy(random_pixel_values(1, tiny_model.cfg.image, seed=4)))
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_timing_reports_median_min_max_per_graph_and_tile_count(graphs: dict[str, tuple[Path, dict]]) -> None:
    times = time_vision_graphs({"plain": graphs["fp32"][0], "fused": graphs["fp32-fused"][0]}, tile_counts=(1, 2),
                               rounds=2)
    assert sorted(times) == ["fused", "plain"]
    for per_tiles in times.values():
        assert sorted(per_tiles) == [1, 2]
        assert all(0 < t["min"] <= t["median"] <= t["max"] for t in per_tiles.values())


def test_unknown_precision_is_refused(tiny_model: PulseReference, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="precision"):
        export_vision_graph(tiny_model, tmp_path, precision="int8")


def _real_shape_vision_model() -> PulseReference:
    """PULSE-7B's vision tower and projector with random weights; the decoder stays on the meta device."""
    cfg = model_config(TinySpec(full_shape=True), FULL_VOCAB)
    with parameters_on_meta():
        model = PulseReference(cfg)
    model.drop_unused_vision_layers()
    for index, (name, param) in enumerate(list(model.named_parameters())):
        if name.startswith(("vision_tower.", "mm_projector.")):
            generator = torch.Generator().manual_seed(index)
            module_name, _, leaf = name.rpartition(".")
            value = random_tensor(name, tuple(param.shape), generator, torch.float32)
            model.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    return model.eval()


@pytest.mark.slow
def test_real_shape_export_writes_external_data_and_matches(tmp_path: Path) -> None:
    model = _real_shape_vision_model()
    description: dict[str, Any] = export_vision_graph(model, tmp_path, optimize=True)
    assert description.external_data == "vision.onnx.data"
    assert description.outputs[0].shape == ("tiles", 576, 4096)
    assert description.fusions["Attention"] == 23
    report = validate_vision_graph(model, tmp_path / "vision.onnx", tile_counts=(1, 2))
    assert report["pass"] is True, report
