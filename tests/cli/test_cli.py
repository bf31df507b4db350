"""`pulse-edge` end to end: make-tiny, render-ecg, infer; and one clean line for every user error."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from pulse_edge.cli.main import main
from pulse_edge.errors import DeviceMemoryError


def _run(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, in a fresh process (as a device integrator calls it)."""
    exe = shutil.which("pulse-edge", path=str(Path(sys.executable).parent))
    assert exe, "the pulse-edge console script is not installed next to this interpreter"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_make_tiny_then_infer_json(tmp_path: Path, ecg_png: Path) -> None:
    model = tmp_path / "tiny"
    made = _run("make-tiny", str(model))
    assert made.returncode == 0, made.stderr
    out = _run("infer", str(ecg_png), "--model", str(model), "--json", "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["image_tokens"] == 2880
    assert result["generated_tokens"] == len(result["token_ids"]) <= 8
    assert result["prompt_tokens"] > 2880
    assert set(result["timings"]) >= {"preprocess_ms", "vision_ms", "prefill_ms", "decode_tokens_per_s"}
    assert isinstance(result["text"], str)


def test_infer_streams_text_and_summarises_on_stderr(tiny_checkpoint: Path, ecg_png: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["infer", str(ecg_png), "--model", str(tiny_checkpoint), "--max-new-tokens", "6"])
    assert res.exit_code == 0, res.output
    assert "2880 image tokens" in res.stderr
    as_json = runner.invoke(main, ["infer", str(ecg_png), "--model", str(tiny_checkpoint), "--max-new-tokens", "6",
                                   "--json"])
    assert res.stdout.rstrip("\n") == json.loads(as_json.stdout)["text"]
    quiet = runner.invoke(main, ["-q", "infer", str(ecg_png), "--model", str(tiny_checkpoint), "--max-new-tokens", "6"])
    assert quiet.exit_code == 0 and quiet.stdout == res.stdout  # -q: the answer alone (the summary was printed)
    assert quiet.stderr == ""


def test_render_ecg_writes_a_print(tmp_path: Path) -> None:
    out = tmp_path / "af.png"
    res = CliRunner().invoke(main, ["render-ecg", str(out), "--rhythm", "afib", "--size", "3300x2550"])
    assert res.exit_code == 0, res.output
    assert Image.open(out).size == (3300, 2550)


def _bad_inputs(tmp: Path) -> dict[str, Path]:
    corrupt = tmp / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    tiny = tmp / "tiny.png"
    Image.new("RGB", (1, 1)).save(tiny)
    text = tmp / "notes.txt"
    text.write_text("not an image")
    return {"corrupt": corrupt, "one pixel": tiny, "text file": text, "missing": tmp / "nope.png"}


@pytest.mark.parametrize("case", ["corrupt", "one pixel", "text file", "missing"])
def test_bad_images_give_one_line_and_exit_2(tmp_path: Path, tiny_checkpoint: Path, case: str) -> None:
    path = _bad_inputs(tmp_path)[case]
    res = _run("infer", str(path), "--model", str(tiny_checkpoint))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pulse-edge: error:"), res.stderr
    assert "Traceback" not in res.stderr and res.stdout == ""


def test_bad_model_dir_gives_one_line(tmp_path: Path, ecg_png: Path) -> None:
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr.strip() == (f"pulse-edge: error: {tmp_path} is neither a pulse-edge bundle (no manifest.json) "
                                  "nor a checkpoint (no config.json); pass the directory `pulse-edge export` wrote, "
                                  "or a PULSE checkpoint")


def test_make_tiny_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("user data")
    res = CliRunner().invoke(main, ["make-tiny", str(tmp_path)])
    assert res.exit_code == 2 and "not empty" in res.stderr
    assert (tmp_path / "keep.txt").read_text() == "user data"


def test_prompt_longer_than_the_context_is_one_line(tiny_checkpoint: Path, ecg_png: Path) -> None:
    question = "Describe the ST segment in every lead. " * 600  # far beyond 4096 - 2880 positions
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tiny_checkpoint), "--question", question])
    assert res.exit_code == 2
    assert res.stderr.startswith("pulse-edge: error: the prompt takes") and "context holds 4096" in res.stderr
    assert res.stderr.count("\n") == 1


def test_interrupted_make_tiny_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.fixtures.tiny as tiny

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # the user pressing Ctrl-C halfway through the shards

    monkeypatch.setattr(tiny, "write_shards", broken)
    res = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert res.exit_code == 130
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("error", "line"), [
    (OSError(28, "No space left on device", "/data/out/scores.json"),
     "pulse-edge: error: the disk is full writing /data/out/scores.json: "),
    (MemoryError("onnxruntime could not allocate 2.0 GiB"), "pulse-edge: error: onnxruntime could not allocate 2.0 "
     "GiB: free memory (close other programs) or use a smaller bundle or fewer --threads, and run the command again"),
    (DeviceMemoryError("the GPU's memory is full: close other GPU programs"),
     "pulse-edge: error: the GPU's memory is full: close other GPU programs"),
], ids=["disk", "host memory", "device memory"])
def test_the_machine_s_state_is_one_line_naming_what_to_do_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  error: BaseException, line: str) -> None:
    """A full disk names the file it was writing; the host's memory names --threads; a full GPU says its own fix
    (the host's RAM and --threads are not it); each exits 2, the machine's state, not a bug's 1."""
    import pulse_edge.export.fixtures.tiny as tiny

    def fails(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(tiny, "write_shards", fails)
    res = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
    assert res.exit_code == 2 and res.output.strip().splitlines() == [res.output.strip()], res.output
    assert res.output.strip().startswith(line), res.output


def test_ctrl_c_inside_a_library_s_lazy_import_is_an_interruption(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers wraps a KeyboardInterrupt raised while it imports a model class in its own error ("Could not
    import module 'CLIPVisionModel'"): a traceback and exit 1 where Ctrl-C exits 130. Another error stays a bug."""
    import pulse_edge.export.fixtures.tiny as tiny

    def interrupted_inside(wrapper: Exception, chained: bool) -> Any:
        def lazy_import(*args: object, **kwargs: object) -> None:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as e:
                if chained:
                    raise wrapper from e
                raise wrapper  # noqa: B904 - raised while handling it: its __context__, as a library may
        return lazy_import

    # transformers' own wording, then a library's own error type around it; "from" or raised while handling it
    for wrapper, chained in itertools.product((ModuleNotFoundError("Could not import module 'CLIPVisionModel'"),
                                               RuntimeError("Failed to import transformers.models.clip")),
                                              (True, False)):
        wrapper.__cause__ = wrapper.__context__ = None
        monkeypatch.setattr(tiny, "write_shards", interrupted_inside(wrapper, chained))
        res = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")])
        assert res.exit_code == 130 and "interrupted" in res.output and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(tiny, "write_shards", lambda *a, **k: (_ for _ in ()).throw(ModuleNotFoundError("x")))
    assert isinstance(CliRunner().invoke(main, ["make-tiny", str(tmp_path / "ckpt")]).exception, ModuleNotFoundError)


def test_ctrl_c_in_a_subgroup_s_command_is_said_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`bench` and `eval` are groups of their own: their exit after saying "interrupted" carried the Ctrl-C inside,
    and the top group said it again."""
    from pulse_edge.benchmarks.perf import latency

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(latency, "run_latency", interrupted)
    res = CliRunner().invoke(main, ["bench", "latency", "--model", str(tmp_path)])
    assert res.exit_code == 130 and res.output.count("interrupted") == 1, res.output


def test_a_disk_filling_up_during_an_export_is_one_line_and_leaves_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    from pulse_edge.export.graphs.decoder import ExternalData

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write into an open file raises it

    monkeypatch.setattr(ExternalData, "initializer", full)
    out = tmp_path / "bundle"
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(out), "--validation", "quick"])
    assert res.exit_code == 2, res.output
    assert f"the disk is full writing {out}" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # no bundle, no partial directory, no lock file


def test_memory_refused_while_answering_is_one_line(tiny_bundle: Path, ecg_png: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's scratch or threads, numpy or ONNX Runtime refused mid-answer: the machine's state, one line,
    exit 2."""
    from pulse_edge.runtime.pipeline import Pipeline

    def refused(*args: object, **kwargs: object) -> None:
        raise MemoryError("the attention kernel could not allocate its scratch or start its threads")

    monkeypatch.setattr(Pipeline, "generate", refused)
    res = CliRunner().invoke(main, ["infer", str(ecg_png), "--model", str(tiny_bundle), "--max-new-tokens", "2"])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("pulse-edge: error: the attention kernel could not allocate")
    assert "free memory" in res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_other_os_errors_keep_their_traceback(tiny_checkpoint: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the machine's state (a full or read-only disk) is a user error: anything else stays visible as a bug."""
    import errno

    from pulse_edge.export.graphs.decoder import ExternalData

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EBADF, "bad file descriptor")

    monkeypatch.setattr(ExternalData, "initializer", broken)
    res = CliRunner().invoke(main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--validation",
                                    "quick"])
    assert res.exit_code == 1 and isinstance(res.exception, OSError) and res.exception.errno == errno.EBADF


def test_build_engines_says_how_to_serve_engines_written_outside_the_bundle(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The trt backend looks inside the bundle only: engines written elsewhere (-o) need --engines to be found."""
    from pulse_edge.export.engines import build

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for out, hint in ((None, "--backend trt`)"), (tmp_path / "elsewhere", f"--backend trt --engines {tmp_path}")):
        written = bundle / "engines-rtx" if out is None else out
        monkeypatch.setattr(build, "build_engines", lambda b, options, progress, w=written: w)
        res = CliRunner().invoke(main, ["build-engines", str(bundle), *(["-o", str(out)] if out else [])])
        assert res.exit_code == 0, res.output
        assert res.stdout.strip().endswith(hint + ("/elsewhere`)" if out else "")), res.stdout


def test_infer_passes_its_defaults_and_options_and_says_every_note(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """With the model and reader stood in for: the paper's 1024 new tokens by default, a --leads list with spaces
    read as names, the input's notes before the answer and every note of the answer's after it."""
    from types import SimpleNamespace

    import pulse_edge.cli.infer as infer_module
    import pulse_edge.runtime.generation.interpretation as interpretation
    import pulse_edge.runtime.inputs as inputs

    asked: dict = {}
    ecg = SimpleNamespace(notes=["rendered from 12 leads"], image=None)
    monkeypatch.setattr(inputs, "load_input", lambda source, **reading: asked.update(reading) or ecg)
    monkeypatch.setattr(infer_module, "open_backend", lambda *args, **kwargs: "the model")

    def answer(pipeline: str, given: object, question: str, *, max_new_tokens: int, sampling: object,
               on_text: object) -> SimpleNamespace:
        asked["max_new_tokens"] = max_new_tokens
        return SimpleNamespace(notes=[*ecg.notes, "the answer stopped at --max-new-tokens", "a second note"])

    monkeypatch.setattr(interpretation, "interpret", answer)
    result = CliRunner().invoke(main, ["-q", "infer", "rec.npy", "--model", str(tmp_path), "--leads", "I, II, III"])
    assert result.exit_code == 0, result.output
    assert asked["max_new_tokens"] == 1024 and asked["leads"] == ("I", "II", "III")
    assert [line for line in result.stderr.splitlines() if "note:" in line] == [
        "pulse-edge: note: rendered from 12 leads", "pulse-edge: note: the answer stopped at --max-new-tokens",
        "pulse-edge: note: a second note"]
    alone = CliRunner().invoke(main, ["infer", "rec.npy", "--model", str(tmp_path), "--fail-fast"])
    assert alone.exit_code == 2 and "need --output FILE" in alone.output  # never ignored in silence
