"""Edges of the calibration and ECGBench readers that earlier tests left open (a fifth mutation round: each test
fails on a mutant of the rule it names): ECGInstruct's images and turns, the task classifier, UTF-8, the ECGBench
subsets' file names, layouts, image fields and answers."""

from __future__ import annotations

import json

import pytest
from pulse_testing.ecgbench_data import ecg_png, item, write_json_subset, write_parquet_subset

from pulse_edge.calibration.datasets import ecgbench_samples
from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, classify_task
from pulse_edge.calibration.datasets.ecgbench import readers
from pulse_edge.calibration.datasets.ecgbench.readers import PARQUET, SubsetSource, _turns, discover, iter_samples
from pulse_edge.calibration.datasets.ecgbench.subsets import resolve_subset
from pulse_edge.calibration.datasets.ecgbench_samples import load_ecgbench
from pulse_edge.calibration.datasets.ecginstruct import load_ecginstruct
from pulse_edge.calibration.datasets.json_text import read_utf8
from pulse_edge.errors import ConfigError, InputError


def _conv(q="<image>\nWhat is the diagnosis?", a="Normal ECG.", frm="gpt"):
    return [{"from": "human", "value": q}, {"from": frm, "value": a}]

@pytest.fixture(scope="module")
def png():
    return ecg_png(seed=3)

def test_a_folder_named_as_image_is_missing(tmp_path, png):
    (tmp_path / "ptb-xl").mkdir()
    (tmp_path / "ok.png").write_bytes(png)
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"id": "d", "image": "ptb-xl", "conversations": _conv()},
                             {"id": "f", "image": "ok.png", "conversations": _conv()}]))
    assert [s.id for s in load_ecginstruct(p)] == ["f"]

def test_utf8_read_and_refused(tmp_path):
    p = tmp_path / "a.json"
    p.write_text('["\u00e9"]', encoding="utf-8")
    assert read_utf8(p) == '["\u00e9"]'
    p.write_bytes(b'["\xff"]')
    with pytest.raises(InputError, match="not UTF-8"):
        read_utf8(p)

@pytest.mark.parametrize("q,task", [("Is this a type A. dissection? Describe the rhythm.", "rhythm"),
                                    ("Rhythm?", "rhythm"),
                                    ("List the findings.", "diagnosis")])
def test_cs_task_rules(q, task):
    assert classify_task(q) == task

def test_a_sample_needs_an_image():
    with pytest.raises(ConfigError, match="exactly one"):
        CalibrationSample("x", "ecginstruct", "other", (("q", "a"),))

def test_origin_of_dotted_and_backslashed_paths(tmp_path, png):
    (tmp_path / "ptb-xl").mkdir()
    (tmp_path / "ptb-xl" / "a.png").write_bytes(png)
    (tmp_path / "mimic\\b.png").write_bytes(png)  # a Windows-style name, literally, on POSIX
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"id": "a", "image": "./ptb-xl/a.png", "conversations": _conv()},
                             {"id": "b", "image": "mimic\\b.png", "conversations": _conv()}]))
    assert [s.origin for s in load_ecginstruct(p)] == ["ptb-xl", "mimic"]

def test_assistant_answers_are_accepted(tmp_path, png):
    (tmp_path / "a.png").write_bytes(png)
    p = tmp_path / "t.json"
    p.write_text(json.dumps([{"id": "a", "image": "a.png", "conversations": _conv(frm="assistant")}]))
    assert load_ecginstruct(p)[0].turns == (("What is the diagnosis?", "Normal ECG."),)

def test_an_underscored_json_file_names_its_subset(tmp_path, png):
    write_json_subset(tmp_path, "ptb-test", [item("1", "Which?", "NORM", png)])
    (tmp_path / "ptb-test.json").rename(tmp_path / "ptb_test.json")
    samples = load_ecgbench(tmp_path / "ptb_test.json")
    assert [s.origin for s in samples] == ["ptb-test"]


def test_several_right_options_are_one_answer(tmp_path, png):
    write_json_subset(tmp_path, "ecgqa-test", [item("e2", "Options: lead i, lead ii", ("lead i", "lead ii"), png)])
    [s] = ecgbench_samples.load_ecgbench(tmp_path)
    assert s.turns[0][1] == "lead i, lead ii"

def test_the_parquet_pool_reads_no_image_bytes(tmp_path, png, monkeypatch):
    f = write_parquet_subset(tmp_path / "ptb-test" / "test-00000-of-00001.parquet", [item("1", "q", "NORM", png)])
    asked, real = [], readers.iter_samples
    monkeypatch.setattr(readers, "iter_samples",
                        lambda source, **kw: asked.append(kw.get("with_images")) or real(source, **kw))
    [s] = ecgbench_samples.load_ecgbench(f)
    assert asked == [False] and s.deferred is not None


def test_a_last_question_without_answer_is_kept_as_none():
    turns = _turns([{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                    {"from": "human", "value": "q2"}], "w")
    assert [(t.question, t.answer) for t in turns] == [("q1", "a1"), ("q2", None)]

def test_an_underscored_json_subset_is_found(tmp_path, png):
    write_json_subset(tmp_path, "ptb-test", [item("1", "q", "NORM", png)])
    (tmp_path / "ptb-test.json").rename(tmp_path / "ptb_test.json")
    assert discover(tmp_path)["ptb-test"].files == (tmp_path / "ptb_test.json",)

def test_parquet_wins_over_json(tmp_path, png):
    write_json_subset(tmp_path, "ptb-test", [item("1", "q", "NORM", png)])
    write_parquet_subset(tmp_path / "ptb-test" / "test-00000-of-00001.parquet", [item("1", "q", "NORM", png)])
    assert discover(tmp_path)["ptb-test"].layout == PARQUET

def test_a_json_image_given_as_a_list(tmp_path, png):
    path = write_json_subset(tmp_path, "ptb-test", [item("1", "q", "NORM", png)])
    records = json.loads(path.read_text())
    records[0]["image"] = [records[0]["image"]]
    path.write_text(json.dumps(records))
    [s] = iter_samples(discover(tmp_path)["ptb-test"], with_images=True)
    assert s.image_name == "ptb-test/1.png" and s.image_file is not None

def test_an_hf_image_stored_by_reference_beside_the_parquet(tmp_path, png):
    import pyarrow as pa
    import pyarrow.parquet as pq
    f = tmp_path / "ptb-test" / "test-00000-of-00001.parquet"
    write_parquet_subset(f, [item("1", "q", "NORM", png)])
    t = pq.read_table(f).to_pylist()
    t[0]["image"] = {"bytes": None, "path": "1.png"}
    pq.write_table(pa.Table.from_pylist(t, schema=pq.read_schema(f)), f)
    (f.parent / "1.png").write_bytes(png)
    [s] = iter_samples(SubsetSource("ptb-test", PARQUET, (f,)), with_images=True)
    assert s.image_file == f.parent / "1.png" and s.load_image().size[0] > 0


def test_aliases_ignore_case_and_spaces():
    assert resolve_subset(" PTB ").name == "ptb-test"


def test_a_subset_alias_names_a_parquet_file_s_samples_as_a_json_file_s(tmp_path, png):
    """`--subset ptb` gave a parquet file's samples the origin and ids "ptb/..." where a JSON file's are
    "ptb-test/...": two id spaces for one subset (stratification, held-out exclusion)."""
    f = write_parquet_subset(tmp_path / "x" / "test-00000-of-00001.parquet", [item("1", "q", "NORM", png)])
    [s] = load_ecgbench(f, subset="ptb")
    assert s.origin == "ptb-test" and s.id.startswith("ptb-test/")
