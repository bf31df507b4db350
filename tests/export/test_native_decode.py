"""The native decode step (runtime/engines/native.py): its index written and validated by the export
(export/build/native.py), its steps against the decode graph's, its choice and its refusals, on the tiny model's
int8 CPU bundle.

Where its kernels cannot run (no AVX-512 VNNI, no compiler) the export writes no index, and every test that needs the
exported bundle (most refusal and fallback tests among them) skips with the kernels' reason; the others run
everywhere.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pulse_edge.cli.main import main
from pulse_edge.errors import BundleError, ConfigError, KernelUnavailable
from pulse_edge.export.graphs.decode_index import NotIndexable, read_decode_graph
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.decode_index import read_index
from pulse_edge.runtime.bundle.manifest import read_manifest
from pulse_edge.runtime.engines.ort import SessionConfig, decoder_engine
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import BlockGemv
from pulse_edge.runtime.pipeline import Pipeline

NATIVE = "native decode step (block GEMV + decode kernel)"


@pytest.fixture(scope="module")
def bundle(cpu_int8_bundle: Path, kernel_or_skip: Callable[..., Any]) -> Path:
    for load in (BlockGemv.load, lambda: CausalAttention.load(DECODE), LayerOps.load):
        kernel_or_skip(load, "the export writes no decode index here: ")
    return cpu_int8_bundle


def _embeds(length: int, hidden: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, length, hidden)) * 0.5).astype(np.float32)


def _decode(bundle: Path, session: SessionConfig, embeds: np.ndarray, steps: int) -> tuple[list[np.ndarray], str]:
    """Logits of a 40-position prompt (the prefill graph) and `steps` decode steps, and who decoded."""
    pipeline = Pipeline.from_bundle(bundle, session=session)
    decoder = pipeline.engine.decoder
    logits = [decoder.forward(embeds[:, :40]).copy()]
    logits += [decoder.forward(embeds[:, 40 + i:41 + i]).copy() for i in range(steps)]
    return logits, pipeline.decoded_by


def test_the_export_writes_validates_and_records_the_index(bundle: Path) -> None:
    manifest = read_manifest(bundle)
    decoder = manifest.graphs[names.DECODER]
    assert decoder.native_index == names.DECODE_INDEX_FILE and decoder.native_index in manifest.files
    index = read_index(bundle / decoder.native_index)
    assert len(index.layers) == manifest.kv.layers and index.data == f"{decoder.file}.data"
    assert {layer.qkv.bits for layer in index.layers} == {8}  # int8: MatMulNBits at 8 bits
    parity = manifest.validation["decoder"]["native_decode"]
    assert parity["pass"] and parity["kept"] and parity["cases"] and all(c["decode"] for c in parity["cases"])
    assert 0 < parity["kernel_call_rel_err"] < 1e-5  # float32 attention against its float32 twin
    assert manifest.validation["decoder"]["pass"]
    assert manifest.calibration.fidelity["decoded_by"] == NATIVE  # fidelity measured as served


def test_native_steps_follow_the_decode_graph_and_its_segments(bundle: Path) -> None:
    """The same prompt and steps decoded natively, by the whole decode graph (ORT's own int8 store: -128..127) and
    by its segments with the decode kernel (the same +-127 store as the native step): the native step computes
    the segments' function to float32 rounding, and the whole graph's but for the store rule."""
    embeds = _embeds(46, read_manifest(bundle).text.hidden_size, seed=3)
    native, native_by = _decode(bundle, SessionConfig(threads=2, prefill_graph="on"), embeds, 6)
    whole, whole_by = _decode(bundle, SessionConfig(threads=1, decode_step="onnx", decode_attention="graph",
                                                    prefill_graph="on"), embeds, 6)
    assert (native_by, whole_by) == (NATIVE, "decoder graph")
    np.testing.assert_array_equal(native[0], whole[0])  # the prompt: the prefill graph either way
    for a, b in zip(native[1:], whole[1:], strict=True):
        assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.9999 and np.argmax(a) == np.argmax(b)
    if read_manifest(bundle).graphs[names.DECODER].segments:
        cut, cut_by = _decode(bundle, SessionConfig(threads=1, decode_attention="kernel", prefill_graph="on"), embeds,
                              6)
        assert cut_by == "decoder graph segments + decode kernel"
        for a, b in zip(native[1:], cut[1:], strict=True):
            assert float(np.abs(a - b).max() / np.abs(b).max()) < 1e-4


def test_a_long_input_goes_in_groups_of_rows(bundle: Path) -> None:
    """Inputs the prefill graph does not take run through the step in groups of 4 rows, each through every layer
    before the next: 11 positions at once give the logits of 11 positions one by one (an engine opened without
    the prefill graph, as validation opens it: every input through the step)."""
    manifest = read_manifest(bundle)
    embeds = _embeds(11, manifest.text.hidden_size, seed=4)
    decoder = decoder_engine(bundle, manifest.graphs[names.DECODER], manifest.kv, manifest.text.vocab_size,
                             SessionConfig(threads=2, decode_step="native"))
    assert decoder.native is not None
    at_once = decoder.forward(embeds).copy()
    decoder.reset()
    for i in range(11):
        one_by_one = decoder.forward(embeds[:, i:i + 1])
    assert float(np.abs(at_once - one_by_one).max() / np.abs(one_by_one).max()) < 1e-4


def test_the_decode_step_flag_chooses_and_refuses(bundle: Path, tiny_bundle: Path) -> None:
    assert Pipeline.from_bundle(bundle, session=SessionConfig(decode_step="onnx")).decoded_by != NATIVE
    # an explicit attention choice is a choice of the graph: auto leaves the step to ORT then
    assert Pipeline.from_bundle(bundle, session=SessionConfig(decode_attention="graph")).decoded_by == "decoder graph"
    with pytest.raises(ConfigError, match="--decode-step native: this bundle has no decode index"):
        Pipeline.from_bundle(tiny_bundle, session=SessionConfig(decode_step="native"))
    assert Pipeline.from_bundle(tiny_bundle).decoded_by == "decoder graph"  # fp32: no index, auto falls back
    with pytest.raises(ConfigError, match="--decode-step native computes the decode attention itself"):
        SessionConfig(decode_step="native", decode_attention="graph")


def test_without_the_prefill_graph_long_prompts_keep_the_decode_graph(bundle: Path) -> None:
    """The step takes a long prompt 4 positions at a time (every weight read once per 4): where the prefill graph is
    not loaded, auto keeps ORT's decode graph for the whole conversation, and native asked outright refuses."""
    off = SessionConfig(prefill_graph="off")
    assert Pipeline.from_bundle(bundle, session=off).decoded_by == "decoder graph segments + decode kernel"
    with pytest.raises(ConfigError, match="--decode-step native: the prefill graph is not loaded"):
        Pipeline.from_bundle(bundle, session=SessionConfig(prefill_graph="off", decode_step="native"))


def _edited_copy(bundle: Path, work: Path, edit) -> Path:
    """The bundle with its decode index (and manifest) edited; the big files linked, not copied."""
    shutil.copytree(bundle, work, copy_function=lambda s, d: Path(d).symlink_to(s) if not str(s).endswith(".json")
                    else shutil.copy(s, d))
    manifest = json.loads((work / names.MANIFEST_FILE).read_text())
    index = json.loads((work / names.DECODE_INDEX_FILE).read_text())
    edit(index, manifest)
    (work / names.DECODE_INDEX_FILE).write_text(json.dumps(index))
    sizes = manifest["graphs"][names.DECODER]["sizes"]
    sizes[names.DECODE_INDEX_FILE] = (work / names.DECODE_INDEX_FILE).stat().st_size
    manifest.pop("files")
    manifest.pop("manifest_sha256")
    manifest["version"] = 1  # no checksums: the index is read as it is
    (work / names.MANIFEST_FILE).write_text(json.dumps(manifest))
    return work


def _drop(key: str):
    def edit(index: dict, manifest: dict) -> None:
        index["layers"][0]["qkv"].pop(key)
    return edit


def _retype(index: dict, manifest: dict) -> None:
    index["lm_head"] = {"bits": 0, "k": index["hidden"], "n": index["vocab"],
                        "weight": {**index["layers"][0]["qkv"]["codes"], "shape": [index["hidden"], index["vocab"]]}}


def _escape(index: dict, manifest: dict) -> None:
    index["data"] = "../" + index["data"]


def _unvalidated(index: dict, manifest: dict) -> None:
    manifest["validation"]["decoder"].pop("native_decode")


@pytest.mark.parametrize(("edit", "refusal"), [
    (_drop("block"), r"layers\.0\.qkv: .*block"), (_drop("codes"), r"layers\.0\.qkv: .*codes"),
    (_retype, "has no float32 weight"), (_escape, "not the decode graph's data file")],
    ids=["no block", "no codes", "uint8 float weight", "data outside"])
def test_a_damaged_index_is_refused_at_load(bundle: Path, tmp_path: Path, edit, refusal: str) -> None:
    work = _edited_copy(bundle, tmp_path / "bundle", edit)
    with pytest.raises(BundleError, match=refusal):
        Pipeline.from_bundle(work, session=SessionConfig(decode_step="native"))


def test_an_unvalidated_step_is_taken_only_when_asked(bundle: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """auto takes the step only where the manifest records its validation; native asked outright takes it (one
    warning)."""
    work = _edited_copy(bundle, tmp_path / "bundle", _unvalidated)
    assert Pipeline.from_bundle(work).decoded_by == "decoder graph segments + decode kernel"
    with caplog.at_level("WARNING"):
        assert Pipeline.from_bundle(work, session=SessionConfig(decode_step="native")).decoded_by == NATIVE
    assert any("records no validation of the native decode step" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("step", ["native", "onnx"])
def test_infer_takes_the_decode_step_from_the_command_line(step: str, bundle: Path, tiny_bundle: Path,
                                                           ecg_png: Path) -> None:
    """The user's path: either step answers a print; native asked for on a bundle without an index is one line
    and exit 2."""
    args = ["infer", str(ecg_png), "--json", "--max-new-tokens", "3", "--decode-step", step]
    served = CliRunner().invoke(main, [*args, "--model", str(bundle)])
    assert served.exit_code == 0, served.output
    assert json.loads(served.output.strip().splitlines()[-1])["text"] is not None
    refused = CliRunner().invoke(main, [*args[:-1], "native", "--model", str(tiny_bundle)])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    lines = [line for line in refused.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--decode-step native: this bundle has no decode index" in lines[0]


def test_a_damaged_index_is_one_line(bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "index.json"
    d = json.loads((bundle / names.DECODE_INDEX_FILE).read_text())
    d["layers"][0]["qkv"]["codes"]["offset"] = -1
    copy.write_text(json.dumps(d))
    with pytest.raises(BundleError, match=r"layers\.0\.qkv\.codes\.offset: -1 is less than the minimum of 0"):
        read_index(copy)
    copy.write_text("{not json")
    with pytest.raises(BundleError, match="cannot be read"):
        read_index(copy)


def test_an_index_pointing_past_its_data_is_refused(bundle: Path, tmp_path: Path) -> None:
    """A hand-edited bundle whose index places a weight beyond the data file: refused at load, never read out of
    bounds."""
    def past_the_end(index: dict, manifest: dict) -> None:
        index["layers"][0]["down"]["codes"]["offset"] = (bundle / index["data"]).stat().st_size

    work = _edited_copy(bundle, tmp_path / "bundle", past_the_end)
    with pytest.raises(BundleError, match=r"past the end of decoder\.onnx\.data"):
        Pipeline.from_bundle(work, session=SessionConfig(decode_step="native"))


def test_a_graph_of_another_form_gets_no_index(tiny_bundle: Path) -> None:
    """The fp32 bundle's decode graph: float MatMuls and a float cache, not the step's form."""
    with pytest.raises(NotIndexable, match="not rotary attention over an int8 per-channel cache"):
        read_decode_graph(tiny_bundle / read_manifest(tiny_bundle).graphs[names.DECODER].file)


@pytest.mark.parametrize("missing", ["BlockGemv", "CausalAttention", "LayerOps"])
def test_no_index_where_one_of_the_steps_kernels_cannot_run(missing: str, bundle: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """Any of the three kernels the runtime loads for the step refused on the export's machine: no index (one info
    line), never an index whose validation then stops the export with a flag the user did not pass."""
    from pulse_edge.export.build import native

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise KernelUnavailable(f"{missing} refused for the test")

    monkeypatch.setattr(getattr(native, missing), "load", refuse)
    spec = read_manifest(bundle).graphs[names.DECODER]
    work = tmp_path / "work"
    work.mkdir()
    with caplog.at_level(logging.INFO, logger="pulse_edge"):
        kept = native.index_graph(work, replace(spec, native_index=None))
    assert kept.native_index is None and not list(work.iterdir())
    assert f"no native decode step for this bundle: {missing} refused for the test" in caplog.text


def _blur_step(monkeypatch: pytest.MonkeyPatch, spread: float) -> None:
    """The native step's logits off by noise of `spread` x their own spread: 0.1 moves them to cosine ~0.995 (beyond
    the bound, as a rounding too coarse for the model would), 1.0 to ~0.7 (a step computing something else)."""
    from pulse_edge.runtime.engines.native import NativeDecoder

    real = NativeDecoder.forward
    noise = np.random.default_rng(5)

    def blurred(self, embeds: np.ndarray, past: int) -> None:
        real(self, embeds, past)
        self.logits += (spread * self.logits.std() * noise.standard_normal(self.logits.shape)).astype(np.float32)

    monkeypatch.setattr(NativeDecoder, "forward", blurred)


def test_a_step_too_coarse_for_the_model_is_dropped_not_the_export(bundle: Path, reexport_int8: Callable[[Path], Path],
                                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Beyond its bound but still the recipe's function: the bundle keeps the decode graph only, one warning says
    so, and the runtime decodes on ONNX Runtime."""
    _blur_step(monkeypatch, 0.1)
    with caplog.at_level(logging.WARNING):
        out = reexport_int8(tmp_path / "coarse")
    manifest = read_manifest(out)
    record = manifest.validation["decoder"]["native_decode"]
    assert record["pass"] and not record["kept"] and not record["graph_pass"]
    assert min(s["cosine"] for c in record["cases"] for s in (c["prefill"], *c["decode"])) >= 0.99
    assert manifest.graphs[names.DECODER].native_index is None and not (out / names.DECODE_INDEX_FILE).exists()
    assert names.DECODE_INDEX_FILE not in manifest.files and manifest.validation["pass"]
    assert sum("the bundle has no native decode step" in r.message for r in caplog.records) == 1
    assert manifest.calibration.fidelity["decoded_by"] != NATIVE


def test_a_step_computing_something_else_refuses_the_export(bundle: Path, reexport_int8: Callable[[Path], Path],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.export.build.bundle import ExportValidationError

    _blur_step(monkeypatch, 1.0)
    with pytest.raises(ExportValidationError, match="native decode step after a"):
        reexport_int8(tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()


# A decode index that disagrees with its bundle, each refused in one BundleError line (a fifth mutation round: the
# load's checks no test reached)
INDEX_EDITS = {
    "hidden": (lambda i, b: i.update(hidden=i["hidden"] * 2), "describes a hidden size"),
    "qkv n": (lambda i, b: i["layers"][0]["qkv"].update(n=i["layers"][0]["qkv"]["n"] // 2), r"qkv is \["),
    "norm shape": (lambda i, b: i["layers"][0]["input_norm"].update(shape=[i["hidden"] * 2]), "input norm is"),
    "zero scale": (lambda i, b: i["layers"][0]["k_scale"].update(offset=i["final_norm"]["offset"] + 4 * i["hidden"]),
                   "non-positive"),  # the zero padding after the last tensor
    "a layer less": (lambda i, b: i["layers"].pop(), "the decode index holds 1 layers"),
    "heads": (lambda i, b: i.update(heads=i["heads"] + 2), "heads or vocabulary"),
    "short rotary": (lambda i, b: [t.update(shape=[4, t["shape"][1]]) for t in i["rotary"].values()],
                     "rotary tables hold 4 positions"),
    "float past the end": (lambda i, b: i["final_norm"].update(offset=(b / i["data"]).stat().st_size - i["hidden"]),
                           "past the end"),  # a float32 tensor: its bytes are 4 x its values
}


@pytest.mark.parametrize("edit", list(INDEX_EDITS), ids=list(INDEX_EDITS))
def test_an_index_disagreeing_with_the_bundle_is_refused(bundle: Path, tmp_path: Path, edit: str) -> None:
    change, refusal = INDEX_EDITS[edit]
    work = _edited_copy(bundle, tmp_path / "bundle", lambda index, manifest: change(index, bundle))
    with pytest.raises(BundleError, match=refusal):
        Pipeline.from_bundle(work, session=SessionConfig(decode_step="native"))


def test_an_empty_input_is_a_value_error_on_every_decode_path(bundle: Path) -> None:
    """The native step read its residual stream before assigning it (UnboundLocalError) for zero positions."""
    for session in (SessionConfig(decode_step="native"), SessionConfig(decode_step="onnx")):
        decoder = Pipeline.from_bundle(bundle, session=session).engine.decoder
        with pytest.raises(ValueError, match=r"no positions to run: embeds is \(1, 0, "):
            decoder.forward(np.zeros((1, 0, read_manifest(bundle).text.hidden_size), np.float32))
