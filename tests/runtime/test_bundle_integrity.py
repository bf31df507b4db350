"""A damaged bundle is one line and exit 2, never tokens: checksums, manifest schema and cross-checks, arrays.

Each case damages a copy of the tiny fp32 bundle the way a disk, a copy or a hand edit does, then runs
`pulse-edge infer` on it (with `--verify` too, the only way a few zeroed blocks in a large file show).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pulse_testing.manifests import edit_manifest

from pulse_edge.cli.main import main
from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.manifest import read_manifest

# The checks' own modules are imported inside the tests that call them, so that the CLI cases of this file
# also run against a pulse-edge without them (where they fail: that is what they were written to show).


@pytest.fixture(scope="module")
def other_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vision.onnx and decoder.onnx(.data) of another tiny checkpoint (seed 1): same names, shapes, sizes."""
    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint
    from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, build_decoder
    from pulse_edge.export.graphs.vision import export_vision_graph
    from pulse_edge.export.model.checkpoint import load_checkpoint

    root = tmp_path_factory.mktemp("other")
    loaded = load_checkpoint(make_tiny_checkpoint(root / "ckpt", TinySpec(seed=1)))
    out = root / "graphs"
    out.mkdir()
    export_vision_graph(loaded.model, out, precision="fp32")
    build_decoder(loaded.model.language_model, DecoderShape.from_config(loaded.config, max_length=4096), out,
                  precision="fp32", plan=FLOAT_PLAN, label="fp32")
    return out


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "bundle"))


_edit = edit_manifest


def _zero_bytes(bundle: Path) -> None:
    path = bundle / "decoder.onnx.data"
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


def _nan_row(bundle: Path) -> None:
    table = np.load(bundle / "embed_tokens.npy")
    table[7, 3] = np.nan
    np.save(bundle / "embed_tokens.npy", table)


def _junk_table(bundle: Path) -> None:
    path = bundle / "embed_tokens.npy"
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def _truncated_table(bundle: Path) -> None:
    path = bundle / "embed_tokens.npy"
    path.write_bytes(path.read_bytes()[:1000])


DAMAGE: dict[str, tuple[Callable[[Path], Any], str]] = {
    "zeroed bytes in decoder.onnx.data": (_zero_bytes, "decoder.onnx.data is not the file export wrote"),
    "NaN in embed_tokens.npy": (_nan_row, "holds NaN or infinite values (row 7 is the first)"),
    "manifest.json is []": (lambda b: (b / "manifest.json").write_text("[]"), "manifest.json holds a list"),
    "graphs made a list": (lambda b: _edit(b, lambda d: d.update(graphs=list(d["graphs"].values()))),
                           "graphs must be an object, got a list"),
    "kv.max_length = -5": (lambda b: _edit(b, lambda d: d["kv"].update(max_length=-5)),
                           "kv.max_length must be an integer >= 1, got -5"),
    "kv.layers off by 3": (lambda b: _edit(b, lambda d: d["kv"].update(layers=d["kv"]["layers"] + 3)),
                           "kv.layers is 5 but the decoder graph decoder.onnx has KV inputs for 2 layers"),
    "text.vocab_size = 10": (lambda b: _edit(b, lambda d: d["text"].update(vocab_size=10)),
                             "text.vocab_size x text.hidden_size is [10, 64]"),
    "embed_tokens.npy truncated": (_truncated_table, "embed_tokens.npy is truncated"),
    "embed_tokens.npy junk of the same size": (_junk_table, "embed_tokens.npy is not a readable .npy array"),
    "kv.max_length a string": (lambda b: _edit(b, lambda d: d["kv"].update(max_length="4096")),
                               "kv.max_length must be an integer >= 1, got '4096'"),
    "a graph file outside the bundle": (lambda b: _edit(b, lambda d: d["graphs"]["vision"].update(file="../x.onnx")),
                                        "graphs.vision.file must be a file name inside the bundle"),
    "text.bos_id outside the vocabulary": (lambda b: _edit(b, lambda d: d["text"].update(bos_id=5000)),
                                           "text.bos_id 5000 is outside the vocabulary of 1000"),
    # answers would never stop before the token limit
    "text.eos_id outside the vocabulary": (lambda b: _edit(b, lambda d: d["text"].update(eos_id=5000)),
                                           "text.eos_id 5000 is outside the vocabulary of 1000"),
    "text.eos_id one past the vocabulary": (lambda b: _edit(b, lambda d: d["text"].update(eos_id=1000)),
                                            "text.eos_id 1000 is outside the vocabulary of 1000"),
    "version 2 with files emptied": (lambda b: _edit(b, lambda d: d.update(version=2, files={})),
                                     "files is empty, but a version-2 manifest records every file's"),
    # the cache bound as another type or shape than the graph reads it
    "kv.dtype another than the graph's": (lambda b: _edit(b, lambda d: d["kv"].update(dtype="float16")),
                                         "kv.dtype is float16 but the decoder's past_key_values.0.key is float32"),
    "kv.kv_heads another than the graph's": (
        lambda b: _edit(b, lambda d: d["kv"].update(kv_heads=d["kv"]["kv_heads"] * 2)),
        "tensor past_key_values.0.key has 4 at axis 1 where kv.kv_heads and kv.head_dim needs 8"),
    # positions past the model's trained range would run without a word
    "kv.max_length beyond the model's positions": (
        lambda b: _edit(b, lambda d: d["kv"].update(max_length=d["text"]["max_position_embeddings"] + 1)),
        "kv.max_length 4097 exceeds the model's 4096 positions"),
    "logits of another vocabulary": (
        lambda b: _edit(b, lambda d: d["graphs"]["decoder"]["outputs"][0].update(shape=[1, 1, 999])),
        "text.vocab_size is 1000 but the decoder's logits have 999 entries"),
    # announced by the server and grouped by the benchmarks as a recipe its graphs are not
    "precision another than the decoder's": (lambda b: _edit(b, lambda d: d.update(precision="int8")),
                                            "precision is 'int8' but graphs.decoder (decoder.onnx) is 'fp32'"),
    "a checksum missing": (lambda b: _edit(b, lambda d: d["files"].pop("vision.onnx")),
                           "files has no checksum for vision.onnx"),
    "version 3 without checksums": (lambda b: _edit(b, lambda d: d.pop("files")), "lacks 'files'"),
    "version 3 with files emptied": (lambda b: _edit(b, lambda d: d.update(files={})),
                                     "files is empty, but a version-3 manifest records every file's"),
    # edits the schema and the cross-checks allow, left unsealed as a hand-edit leaves them: only the seal sees them
    "image_std edited by hand": (lambda b: _unsealed(b, lambda d: d["image"].update(image_std=[0.5, 0.5, 0.5])),
                                 "manifest.json was changed after export: its contents no longer match"),
    "a validation verdict edited by hand": (  # native_validated reads it: the native step would be served
        lambda b: _unsealed(b, lambda d: d["validation"].update(pass_by_hand=True)),
        "manifest.json was changed after export"),
    "the prompt's system text edited by hand": (
        lambda b: _unsealed(b, lambda d: d["prompt"].update(system=d["prompt"]["system"] + " Be brief.")),
        "manifest.json was changed after export"),
    "version lowered to 2 by hand": (lambda b: _unsealed(b, lambda d: d.update(version=2)),
                                     "manifest.json was changed after export"),
    "the seal removed": (lambda b: _unsealed(b, lambda d: d.pop("manifest_sha256")),
                         "a version 3 manifest lacks 'manifest_sha256'"),
    "the seal not a sha256": (lambda b: _unsealed(b, lambda d: d.update(manifest_sha256="0" * 63)),
                              "manifest_sha256 must be 64 lower-case hex digits"),
}


def _unsealed(bundle: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    edit_manifest(bundle, change, resealed=False)


def _infer(bundle: Path, image: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["infer", str(image), "--model", str(bundle), "--max-new-tokens", "2", *extra])


def _assert_refused(result: Any, expected: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stdout == "", "no tokens may be printed"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pulse-edge: error:"), result.stderr
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_bundle_is_one_line_and_no_tokens(case: str, tiny_bundle: Path, tmp_path: Path,
                                                    ecg_png: Path) -> None:
    damage, expected = DAMAGE[case]
    bundle = _copy(tiny_bundle, tmp_path)
    damage(bundle)
    _assert_refused(_infer(bundle, ecg_png), expected)
    _assert_refused(_infer(bundle, ecg_png, "--verify"), expected)
    _assert_refused(CliRunner().invoke(main, ["verify", str(bundle)]), expected)


@pytest.mark.parametrize("std", [[1e-300, 0.3, 0.3], [1e6, 0.3, 0.3]])
def test_a_resealed_absurd_normalisation_is_one_line_without_numpy_warnings(std: list[float], tiny_bundle: Path,
                                                                           tmp_path: Path, ecg_png: Path) -> None:
    """A manifest re-sealed with image_std 1e-300 overflowed every tile to inf: numpy's RuntimeWarnings came
    before the refusal."""
    bundle = _copy(tiny_bundle, tmp_path)
    edit_manifest(bundle, lambda d: d["image"].update(image_std=std))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy warning would fail the test
        _assert_refused(_infer(bundle, ecg_png), "image_std [")
    _assert_refused(_infer(bundle, ecg_png), "are not a normalisation (means within 0-1, deviations within 0.01-10)")


def test_a_graph_for_another_engine_is_refused_not_run_by_onnxruntime(tiny_bundle: Path, tmp_path: Path,
                                                                      ecg_png: Path) -> None:
    """A re-sealed manifest that named the decoder's engine "tensorrt" skipped every IO cross-check (they were
    ONNX's only), then ONNX Runtime ran the graph anyway: a binding traceback, or "a fault in pulse-edge"."""
    bundle = _copy(tiny_bundle, tmp_path)
    edit_manifest(bundle, lambda d: (d["graphs"]["decoder"].update(engine="tensorrt"), d["kv"].update(layers=2)))
    _assert_refused(_infer(bundle, ecg_png), "graph engine 'tensorrt' is not one of onnx")
    _assert_refused(CliRunner().invoke(main, ["verify", str(bundle)]), "graph engine 'tensorrt'")


def test_a_bundle_file_this_user_cannot_read_is_one_line(tiny_bundle: Path, tmp_path: Path, ecg_png: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bundle copied by root with a tight umask and served by a service user: a PermissionError traceback. (As
    root a mode 000 file is still read, so the OS's refusal is played here.)"""
    from pulse_edge.runtime.bundle import integrity

    bundle = _copy(tiny_bundle, tmp_path)
    real_open = os.open

    def refusing(path: Any, flags: int, *args: Any) -> int:
        if Path(path).name == "decoder.onnx.data":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(integrity.os, "open", refusing)
    expected = "decoder.onnx.data cannot be read (Permission denied); make every file of the bundle readable"
    _assert_refused(_infer(bundle, ecg_png), expected)
    _assert_refused(CliRunner().invoke(main, ["verify", str(bundle)]), expected)

    def failing(path: Any, flags: int, *args: Any) -> int:  # a disk error is no permission to fix
        if Path(path).name == "decoder.onnx.data":
            raise OSError(5, "Input/output error", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(integrity.os, "open", failing)
    _assert_refused(_infer(bundle, ecg_png), "cannot be read (Input/output error); the disk or the copy is damaged")


@pytest.mark.parametrize("graph", ["vision.onnx", "decoder.onnx.data"])
def test_a_graph_swapped_in_from_another_checkpoint_is_refused(graph: str, tiny_bundle: Path, other_graphs: Path,
                                                               tmp_path: Path, ecg_png: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    assert (other_graphs / graph).stat().st_size == (bundle / graph).stat().st_size  # sizes cannot tell
    assert (other_graphs / graph).read_bytes() != (bundle / graph).read_bytes()
    shutil.copyfile(other_graphs / graph, bundle / graph)
    _assert_refused(_infer(bundle, ecg_png), f"{graph} is not the file export wrote")
    _assert_refused(_infer(bundle, ecg_png, "--verify"), f"{graph} is not the file export wrote")


def test_zeroed_blocks_outside_the_sample_are_found_by_the_first_loads_full_hash(
        tiny_bundle: Path, tmp_path: Path, ecg_png: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 sampled pages (first and last), a zeroed block in the middle passes the sample. Loaded once
    unstamped, the copy is hashed whole and refused; stamped while clean, then damaged in place, its times
    change and it is hashed again (runtime/bundle/verified.py)."""
    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.bundle import integrity
    from pulse_edge.runtime.pipeline import Pipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _copy(tiny_bundle, tmp_path)
    monkeypatch.setattr(integrity, "SAMPLED_PAGES", 2)
    manifest = read_manifest(bundle)
    sampled = {name: integrity.sampled_sha256(bundle / name) for name in manifest.files}
    _edit(bundle, lambda d: [d["files"][n].update(sampled_sha256=h) for n, h in sampled.items()])
    clean = tmp_path / "clean"
    shutil.copytree(bundle, clean)
    _zero_bytes(bundle)
    _assert_refused(_infer(bundle, ecg_png), "decoder.onnx.data is not the file export wrote (sha256")
    assert _infer(clean, ecg_png).exit_code == 0  # hashed whole, stamped
    _zero_bytes(clean)
    with pytest.raises(BundleError, match=r"decoder\.onnx\.data is not the file export wrote \(sha256"):
        Pipeline.from_bundle(clean)


def test_a_stamped_bundle_is_not_hashed_whole_again_until_its_files_change(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.runtime.bundle import integrity, verified
    from pulse_edge.runtime.pipeline import Pipeline

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = _copy(tiny_bundle, tmp_path)
    hashed: list[str] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path, progress=None: hashed.append(path.name) or real(path))
    Pipeline.from_bundle(bundle).close()
    files = sorted(read_manifest(bundle).files)
    assert sorted(hashed) == files  # the first load: every file
    Pipeline.from_bundle(bundle).close()
    assert sorted(hashed) == files  # stamped: the sample only
    Pipeline.from_bundle(bundle, verify=True).close()
    assert sorted(hashed) == sorted(files * 2)  # --verify always hashes
    verified.stamp_path(bundle).write_text("{not json")  # an unreadable stamp costs a full hash, nothing else
    Pipeline.from_bundle(bundle).close()
    assert len(hashed) == 3 * len(files)


def test_two_copies_keep_a_stamp_each_and_a_file_changed_while_hashed_is_not_stamped(
        tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One stamp per manifest was rewritten by each copy's load: every load of the other hashed all again. A file
    written while it was hashed must not be recorded as the one that matched."""
    from pulse_edge.runtime.bundle import integrity, verified

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    copies = [_copy(tiny_bundle, tmp_path / "a"), _copy(tiny_bundle, tmp_path / "b")]
    manifest = read_manifest(copies[0])
    hashed: list[Path] = []
    real = integrity.file_sha256
    monkeypatch.setattr(integrity, "file_sha256", lambda path, progress=None: hashed.append(path) or real(path))
    for bundle in copies * 2:
        integrity.check_bundle(bundle, manifest)
    assert len(hashed) == 2 * len(manifest.files)  # each copy once
    fresh = _copy(tiny_bundle, tmp_path / "c")

    def touched_while_hashed(path: Path, progress: object = None) -> str:
        digest = real(path)
        os.utime(path)  # as a copy still writing would: the file's times move after its hash was taken
        return digest

    monkeypatch.setattr(integrity, "file_sha256", touched_while_hashed)
    integrity.check_bundle(fresh, manifest)
    assert not verified.is_stamped(fresh, manifest.files)


def test_the_sample_reaches_the_files_end_and_the_full_hash_every_chunk(tiny_bundle: Path, tmp_path: Path,
                                                                        ecg_png: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sampled pages run from the first byte to the last; the full hash reads past its first chunk."""
    import hashlib

    from pulse_edge.runtime.bundle import integrity

    bundle = _copy(tiny_bundle, tmp_path)
    data = bundle / "decoder.onnx.data"
    monkeypatch.setattr(integrity, "_CHUNK", 4096)
    assert integrity.file_sha256(data) == hashlib.sha256(data.read_bytes()).hexdigest()
    monkeypatch.setattr(integrity, "SAMPLED_PAGES", 2)
    before = integrity.sampled_sha256(data)
    with open(data, "r+b") as f:  # the last page, every bit flipped
        f.seek(-4096, 2)
        last = f.read()
        f.seek(-4096, 2)
        f.write(bytes(b ^ 0xFF for b in last))
    assert integrity.sampled_sha256(data) != before


def test_verify_reports_a_whole_bundle(tiny_bundle: Path) -> None:
    result = CliRunner().invoke(main, ["verify", str(tiny_bundle)])
    assert result.exit_code == 0, result.output
    files = len(read_manifest(tiny_bundle).files)
    assert files == 5 and f"ok, {files} files" in result.stdout and result.stderr == ""


def test_a_version_1_bundle_loads_with_one_warning_and_cannot_be_verified(tiny_bundle: Path, tmp_path: Path,
                                                                          ecg_png: Path) -> None:
    bundle = _copy(tiny_bundle, tmp_path)
    _unsealed(bundle, lambda d: (d.pop("files"), d.pop("manifest_sha256"), d.update(version=1)))
    result = _infer(bundle, ecg_png, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["generated_tokens"] == 2
    assert result.stderr.strip().splitlines() == [
        f"pulse-edge: {bundle} has no checksums (manifest version 1): its files are checked by size only; "
        "re-export it to be able to verify it"]
    _assert_refused(_infer(bundle, ecg_png, "--verify"), "has no checksums to verify (manifest version 1")
    _assert_refused(CliRunner().invoke(main, ["verify", str(bundle)]), "has no checksums to verify")
    _nan_row(bundle)  # the cheap checks still run on a version-1 bundle
    _assert_refused(_infer(bundle, ecg_png), "holds NaN or infinite values")


def test_a_version_2_bundle_loads_and_verifies_with_one_warning_about_its_unsealed_manifest(
        tiny_bundle: Path, tmp_path: Path, ecg_png: Path) -> None:
    """Bundles exported before the seal still load; the warning says what goes unchecked, and an edit still goes
    through (nothing to check it against), which is why the warning is there."""
    bundle = _copy(tiny_bundle, tmp_path)
    _unsealed(bundle, lambda d: (d.pop("manifest_sha256"), d.update(version=2)))
    warning = (f"pulse-edge: {bundle} has no checksum of its manifest (version 2): an edit to manifest.json goes "
               "unnoticed; re-export it to seal it")
    result = _infer(bundle, ecg_png, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["generated_tokens"] == 2 and result.stderr.strip().splitlines() == [warning]
    verified = CliRunner().invoke(main, ["verify", str(bundle)])
    assert verified.exit_code == 0 and "ok, 5 files" in verified.stdout, verified.output
    assert verified.stderr.strip().splitlines() == [warning]
    _unsealed(bundle, lambda d: d["image"].update(image_std=[0.5, 0.5, 0.5]))
    assert _infer(bundle, ecg_png, "--json").exit_code == 0


def test_the_seal_covers_values_not_formatting(tiny_bundle: Path, tmp_path: Path) -> None:
    """Re-indenting or reordering the manifest's keys changes no value and keeps it valid, and so does a number
    spelled another way (jq writes 1.0 as 1); an integer field written as 1.0 is the schema's refusal."""
    bundle = _copy(tiny_bundle, tmp_path)
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps(dict(reversed(list(data.items()))), separators=(",", ":")))
    assert read_manifest(bundle).to_dict() == data
    respelled = re.sub(r"(?<=[\[,:])(-?\d+)\.0(?=[,\]}])", r"\1", path.read_text())  # jq 1.6's 1.0 -> 1
    assert respelled != path.read_text()
    path.write_text(respelled)
    assert read_manifest(bundle).to_dict() == data
    path.write_text(json.dumps(data).replace('"bos_id": 1,', '"bos_id": 1.0,'))
    with pytest.raises(BundleError, match=r"text\.bos_id must be an integer >= 0, got 1\.0"):
        read_manifest(bundle)
    path.write_text(json.dumps(data).replace('"system": "', '"system": " '))
    with pytest.raises(BundleError, match=r"manifest\.json was changed after export"):
        read_manifest(bundle)


def test_verify_of_what_is_not_a_bundle(tmp_path: Path) -> None:
    _assert_refused(CliRunner().invoke(main, ["verify", str(tmp_path / "nope")]), "does not exist")
    _assert_refused(CliRunner().invoke(main, ["verify", str(tmp_path)]), "it has no manifest.json")


def test_verify_shows_a_byte_bar_for_large_files_on_a_terminal(tiny_bundle: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from pulse_edge.cli import progress
    from pulse_edge.runtime.bundle import integrity

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    monkeypatch.setattr(progress, "HASH_BAR_MIN_BYTES", 500_000)  # the tiny decoder.onnx.data and vision.onnx
    console = progress.configure(verbose=False, quiet=False)
    monkeypatch.setattr(console, "_stream", stream)
    with progress.HashBar() as bar:
        integrity.verify_bundle(tiny_bundle, progress=bar)
    shown = stream.getvalue()
    assert "hashing decoder.onnx.data" in shown and "hashing vision.onnx" in shown and "embed_tokens" not in shown
    quiet = progress.configure(verbose=False, quiet=True)
    monkeypatch.setattr(quiet, "_stream", stream := Terminal())
    with progress.HashBar() as bar:
        integrity.verify_bundle(tiny_bundle, progress=bar)
    assert stream.getvalue() == ""


def test_graph_io_is_checked_against_the_manifest(tiny_bundle: Path) -> None:
    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.engines.graph_io import check_graph_io

    spec = read_manifest(tiny_bundle).graphs["vision"]

    def session(name: str = "pixel_values", dtype: str = "tensor(float)", shape: list | None = None) -> Any:
        arg = SimpleNamespace(name=name, type=dtype, shape=shape or ["tiles", 3, 336, 336])
        out = SimpleNamespace(name="image_features", type="tensor(float)", shape=["tiles", 576, 64])
        return SimpleNamespace(get_inputs=lambda: [arg], get_outputs=lambda: [out])

    check_graph_io(spec, session())  # as exported
    with pytest.raises(BundleError, match=r"vision.onnx does not have the inputs the manifest lists \(in the graph "
                                          r"only: \['images'\], in the manifest only: \['pixel_values'\]\)"):
        check_graph_io(spec, session(name="images"))
    with pytest.raises(BundleError, match="pixel_values is float16 in the graph, float32 in the manifest"):
        check_graph_io(spec, session(dtype="tensor(float16)"))
    with pytest.raises(BundleError, match=r"pixel_values is \['tiles', 3, 224, 224\] in the graph"):
        check_graph_io(spec, session(shape=["tiles", 3, 224, 224]))


def test_the_embedding_check_is_a_pass_over_exponent_bits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every non-finite fp16 / fp32 value is found, in any row of any block; finite extremes are not. Blocks of
    1 KiB: the table spans many, the bad row sits in the last, and its number counts the blocks before it."""
    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.bundle import arrays
    from pulse_edge.runtime.bundle.arrays import _check_finite

    monkeypatch.setattr(arrays, "_BLOCK_BYTES", 1024)
    for dtype in (np.float16, np.float32):
        table = np.full((3000, 8), np.finfo(dtype).max, dtype)
        table[::2] = np.finfo(dtype).tiny  # subnormal-adjacent and huge values are fine
        _check_finite(table, tmp_path / "t.npy")
        for bad in (np.nan, np.inf, -np.inf):
            broken = table.copy()
            broken[2999, 7] = bad
            with pytest.raises(BundleError, match="row 2999 is the first"):
                _check_finite(broken, tmp_path / "t.npy")


def test_a_non_finite_image_newline_is_refused_at_load(tmp_path: Path) -> None:
    """spatial_unpad's newline vector is spliced after every row of image tokens: a NaN in it was caught only
    later, named as the vision graph's output."""
    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.bundle.arrays import _read_newline

    vector = np.linspace(-1, 1, 16, dtype=np.float32)
    np.save(tmp_path / "newline.npy", vector)
    assert np.array_equal(_read_newline(tmp_path / "newline.npy", 16), vector)
    vector[5] = np.nan
    np.save(tmp_path / "newline.npy", vector)
    with pytest.raises(BundleError, match=r"newline\.npy holds NaN or infinite values"):
        _read_newline(tmp_path / "newline.npy", 16)


def test_the_manifest_schema_is_valid_json_schema_and_names_the_field_in_one_line() -> None:
    """The schema itself passes jsonschema's meta-schema, and values JSON allows but no manifest holds are refused
    naming the field: NaN (Python's json reads it), a boolean where a count belongs, a list of the wrong length."""
    from jsonschema import Draft202012Validator

    from pulse_edge.errors import BundleError
    from pulse_edge.runtime.bundle.schema import MANIFEST_SCHEMA, check_manifest_json

    Draft202012Validator.check_schema(MANIFEST_SCHEMA)
    good = json.loads(json.dumps({
        "format": "pulse-edge-bundle", "version": 1, "precision": "fp32", "graphs": {}, "tokenizer": "tokenizer.json",
        "kv": {"layers": 2, "kv_heads": 4, "head_dim": 16, "dtype": "float32", "max_length": 256},
        "text": {"hidden_size": 64, "vocab_size": 1000, "bos_id": 1, "eos_id": 2, "max_position_embeddings": 256},
        "embedding": {"file": "embed_tokens.npy", "dtype": "float32", "shape": [1000, 64]},
        "image": {"image_std": [0.3, 0.3, 0.3]},
        "prompt": {"name": "v1", "system": "", "roles": ["U", "A"], "sep": " "},
    }))
    check_manifest_json(good)
    cases = {
        "image.image_std[1] must be a finite number > 0, got nan": lambda d: d["image"].update(
            image_std=[0.3, float("nan"), 0.3]),
        "kv.layers must be an integer >= 1, got a boolean": lambda d: d["kv"].update(layers=True),
        "prompt.roles must be a list of 2, got 3 items": lambda d: d["prompt"].update(roles=["a", "b", "c"]),
        "text lacks 'eos_id'": lambda d: d["text"].pop("eos_id"),
        "kv.head_dim must be an integer >= 1, got 16.0": lambda d: d["kv"].update(head_dim=16.0),
    }
    for expected, damage in cases.items():
        d = json.loads(json.dumps(good))
        damage(d)
        with pytest.raises(BundleError) as caught:
            check_manifest_json(d)
        assert str(caught.value) == f"manifest.json: {expected}; re-export the bundle"
    # another tool's manifest, or a version JSON spells as true (read as 1 it skipped the checksums)
    for damage, words in (({"format": "other-tool-bundle"}, "not a pulse-edge bundle"),
                          ({"version": True}, "bundle manifest version True is not supported")):
        with pytest.raises(BundleError, match=words):
            check_manifest_json({**json.loads(json.dumps(good)), **damage})


def test_an_int8_kv_cache_without_scales_and_a_float_one_with_them_are_refused() -> None:
    from pulse_edge.runtime.bundle.manifest import KVLayout

    shape = {"layers": 2, "kv_heads": 4, "head_dim": 16, "max_length": 64}
    with pytest.raises(BundleError, match=r"a int8 KV cache with scales None \(an int8 cache needs them"):
        KVLayout(**shape, dtype="int8", scales=None)
    with pytest.raises(BundleError, match=r"a float16 KV cache with scales 'per_channel'"):
        KVLayout(**shape, dtype="float16", scales="per_channel")
    assert KVLayout(**shape, dtype="int8", scales="per_channel").scales == "per_channel"


def test_a_prefill_graph_of_another_precision_than_the_bundle_is_refused(tiny_bundle: Path) -> None:
    """The rule holds the prefill graph too, not the decoder alone (a mutant checking the decoder passed)."""
    import dataclasses

    from pulse_edge.runtime.bundle import names
    from pulse_edge.runtime.bundle.checks import check_consistency

    manifest = read_manifest(tiny_bundle)
    decoder = manifest.graphs[names.DECODER]
    prefill = dataclasses.replace(decoder, file="prefill.onnx", precision="int8")
    manifest = dataclasses.replace(manifest, files={**manifest.files, "prefill.onnx": manifest.files[decoder.file]})
    with pytest.raises(BundleError, match=r"precision is 'fp32' but graphs.prefill \(prefill.onnx\) is 'int8'"):
        check_consistency(dataclasses.replace(manifest, graphs={**manifest.graphs, names.PREFILL: prefill}))
    check_consistency(dataclasses.replace(manifest, graphs={**manifest.graphs, names.PREFILL: dataclasses.replace(
        prefill, precision="fp32")}))  # the same graph at the bundle's precision passes


def test_no_stamp_names_an_exports_staging_folder(tiny_bundle: Path) -> None:
    """Validation reads the staging folder under a stamp of its own; that folder is renamed away, so its stamp was
    one orphan file per export in the user's cache for good. The session's exports so far: one stamp each, for
    the bundle's own path."""
    from pulse_edge.runtime.bundle import verified

    stamped = [json.loads(p.read_text())["bundle"] for p in verified.stamp_path(tiny_bundle).parent.glob("*.json")]
    assert str(tiny_bundle.resolve()) in stamped and not [b for b in stamped if b.endswith(".partial")], stamped


def test_a_bundle_written_over_after_its_load_answers_nothing_until_loaded_again(tiny_bundle: Path, tmp_path: Path,
                                                                                  ecg_png: Path) -> None:
    """The table and the graphs' data are mapped: a `cp` into the folder of a loaded bundle changed every token with
    no error (and a file cut short killed the process with SIGBUS). A write into a loaded file is refused before
    the next question; new files renamed over the paths leave the loaded ones whole, and answers go on unchanged."""
    from pulse_edge.runtime.pipeline import Pipeline

    bundle = _copy(tiny_bundle, tmp_path)
    table = bundle / "embed_tokens.npy"
    with Pipeline.from_bundle(bundle) as pipeline:
        first = pipeline.interpret(ecg_png, max_new_tokens=4).token_ids
        renamed = tmp_path / "new.npy"  # an update deployed by renaming: the loaded inode stays as it was
        np.save(renamed, -np.load(table))
        os.replace(renamed, table)
        assert pipeline.interpret(ecg_png, max_new_tokens=4).token_ids == first
        os.truncate(table, 4096)  # an update copied in place, cut short: its new inode is not the loaded one
        assert pipeline.interpret(ecg_png, max_new_tokens=4).token_ids == first
    with Pipeline.from_bundle(_copy(tiny_bundle, tmp_path / "again")) as pipeline:
        conversation = pipeline.chat()
        conversation.ask("Rate?", Image.open(ecg_png), max_new_tokens=2)
        data = pipeline.bundle / "decoder.onnx.data"
        with open(data, "r+b") as handle:  # `cp` onto a loaded file: the same inode, other bytes
            handle.seek(data.stat().st_size // 2)
            handle.write(bytes(8))
        for ask in (lambda: conversation.ask("And the axis?"),  # a follow-up, then a new question
                    lambda: pipeline.interpret(ecg_png, max_new_tokens=4)):
            with pytest.raises(BundleError, match=r"decoder\.onnx\.data was written over after the bundle was "
                                                  r"loaded \(an update copied into the folder in use\?\)"):
                ask()


def test_a_bundle_that_cannot_be_held_open_says_why_and_a_check_during_close_says_nothing(tmp_path: Path) -> None:
    """Out of file descriptors is no damaged bundle ("copy the bundle again" was the advice); a /health check that
    meets the pipeline's close (a server stopping) read closed descriptors: an OSError, a 500."""
    import resource

    from pulse_edge.runtime.bundle.loaded import LoadedFiles

    for k in range(24):
        (tmp_path / f"part{k}").write_bytes(b"x")
    manifest = SimpleNamespace(files={f"part{k}": None for k in range(24)})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (16, hard))
    try:
        with pytest.raises(BundleError, match=r"\(Too many open files\); raise the open-files limit \(ulimit -n\)"):
            LoadedFiles(tmp_path, manifest)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    files = LoadedFiles(tmp_path, manifest)
    held = list(files._held)
    for _, fd, _ in held:  # what close() does, while a check runs over the list it had
        os.close(fd)
    files.check()
    files._held = []
