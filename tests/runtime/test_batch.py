"""Folders of ECGs into a JSON-lines file (runtime/batch.py, runtime/inputs/discover.py) with a stand-in model:
every input gets a line, failures are recorded and not fatal, reruns skip what is done and redo torn lines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pulse_testing.ecg_files import beats
from pulse_testing.pages import page

from pulse_edge.errors import ConfigError, InputError
from pulse_edge.runtime.batch import BatchOptions, plan_batch, render_name, run_batch, save_image
from pulse_edge.runtime.generation.result import GenerationResult, Timings
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.inputs.discover import expand_inputs

ANSWER = "Sinus rhythm. No atrial fibrillation; left bundle branch block."


class FakeModel:
    """Answers every image with ANSWER and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, image, question="", *, max_new_tokens=1024, sampling=None, on_text=None):
        self.calls += 1
        assert image.mode == "RGB"
        return GenerationResult(ANSWER, [1, 2], 2880, 2950, 2, "eos", Timings(1, 1, 1, 1, 1, 1), "fake")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """3 good inputs (a PNG, a nested NPY recording, a JPEG) and 2 bad ones (text, a cut PNG), plus a hidden file."""
    root = tmp_path / "ecgs"
    (root / "sub").mkdir(parents=True)
    page((300, 200)).save(root / "a.png")
    np.save(root / "sub" / "b.npy", beats(5000, 500))
    page((300, 200)).save(root / "c.jpg")
    (root / "d.txt").write_text("not an ECG")
    (root / "e.png").write_bytes((root / "a.png").read_bytes()[:60])
    (root / ".hidden.png").write_bytes(b"ignored")
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _run(sources, out, fake, **options):
    opened = []
    batch = BatchOptions(**{"max_new_tokens": 2, "input_options": {"fs": 500}, "model": "fake", **options})
    stats = run_batch(plan_batch(sources, out, batch.settings()), lambda: opened.append(1) or fake, batch)
    return stats, len(opened)


def test_every_input_gets_a_line_and_failures_are_not_fatal(folder: Path, tmp_path: Path) -> None:
    sources = expand_inputs([str(folder)])
    assert [Path(s).name for s in sources] == ["a.png", "c.jpg", "d.txt", "e.png", "b.npy"]
    out, model = tmp_path / "out.jsonl", FakeModel()
    stats, opened = _run(sources, out, model)
    assert (stats.answered, stats.failed, stats.already_done, opened, model.calls) == (3, 2, 0, 1, 3)
    lines = _lines(out)
    assert [line["source"] for line in lines] == sources
    errors = {Path(line["source"]).name: line["error"] for line in lines if "error" in line}
    assert set(errors) == {"d.txt", "e.png"} and "unknown content" in errors["d.txt"]
    answered = next(line for line in lines if line["source"].endswith("b.npy"))
    assert answered["input_kind"] == "npy" and answered["text"] == ANSWER
    assert [f["code"] for f in answered["findings"]] == ["SR", "LBBB"]  # never the denied AFIB


def test_an_input_whose_logits_are_not_finite_is_its_own_failure(folder: Path, tmp_path: Path) -> None:
    """A model that computes NaN on one print: that line records it and the batch goes on (a batch stopped there
    would stop there again on every resume)."""
    from pulse_edge.errors import ModelOutputError

    class NanOnJpeg(FakeModel):
        def generate(self, image, question="", **kwargs):
            if image.size == (300, 200) and self.calls == 1:  # the second input, c.jpg
                self.calls += 1
                raise ModelOutputError("the model's logits hold NaN or inf, so no answer is given")
            return super().generate(image, question, **kwargs)

    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    stats, _ = _run(sources, out, NanOnJpeg())
    assert (stats.answered, stats.failed) == (2, 3)
    errors = {Path(line["source"]).name: line["error"] for line in _lines(out) if "error" in line}
    assert errors["c.jpg"].startswith("the model's logits hold NaN")


def test_a_rerun_skips_what_is_answered_and_retries_failures(folder: Path, tmp_path: Path) -> None:
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    _run(sources, out, FakeModel())
    (folder / "d.txt").unlink()
    page((300, 200)).save(folder / "d.txt", format="PNG")  # fixed: a PNG under a .txt name
    model = FakeModel()
    stats, _ = _run(sources, out, model)
    assert (stats.already_done, stats.answered, stats.failed, model.calls) == (3, 1, 1, 1)
    assert len(_lines(out)) == 7  # 5 + the 2 retried; a source's last line is its current result
    done = FakeModel()
    stats, opened = _run(sources[:3], out, done)  # everything asked for is answered: no model is opened
    assert (stats.already_done, opened, done.calls) == (3, 0, 0)


def test_a_line_torn_by_a_crash_is_cut_off_and_redone(folder: Path, tmp_path: Path) -> None:
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    _run(sources[:2], out, FakeModel())
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 40])  # the second line cut mid-write
    plan = plan_batch(sources[:2], out)
    assert plan.existing.torn_tail and plan.todo == (sources[1],)
    _run(sources[:2], out, FakeModel())
    assert [line["source"] for line in _lines(out)] == sources[:2]


def test_a_last_line_without_its_newline_is_ended_before_more_are_appended(folder: Path, tmp_path: Path) -> None:
    """A whole last record whose newline was lost: a resume appended the next answer onto the same line, and the
    file was refused for good after ("line 1 is not valid JSON")."""
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    _run(sources[:1], out, FakeModel())
    out.write_bytes(out.read_bytes().rstrip(b"\n"))
    stats, _ = _run(sources[:2], out, FakeModel())
    assert (stats.already_done, stats.answered) == (1, 1)
    assert [line["source"] for line in _lines(out)] == sources[:2]


def test_a_line_cut_inside_a_character_is_torn_and_redone(folder: Path, tmp_path: Path) -> None:
    """A crash mid-write can cut a non-ASCII answer ("é", two bytes) between its bytes: a prefix of a line like any
    other, not a file to refuse."""
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    _run(sources[:1], out, FakeModel())
    out.write_bytes(out.read_bytes() + '{"source": "x", "text": "Rythme sinusal \u00e9'.encode()[:-1])
    plan = plan_batch(sources[:2], out)
    assert plan.existing.torn_tail and plan.todo == (sources[1],)


def test_every_answer_is_checked_for_the_settings_of_the_run_appended_to_it(folder: Path, tmp_path: Path) -> None:
    """A file whose first line predates recorded settings and whose second was another model's: the check read the
    first line only, and this run's answers went in beside the other model's in silence."""
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    _run(sources[:2], out, FakeModel())
    lines = _lines(out)
    del lines[0]["settings"]
    lines[1]["settings"]["model"] = "another-model"
    out.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ConfigError, match="another model"):
        plan_batch(sources, out, settings=lines[1]["settings"] | {"model": "this-model"})


def test_fail_fast_records_the_failure_then_stops(folder: Path, tmp_path: Path) -> None:
    sources, out = expand_inputs([str(folder)]), tmp_path / "out.jsonl"
    model = FakeModel()
    with pytest.raises(InputError, match=r"d\.txt"):
        _run(sources, out, model, fail_fast=True)
    assert [Path(line["source"]).name for line in _lines(out)] == ["a.png", "c.jpg", "d.txt"]
    assert model.calls == 2


def test_save_render_keeps_one_print_per_recording(folder: Path, tmp_path: Path) -> None:
    sources, out, prints = expand_inputs([str(folder)]), tmp_path / "out.jsonl", tmp_path / "prints"
    _run(sources, out, FakeModel(), save_render_dir=prints)
    saved = sorted(p.name for p in prints.iterdir())
    assert saved == [render_name(str(folder / "sub" / "b.npy"))]
    assert Image.open(prints / saved[0]).size == (2200, 1700)


def test_two_recordings_whose_paths_flatten_alike_keep_a_print_each(tmp_path: Path) -> None:
    """'rin/sub/r.npy' and 'rin/sub__r.npy' were both saved as rin__sub__r.npy.png: the later print overwrote the
    earlier, and the print kept for the first recording showed the second one's ECG."""
    first, second = tmp_path / "rin" / "sub" / "r.npy", tmp_path / "rin" / "sub__r.npy"
    first.parent.mkdir(parents=True)
    np.save(first, beats(5000, 500))
    np.save(second, 3 * beats(5000, 500))  # another patient's: larger waves
    out, prints = tmp_path / "out.jsonl", tmp_path / "prints"
    _run([str(first), str(second)], out, FakeModel(), save_render_dir=prints)
    names = [line["render"] for line in _lines(out)]
    assert len(set(names)) == 2 and sorted(p.name for p in prints.iterdir()) == sorted(names)
    assert all(name.split("~")[0].endswith("rin__sub__r.npy") for name in names)  # still the path, readable
    images = [np.asarray(Image.open(prints / name)) for name in names]
    assert not np.array_equal(images[0], images[1])


def test_a_deep_recordings_print_keeps_its_own_name_within_the_file_systems_limit(tmp_path: Path) -> None:
    """A flattened path of 230 bytes, with the hash and the temporary name's suffix, passed 255 bytes: OSError
    'File name too long' stopped the batch with a traceback (a review of the hashed names)."""
    deep = tmp_path.joinpath(*["d" * 40] * 5, "é" * 20, "recording.npy")
    deep.parent.mkdir(parents=True)
    np.save(deep, beats(5000, 500))
    out, prints = tmp_path / "out.jsonl", tmp_path / "prints"
    stats, _ = _run([str(deep)], out, FakeModel(), save_render_dir=prints)
    assert stats.failed == 0 and [p.name for p in prints.iterdir()] == [_lines(out)[0]["render"]]
    assert len(_lines(out)[0]["render"].encode()) <= 200 and "__recording.npy~" in _lines(out)[0]["render"]


@pytest.mark.parametrize(("changed", "key"), [
    ({"question": "Is there atrial fibrillation?"}, "question"), ({"max_new_tokens": 5}, "max_new_tokens"),
    ({"sampling": SamplingParams(temperature=0.7)}, "sampling"), ({"model": "/models/other"}, "model"),
    ({"input_options": {"fs": 250}}, "input_options")])
def test_a_rerun_with_other_settings_into_the_same_file_is_refused(folder: Path, tmp_path: Path, changed: dict,
                                                                    key: str) -> None:
    """A rerun skips what is answered: with another question (or model, sampling...) it would report nothing to do,
    or mix answers to two requests in one file. Refused before the model opens; the same settings resume."""
    sources, out = [str(folder / "a.png"), str(folder / "c.jpg")], tmp_path / "out.jsonl"
    _run(sources[:1], out, FakeModel(), model="/models/pulse")
    assert _lines(out)[0]["settings"]["model"] == "/models/pulse"
    with pytest.raises(ConfigError, match=rf"out\.jsonl holds answers asked with another {key} \(.*; this run: .*\), "
                                          r"which a rerun would leave beside this run's unmarked: write to another"):
        _run(sources, out, FakeModel(), **{"model": "/models/pulse", **changed})
    stats, opened = _run(sources, out, FakeModel(), model="/models/pulse")
    assert (stats.already_done, stats.answered, opened) == (1, 1, 1)
    # settings that act the same are the same: greedy whatever its seed, a unit not given is millivolts
    stats, opened = _run(sources, out, FakeModel(), model="/models/pulse", sampling=SamplingParams(seed=9),
                         input_options={"fs": 500, "unit": "mV", "leads": None})
    assert (stats.already_done, opened) == (2, 0)
    legacy = tmp_path / "legacy.jsonl"  # written before settings were recorded: its question is compared
    legacy.write_text(json.dumps({"source": sources[0], "question": "Old?", "text": "x"}) + "\n")
    with pytest.raises(ConfigError, match=r"another question \('Old\?'"):
        _run(sources, legacy, FakeModel())


def test_a_file_that_is_not_an_infer_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "other.jsonl"
    out.write_text('{"id": "1", "text": "x"}\n')
    with pytest.raises(InputError, match="line 1 has no source"):
        plan_batch(["a.png"], out)


def test_a_folder_that_cannot_be_listed_refuses_the_batch_before_anything_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """os.walk skipped it in silence: the batch answered the rest and exited 0, its ECGs never read. (As root a
    mode 000 folder is still listed, so the OS's refusal is played here.)"""
    import os

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "b.png").write_bytes(b"")
    scandir = os.scandir

    def refusing(path: object = ".") -> object:
        if Path(str(path)).name in ("locked", "lost+found"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    for argument in (str(tmp_path), str(tmp_path / "**" / "*.png"), str(tmp_path / "*" / "*.png")):
        with pytest.raises(InputError, match=r"locked: this folder cannot be listed \(Permission denied\)"):
            expand_inputs([argument])
    # a pattern that does not reach it, a file system's own lost+found, a folder that is not there: as before
    (tmp_path / "one" / "two" / "locked").mkdir(parents=True)
    (tmp_path / "one" / "b.png").write_bytes(b"")
    (tmp_path / "locked").rename(tmp_path / "lost+found")
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "*" / "*.png")])] == ["b.png"]  # one level down
    (tmp_path / "one" / "two" / "locked").rmdir()
    (tmp_path / "one" / "two" / "lost+found").mkdir()
    assert [Path(p).name for p in expand_inputs([str(tmp_path)])] == ["a.png", "b.png"]
    with pytest.raises(InputError, match="the pattern matches no file"):
        expand_inputs([str(tmp_path / "nodir" / "*" / "x.png")])


def test_inputs_expand_from_folders_globs_and_files(tmp_path: Path) -> None:
    for name in ("r1.hea", "r1.dat", "r2.hea", "r2.mat", "x.png", "out.jsonl"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / "y.dcm").write_bytes(b"")
    names = [Path(p).name for p in expand_inputs([str(tmp_path)], exclude=[tmp_path / "out.jsonl"])]
    assert names == ["r1.hea", "r2.hea", "x.png", "y.dcm"]  # one input per WFDB record; the output is no input
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "**" / "*.dcm")])] == ["y.dcm"]
    assert expand_inputs([str(tmp_path / "r1.dat")]) == [str(tmp_path / "r1.dat")]  # named one by one: kept
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "z.png").write_bytes(b"")  # below a hidden folder: never an ECG
    (tmp_path / "deep" / "er").mkdir()
    (tmp_path / "deep" / "er" / "w.dcm").write_bytes(b"")
    (tmp_path / "orphan.dat").write_bytes(b"")  # no header beside it: an input, refused when read, not dropped
    names = [Path(p).name for p in expand_inputs([str(tmp_path)], exclude=[tmp_path / "out.jsonl"])]
    assert names == ["orphan.dat", "r1.hea", "r2.hea", "x.png", "y.dcm", "w.dcm"]
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "r*")])] == ["r1.hea", "r2.hea"]  # not r1.dat
    assert [Path(p).name for p in expand_inputs([str(tmp_path / "**" / "*.dcm")])] == ["w.dcm", "y.dcm"]  # sorted paths
    with pytest.raises(InputError, match="matches no file"):
        expand_inputs([str(tmp_path / "*.xml")])


@pytest.mark.parametrize("cut", range(0, 4))
def test_a_print_name_cut_inside_a_character_is_still_text(cut: int) -> None:
    """The byte cut landed inside "é": its bytes decoded as lone surrogates, and the JSON line recording the name
    raised UnicodeEncodeError after the print was saved (a second review)."""
    name = render_name("/data/ecg_é/" + "x" * cut + "é" * 100 + "/r.csv")
    assert name.encode("utf-8").decode("utf-8") == name and name.endswith(".png")


def test_the_command_refuses_an_output_it_cannot_write_makes_its_folder_and_sums_up_a_rerun(
        folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`infer --output`: an output file this user cannot write is one line before the model loads (a traceback
    after it); a folder not there yet is made (a FileNotFoundError on its lock); a failure under --fail-fast is
    said once; a rerun's summary counts what was already answered, of all inputs."""
    import os

    import click

    from pulse_edge.cli.batch import infer_many

    opened: list[int] = []

    def run(output: Path, inputs: tuple[str, ...], fail_fast: bool = False) -> None:
        with click.Context(click.Command("infer")):
            infer_many(inputs, output, lambda: opened.append(1) or FakeModel(), question="Rate?", max_new_tokens=2,
                       sampling=None, reading={"fs": 500}, save_render=None, fail_fast=fail_fast, model="fake")

    out = tmp_path / "new" / "sub" / "out.jsonl"
    run(out, (str(folder / "a.png"),))
    assert len(_lines(out)) == 1 and opened == [1]
    capsys.readouterr()
    run(out, (str(folder / "a.png"),))
    assert capsys.readouterr().err.startswith(f"pulse-edge: 0 answered, 0 failed, 1 already in {out} (of 1 inputs)")
    with pytest.raises(InputError, match=r"d\.txt"):
        run(out, (str(folder / "d.txt"),), fail_fast=True)
    assert "failed:" not in capsys.readouterr().err  # the error ends the command, said by it once
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match="is not writable by this user; choose another --output file"):
        run(out, (str(folder / "c.jpg"),))
    assert opened == [1, 1]  # never opened for the refused run


def test_a_print_is_never_a_hidden_file_and_blank_lines_are_no_records(tmp_path: Path) -> None:
    """"./a.csv" flattened to ".__a.csv~....png", a print no file browser shows; a blank line in an answers file
    (an editor's, a concatenation's) was refused as not JSON."""
    from pulse_edge.jsonl import read_json_lines

    assert not render_name("./a.csv").startswith(".") and render_name(".hidden.csv").startswith("hidden.csv~")
    with pytest.raises(ConfigError, match=r"r\.xyz: unknown image suffix '\.xyz'; name it \.png"):
        save_image(Image.new("RGB", (4, 4)), tmp_path / "r.xyz")  # Pillow's ValueError was a traceback, exit 1
    assert list(tmp_path.iterdir()) == []
    lines = tmp_path / "answers.jsonl"
    lines.write_text('{"id": 1}\n\n  \n{"id": 2}\n')
    assert [r["id"] for r in read_json_lines(lines, lambda record, path, number: record).records] == [1, 2]
