"""Parity against the emulated reference ("is the graph right?") and fidelity against fp32 ("is the recipe good
enough?"), on a tiny checkpoint with ordinary random weights (initializer_range 0.3, hidden 64), whose recipes
sit far from fp32 (int4's logit cosine ~0.86): a correct quantized graph is exported, with both reports in its
manifest; only --accuracy-gate refuses it for its fidelity. Each deliberately broken graph (block scales x3,
blocks transposed, a smoothing factor dropped on one side, a wrong zero point, codes offset) is refused by
parity, at the site that has the defect, while the unbroken copy of the same bundle passes the same checks.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from pulse_testing.ecgbench_data import ecg_png
from pulse_testing.graph_surgery import Edit, edit_initializers, read_initializer

from pulse_edge.calibration.fidelity import AccuracyGate
from pulse_edge.calibration.recipes import make_recipe
from pulse_edge.export.build.bundle import ExportOptions, bundle_parity, export_bundle, failure_summary
from pulse_edge.export.quant.context import QuantSettings
from pulse_edge.export.validate.parity import ValidationPlan
from pulse_edge.export.validate.tolerances import TOLERANCES
from pulse_edge.runtime.bundle.manifest import read_manifest

RECIPES = ("int8", "int4", "fp8")
RHYTHMS = ("sinus", "afib", "tachycardia", "bradycardia", "first_degree_av_block")
QUESTIONS = (("What is the rhythm?", "Sinus rhythm."), ("Interpret this ECG.", "Normal ECG, no acute changes."),
             ("Which best describes this ECG?\nOptions: A. Atrial fibrillation B. Sinus rhythm", "B"))
BREAK_PLAN = ValidationPlan(prefill_lengths=(5,), decode_steps=1, greedy_runs=0)


@pytest.fixture(scope="module")
def instruct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ECGInstruct-format JSON (id, image, conversations) over rendered prints: 15 items on 5 images."""
    root = tmp_path_factory.mktemp("ecginstruct")
    (root / "images").mkdir()
    records = []
    for i, rhythm in enumerate(RHYTHMS):
        (root / "images" / f"{rhythm}.png").write_bytes(ecg_png(seed=i, rhythm=rhythm))
        for j, (question, answer) in enumerate(QUESTIONS):
            records.append({"id": f"{rhythm}-{j}", "image": f"images/{rhythm}.png",
                            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]})
    path = root / "ecginstruct.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("init03") / "ckpt", TinySpec(init_range=0.3))


@pytest.fixture(scope="module")
def pipeline(checkpoint: Path):
    from pulse_edge.export.model.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(checkpoint, dtype="fp32", device="cpu", fused_projector=False)


@pytest.fixture(scope="module")
def scales(pipeline, instruct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate

    options = CalibrationOptions(data=str(instruct), samples=8)
    return calibrate(pipeline.loaded, pipeline.tokenizer, options).save(tmp_path_factory.mktemp("s") / "scales.npz")


def _options(precision: str, scales: Path, plan: ValidationPlan | None = None, **recipe: Any) -> ExportOptions:
    settings = QuantSettings(make_recipe(precision, **recipe), scales=scales, held_out=2)
    return ExportOptions(precision=precision, plan=plan or ValidationPlan.quick(), quant=settings)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def exported(checkpoint: Path, scales: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Path], dict[str, list[str]]]:
    """The bundles, and the warning lines each export logged (the CLI prints them on stderr)."""
    root = tmp_path_factory.mktemp("bundles")
    options = {p: _options(p, scales) for p in RECIPES}
    made, warned = {}, {}
    for key, option in options.items():
        handler = _Lines()
        logging.getLogger("pulse_edge").addHandler(handler)
        try:
            made[key] = export_bundle(checkpoint, root / key, option)
        finally:
            logging.getLogger("pulse_edge").removeHandler(handler)
        warned[key] = handler.lines
    return made, warned


@pytest.fixture(scope="module")
def bundles(exported: tuple[dict[str, Path], dict[str, list[str]]]) -> dict[str, Path]:
    return exported[0]


# --- acceptance: a correct graph is kept, with both reports ---------------------------------------------------


def test_every_recipe_exports_with_parity_and_fidelity_in_the_manifest(bundles: dict[str, Path]) -> None:
    for precision in RECIPES:
        manifest = read_manifest(bundles[precision])
        validation, fidelity = manifest.validation, manifest.calibration.fidelity
        assert validation["pass"] and validation["reference"] == f"the emulated {precision} reference"
        sites = validation["sites"]
        assert sites["pass"] and {c["site"] for c in sites["decoder"]["checks"]} >= {"layers.0.qkv", "lm_head",
                                                                                     "layers.1.post_norm"}
        assert sites["decoder"]["max_rel_err"] <= TOLERANCES["site"].max_rel_err
        assert len(sites["vision"]["checks"]) == 14  # 2 layers x (q, k, v, o, fc1, fc2) + the projector's 2
        assert all(c["pass"] for c in validation["decoder"]["cases"])
        assert set(fidelity["summary"]) >= {"cosine", "kl", "agreement", "vision_cosine"}
        assert fidelity["ort_session"]["prepack"] is True  # measured as `infer` serves the bundle
        assert fidelity["recommended"]["levels"]
        samples = manifest.calibration.samples
        assert samples["data"].endswith("ecginstruct.json") and samples["count"] == 8


def test_parity_holds_where_fidelity_is_far_from_fp32(bundles: dict[str, Path]) -> None:
    """The int4 recipe's own error on these weights is large; its graph still matches its recipe to ~1e-6."""
    manifest = read_manifest(bundles["int4"])
    assert manifest.calibration.fidelity["summary"]["cosine"] < 0.99
    assert manifest.calibration.fidelity["recommended"]["below"]  # and export said so
    worst = max(s["max_rel_err"] for c in manifest.validation["decoder"]["cases"] for s in [c["prefill"], *c["decode"]])
    assert worst <= 1e-4


def test_the_gate_reads_the_stored_fidelity(bundles: dict[str, Path]) -> None:
    """What `--accuracy-gate 'cosine>=0.99'` decides for each bundle, from its stored report (the CLI run below
    shows the refusal itself)."""
    gate = AccuracyGate.from_string("cosine>=0.99")
    verdicts = {p: gate.check(read_manifest(bundles[p]).calibration.fidelity["summary"]) for p in RECIPES}
    assert verdicts["int4"] and verdicts["fp8"]
    assert all(v[0].startswith("cosine ") for v in verdicts.values() if v)


def test_accuracy_gate_refuses_with_one_line(checkpoint: Path, scales: Path, tmp_path: Path) -> None:
    from pulse_edge.cli.main import main

    out = tmp_path / "gated"
    res = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(out), "--precision", "int4", "--scales",
                                    str(scales), "--validation", "quick", "--held-out", "2",
                                    "--accuracy-gate", "cosine>=0.99"])
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("pulse-edge: error: the quantized bundle falls below --accuracy-gate (cosine ")
    assert not [line for line in lines if "Traceback" in line]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_below_the_recommended_level_export_warns_on_one_line_and_keeps_the_bundle(
        exported: tuple[dict[str, Path], dict[str, list[str]]]) -> None:
    bundles, warned = exported
    for key, path in bundles.items():
        below = read_manifest(path).calibration.fidelity["recommended"]["below"]
        lines = [line for line in warned[key] if "recommended" in line]
        assert len(lines) == (1 if below else 0), (key, warned[key])
        assert all("\n" not in line and line.startswith("warning: ") for line in lines)
    assert warned["int4"]  # its cosine (~0.86 here) is below int4's recommended 0.97


@pytest.mark.slow
@pytest.mark.parametrize("precision", RECIPES)
def test_accuracy_gate_refuses_every_recipe_on_this_checkpoint(precision: str, checkpoint: Path, scales: Path,
                                                               tmp_path: Path) -> None:
    from pulse_edge.cli.main import main

    res = CliRunner().invoke(main, ["export", str(checkpoint), "-o", str(tmp_path / "g"), "--precision", precision,
                                    "--scales", str(scales), "--validation", "quick", "--accuracy-gate",
                                    "cosine>=0.99"])
    assert res.exit_code == 2 and "falls below --accuracy-gate" in res.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []


# --- broken graphs are refused by parity --------------------------------------------------------------------


def _times(factor: float) -> Edit:
    return lambda a: a * np.float32(factor)


def _transpose_blocks(n: int) -> Edit:
    """Blocks laid out [n_blocks, N] where MatMulNBits reads [N, n_blocks] (a packing bug)."""
    def edit(a: np.ndarray) -> np.ndarray:
        blocks = a.reshape(n, -1, *a.shape[2:]) if a.ndim > 1 else a.reshape(n, -1)
        return np.ascontiguousarray(blocks.swapaxes(0, 1)).reshape(a.shape)
    return edit


def _offset_codes(a: np.ndarray) -> np.ndarray:
    """Every stored code one higher: weights written with a zero point off by one."""
    return np.minimum(a.astype(np.int16) + 1, 255).astype(np.uint8)


def _undo_gamma_fold(pipeline, site: str, layer: int) -> Callable[[Any], Edit]:
    """The input scale multiplied into the weights but not divided out of the RMSNorm weight."""
    gamma = pipeline.model.language_model.model.layers[layer].input_layernorm.weight.detach().numpy()
    return lambda a: gamma.astype(a.dtype)


def _undo_weight_fold(pipeline, bundle: Path, site: str) -> dict[str, Edit]:
    """The RMSNorm weight divided by the input scale, the weights stored without it (plain quantization)."""
    from pulse_edge.calibration.quant_math import quantize_blockwise

    attn = pipeline.model.language_model.model.layers[0].self_attn
    weight = np.concatenate([m.weight.detach().numpy() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]).T
    bq = quantize_blockwise(weight, 8, 128)
    return {f"{site}.qweight": lambda _: bq.packed, f"{site}.scales": lambda _: bq.scales}


# (bundle, what is broken, {initializer: edit} or a builder of it, the check expected to name it)
BREAKS: dict[str, tuple[str, Any, str]] = {
    "int8 block scales x3": ("int8", {"layers.0.qkv.scales": _times(3)}, "decoder layers.0.qkv"),
    "int4 block scales x3": ("int4", {"layers.1.down.scales": _times(3)}, "decoder layers.1.down"),
    "int8 blocks transposed": ("int8", {"layers.0.down.qweight": _transpose_blocks(64),
                                        "layers.0.down.scales": _transpose_blocks(64)}, "decoder layers.0.down"),
    "int8 codes offset by one": ("int8", {"layers.1.gate_up.qweight": _offset_codes}, "decoder layers.1.gate_up"),
    "int8 smoothing kept in the norm's weight": ("int8", "gamma", "decoder layers.0.input_norm"),
    "int8 smoothing missing from the weights": ("int8", "weights", "decoder layers.0.qkv"),
    "vision weight zero point 1": ("int8", {"vision.layers.1.fc2.w_zero": lambda a: a + 1},
                                   "vision vision.layers.1.fc2"),
    "vision activation scale x3": ("int4", {"projector.0.x_scale": _times(3)}, "vision projector.0"),
    "fp8 weight scales x3": ("fp8", {"layers.0.gate_up.w_scale": _times(3)}, "decoder layers.0.gate_up"),
}


def _parity(bundle: Path, pipeline, scales: Path, precision: str, **recipe: Any) -> dict[str, Any]:
    from pulse_edge.calibration.scales import Scales
    from pulse_edge.export.graphs.decoder import DecoderShape
    from pulse_edge.export.quant.context import QuantContext

    options = _options(precision, scales, BREAK_PLAN, **recipe)
    quant = QuantContext(settings=options.quant, scales=Scales.load(scales), scales_source=str(scales))
    manifest = read_manifest(bundle)
    plan = quant.decoder_plan(pipeline.loaded, DecoderShape.from_config(pipeline.loaded.config,
                                                                        max_length=manifest.kv.max_length))
    return bundle_parity(pipeline.loaded, bundle, manifest, options, quant, plan)


# The four in the default suite; the other breaks run with --run-slow (each costs a parity run).
DEFAULT_BREAKS = ("int8 block scales x3", "int8 blocks transposed", "int8 smoothing kept in the norm's weight",
                  "vision weight zero point 1")


SLOW_BREAKS = [pytest.param(name, marks=pytest.mark.slow) for name in BREAKS if name not in DEFAULT_BREAKS]


@pytest.mark.parametrize("name", ["unbroken", *DEFAULT_BREAKS, *SLOW_BREAKS])
def test_a_broken_graph_is_refused_by_parity_at_its_site(name: str, bundles: dict[str, Path], pipeline,
                                                         scales: Path, tmp_path: Path) -> None:
    key, edits, where = BREAKS.get(name, ("int8", {}, ""))
    bundle = Path(shutil.copytree(bundles[key], tmp_path / key))
    if edits == "gamma":
        edits = {"layers.0.input_norm.weight": _undo_gamma_fold(pipeline, "layers.0.qkv", 0)}
    elif edits == "weights":
        edits = _undo_weight_fold(pipeline, bundle, "layers.0.qkv")
    for graph in ("decoder.onnx", "vision.onnx"):
        names = {n for n in edits if n.startswith(("vision.", "projector.")) == (graph == "vision.onnx")}
        if names:
            before = {n: read_initializer(bundle / graph, n).copy() for n in names}
            edit_initializers(bundle / graph, {n: edits[n] for n in names})
            assert all(not np.array_equal(read_initializer(bundle / graph, n), before[n]) for n in names)
    report = _parity(bundle, pipeline, scales, key)
    if name == "unbroken":
        assert report["pass"], failure_summary(report)
        return
    assert not report["pass"] and not report["sites"]["pass"]
    assert failure_summary(report).startswith(where + " ("), failure_summary(report)
