"""The decoder graphs cut at their attentions (export/graphs/segments.py) and run with the CPU attention kernels
(runtime/engines/segmented.py), on an int8 bundle of the tiny model: the prefill graph with the bf16 kernel (AMX
or AVX-512 BF16), the decode graph with the AVX-512 one.

Where a kernel cannot run (no AVX-512 BF16 or AVX-512, or no compiler) the export writes no segments for its graph:
those tests skip with the kernel's reason; the fallback tests run everywhere.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from pulse_testing.manifests import edit_manifest

from pulse_edge.errors import BundleError, ConfigError, KernelUnavailable
from pulse_edge.export.graphs.segments import build_segments
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import Manifest, read_manifest
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.kernels.attention import DECODE, PREFILL, CausalAttention
from pulse_edge.runtime.pipeline import Pipeline

LAYERS = 2  # the tiny decoder


@pytest.fixture(scope="module")
def kernel_here(kernel_or_skip: Callable[..., Any]) -> None:
    kernel_or_skip(CausalAttention.load, "the export writes no segments here: ")


@pytest.fixture(scope="module")
def decode_kernel_here(kernel_or_skip: Callable[..., Any]) -> None:
    kernel_or_skip(lambda: CausalAttention.load(DECODE), "the export writes no decode segments here: ")


@pytest.fixture(scope="module")
def bundle(cpu_int8_bundle: Path) -> Path:
    return cpu_int8_bundle


def _embeds(length: int, hidden: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, length, hidden)) * 0.5).astype(np.float32)


def _prefill(bundle: Path, mode: str, embeds: np.ndarray, cut: int) -> tuple[np.ndarray, list[np.ndarray], str]:
    """The logits after two chunks, the cache as left, and what prefilled."""
    pipeline = Pipeline.from_bundle(bundle, session=SessionConfig(threads=1, prefill_attention=mode))
    decoder = pipeline.engine.decoder
    decoder.forward(embeds[:, :cut])
    logits = decoder.forward(embeds[:, cut:]).copy()
    return logits, [value.numpy().copy() for value in decoder._cache], pipeline.prefilled_by


def test_the_export_cuts_validates_and_records_the_segments(bundle: Path, kernel_here: None) -> None:
    manifest = read_manifest(bundle)
    prefill = manifest.graphs[names.PREFILL]
    assert [s.file for s in prefill.segments] == [names.segment_file(names.PREFILL, k) for k in range(LAYERS + 1)]
    assert prefill.segment_scales == names.segment_scales_file(names.PREFILL)
    assert all(s.file in manifest.files for s in prefill.segments) and prefill.segment_scales in manifest.files
    parity = manifest.validation["decoder"]["prefill_segments"]
    assert parity["pass"] and parity["cases"] and all(len(c["chunks"]) == 2 for c in parity["cases"])
    # the fidelity against fp32 was measured on what serves long prompts here: the segments with the kernel
    assert manifest.calibration.fidelity["prefilled_by"] in {f"prefill graph segments + {k.what}" for k in PREFILL}
    # only nodes were written: every segment's weights point into prefill.onnx.data
    for segment in prefill.segments:
        proto = onnx.load(str(bundle / segment.file), load_external_data=False)
        locations = {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
        assert locations <= {"prefill.onnx.data"}
        assert (bundle / segment.file).stat().st_size < 64 * 1024


def test_the_segments_store_what_the_whole_graph_stores(bundle: Path, kernel_here: None) -> None:
    """Layer 0 reads only the embeddings: its cached codes (rotary, quantization, position) are bit for bit the
    whole graph's. Later layers see the kernel's bf16 attention; the logits stay close."""
    hidden = read_manifest(bundle).text.hidden_size
    embeds = _embeds(70, hidden)
    whole, whole_cache, whole_by = _prefill(bundle, "graph", embeds, 40)
    cut, cut_cache, cut_by = _prefill(bundle, "kernel", embeds, 40)
    assert whole_by == "prefill graph" and cut_by in {f"prefill graph segments + {k.what}" for k in PREFILL}
    positions = slice(0, 70)
    for part in range(2):
        np.testing.assert_array_equal(cut_cache[part][:, :, positions], whole_cache[part][:, :, positions])
    cosine = float(whole @ cut / np.linalg.norm(whole) / np.linalg.norm(cut))
    assert cosine > 0.999 and int(np.argmax(whole)) == int(np.argmax(cut))


def test_without_the_kernel_the_whole_graph_prefills(bundle: Path, kernel_here: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(cls: type, cache: Path | None = None) -> CausalAttention:
        raise KernelUnavailable("the AMX-BF16 prefill attention needs CPU features this machine lacks (amx_bf16)")

    monkeypatch.setattr(CausalAttention, "load", classmethod(unavailable))
    assert Pipeline.from_bundle(bundle).prefilled_by == "prefill graph"
    with pytest.raises(ConfigError, match=r"--prefill-attention kernel: .*lacks \(amx_bf16\)"):
        Pipeline.from_bundle(bundle, session=SessionConfig(prefill_attention="kernel"))


def test_asking_for_the_kernel_on_an_uncut_bundle_is_refused(tiny_bundle: Path, bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="has no prefill graph, so none is cut"):
        Pipeline.from_bundle(tiny_bundle, session=SessionConfig(prefill_attention="kernel"))
    whole = _copy(bundle, tmp_path / "whole")  # a prefill graph without segments (an older export, or dropped)
    _rewrite(whole, lambda d: [d["graphs"]["prefill"].pop(k, None) for k in ("segments", "segment_scales")])
    with pytest.raises(ConfigError, match="not cut for the attention kernel"):
        Pipeline.from_bundle(whole, session=SessionConfig(prefill_attention="kernel"))
    assert Pipeline.from_bundle(whole).prefilled_by == "prefill graph"


def _copy(bundle: Path, dest: Path) -> Path:
    shutil.copytree(bundle, dest)
    return dest


_rewrite = edit_manifest


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0, -1.0])
def test_damaged_scales_or_segments_are_one_line(bundle: Path, kernel_here: None, tmp_path: Path, bad: float) -> None:
    broken = _copy(bundle, tmp_path / "bad")
    scales = np.load(broken / names.segment_scales_file(names.PREFILL))
    scales[0, 0, 0, 0] = bad  # a zero or negative scale reads the cache wrong as surely as a NaN
    np.save(broken / names.segment_scales_file(names.PREFILL), scales)
    _rewrite(broken, lambda d: d["files"].pop(names.segment_scales_file(names.PREFILL)) and d["files"].update(
        {names.segment_scales_file(names.PREFILL): _record(broken / names.segment_scales_file(names.PREFILL))}))
    with pytest.raises(BundleError, match="not positive finite float32"):
        Pipeline.from_bundle(broken, session=SessionConfig(prefill_attention="kernel"))
    short = _copy(bundle, tmp_path / "short")
    _rewrite(short, lambda d: d["graphs"]["prefill"]["segments"].pop())
    with pytest.raises(BundleError, match=f"holds {LAYERS} segments for {LAYERS} layers"):
        Pipeline.from_bundle(short)


@pytest.mark.parametrize("head_dim", [72, 144])
def test_heads_the_kernel_does_not_compute_are_refused_before_any_session(head_dim: int) -> None:
    """Channels not in whole 16-lane vectors, or more than the kernel holds: refused, never computed."""
    from types import SimpleNamespace

    from pulse_edge.runtime.engines.segmented import SegmentedDecoder

    kernel = SimpleNamespace(kind=SimpleNamespace(max_head_dim=128))
    with pytest.raises(BundleError, match=f"heads of {head_dim} channels, which the CPU kernel does not compute"):
        SegmentedDecoder(Path("."), None, SimpleNamespace(head_dim=head_dim), [], None, [], kernel, 1)


def _record(path: Path) -> dict:
    from dataclasses import asdict

    from pulse_edge.runtime.bundle.integrity import file_record

    return asdict(file_record(path))


def test_manifest_round_trip_keeps_segments_and_omits_them_when_absent(bundle: Path, kernel_here: None) -> None:
    manifest = read_manifest(bundle)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.graphs[names.PREFILL].segments == manifest.graphs[names.PREFILL].segments
    uncut = replace(manifest, graphs={**manifest.graphs, names.PREFILL: replace(
        manifest.graphs[names.PREFILL], segments=(), segment_scales=None)})
    assert "segments" not in uncut.to_dict()["graphs"][names.PREFILL]


def test_segments_the_kernel_is_not_close_enough_for_are_dropped(bundle: Path, kernel_here: None,
                                                                 tmp_path: Path) -> None:
    """The export's answer when the twin passes but the kernel's bf16 does not (export/build/segments.py):
    the files go, the manifest keeps the whole graph, and the bundle still loads and prefills."""
    from pulse_edge.export.build.segments import drop_segments

    copy = _copy(bundle, tmp_path / "drop")
    record = {"cases": [{"kernel_vs_twin": {"max_rel_err": 0.09, "cosine": 0.995}}], "tolerance_level": "int8 prefill",
              "twin_pass": True}
    manifest = drop_segments(copy, read_manifest(copy), record)
    assert record["kept"] is False and not manifest.graphs[names.PREFILL].segments
    assert not list(copy.glob("prefill.seg*.onnx")) and not (copy / names.segment_scales_file(names.PREFILL)).exists()
    assert read_manifest(copy).graphs[names.PREFILL].segment_scales is None
    assert Pipeline.from_bundle(copy, verify=True).prefilled_by == "prefill graph"


def test_a_graph_without_an_int8_cache_cannot_be_cut(tiny_bundle: Path) -> None:
    """The tiny float bundle's decoder attends in one GroupQueryAttention without the int8 cache's stores."""
    proto = onnx.load(str(tiny_bundle / "decoder.onnx"), load_external_data=False)
    with pytest.raises(ValueError, match=r"not a decoder graph over an int8 cache"):
        build_segments(proto, LAYERS, 4, 16)


def test_asking_for_the_kernel_without_the_prefill_graph_is_refused(bundle: Path) -> None:
    with pytest.raises(ConfigError, match="the prefill graph is not loaded"):
        Pipeline.from_bundle(bundle, session=SessionConfig(prefill_attention="kernel", prefill_graph="off"))


def test_a_segment_reading_what_nothing_writes_is_refused_at_load(bundle: Path, kernel_here: None,
                                                                 tmp_path: Path) -> None:
    """The manifest's own check (runtime/bundle/checks.py), before any session is made."""
    edited = _copy(bundle, tmp_path / "edited")
    _rewrite(edited, lambda d: d["graphs"]["prefill"]["segments"][1]["inputs"].append("layers.9.attn.out"))
    with pytest.raises(BundleError, match=r"segments\[1\] \(prefill.seg01.onnx\) reads 'layers.9.attn.out', which no "
                                          "earlier segment writes"):
        Pipeline.from_bundle(edited)


def test_a_segment_listing_what_its_graph_lacks_is_refused_at_load(bundle: Path, kernel_here: None,
                                                                  tmp_path: Path) -> None:
    """A name the chain allows (segment 0 writes it) but segment 1's graph does not read: the session's check."""
    edited = _copy(bundle, tmp_path / "edited")
    _rewrite(edited, lambda d: d["graphs"]["prefill"]["segments"][1]["inputs"].append(names.attention_query_name(0)))
    with pytest.raises(BundleError, match="does not have the inputs the manifest lists"):
        Pipeline.from_bundle(edited)


def _break_rotary(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cut with the rotary tables swapped in every layer: a wrong graph the twin pass must catch."""
    from pulse_edge.export.graphs import segments

    real = segments._open_attention

    def swapped(gqa, i, kv_heads, head_dim):
        nodes, consts = real(gqa, i, kv_heads, head_dim)
        for node in nodes:
            if node.op_type == "RotaryEmbedding":
                node.input[2], node.input[3] = node.input[3], node.input[2]
        return nodes, consts

    monkeypatch.setattr(segments, "_open_attention", swapped)


def _break_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel that passes its load's self-test but attends wrongly in the bundle (as a miscompiled corner
    could): the export must refuse, not blame bf16 and drop the segments."""
    monkeypatch.setattr(CausalAttention, "self_test", lambda self: None)
    real = CausalAttention.__call__

    def shifted(self, q, k, v, ks, vs, *, past, threads, out=None, pool=None):
        result = real(self, q, k, v, ks, vs, past=past, threads=threads, out=out, pool=pool)
        if self.kind in PREFILL:  # the prefill kernel's fault; the decode kernel's own checks are elsewhere
            result[...] = result[::-1]  # every query row gets another row's answer
        return result

    monkeypatch.setattr(CausalAttention, "__call__", shifted)


def _blur_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel right to within ~18% per call, as a much coarser rounding would be: its segments must be dropped,
    the export kept (the tiny model's logits barely move: 10% per call left them at cosine 0.99929 to the twin's)."""
    monkeypatch.setattr(CausalAttention, "self_test", lambda self: None)
    real = CausalAttention.__call__
    noise = np.random.default_rng(3)

    def blurred(self, q, k, v, ks, vs, *, past, threads, out=None, pool=None):
        result = real(self, q, k, v, ks, vs, past=past, threads=threads, out=out, pool=pool)
        if self.kind in PREFILL:  # bf16's kind of error; the decode kernel computes in float32
            result += (0.18 * result.std() * noise.standard_normal(result.shape)).astype(np.float32)
        return result

    monkeypatch.setattr(CausalAttention, "__call__", blurred)


def test_a_kernel_too_coarse_for_the_model_loses_its_segments_not_the_export(
        reexport_int8: Callable[[Path], Path], bundle: Path, kernel_here: None, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _blur_kernel(monkeypatch)
    with caplog.at_level("WARNING"):
        out = reexport_int8(tmp_path / "blurred")
    manifest = read_manifest(out)
    record = manifest.validation["decoder"]["prefill_segments"]
    assert record["kept"] is False and not record["kernel_pass"] and record["pass"]
    assert 0.01 < max(c["kernel_call_rel_err"] for c in record["cases"]) <= record["kernel_wrong_call_rel_err"]
    assert not manifest.graphs[names.PREFILL].segments and not list(out.glob("prefill.seg*.onnx"))
    assert manifest.calibration.fidelity["prefilled_by"] == "prefill graph"
    assert sum("the prefill graph is kept whole" in r.message for r in caplog.records) == 1


def test_a_cut_beyond_its_bound_by_rounding_loses_its_segments_not_the_export(
        reexport_int8: Callable[[Path], Path], bundle: Path, kernel_here: None, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The twin's logits beyond the prefill graph's bound but above WRONG_CUT_COSINE, as at 32 random layers where
    per-token codes flip and compound (0.996984 against the then bound 0.997): rounding, so the segments go, the
    bundle stays. The record is the real validation's with its twin cosine set there (the tiny model rounds far
    less)."""
    from pulse_edge.export.build import segments as build_segments

    real = build_segments.validate_segmented_prefill

    def beyond(*args: Any, **kwargs: Any) -> dict[str, Any]:
        report = real(*args, **kwargs)
        for case in report["cases"]:
            case["prefill_twin"] = {**case["prefill_twin"], "cosine": 0.995, "pass": False}
            case["pass"] = False
        return {**report, "pass": False}

    monkeypatch.setattr(build_segments, "validate_segmented_prefill", beyond)
    with caplog.at_level("WARNING"):
        out = reexport_int8(tmp_path / "rounded")
    manifest = read_manifest(out)
    record = manifest.validation["decoder"]["prefill_segments"]
    assert record["pass"] and not record["twin_pass"] and record["kept"] is False and manifest.validation["pass"]
    assert not manifest.graphs[names.PREFILL].segments and not list(out.glob("prefill.seg*.onnx"))
    assert sum("rounding, not a wrong cut" in r.message for r in caplog.records) == 1


@pytest.mark.parametrize(("breaks", "reason"), [(_break_rotary, "with the kernel's float32 twin"),
                                               (_break_kernel, "beyond its bf16 rounding")],
                         ids=["cut", "kernel"])
def test_a_wrong_cut_or_kernel_refuses_the_export(breaks, reason: str, reexport_int8: Callable[[Path], Path],
                                                 bundle: Path, kernel_here: None, monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    from pulse_edge.export.build.bundle import ExportValidationError

    breaks(monkeypatch)
    with pytest.raises(ExportValidationError, match=reason):
        reexport_int8(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


@pytest.mark.parametrize(("flag", "kernel", "refusal"), [
    ("--prefill-attention", PREFILL, "--prefill-attention kernel: this bundle has no prefill graph"),
    ("--decode-attention", DECODE, "--decode-attention kernel: this bundle's decoder graph is not cut")],
    ids=["prefill", "decode"])
def test_infer_takes_the_attention_kernels_from_the_command_line(flag: str, kernel, refusal: str, bundle: Path,
                                                                 tiny_bundle: Path, ecg_png: Path,
                                                                 kernel_or_skip: Callable[..., Any]) -> None:
    """The user's path: the kernel answers a print; asked for on a bundle it cannot serve, one line and exit 2."""
    from click.testing import CliRunner

    from pulse_edge.cli.main import main

    kernel_or_skip(lambda: CausalAttention.load(kernel), "the export writes no segments for this kernel here: ")
    args = ["infer", str(ecg_png), "--json", "--max-new-tokens", "4", flag, "kernel"]
    served = CliRunner().invoke(main, [*args, "--model", str(bundle)])
    assert served.exit_code == 0, served.output
    assert json.loads(served.output.strip().splitlines()[-1])["text"] is not None
    refused = CliRunner().invoke(main, [*args, "--model", str(tiny_bundle)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and refusal in lines[0]


def test_the_export_cuts_and_validates_the_decode_graph(bundle: Path, decode_kernel_here: None) -> None:
    manifest = read_manifest(bundle)
    decoder = manifest.graphs[names.DECODER]
    assert [s.file for s in decoder.segments] == [names.segment_file(names.DECODER, k) for k in range(LAYERS + 1)]
    assert decoder.segment_scales == names.segment_scales_file(names.DECODER)
    assert decoder.segment_scales in manifest.files
    for segment in decoder.segments:  # only nodes: the weights are the decode graph's
        proto = onnx.load(str(bundle / segment.file), load_external_data=False)
        assert {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"} <= {
            "decoder.onnx.data"}
    parity = manifest.validation["decoder"]["decode_segments"]
    assert parity["pass"] and parity["cases"] and all(c["decode"] for c in parity["cases"])
    assert 0 < parity["kernel_call_rel_err"] < 1e-5  # float32 against the float32 twin
    assert manifest.validation["decoder"]["pass"]
    prefill = manifest.graphs[names.PREFILL]
    if prefill.segment_scales:  # cut where a prefill kernel runs: the same cache, the same scales
        np.testing.assert_array_equal(np.load(bundle / decoder.segment_scales),
                                      np.load(bundle / prefill.segment_scales))


def _decode(bundle: Path, mode: str, embeds: np.ndarray, steps: int) -> tuple[list[np.ndarray], str]:
    """Logits of a 40-position prompt (prefill graph) and `steps` decode steps, and what decoded."""
    pipeline = Pipeline.from_bundle(bundle, session=SessionConfig(threads=1, decode_attention=mode,
                                                                  prefill_graph="on"))
    decoder = pipeline.engine.decoder
    logits = [decoder.forward(embeds[:, :40]).copy()]
    logits += [decoder.forward(embeds[:, 40 + i:41 + i]).copy() for i in range(steps)]
    return logits, pipeline.decoded_by


def test_decode_steps_on_the_kernel_follow_the_whole_decode_graph(bundle: Path, decode_kernel_here: None) -> None:
    """The same steps on the whole decode graph (ORT's own int8 cache) and on its segments with the kernel; they
    differ only by how a new position is stored (ORT clips to -128, the cut to -127) and by float32 sums."""
    embeds = _embeds(46, read_manifest(bundle).text.hidden_size, seed=3)
    whole, whole_by = _decode(bundle, "graph", embeds, 6)
    cut, cut_by = _decode(bundle, "kernel", embeds, 6)
    assert (whole_by, cut_by) == ("decoder graph", "decoder graph segments + decode kernel")
    np.testing.assert_array_equal(whole[0], cut[0])  # the prompt: the prefill graph either way
    for a, b in zip(whole[1:], cut[1:], strict=True):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999 and np.argmax(a) == np.argmax(b)


def test_decode_attention_kernel_on_a_bundle_without_decode_segments_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="--decode-attention kernel: this bundle's decoder graph is not cut"):
        Pipeline.from_bundle(tiny_bundle, session=SessionConfig(decode_attention="kernel"))
    assert Pipeline.from_bundle(tiny_bundle).decoded_by == "decoder graph"


def test_decode_steps_on_bindings_made_once_match_rebinding_every_step(bundle: Path, decode_kernel_here: None) -> None:
    """runtime/engines/segmented.py binds a one-position input's buffers once (after the first step showed their
    shapes); an input of a few positions between steps takes the general path. Same logits bit for bit."""
    embeds = _embeds(52, read_manifest(bundle).text.hidden_size, seed=5)
    pipeline = Pipeline.from_bundle(bundle, session=SessionConfig(threads=1, decode_attention="kernel",
                                                                  prefill_graph="on"))
    decoder = pipeline.engine.decoder
    segments = decoder.decode_segments
    inputs = [embeds[:, :40], *(embeds[:, 40 + i:41 + i] for i in range(4)), embeds[:, 44:47],
              *(embeds[:, 47 + i:48 + i] for i in range(5))]  # a prompt, steps, a 3-position turn, steps

    def run(rebind: bool) -> list[np.ndarray]:
        decoder.reset()
        logits = []
        for chunk in inputs:
            if rebind:
                segments.step = None
            logits.append(decoder.forward(chunk).copy())
        return logits

    once = run(rebind=False)
    assert segments.step is not None
    for a, b in zip(once, run(rebind=True), strict=True):
        np.testing.assert_array_equal(a, b)
