"""Parity against the emulated reference ("is the graph right?") and fidelity against fp32 ("is the recipe good
enough?"), on a tiny checkpoint with ordinary random weights (initializer_range 0.3, hidden 64), whose recipes
sit far from fp32 (int4's logit cosine ~0.86): a correct quantized graph is exported, with both reports in its
manifest; only --accuracy-gate refuses it for its fidelity. Each deliberately broken graph (block scales x3,
blocks transposed, a smoothing factor dropped on one side, a wrong zero point, codes offset) is refused by
parity, at the site that has the defect, while the unbroken copy of the same bundle passes the same checks.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from pulse_testing.ecgbench_data import ecg_png
from pulse_testing.graph_surgery import Edit, edit_initializers, read_initializer

from pulse_edge.calibration.fidelity import AccuracyGate
from pulse_edge.calibration.recipes import make_recipe
from pulse_edge.calibration.scales import Scales
from pulse_edge.export.build.bundle import ExportOptions, bundle_parity, failure_summary
from pulse_edge.export.quant.context import QuantSettings
from pulse_edge.export.validate.parity import ValidationPlan
from pulse_edge.export.validate.tolerances import RECOMMENDED_FIDELITY, TOLERANCES
from pulse_edge.runtime.bundle.integrity import bundle_file_records
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
    """`pulse-edge make-tiny --init-range 0.3`: LLaVA layout, hidden 64, ordinary random weights."""
    out = tmp_path_factory.mktemp("init03") / "ckpt"
    _cli("make-tiny", str(out), "--init-range", "0.3")
    assert json.loads((out / "config.json").read_text())["hidden_size"] == 64
    return out


@pytest.fixture(scope="module")
def pipeline(checkpoint: Path):
    from pulse_edge.export.model.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(checkpoint, dtype="fp32", device="cpu", fused_projector=False)


@pytest.fixture(scope="module")
def scales(checkpoint: Path, instruct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pulse-edge calibrate` on the ECGInstruct-format file: 8 of its 15 items (the rest are held out)."""
    out = tmp_path_factory.mktemp("s") / "scales.npz"
    said = _cli("-q", "calibrate", str(checkpoint), "--data", str(instruct), "--samples", "8", "-o", str(out)).output
    assert "calibrated on sample" not in said and f"wrote {out}: 8 samples" in said  # -q: the result, no progress
    return out


def _cli(*args: str, code: int = 0) -> Any:
    from pulse_edge.cli.main import main

    res = CliRunner().invoke(main, list(args))
    assert res.exit_code == code, (res.output, res.exception)
    return res


def _options(precision: str, scales: Path, plan: ValidationPlan | None = None, **recipe: Any) -> ExportOptions:
    settings = QuantSettings(make_recipe(precision, **recipe), scales=scales, held_out=2)
    return ExportOptions(precision=precision, plan=plan or ValidationPlan.quick(), quant=settings)


def _export_args(checkpoint: Path, scales: Path, out: Path, precision: str) -> list[str]:
    return ["export", str(checkpoint), "-o", str(out), "--precision", precision, "--scales", str(scales),
            "--validation", "quick", "--held-out", "2"]


@dataclass(frozen=True)
class Exported:
    path: Path
    scales: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="module")
def exports(checkpoint: Path, scales: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """`pulse-edge export --scales` per recipe, run once each on first use (the slow tests ask for int4 / fp8)."""
    root, made = tmp_path_factory.mktemp("bundles"), {}

    def get(precision: str) -> Exported:
        if precision not in made:
            res = _cli(*_export_args(checkpoint, scales, root / precision, precision))
            made[precision] = Exported(root / precision, scales, res.stdout, res.stderr)
        return made[precision]
    return get


SLOW = pytest.mark.slow  # one more export each (~20 s on 2 busy cores)
PRECISIONS = ["int8", pytest.param("int4", marks=SLOW), pytest.param("fp8", marks=SLOW)]


# --- acceptance: a correct graph is kept, with both reports ---------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_recipe_exports_with_parity_and_fidelity_in_the_manifest(precision: str,
                                                                     exports: Callable[[str], Exported]) -> None:
    made = exports(precision)
    manifest = read_manifest(made.path)
    validation, fidelity = manifest.validation, manifest.calibration.fidelity
    assert validation["pass"] and validation["reference"] == f"the emulated {precision} reference"
    assert f"validated against the emulated {precision} reference" in made.stdout
    sites = validation["sites"]
    assert sites["pass"] and {c["site"] for c in sites["decoder"]["checks"]} >= {"layers.0.qkv", "lm_head",
                                                                                 "layers.1.post_norm"}
    assert sites["decoder"]["max_rel_err"] <= TOLERANCES["site"].max_rel_err
    assert len(sites["vision"]["checks"]) == 14  # 2 layers x (q, k, v, o, fc1, fc2) + the projector's 2
    assert all(c["pass"] for c in validation["decoder"]["cases"])
    assert set(fidelity["summary"]) >= {"cosine", "kl", "agreement", "vision_cosine"}
    summary = fidelity["summary"]  # what the gate and the warning read: each the figure of its own report
    assert (summary["cosine"], summary["kl"], summary["vision_cosine"], summary["agreement"]) == (
        fidelity["decoder"]["cosine"], fidelity["decoder"]["kl"], fidelity["vision"]["cosine"],
        fidelity["greedy"]["agreement"])
    assert {r["run"] for r in sites["decoder"]["checks"]} >= {"decode"}  # MatMulNBits' M = 1 path is probed
    assert [s["tiles"] for s in validation["vision"]["shapes"]] == [1, 5]
    if precision == "int4":  # AWQ's scales folded into every decoder layer's sites
        assert {"layers.0.qkv", "layers.1.down"} <= set(manifest.calibration.smoothed_or_scaled_sites)
    assert fidelity["ort_session"]["prepack"] is True  # measured as `infer` serves the bundle
    assert fidelity["recommended"]["levels"] == RECOMMENDED_FIDELITY[precision]
    samples = manifest.calibration.samples
    assert samples["data"].endswith("ecginstruct.json") and samples["count"] == 8
    assert not set(fidelity["held_out"]) & set(Scales.load(made.scales).samples["ids"])


@pytest.mark.parametrize("precision", PRECISIONS)
def test_below_the_recommended_level_export_warns_on_one_stderr_line_and_keeps_the_bundle(
        precision: str, exports: Callable[[str], Exported]) -> None:
    made = exports(precision)
    below = read_manifest(made.path).calibration.fidelity["recommended"]["below"]
    warnings = [line for line in made.stderr.splitlines() if line.startswith("pulse-edge: warning:")]
    assert len(warnings) == (1 if below else 0), made.stderr
    assert all("below the level recommended for" in line and "; ".join(below) in line for line in warnings)
    assert (made.path / "manifest.json").exists()
    if precision == "int4":
        assert below  # its cosine (~0.86 here) is below int4's recommended 0.97


def test_an_int8_bundle_below_a_stricter_level_warns_once_and_is_kept(checkpoint: Path, scales: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The default suite's own case of the warning (int8 meets its real level, so the test above sees none
    without --run-slow): the level raised past what this int8 export reaches."""
    import pulse_edge.export.validate.fidelity as fidelity

    levels = "cosine>=0.9999999,vision_cosine>=0.99"
    monkeypatch.setattr(fidelity, "RECOMMENDED_FIDELITY", {"int8": levels})
    res = _cli(*_export_args(checkpoint, scales, tmp_path / "int8", "int8"))
    warnings = [line for line in res.stderr.splitlines() if line.startswith("pulse-edge: warning:")]
    below = read_manifest(tmp_path / "int8").calibration.fidelity["recommended"]["below"]
    assert len(below) == 1 and below[0].startswith("cosine ")
    assert warnings == [f"pulse-edge: warning: this int8 bundle's fidelity against fp32 is below the level recommended "
                        f"for int8 ({below[0]}; recommended {levels}): its answers may depart from the fp32 model's; "
                        "the report is in manifest.json (calibration.fidelity); --accuracy-gate refuses such bundles"]


@pytest.mark.slow
def test_parity_holds_where_fidelity_is_far_from_fp32(exports: Callable[[str], Exported]) -> None:
    """The int4 recipe's own error on these weights is large; its graph still matches its recipe to ~1e-6."""
    manifest = read_manifest(exports("int4").path)
    assert manifest.calibration.fidelity["summary"]["cosine"] < 0.99
    assert manifest.calibration.fidelity["recommended"]["below"]  # and export said so
    worst = max(s["max_rel_err"] for c in manifest.validation["decoder"]["cases"] for s in [c["prefill"], *c["decode"]])
    assert worst <= 1e-4


# The gate, 'cosine>=0.99', refuses int4 and fp8 on this checkpoint; int8 (weight-only) keeps a logit
# cosine above 0.99 here (docs/quantization.md has the figures), so a gate just above its own figure refuses it.
GATES = {"int8": "cosine>=0.9995", "int4": "cosine>=0.99", "fp8": "cosine>=0.99"}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_gate_decides_from_the_stored_fidelity(precision: str, exports: Callable[[str], Exported]) -> None:
    summary = read_manifest(exports(precision).path).calibration.fidelity["summary"]
    refusal = AccuracyGate.from_string(GATES[precision]).check(summary)
    assert refusal and refusal[0].startswith("cosine ")
    assert bool(AccuracyGate.from_string("cosine>=0.99").check(summary)) == (precision != "int8")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_accuracy_gate_refuses_the_same_export_with_one_line(precision: str, checkpoint: Path, scales: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "gated"
    res = _cli(*_export_args(checkpoint, scales, out, precision), "--accuracy-gate", GATES[precision], code=2)
    # the refusal alone: no fidelity warning before it. Where this CPU runs the bf16 prefill kernel, its segments
    # may be dropped with a notice of their own (rounding on this outlier model, export/build/segments.py): not
    # the fidelity's, and not this test's subject
    lines = [line for line in res.stderr.splitlines() if line.startswith("pulse-edge:")
             and "the CPU attention kernel's bf16 rounding" not in line]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pulse-edge: error: the quantized bundle falls below --accuracy-gate (cosine ")
    assert "Traceback" not in res.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


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


def _offset_int8_codes(a: np.ndarray) -> np.ndarray:
    """The prefill graph's int8 codes (per output channel) one higher."""
    return np.minimum(a.astype(np.int16) + 1, 127).astype(np.int8)


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
    "int8 prefill graph codes offset by one": ("int8", {"prefill:layers.1.gate_up.qweight": _offset_int8_codes},
                                               "prefill graph layers.1.gate_up"),
    "int8 smoothing kept in the norm's weight": ("int8", "gamma", "decoder layers.0.input_norm"),
    "int8 smoothing missing from the weights": ("int8", "weights", "decoder layers.0.qkv"),
    "vision activation scale x3": ("int4", {"projector.0.x_scale": _times(3)}, "vision projector.0"),
    "fp8 weight scales x3": ("fp8", {"layers.0.gate_up.w_scale": _times(3)}, "decoder layers.0.gate_up"),
}


def _parity(bundle: Path, pipeline, scales: Path, precision: str, **recipe: Any) -> dict[str, Any]:
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
                  "int8 codes offset by one", "int8 prefill graph codes offset by one")
PREFILL_EDIT = "prefill:"  # an edit of the CPU recipe's prefill graph (prefill.onnx), not the decoder graph's


def _graph_of(name: str) -> str:
    if name.startswith(PREFILL_EDIT):
        return "prefill.onnx"
    return "vision.onnx" if name.startswith(("vision.", "projector.")) else "decoder.onnx"


SLOW_BREAKS = [pytest.param(name, marks=pytest.mark.slow) for name in BREAKS if name not in DEFAULT_BREAKS]


@pytest.mark.parametrize("name", ["unbroken", *DEFAULT_BREAKS, *SLOW_BREAKS])
def test_a_broken_graph_is_refused_by_parity_at_its_site(name: str, exports: Callable[[str], Exported], pipeline,
                                                         scales: Path, tmp_path: Path) -> None:
    key, edits, where = BREAKS.get(name, ("int8", {}, ""))
    bundle = Path(shutil.copytree(exports(key).path, tmp_path / key))
    if edits == "gamma":
        edits = {"layers.0.input_norm.weight": _undo_gamma_fold(pipeline, "layers.0.qkv", 0)}
    elif edits == "weights":
        edits = _undo_weight_fold(pipeline, bundle, "layers.0.qkv")
    for graph in ("decoder.onnx", "vision.onnx", "prefill.onnx"):
        graph_edits = {n.removeprefix(PREFILL_EDIT): edit for n, edit in edits.items() if _graph_of(n) == graph}
        if graph_edits:
            before = {n: read_initializer(bundle / graph, n).copy() for n in graph_edits}
            edit_initializers(bundle / graph, graph_edits)
            assert all(not np.array_equal(read_initializer(bundle / graph, n), before[n]) for n in graph_edits)
    # The integrity checks would refuse the edited files before parity sees them (tests/runtime/
    # test_bundle_integrity.py); record them as export would, so the graph itself is what is judged.
    replace(read_manifest(bundle), files=bundle_file_records(bundle)).write(bundle)
    report = _parity(bundle, pipeline, scales, key)
    if name == "unbroken":
        assert report["pass"], failure_summary(report)
        assert report["decoder"]["prefill_graph"]["sites"]["pass"]  # the prefill graph's sites were checked too
        return
    prefill_sites = report["decoder"]["prefill_graph"]["sites"]
    assert not report["pass"] and not (report["sites"]["pass"] and prefill_sites["pass"])
    assert failure_summary(report).startswith(where + " ("), failure_summary(report)


@pytest.mark.slow  # one more export (~17 s)
def test_a_tensorrt_ready_export_is_judged_against_its_emulated_recipe(checkpoint: Path, scales: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "trt"
    res = _cli(*_export_args(checkpoint, scales, out, "int8"), "--target", "tensorrt")
    validation = read_manifest(out).validation
    assert validation["pass"] and validation["tolerance_level"] == "int8 tensorrt"
    assert validation["reference"] == "the emulated int8 reference" and "sites" not in validation
    assert "for TensorRT" in res.stdout and "validated against the emulated int8 reference" in res.stdout
