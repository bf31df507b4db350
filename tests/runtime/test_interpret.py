"""Recordings end to end on a tiny bundle: files written by pydicom, wfdb.wrsamp and ElementTree (HL7 aECG)
are rendered and answered exactly like the rendered print itself; `Pipeline.interpret` takes every input form
and returns what `infer --json` prints; `infer DIR --output` answers folders resumably."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pulse_testing.ecg_files import aecg_document, dicom_dataset, write_dicom, write_wfdb

from pulse_edge.cli.main import main
from pulse_edge.export.build.bundle import ExportOptions, export_bundle
from pulse_edge.export.validate.parity import ValidationPlan
from pulse_edge.runtime.ecg.leads import LEADS
from pulse_edge.runtime.ecg.render import render_ecg
from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
from pulse_edge.runtime.generation.interpretation import Interpretation, interpret
from pulse_edge.runtime.image.preprocess import preprocess
from pulse_edge.runtime.inputs import load_input
from pulse_edge.runtime.pipeline import Pipeline

pytest.importorskip("pydicom", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("wfdb", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("defusedxml", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:::wfdb")

EIGHT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
TOKENS = 3


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "tiny",
                         ExportOptions(plan=ValidationPlan.quick()))


@pytest.fixture(scope="module")
def pipeline(bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(bundle)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same synthetic AF recording as a DICOM (8 leads: limb leads derived), a WFDB record at 1 kHz
    (resampled) and an HL7 aECG document, each written by its format's own writer."""
    folder = tmp_path_factory.mktemp("recordings")
    af = synthesize_ecg("afib", seed=5, fs=1000).signals.astype(np.float64)
    rows = [LEADS.index(lead) for lead in EIGHT]
    dicom = write_dicom(folder / "af.dcm", dicom_dataset(af[rows, ::2], 500, EIGHT))
    wfdb_header = write_wfdb(folder, "af_1k", af, 1000)
    aecg = folder / "af.xml"
    aecg.write_bytes(aecg_document(af[:, ::2], 500))
    return {"dicom": dicom, "wfdb": wfdb_header, "hl7-aecg": aecg}


class Spy:
    """A model that records the images it is asked about and lets the pipeline answer."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline, self.images = pipeline, []

    def generate(self, image, *args, **kwargs):
        self.images.append(image)
        return self.pipeline.generate(image, *args, **kwargs)


@pytest.mark.parametrize("kind", ["dicom", "wfdb", "hl7-aecg"])
def test_a_recording_is_answered_exactly_as_its_rendered_print(pipeline: Pipeline, recordings: dict[str, Path],
                                                               kind: str, tmp_path: Path) -> None:
    ecg = load_input(recordings[kind])
    assert (ecg.kind, ecg.image.size, ecg.recording.signals.shape) == (kind, (2200, 1700), (12, 5000))
    png = tmp_path / "print.png"
    ecg.image.save(png)
    printed = Image.open(png).convert("RGB")
    spy = Spy(pipeline)
    from_file = interpret(spy, recordings[kind], max_new_tokens=TOKENS)
    (seen,) = spy.images
    np.testing.assert_array_equal(np.asarray(seen), np.asarray(printed))  # the model read the print, pixel for pixel
    layout = pipeline.manifest.image
    ours, theirs = preprocess(seen, layout), preprocess(printed, layout)
    assert ours.num_image_tokens == theirs.num_image_tokens == 2880
    np.testing.assert_array_equal(pipeline.engine.image_features(ours), pipeline.engine.image_features(theirs))
    from_print = pipeline.generate(printed, max_new_tokens=TOKENS)
    assert from_file.token_ids == from_print.token_ids
    assert (from_file.image_tokens, from_file.prompt_tokens) == (from_print.image_tokens, from_print.prompt_tokens)
    assert from_file.source == str(recordings[kind]) and from_file.input_kind == kind


def test_notes_say_what_was_done(recordings: dict[str, Path]) -> None:
    assert load_input(recordings["dicom"]).notes == ("derived III, aVR, aVL, aVF from I and II",)
    assert load_input(recordings["wfdb"]).notes == ("resampled 1000 Hz -> 500 Hz",)
    assert load_input(recordings["hl7-aecg"]).notes == ()


def test_interpret_takes_every_input_form(pipeline: Pipeline, recordings: dict[str, Path]) -> None:
    path = recordings["dicom"]
    by_path = pipeline.interpret(str(path), max_new_tokens=TOKENS)
    by_bytes = pipeline.interpret(path.read_bytes(), name="upload.dcm", max_new_tokens=TOKENS)
    assert by_bytes.token_ids == by_path.token_ids and by_bytes.source == "upload.dcm"
    twelve = load_input(path).recording
    by_array = pipeline.interpret(twelve.signals, fs=twelve.fs, max_new_tokens=TOKENS)
    assert by_array.token_ids == by_path.token_ids and by_array.input_kind == "array"
    image = render_ecg(synthesize_ecg("sinus", seed=2))
    by_image = pipeline.interpret(image, question="What is the rhythm?", max_new_tokens=TOKENS)
    assert by_image.token_ids == pipeline.generate(image, "What is the rhythm?", max_new_tokens=TOKENS).token_ids
    assert by_image.question == "What is the rhythm?" and by_image.notes == ()


def test_the_json_is_the_interpretation(bundle: Path, pipeline: Pipeline, recordings: dict[str, Path]) -> None:
    res = CliRunner().invoke(main, ["infer", str(recordings["dicom"]), "--model", str(bundle), "--json",
                                    "--max-new-tokens", str(TOKENS)])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)
    expected = pipeline.interpret(str(recordings["dicom"]), max_new_tokens=TOKENS).to_dict()
    assert set(printed) == set(expected) == {f for f in Interpretation.__dataclass_fields__}
    for key in ("text", "token_ids", "image_tokens", "source", "input_kind", "notes", "findings", "question"):
        assert printed[key] == expected[key], key
    assert res.stderr.startswith("pulse-edge: note: derived III, aVR, aVL, aVF from I and II\n")


def test_save_render_keeps_the_print_the_model_read(bundle: Path, recordings: dict[str, Path],
                                                    tmp_path: Path) -> None:
    out = tmp_path / "render.png"
    runner = CliRunner()
    res = runner.invoke(main, ["infer", str(recordings["wfdb"]), "--model", str(bundle), "--json",
                               "--max-new-tokens", str(TOKENS), "--save-render", str(out)])
    assert res.exit_code == 0, res.output
    saved = np.asarray(Image.open(out).convert("RGB"))
    np.testing.assert_array_equal(saved, np.asarray(load_input(recordings["wfdb"]).image))
    again = runner.invoke(main, ["infer", str(out), "--model", str(bundle), "--json", "--max-new-tokens", str(TOKENS)])
    assert json.loads(again.stdout)["token_ids"] == json.loads(res.stdout)["token_ids"]


def _mixed_folder(root: Path) -> dict[str, int]:
    """50 inputs: images, PDFs and recordings of every format, 3 of them broken. Returns counts by kind."""
    from pulse_testing.ecg_files import beats, write_csv

    root.mkdir()
    counts: dict[str, int] = {}
    for k in range(20):  # 10 PNG, 5 JPEG, 5 PDF prints
        image = render_ecg(synthesize_ecg("sinus", seed=k), width_px=1100, height_px=850)
        suffix = ("png", "jpg", "pdf")[0 if k < 10 else 1 if k < 15 else 2]
        image.save(root / f"print{k:02d}.{suffix}")
        counts[suffix] = counts.get(suffix, 0) + 1
    for k in range(8):
        write_dicom(root / f"exam{k}.dcm", dicom_dataset(beats(10 * 500, 500, seed=k), 500))
    for k in range(7):
        write_wfdb(root, f"rec{k}", beats(10 * 500, 500, seed=k), 500)
        (root / f"cart{k}.xml").write_bytes(aecg_document(beats(10 * 500, 500, seed=k), 500))
    for k in range(5):
        write_csv(root / f"export{k}.csv", beats(10 * 500, 500, seed=k), LEADS)
    (root / "cut.dcm").write_bytes((root / "exam0.dcm").read_bytes()[:700])
    (root / "notes.png").write_text("not an image")
    (root / "empty.pdf").write_bytes(b"")
    counts.update(dcm=8, hea=7, xml=7, csv=5, broken=3)
    assert sum(counts.values()) == 50
    return counts


@pytest.mark.slow
def test_a_folder_of_50_mixed_inputs_is_answered_then_resumed(bundle: Path, tmp_path: Path) -> None:
    _mixed_folder(tmp_path / "ecgs")
    out = tmp_path / "results.jsonl"
    args = ["infer", str(tmp_path / "ecgs"), "--model", str(bundle), "--output", str(out), "--max-new-tokens", "2",
            "--fs", "500"]
    runner = CliRunner()
    first = runner.invoke(main, args)
    assert first.exit_code == 2, first.output  # 3 failed: not every input has its answer
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 50 and len({line["source"] for line in lines}) == 50
    failed = sorted(Path(line["source"]).name for line in lines if "error" in line)
    assert failed == ["cut.dcm", "empty.pdf", "notes.png"]
    kinds = {line["input_kind"] for line in lines if "error" not in line}
    assert kinds == {"image", "pdf", "dicom", "wfdb", "hl7-aecg", "csv"}
    assert all(line["image_tokens"] == 2880 for line in lines if "error" not in line)
    assert "47 answered, 3 failed, 0 already in" in first.stderr
    again = runner.invoke(main, args)
    assert again.exit_code == 2, again.output
    assert "0 answered, 3 failed, 47 already in" in again.stderr  # the 47 done are skipped, the 3 retried
    assert len(out.read_text().splitlines()) == 53
