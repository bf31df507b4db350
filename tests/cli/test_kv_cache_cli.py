"""`pulse-edge export --kv-cache fp16` for an fp32 bundle: written, validated against the reference caching the same
way, its fidelity against fp32 recorded, served; and the caches an fp32 export cannot have refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from pulse_edge.cli.main import main
from pulse_edge.runtime.bundle.manifest import read_manifest


def test_an_fp32_export_with_an_fp16_cache_is_validated_measured_and_served(tiny_checkpoint: Path, tmp_path: Path,
                                                                           ecg_png: Path) -> None:
    out = tmp_path / "fp32-kv16"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--kv-cache", "fp16",
                                    "--validation", "quick", "--held-out", "1", "--accuracy-gate", "cosine>=0.999"])
    assert res.exit_code == 0, res.output
    assert "validated against the torch reference with an fp16 KV cache" in res.output
    assert "fidelity against the fp32 torch reference on 1 held-out samples (its fp16 KV cache)" in res.output
    manifest = read_manifest(out)
    assert manifest.precision == "fp32" and manifest.kv.dtype == "float16" and manifest.kv.scales is None
    validation = manifest.validation
    assert validation["pass"] and validation["tolerance_level"] == "fp32+fp16_kv"
    assert not validation["greedy"]["required_equal"]  # a near-tie may flip under the rounding: recorded, not required
    summary = validation["fidelity"]["summary"]  # what the cache costs against fp32
    assert 0.999 < summary["cosine"] < 1.0 and 0.0 <= summary["kl"] < 1e-3, summary
    assert validation["fidelity"]["held_out"] and np.isfinite(summary["rel_err"])
    served = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(out), "--json", "--max-new-tokens", "4"])
    assert served.exit_code == 0, served.output
    assert json.loads(served.stdout)["generated_tokens"] >= 1


def test_float_cache_refusals_are_one_line(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """int8 needs calibrated scales; a gate on the float cache has nothing to judge; a gate the fp16 cache misses
    writes nothing (cosine > 1 cannot be met)."""
    cases = {"--precision int8 or int4": ["--kv-cache", "int8"],
             "this float bundle is the reference itself": ["--accuracy-gate", "cosine>=0.99"],
             "this bundle with an fp16 KV cache falls below --accuracy-gate": [
                 "--kv-cache", "fp16", "--accuracy-gate", "cosine>=1.01", "--validation", "quick", "--held-out", "1"]}
    for expected, extra in cases.items():
        out = tmp_path / "never"
        res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), *extra])
        assert res.exit_code == 2, res.output
        assert expected in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def test_an_int8_export_with_an_fp16_cache_keeps_it_in_both_decoder_graphs(tiny_checkpoint: Path,
                                                                           tmp_path: Path) -> None:
    """The CPU recipe's decode and prefill graphs share one cache: both fp16 here, each checked against the emulated
    int8 reference caching in fp16 (its sites too, on the graphs' own inputs)."""
    scales = tmp_path / "scales.npz"
    assert CliRunner().invoke(main, ["calibrate", str(tiny_checkpoint), "--samples", "2", "-o", str(scales)]
                              ).exit_code == 0
    out = tmp_path / "int8-kv16"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--precision", "int8",
                                    "--kv-cache", "fp16", "--scales", str(scales), "--validation", "quick",
                                    "--held-out", "1"])
    assert res.exit_code == 0, res.output
    manifest = read_manifest(out)
    assert manifest.kv.dtype == "float16" and set(manifest.graphs) == {"vision", "decoder", "prefill"}
    caches = [g.tensor("past_key_values.0.key").dtype for name, g in manifest.graphs.items() if name != "vision"]
    assert caches == ["float16", "float16"]
    validation = manifest.validation
    assert validation["pass"] and validation["decoder"]["prefill_graph"]["pass"]
    assert validation["reference"] == "the emulated int8 reference with an fp16 KV cache"
    assert manifest.calibration.recipe["kv_cache"] == "fp16"
    # served: long prompts in the prefill graph's own chunk (int8 GEMMs run faster on more rows), unless asked
    from pulse_edge.runtime.engines.bundle_engine import DEFAULT_PREFILL_CHUNK, PREFILL_GRAPH_CHUNK
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.pipeline import Pipeline

    assert Pipeline.from_bundle(out).engine.prefill_chunk == PREFILL_GRAPH_CHUNK
    assert Pipeline.from_bundle(out, prefill_chunk=256).engine.prefill_chunk == 256
    without = Pipeline.from_bundle(out, session=SessionConfig(prefill_graph="off"))
    assert without.prefilled_by == "decoder graph" and without.engine.prefill_chunk == DEFAULT_PREFILL_CHUNK
