"""`pulse-edge calibrate` and `export --precision int4/int8` from the command line, errors included."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pulse_edge.calibration.scales import Scales
from pulse_edge.cli.main import main


def test_calibrate_then_export_int4_with_those_scales(tiny_checkpoint: Path, tmp_path: Path) -> None:
    scales = tmp_path / "scales.npz"
    res = CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--samples", "3", "--method", "percentile",
                                    "-o", str(scales)])
    assert res.exit_code == 0, res.output
    assert "layers.0.qkv" in res.output and "wrote" in res.output
    loaded = Scales.load(scales)
    assert loaded.method == "percentile" and loaded.samples["count"] == 3
    umask = os.umask(0)
    os.umask(umask)
    assert scales.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600: another user exports with them
    assert [p.name for p in tmp_path.iterdir()] == ["scales.npz"]  # nothing temporary left beside it
    out = tmp_path / "b4"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--precision", "int4",
                                    "--scales", str(scales), "--validation", "quick", "--held-out", "1",
                                    "--int4-method", "rtn", "--block-size", "32"])
    assert res.exit_code == 0, res.output
    assert "fidelity against the fp32 torch reference on 1 held-out samples" in res.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["calibration"]["recipe"]["int4_method"] == "rtn"
    assert manifest["calibration"]["recipe"]["block_size"] == 32
    assert manifest["calibration"]["method"] == "percentile"
    assert manifest["calibration"]["smoothed_or_scaled_sites"] == []  # rtn: no AWQ scales folded


@pytest.mark.parametrize(("precision", "extra", "named"), [
    ("fp32", ["--scales", "s.npz"], "--scales"), ("fp16", ["--keep", "lm_head"], "--keep"),
    ("int4", ["--int8-decoder", "w8a8"], "--int8-decoder"), ("int8", ["--int4-method", "rtn"], "--int4-method"),
    ("fp8", ["--block-size", "64"], "--block-size"), ("fp32", ["--no-prefill-graph"], "--no-prefill-graph"),
    ("int4", ["--smooth-alpha", "0.5"], "--smooth-alpha"),  # SmoothQuant: int8's w8 / w8a8 sites only
    ("int8", ["--scales", "s.npz", "--calibration-samples", "8"], "--calibration-samples (the scales file's"),
    ("int8", ["--int8-decoder", "w8a8", "--block-size", "64"], "--block-size"),  # per channel: no blocks
    ("int4", ["--target", "tensorrt", "--no-prefill-graph"], "--no-prefill-graph"),  # the CPU recipes' graph
    ("fp32", ["--held-out", "3"], "--held-out"),  # no fidelity report to hold them: ignored, exit 0
    ("fp16", ["--kv-cache", "fp16", "--held-out", "3"], "--held-out"),  # fp16's cache is no recipe: no report
])
def test_a_quantization_option_the_precision_does_not_read_is_refused(tiny_checkpoint: Path, tmp_path: Path,
                                                                      precision: str, extra: list[str],
                                                                      named: str) -> None:
    """The manifest would record a recipe knob that did nothing: refused in one line before any work."""
    out = tmp_path / "never"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--precision", precision,
                                    *extra])
    assert res.exit_code == 2 and res.output.startswith(f"pulse-edge: error: {named}"), res.output
    assert (f"not used by an export at --precision {precision} (--target " in res.output
            or "this bundle has none: leave it out" in res.output) and not out.exists()
    assert len(res.output.strip().splitlines()) == 1


def test_quantization_errors_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    cases = {
        "does not exist; make it with pulse-edge calibrate": ["--scales", str(tmp_path / "none.npz")],
        "is a directory; --scales takes the .npz file": ["--scales", str(tmp_path)],
        # numpy's own line invited a pickled load ("If you trust the file ... allow_pickle=")
        "x.json is not an .npz archive": ["--scales", str(tmp_path / "x.json")],
        "--accuracy-gate": ["--accuracy-gate", "speed>=9"],
        "--smooth-alpha must be": ["--smooth-alpha", "lots"],
    }
    for expected, extra in cases.items():
        out = tmp_path / "never"
        res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--precision", "int8",
                                        *extra])
        assert res.exit_code == 2, res.output
        assert expected in res.output and "Traceback" not in res.output and "pickle" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def test_calibrate_refuses_unknown_data(tiny_checkpoint: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--data", str(tmp_path / "x.txt"),
                                    "-o", str(tmp_path / "s.npz")])
    assert res.exit_code == 2 and "not a calibration source" in res.output
    assert not (tmp_path / "s.npz").exists()


def test_keep_typos_and_damaged_scales_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    scales = tmp_path / "scales.npz"
    assert CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--samples", "2", "-o", str(scales)]
                              ).exit_code == 0
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(scales.read_bytes()[: scales.stat().st_size // 2])
    cases = {"names no layer": ["--scales", str(scales), "--keep", "lm-head"],
             "not a pulse-edge scales file": ["--scales", str(damaged)]}
    for expected, extra in cases.items():
        res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "never"),
                                        "--precision", "int4", *extra])
        assert res.exit_code == 2 and expected in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "never").exists()


def test_vision_rewrite_refuses_a_graph_whose_weights_it_cannot_find(tiny_pipeline, tmp_path: Path) -> None:
    """A vision graph that is not the model's own (here: one Linear changed after export) must not be
    half-quantized and labelled int8."""
    import copy

    import pytest
    import torch

    from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
    from pulse_edge.calibration.recipes import make_recipe
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.graphs.vision import export_vision_graph
    from pulse_edge.export.quant.apply import quantize_vision_graph

    scales = calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=2))
    export_vision_graph(tiny_pipeline.model, tmp_path)
    changed = copy.deepcopy(tiny_pipeline.model)
    with torch.no_grad():
        changed.vision_tower.encoder.layers[0].mlp.fc1.weight.add_(1e-3)
    with pytest.raises(ConfigError, match=r"vision\.layers\.0\.fc1"):
        quantize_vision_graph(tmp_path / "vision.onnx", changed, make_recipe("int8"), scales)
    counts = quantize_vision_graph(tmp_path / "vision.onnx", tiny_pipeline.model, make_recipe("int8"), scales)
    assert counts[make_recipe("int8").vision] == 14  # 6 Linears x 2 layers + the projector's 2
