"""Hostile inputs a new user tries: each is one line `pulse-edge: error: ...`, exit 2, nothing written or lost.

Bad configs, bad output paths (checked before any work), bad option values, damaged data files, and the
messages that must say what a thing is and what to do. Damaged bundles are tests/runtime/test_bundle_integrity.py;
locks, signals and stale temporaries are tests/test_staging.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from pulse_edge.cli.main import main

UNWRITABLE = Path("/proc/pulse-edge-test-output")  # a pseudo filesystem nobody may create in


def _run(*args: str) -> Any:
    return CliRunner().invoke(main, list(args))


def _one_line(result: Any, expected: str = "", code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pulse-edge: error:"), result.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.output
    return lines[0]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- bad configs ------------------------------------------------------------------------------------------------

CONFIG_DAMAGE = {
    "vocab_size null": (lambda d: {**d, "vocab_size": None}, "vocab_size must be an integer >= 1, got None"),
    "num_attention_heads 0": (lambda d: {**d, "num_attention_heads": 0},
                              "num_attention_heads must be an integer >= 1, got 0"),
    "a JSON list": (lambda d: [d], "holds a JSON list, not a config object"),
    "hidden_size 10**9": (lambda d: {**d, "hidden_size": 10**9}, "hidden_size 1000000000 is beyond any LLaVA"),
    "num_hidden_layers 10**7": (lambda d: {**d, "num_hidden_layers": 10**7},
                                "num_hidden_layers 10000000 is beyond any LLaVA"),
    # the tokenizer is another model's: an IndexError traceback in the first forward, or a failure at the end of an
    # export naming its temporary folder (a review of untouched paths)
    "vocab_size under the tokenizer's pieces": (lambda d: {**d, "vocab_size": 900},
                                                "tokenizer.model has 1000 pieces but"),
    "eos_token_id not the tokenizer's": (lambda d: {**d, "eos_token_id": 3},
                                         "config.json: eos_token_id is 3 but tokenizer.model has it at 2"),
    "tie_word_embeddings a string": (lambda d: {**d, "tie_word_embeddings": "false"},  # bool("false") is True
                                     "tie_word_embeddings must be true or false, got 'false'"),
    # (null is transformers' default, false: read so, tests/export/test_checkpoint.py)
    # found after the weights were read, and blamed on an --max-context nobody gave
    "max_position_embeddings under the smallest image": (
        lambda d: {**d, "max_position_embeddings": 512}, "max_position_embeddings 512 cannot hold the smallest image"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_DAMAGE))
def test_a_bad_config_is_one_line(case: str, tiny_checkpoint: Path, tmp_path: Path, ecg_png: Path) -> None:
    change, expected = CONFIG_DAMAGE[case]
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    config = checkpoint / "config.json"
    config.write_text(json.dumps(change(json.loads(config.read_text()))))
    _one_line(_run("export", str(checkpoint), "-o", str(tmp_path / "bundle")), expected)
    _one_line(_run("infer", str(ecg_png), "--model", str(checkpoint)), expected)
    _one_line(_run("calibrate", str(checkpoint), "-o", str(tmp_path / "s.npz")), expected)
    assert _listing(tmp_path) == ["ckpt"]  # no bundle, no temporary folder, no lock, no scales


def _damage_index(checkpoint: Path, change: Any) -> None:
    index = checkpoint / "model.safetensors.index.json"
    if not index.is_file():
        pytest.skip("the tiny checkpoint is one file: no shard index to damage")
    index.write_text(change(index.read_text()))


@pytest.mark.parametrize(("change", "expected"), [
    (lambda text: text[: len(text) // 2], "is not a valid shard index (Unterminated string"),
    (lambda text: "[]", "is not a valid shard index (a JSON list, not an object)"),
    (lambda text: json.dumps({**json.loads(text), "weight_map": []}), "its weight_map must map tensor names"),
], ids=["cut short", "a list", "weight_map a list"])
def test_a_damaged_shard_index_is_one_line(change: Any, expected: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    _damage_index(checkpoint, change)
    _one_line(_run("export", str(checkpoint), "-o", str(tmp_path / "bundle")), expected)
    _one_line(_run("calibrate", str(checkpoint), "-o", str(tmp_path / "s.npz")), expected)
    assert _listing(tmp_path) == ["ckpt"]


def test_integer_weights_are_refused_not_cast(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A norm stored as int64 with the right shape: .to(float32) would make weights of its codes, and the
    reference built from the same values would pass every check."""
    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    shard = next(f for f in sorted(checkpoint.glob("*.safetensors"))
                 if any(k.endswith("norm.weight") for k in load_file(f)))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("norm.weight"))
    save_file({**tensors, key: tensors[key].round().long()}, shard, metadata={"format": "pt"})
    _one_line(_run("export", str(checkpoint), "-o", str(tmp_path / "bundle")), "is stored as torch.int64")


def test_a_weight_past_fp16s_range_is_named_at_an_fp16_export(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """One decoder weight of 1e6: numpy's overflow warning leaked, then every check read "rel err nan"."""
    from safetensors.torch import load_file, save_file

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    shard = next(f for f in sorted(checkpoint.glob("*.safetensors"))
                 if any(k.endswith("mlp.down_proj.weight") for k in load_file(f)))
    tensors = load_file(shard)
    key = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    tensors[key][0, 0] = 1e6
    save_file(tensors, shard, metadata={"format": "pt"})
    line = _one_line(_run("export", str(checkpoint), "-o", str(tmp_path / "bundle"), "--precision", "fp16"),
                     "holds values up to 1e+06, past fp16's 65504")
    assert "RuntimeWarning" not in line and _listing(tmp_path) == ["ckpt"]


# --- output paths -----------------------------------------------------------------------------------------------

def _targets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    afile = tmp_path / "notes.txt"
    afile.write_text("user data")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("user data")
    return {"under a file": (afile / "out", "is a file, not a directory"),
            "under /proc": (UNWRITABLE / "out", "is not writable"),
            "a non-empty directory": (full, "not empty")}


@pytest.mark.parametrize("case", ["under a file", "under /proc", "a non-empty directory"])
@pytest.mark.parametrize("command", ["export", "make-tiny", "calibrate"])
def test_a_bad_output_path_is_refused_before_any_work(command: str, case: str, tiny_checkpoint: Path,
                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.build.bundle as bundle
    import pulse_edge.export.fixtures.tiny as tiny
    import pulse_edge.export.model.torch_backend as torch_backend

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("work started before the output path was checked")

    # where the commands call it (each module imported the function by name): export, calibrate
    monkeypatch.setattr(bundle, "load_checkpoint", no_work)
    monkeypatch.setattr(torch_backend, "load_checkpoint", no_work)
    monkeypatch.setattr(tiny, "_write_checkpoint", no_work)
    out, expected = _targets(tmp_path)[case]
    if command == "calibrate" and case == "a non-empty directory":
        expected = "is a directory, not a scales file; give a file name"
    args = {"export": ["export", str(tiny_checkpoint), "-o", str(out)], "make-tiny": ["make-tiny", str(out)],
            "calibrate": ["calibrate", str(tiny_checkpoint), "-o", str(out / "scales.npz" if case != "a non-empty "
                                                                          "directory" else out)]}[command]
    _one_line(_run(*args), expected)
    assert _listing(tmp_path) == ["full", "notes.txt"]
    assert (tmp_path / "full" / "keep.txt").read_text() == "user data"
    assert (tmp_path / "notes.txt").read_text() == "user data"


def _no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.cli.infer as infer_module

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the output places were checked")

    monkeypatch.setattr(infer_module, "open_backend", refuse)


@pytest.mark.parametrize("case", ["a directory", "under /proc", "renders under /proc", "another file's JSON",
                                  "a JSON list", "a JSON number", "a text file", "a device",
                                  "one render under /proc", "one render into a folder", "one render under a file"])
def test_infer_output_places_are_checked_before_the_model_loads(case: str, tiny_bundle: Path, ecg_png: Path,
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """`--output` a folder, in a place nobody can write, with --save-render there, or a file that is not an infer
    output (a config.json written by json.dump: one object, no newline): one line, and the file is untouched."""
    _no_model(monkeypatch)
    content = {"a JSON list": "[{\"threads\": 2}]", "a JSON number": "42", "a text file": "api_key: sk-123"}.get(
        case, json.dumps({"threads": 2}))
    config = tmp_path / "config.json"
    config.write_text(content)
    args, expected = {
        "a directory": (["--output", str(tmp_path)], "is a directory, not a --output file"),
        "under /proc": (["--output", str(UNWRITABLE / "a.jsonl")], "is not writable"),
        "renders under /proc": (["--output", str(tmp_path / "a.jsonl"), "--save-render", str(UNWRITABLE)],
                                "is not writable"),
        "another file's JSON": (["--output", str(config)], "line 1 has no source"),
        "a JSON list": (["--output", str(config)], "line 1 is not a JSON object"),
        "a JSON number": (["--output", str(config)], "line 1 is not a JSON object"),
        "a text file": (["--output", str(config)], "line 1 is not JSON"),
        # /dev/null: fsync refused it with a traceback after the first answer
        "a device": (["--output", "/dev/null"], "/dev/null is not a regular file (a device or a pipe)"),
        # one input: --save-render was never checked, and failed with a traceback
        "one render under /proc": (["--save-render", str(UNWRITABLE / "r.png")], "is not writable"),
        "one render into a folder": (["--save-render", str(tmp_path)], "is a directory, not a --save-render file"),
        "one render under a file": (["--save-render", str(config / "r.png")], "is a file, not a directory"),
    }[case]
    _one_line(_run("infer", str(ecg_png), "--model", str(tiny_bundle), *args), expected)
    assert config.read_text() == content and not (tmp_path / "a.jsonl").exists()


def test_a_second_infer_into_the_same_output_is_refused_while_the_first_writes(tiny_bundle: Path, ecg_png: Path,
                                                                               tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from pulse_edge.staging import target_lock

    _no_model(monkeypatch)
    out = tmp_path / "answers.jsonl"
    with target_lock(out, what="--output file"):  # as a first run holds it for its whole batch
        result = _run("infer", str(ecg_png), "--model", str(tiny_bundle), "--output", str(out))
    _one_line(result, f"another pulse-edge command is writing {out}")
    assert not out.exists()


def test_a_second_calibrate_into_the_same_file_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from pulse_edge.staging import target_lock

    out = tmp_path / "scales.npz"
    with target_lock(out, what="scales file"):  # as a running calibrate holds it until its file is written
        _one_line(_run("calibrate", str(tiny_checkpoint), "-o", str(out)),
                  f"another pulse-edge command is writing {out}")
    assert not out.exists()


# --- option values ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["--temperature", "0.7", "--seed", "-1"], "Invalid value for '--seed': -1 is not in the range"),
    (["--temperature", "inf"], "Invalid value for '--temperature': inf is not a finite number"),
    (["--temperature", "nan"], "Invalid value for '--temperature': nan is not a finite number"),
    (["--threads", "100000"], "threads 100000 is more than the"),
    (["--device", "banana"], "Invalid value for '--device': 'banana' is not one of auto, cpu, cuda or cuda:N"),
    (["--max-new-tokens", "0"], "Invalid value for '--max-new-tokens': 0 is not in the range x>=1"),
    (["--question", "Rate\udce9?"], "the --question is not valid text: character 4"),  # a Latin-1 byte in argv
    (["--question", "  "], "--question is empty; leave it out"),  # asked the default question in silence before
])
def test_bad_infer_values_are_one_line(args: list[str], expected: str, tiny_bundle: Path, ecg_png: Path) -> None:
    result = _run("infer", str(ecg_png), "--model", str(tiny_bundle), *args)
    _one_line(result, expected)
    assert result.stdout == ""


def test_make_tiny_refuses_an_outlier_scale_with_no_outlier_dims(tmp_path: Path) -> None:
    _one_line(_run("make-tiny", str(tmp_path / "t"), "--outlier-scale", "20"), "give --outliers N too")
    assert _listing(tmp_path) == []


def test_make_tiny_refuses_a_size_the_disk_cannot_hold_before_writing(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`--layers 100000` ran until killed; a full-shape checkpoint on a small disk failed at its last shard."""
    import shutil

    from pulse_edge.cli import fixtures

    _one_line(_run("make-tiny", str(tmp_path / "t"), "--layers", "100000"), "100000 is not in the range 1<=x<=80")
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fixtures.shutil, "disk_usage", lambda _: real._replace(free=10 << 30))
    line = _one_line(_run("make-tiny", str(tmp_path / "t"), "--full-shape"))
    # 6.74 G (the decoder) + 0.30 G (the tower) + 0.02 G (the projector) parameters in bf16: 14.1 GB
    assert "the checkpoint's weights take 13.2 GiB and" in line and "has 10.0 GiB free" in line
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("args", [["serve", "b", "--timeout", "nan"], ["serve", "b", "--max-body-mb", "inf"],
                                  ["build-engines", "b", "--workspace", "nan"],
                                  ["make-tiny", "t", "--outlier-scale", "inf"], ["infer", "x.png", "--fs", "nan"],
                                  ["infer", "x.png", "--top-p", "nan"]],
                         ids=["serve timeout nan", "serve body inf", "workspace nan", "outlier scale inf", "fs nan",
                              "top-p nan"])
def test_nan_and_inf_are_refused_where_a_range_would_let_them_through(args: list[str], tmp_path: Path) -> None:
    """nan fails every comparison, so a bare range admitted it: --timeout nan answered every request 504."""
    _one_line(_run(*args[:1], str(tmp_path / args[1]), *args[2:]), "is not a finite number")
    assert _listing(tmp_path) == []


def test_a_studys_scale_refuses_nan_through_the_same_type() -> None:
    from pulse_edge.benchmarks.studies.cpu_kernels import main as study

    result = CliRunner().invoke(study, ["--scale", "nan"])
    assert result.exit_code == 2 and "Invalid value for '--scale': nan is not a finite number" in result.output


@pytest.mark.parametrize("args", [["bench", "latency", "--model", "m"], ["bench", "profile", "--model", "m"],
                                  ["bench", "backends"]], ids=["latency", "profile", "backends"])
def test_a_bench_report_path_is_checked_before_any_measuring(args: list[str], tmp_path: Path) -> None:
    """--json naming a folder or an unwritable place: one line when the command line is read, not a traceback
    after minutes of runs (the model path is never even opened)."""
    for target, expected in ((tmp_path, "is a directory, not a report file"),
                             (UNWRITABLE / "r.json", "is not writable")):
        _one_line(_run(*[a if a != "m" else str(tmp_path / "none") for a in args], "--json", str(target)), expected)


@pytest.mark.parametrize(("model", "args", "expected"), [
    ("checkpoint", ["--threads", "2"], "--threads: settings of the ort backend; the torch backend"),
    ("checkpoint", ["--prefill-chunk", "64"], "--prefill-chunk: settings of the ort backend"),
    ("bundle", ["--backend", "trt", "--decode-step", "native", "--no-prepack"],
     "--no-prepack, --decode-step: ONNX Runtime settings; the trt backend runs TensorRT engines"),
], ids=["torch threads", "torch chunk", "trt decode step"])
def test_ort_settings_given_to_another_backend_are_refused_not_ignored(model: str, args: list[str], expected: str,
                                                                       tiny_checkpoint: Path, tiny_bundle: Path,
                                                                       ecg_png: Path) -> None:
    path = tiny_checkpoint if model == "checkpoint" else tiny_bundle
    _one_line(_run("infer", str(ecg_png), "--model", str(path), *args), expected)


@pytest.mark.parametrize("command", ["backends", "recipes", "latency"])
def test_bench_threads_beyond_the_cores_are_refused_when_read(command: str, tmp_path: Path) -> None:
    """Not after minutes of exports and calibration (bench recipes) or a torch set to 100000 threads."""
    model = ["--model", str(tmp_path / "none")] if command == "latency" else []
    _one_line(_run("bench", command, *model, "--threads", "100000"), "100000 is more than the")


def test_a_bad_device_for_the_torch_backend_is_one_line() -> None:
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.model.torch_backend import resolve_device

    with pytest.raises(ConfigError, match="device 'banana' is not one of auto, cpu, cuda or cuda:N"):
        resolve_device("banana")
    with pytest.raises(ConfigError, match="device 'cpu:0x' is not one of"):
        resolve_device("cpu:0x")


@pytest.mark.parametrize(("name", "args", "expected"), [
    ("x.png", ["--size", "0x0"], "page 0x0 px is outside 1x1 .. 64,000,000 pixels"),
    ("x.png", ["--size", "100000x100000"], "page 100000x100000 px is outside"),
    ("x.png", ["--size", "-3x5"], "page -3x5 px is outside"),
    ("x.png", ["--seed", "-1"], "Invalid value for '--seed'"),
    ("x.gif", [], "the extension '.gif' is not one of .png, .jpg"),
    ("x", [], "the extension '(none)' is not one of"),
    ("missing/x.png", [], "does not exist; create it first"),
])
def test_bad_render_ecg_values_are_one_line(name: str, args: list[str], expected: str, tmp_path: Path) -> None:
    _one_line(_run("render-ecg", str(tmp_path / name), *args), expected)
    assert _listing(tmp_path) == []


def test_render_ecg_writes_each_format_it_names(tmp_path: Path) -> None:
    for name, kind in (("a.jpg", "JPEG"), ("a.tif", "TIFF"), ("a.bmp", "BMP")):
        result = _run("render-ecg", str(tmp_path / name), "--size", "1100x850")
        assert result.exit_code == 0, result.output
        assert Image.open(tmp_path / name).format == kind
    assert _listing(tmp_path) == ["a.bmp", "a.jpg", "a.tif"]  # no temporary files left


# --- data files -------------------------------------------------------------------------------------------------

def _corrupt_parquet(folder: Path) -> Path:
    path = folder / "ptb-test" / "test-00000-of-00001.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1" + b"\x00" * 200 + b"not a footer")
    return path


def test_a_corrupt_parquet_is_one_line_for_eval_score(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow (pulse-edge[bench])")
    path = _corrupt_parquet(tmp_path / "data")
    predictions = tmp_path / "p.jsonl"
    predictions.write_text('{"id": "a", "text": "NORM"}\n')
    _one_line(_run("eval", "score", "--subset", "ptb", "--data", str(tmp_path / "data"), "--predictions",
                   str(predictions)), f"{path} is not a readable parquet file")


def test_a_corrupt_parquet_is_one_line_for_calibrate(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("pyarrow", reason="parquet needs pyarrow (pulse-edge[bench])")
    path = _corrupt_parquet(tmp_path / "data")
    out = tmp_path / "scales.npz"
    _one_line(_run("calibrate", str(tiny_checkpoint), "--data", str(path), "--samples", "2", "-o", str(out)),
              f"{path} is not a readable parquet file")
    assert not out.exists()


def test_an_empty_predictions_file_has_nothing_to_score(tmp_path: Path) -> None:
    predictions = tmp_path / "p.jsonl"
    predictions.write_text("")
    _one_line(_run("eval", "score", "--subset", "ptb", "--data", str(tmp_path), "--predictions", str(predictions)),
              "holds no predictions: nothing to score")


# --- messages ---------------------------------------------------------------------------------------------------

def test_a_bundle_without_its_manifest_is_named_a_bundle(tiny_bundle: Path, tmp_path: Path, ecg_png: Path) -> None:
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    (bundle / "manifest.json").unlink()
    line = _one_line(_run("infer", str(ecg_png), "--model", str(bundle)))
    assert "looks like a pulse-edge bundle (decoder.onnx, vision.onnx) but has no manifest.json" in line
    assert "re-copy or re-export it" in line and "not a checkpoint" not in line


def test_export_and_calibrate_name_their_argument_not_an_option(tmp_path: Path, tiny_bundle: Path) -> None:
    for command in ("export", "calibrate"):
        missing = _one_line(_run(command, str(tmp_path / "nope"), "-o", str(tmp_path / "out")))
        assert "--model" not in missing and "does not exist: a checkpoint is a directory" in missing
        bundle = _one_line(_run(command, str(tiny_bundle), "-o", str(tmp_path / "out")))
        assert "is a pulse-edge bundle, not a checkpoint" in bundle


def test_a_multi_page_pdf_says_which_page_it_reads(tiny_bundle: Path, tmp_path: Path, ecg_png: Path) -> None:
    pdf = tmp_path / "two.pdf"
    first = Image.open(ecg_png).convert("RGB")
    first.save(pdf, save_all=True, append_images=[Image.new("RGB", first.size, "white")], resolution=200)
    result = _run("infer", str(pdf), "--model", str(tiny_bundle), "--max-new-tokens", "1", "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == f"pulse-edge: note: {pdf} has 2 pages; reading the first (export the ECG's " \
                                    "page alone to read another)"
    assert json.loads(result.stdout)["image_tokens"] == 2880  # the print on page 1, not the blank page 2


def test_verify_of_a_checkpoint_says_it_has_no_checksums(tiny_checkpoint: Path, ecg_png: Path) -> None:
    _one_line(_run("infer", str(ecg_png), "--model", str(tiny_checkpoint), "--verify"),
              "--verify checks a bundle's files against its manifest; ")


def test_calibrate_reads_its_data_before_it_loads_the_model(tiny_checkpoint: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A typo in --data cost minutes and ~14 GB of loading the 7B before it was reported."""
    from pulse_edge.export.model.torch_backend import TorchPipeline

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not be loaded before the data is read")

    monkeypatch.setattr(TorchPipeline, "from_checkpoint", never)
    (tmp_path / "bad.json").write_text('{"not": "a list"}')
    result = _run("calibrate", str(tiny_checkpoint), "--data", str(tmp_path / "bad.json"), "-o",
                  str(tmp_path / "s.npz"))
    _one_line(result, "bad.json")
    assert not (tmp_path / "s.npz").exists()


def test_calibration_on_fewer_samples_than_asked_says_so(caplog: pytest.LogCaptureFixture) -> None:
    from pulse_edge.calibration.calibrate import CalibrationOptions, choose_samples

    with caplog.at_level("WARNING"):
        chosen = choose_samples(CalibrationOptions(data="synthetic:3", samples=8))
    assert len(chosen) == 3 and "holds 3 usable samples, fewer than the 8 asked for" in caplog.text


def test_a_missing_package_is_one_line_and_a_missing_module_of_ours_a_bug() -> None:
    """`bench gpu --dry-run` on a machine without jsonschema (imported by every runtime path since the bundle schema)
    was a ModuleNotFoundError traceback (a docs review)."""
    import click

    from pulse_edge.cli.group import UserErrorGroup

    @click.group(cls=UserErrorGroup)
    def group() -> None:
        pass

    @group.command()
    @click.argument("module")
    def needs(module: str) -> None:
        raise ModuleNotFoundError(f"No module named {module!r}", name=module)

    missing = CliRunner().invoke(group, ["needs", "no_such_package_here.validators"])
    assert missing.exit_code == 2 and missing.stderr.count("\n") == 1
    assert missing.stderr.startswith("pulse-edge: error: this command needs the Python module "
                                     "'no_such_package_here', which is not installed")
    other = CliRunner().invoke(group, ["needs", "click.llava_nexter"])  # installed, but not with that module
    assert other.exit_code == 2 and other.stderr.startswith(
        "pulse-edge: error: this command needs 'click.llava_nexter', which the installed click does not have")
    spaced = CliRunner().invoke(group, ["needs", "google.no_such_part"])  # a namespace package: nobody's install
    assert spaced.exit_code == 2 and "the Python module 'google.no_such_part', which is not installed" in spaced.stderr
    ours = CliRunner().invoke(group, ["needs", "pulse_edge.runtime.gone"])
    assert isinstance(ours.exception, ModuleNotFoundError)  # a module of pulse-edge's own missing is a bug


def test_the_groups_own_bad_options_are_one_line_and_no_command_is_the_help() -> None:
    """`pulse-edge --bogus verify b` printed click's usage, its hint and the error (three lines); `pulse-edge bench`
    with no command printed its help after "pulse-edge: error:" (a docs review)."""
    bogus = CliRunner().invoke(main, ["--bogus", "verify", "b"])
    assert bogus.exit_code == 2 and bogus.stderr.count("\n") == 1
    assert bogus.stderr.startswith("pulse-edge: error: No such option '--bogus'")
    both = CliRunner().invoke(main, ["-v", "-q", "verify", "b"])
    assert both.exit_code == 2 and both.stderr.count("\n") == 1 and "contradict" in both.stderr
    for args in ([], ["bench"], ["eval"]):
        helped = CliRunner().invoke(main, args)
        assert helped.exit_code == 2 and "pulse-edge: error" not in helped.output and "Commands:" in helped.output, args


@pytest.mark.parametrize("command", ["recipes", "backends"])
def test_a_bench_work_folder_that_is_a_file_is_one_line(command: str, tmp_path: Path) -> None:
    """FileExistsError traceback, exit 1, from `--work FILE` (a review of untouched paths)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    _one_line(_run("bench", command, "--work", str(afile)), "is a file")


@pytest.mark.parametrize(("args", "expected"), [
    (["bench", "gpu", "--dry-run", "--steps", ""], "--steps names no step"),  # said "a list of integers"
    (["make-tiny", "{tmp}/x", "--outliers", "2", "--outlier-scale", "1e40"],  # inf weights, written with exit 0
     "1e+40 is not in the range 0<x<=10000"),
    (["make-tiny", "{tmp}/y", "--layout", "llava_next"], "give --merge spatial_unpad"),
    (["render-ecg", "{tmp}"], "is a directory; OUT is the print's file name"),  # "the extension '(none)'"
    (["eval", "compare", "{tmp}", "{tmp}/afile", "--data", "{tmp}"], "afile: is a file, not a run folder"),
])
def test_small_misleading_lines_name_what_is_wrong(args: list[str], expected: str, tmp_path: Path) -> None:
    """From a review of untouched paths: each was one line, but naming the wrong thing."""
    (tmp_path / "afile").write_text("x")
    _one_line(_run(*[a.replace("{tmp}", str(tmp_path)) for a in args]), expected)


def test_a_checkpoint_whose_own_vision_overflows_is_named_at_export(tmp_path: Path) -> None:
    """make-tiny --init-range 1e30: the reference's vision features are inf; export said "the bundle may be damaged
    (run `pulse-edge verify MODEL`)" about a bundle not yet written (a review of untouched paths)."""
    assert _run("make-tiny", str(tmp_path / "big"), "--init-range", "1e30").exit_code == 0
    _one_line(_run("export", str(tmp_path / "big"), "-o", str(tmp_path / "b"), "--validation", "quick"),
              "the torch reference's vision features hold NaN or inf on a validation print")
    assert _listing(tmp_path) == ["big"]


@pytest.mark.slow  # 18 s here: the bandwidth probe runs before the model is opened
def test_bench_latency_passes_its_engines_to_the_backend(tiny_bundle: Path, tmp_path: Path) -> None:
    """`bench latency --engines DIR` (the refusal for engines outside the bundle told the user to pass it, and bench
    latency had no such option): it reaches the backend, which holds it to --backend trt."""
    result = _run("bench", "latency", "--model", str(tiny_bundle), "--engines", str(tmp_path), "--sizes", "900x700",
                  "--runs", "1", "--warmup", "0")
    assert result.exit_code == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "pulse-edge: error: --engines names TensorRT engines: it goes with --backend trt")
