"""Calibration samples: ECGInstruct / ECGBench / synthetic readers, stratified selection, runtime-exact inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pulse_testing.ecgbench_data import ecg_png, item, write_json_subset, write_parquet_subset

from pulse_edge.calibration.datasets.calibration_sample import SOURCES, TASKS, CalibrationSample, classify_task
from pulse_edge.calibration.datasets.ecgbench_samples import fetch_images, load_ecgbench
from pulse_edge.calibration.datasets.ecginstruct import load_ecginstruct
from pulse_edge.calibration.datasets.synthetic import PRINT_SIZES, synthetic_samples
from pulse_edge.calibration.samples import (
    DEFAULT_SYNTHETIC_COUNT,
    load_samples,
    prepare_sample,
    select_samples,
    split_held_out,
)
from pulse_edge.errors import ConfigError, InputError, PromptError
from pulse_edge.runtime.image.preprocess import ImageLayout, image_token_count, preprocess
from pulse_edge.runtime.inputs.images import load_image
from pulse_edge.runtime.text.prompt import IMAGE_SLOT, Turn, prompt_ids, spliced_length

DIAG_Q = "What is the diagnosis of this ECG?"
MULTI = [("What is the rhythm?", "Sinus rhythm at 72 bpm."),
         ("Please write a short report.", "Sinus rhythm. Normal axis. No ST changes. Normal ECG.")]
MC_Q = "Which best describes this ECG?\nOptions: A. Atrial fibrillation B. Sinus rhythm C. Flutter D. Asystole"


def _conversation(turns: list[tuple[str, str]]) -> list[dict[str, str]]:
    out = []
    for k, (question, answer) in enumerate(turns):
        out += [{"from": "human", "value": f"<image>\n{question}" if k == 0 else question},
                {"from": "gpt", "value": answer}]
    return out


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return {"sinus": ecg_png(seed=1, rhythm="sinus"), "afib": ecg_png(seed=2, rhythm="afib")}


@pytest.fixture
def instruct(tmp_path: Path, pngs: dict[str, bytes]) -> Path:
    """An ECGInstruct-format JSON in tmp_path with images under images/ (one multi-turn item)."""
    (tmp_path / "images" / "ptbxl").mkdir(parents=True)
    (tmp_path / "images" / "ptbxl" / "a.png").write_bytes(pngs["sinus"])
    (tmp_path / "images" / "ptbxl" / "b.png").write_bytes(pngs["afib"])
    records = [
        {"id": "a1", "image": "images/ptbxl/a.png", "conversations": _conversation([(DIAG_Q, "Normal ECG.")])},
        {"id": "a2", "image": "images/ptbxl/a.png", "conversations": _conversation(MULTI)},
        {"id": 3, "image": "images/ptbxl/b.png", "conversations": _conversation([(MC_Q, "A")])},
    ]
    path = tmp_path / "ecginstruct.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    from pulse_edge.export.model.tokenizer_convert import write_tokenizer_json
    from pulse_edge.runtime.text.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return Tokenizer.from_file(write_tokenizer_json(tiny_checkpoint / "tokenizer.model", out))


@pytest.fixture(scope="module")
def layout(tiny_checkpoint: Path) -> ImageLayout:
    from pulse_edge.export.model.config import read_config

    return read_config(tiny_checkpoint).image


# --- ECGInstruct ---------------------------------------------------------------------------------------------


def test_ecginstruct_is_read_with_turns_images_and_tasks(instruct: Path) -> None:
    samples = load_ecginstruct(instruct)
    assert [s.id for s in samples] == ["a1", "a2", "3"]
    assert [s.task for s in samples] == ["diagnosis", "rhythm", "multiple_choice"]
    assert {s.source for s in samples} == {"ecginstruct"}
    assert samples[0].turns == ((DIAG_Q, "Normal ECG."),)
    assert samples[1].turns == tuple(MULTI)  # multi-turn kept whole, "<image>\n" removed
    assert samples[2].image_path == instruct.parent / "images" / "ptbxl" / "b.png"
    decoded = samples[2].load_image()
    assert np.array_equal(np.asarray(decoded), np.asarray(load_image(samples[2].image_path)))


def test_ecginstruct_image_root_is_where_image_paths_start(instruct: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "meta" / "train.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(instruct.read_text(encoding="utf-8"), encoding="utf-8")
    samples = load_ecginstruct(elsewhere, image_root=instruct.parent)
    assert samples[0].image_path == instruct.parent / "images" / "ptbxl" / "a.png"
    with pytest.raises(InputError, match=r"item 0 \(id a1\): image 'images/ptbxl/a.png' not found under .*image_root"):
        load_ecginstruct(elsewhere)


def _good(**changes: object) -> dict[str, object]:
    record: dict[str, object] = {"id": "x1", "image": "images/ptbxl/a.png",
                                 "conversations": _conversation([(DIAG_Q, "Normal ECG.")])}
    record.update(changes)
    return record


MALFORMED = [
    ({"id": "x1"}, r"expected a JSON list .*got a dict"),
    ([_good(), "text"], r"item 1: expected an object"),
    ([{"id": "x9", "conversations": []}], r"item 0 \(id x9\): missing key\(s\) image"),
    ([_good(conversations=[{"from": "human", "value": "<image>\nQ"}, {"from": "human", "value": "Q2"}])],
     r"item 0 \(id x1\): conversation message 1 is from 'human', expected 'gpt'"),
    ([_good(conversations=[{"from": "gpt", "value": "A"}, {"from": "human", "value": "<image>\nQ"}])],
     r"message 0 is from 'gpt', expected 'human'"),
    ([_good(conversations=[{"from": "human", "value": "<image>\nQ"}])], r"ends with a human message"),
    ([_good(conversations=_conversation([(DIAG_Q, "A")])[:0])], r"non-empty list"),
    ([_good(), _good(id="x2", conversations=[{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}])],
     r"item 1 \(id x2\): the first human message does not carry the image"),
    ([_good(image="images/missing.png")], r"image 'images/missing.png' not found under .*image_root"),
    ([_good(conversations=_conversation([(DIAG_Q, "A"), ("<image>\nAgain?", "B")]))],
     r"'<image>' appears in a later human message"),
    # a dataset file from elsewhere must not read outside the image folder; a name no OS takes is one line
    ([_good(image="../outside.png")], r"image '../outside.png' is not a path inside the image folder"),
    ([_good(image="/etc/hostname")], r"image '/etc/hostname' is not a path inside the image folder"),
    ([_good(image="x" * 5000 + ".png")], r"cannot be a file name"),
]


@pytest.mark.parametrize(("content", "message"), MALFORMED)
def test_malformed_ecginstruct_gives_one_line_error(instruct: Path, content: object, message: str) -> None:
    bad = instruct.with_name("bad.json")
    bad.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(InputError, match=message) as err:
        load_ecginstruct(bad)
    assert "\n" not in str(err.value)
    assert str(bad) in str(err.value)


# --- ECGBench ------------------------------------------------------------------------------------------------


def test_ecgbench_parquet_file_and_json_folder(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    items = [item("p1", "Which rhythm is shown?", "Sinus rhythm", pngs["sinus"]),
             item("p2", "Is this abnormal?", ("yes", "AF"), pngs["afib"])]
    parquet = write_parquet_subset(tmp_path / "pq" / "cpsc-test" / "test-00000-of-00001.parquet", items)
    from_parquet = load_ecgbench(parquet)
    assert [s.id for s in from_parquet] == ["cpsc-test/p1", "cpsc-test/p2"]
    assert [s.task for s in from_parquet] == ["rhythm", "diagnosis"]
    assert from_parquet[0].image_bytes is None and from_parquet[0].deferred is not None  # read once chosen
    assert fetch_images(from_parquet)[0].image_bytes == pngs["sinus"]
    assert from_parquet[1].turns == (("Is this abnormal?", "yes, AF"),)
    write_json_subset(tmp_path / "js", "ptb-test", items)
    from_json = load_ecgbench(tmp_path / "js")
    assert [s.id for s in from_json] == ["ptb-test/p1", "ptb-test/p2"]
    assert from_json[1].image_path is not None and from_json[1].image_bytes is None
    same = [np.asarray(s.load_image()) for s in (from_parquet[1], from_json[1])]
    assert np.array_equal(same[0], same[1])
    assert {s.source for s in from_parquet + from_json} == {"ecgbench"}


def test_an_ecgbench_pool_holds_no_image_bytes_and_the_chosen_are_read_in_one_pass(
        tmp_path: Path, pngs: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole release holds ~13 GB of prints: a pool of every sample's bytes does not fit a cart's memory."""
    from pulse_edge.calibration.datasets.ecgbench import readers

    items = [item(f"p{i}", "Which rhythm is shown?", "Sinus rhythm", pngs["sinus" if i % 2 else "afib"])
             for i in range(6)]
    write_parquet_subset(tmp_path / "cpsc-test" / "test-00000-of-00001.parquet", items[:3])
    write_parquet_subset(tmp_path / "cpsc-test" / "test-00001-of-00001.parquet", items[3:])
    write_json_subset(tmp_path, "ptb-test", items[:1])
    pool = load_samples(tmp_path)
    assert [s.image_bytes for s in pool if s.source == "ecgbench" and s.id.startswith("cpsc")] == [None] * 6
    reads = []
    real = readers.iter_samples
    monkeypatch.setattr(readers, "iter_samples", lambda *a, **k: reads.append(k) or real(*a, **k))
    chosen = select_samples(pool, 4, seed=0)
    by_id = {f"cpsc-test/{i.id}": i.image for i in items}
    rows = {s.id.removeprefix("cpsc-test/") for s in chosen if s.id in by_id}  # the JSON one is a file's path
    assert len(reads) == 1 and reads[0]["with_images"] and reads[0]["ids"] == rows
    for sample in chosen:
        if sample.id in by_id:  # each chosen row with its own image, not a neighbour's
            assert sample.image_bytes == by_id[sample.id] and sample.deferred is None
        else:
            assert sample.image_path is not None
    # one sample's image on its own (fidelity reads a sample at a time)
    assert np.array_equal(np.asarray(pool[1].load_image()), np.asarray(fetch_images([pool[1]])[0].load_image()))


def test_a_chosen_ecgbench_row_without_an_image_or_gone_is_one_line(tmp_path: Path,
                                                                     pngs: dict[str, bytes]) -> None:
    path = write_parquet_subset(tmp_path / "cpsc-test" / "test-00000-of-00001.parquet",
                                [item("p1", "Q?", "A", pngs["sinus"]), item("p1", "Q2?", "B", pngs["afib"])])
    pool = load_ecgbench(path)
    with pytest.raises(InputError, match="the id is repeated"):
        fetch_images(pool[:1])
    write_parquet_subset(path, [item("p2", "Q?", "A", pngs["sinus"])])
    with pytest.raises(InputError, match=r"p1: no longer in .*replaced while calibrating"):
        fetch_images(pool[:1])
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.set_column(2, "image", pa.nulls(1, table.schema.field("image").type)), path)
    with pytest.raises(InputError, match=r"its row holds no image: download the subset's parquet files \(and any"):
        fetch_images(load_ecgbench(path))


def test_ecgbench_folder_without_subsets_and_missing_images(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    with pytest.raises(InputError, match="no ECGBench subsets found"):
        load_ecgbench(tmp_path)
    write_json_subset(tmp_path, "mmmu-ecg", [item("m1", "Q?", "A", pngs["sinus"])])
    (tmp_path / "images" / "mmmu-ecg" / "m1.png").unlink()
    with pytest.raises(InputError, match=r"mmmu-ecg/m1: image 'mmmu-ecg/m1.png' not found"):
        load_ecgbench(tmp_path, subset="mmmu")


def test_ecgbench_json_images_stay_inside_the_image_folder(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    path = write_json_subset(tmp_path, "mmmu-ecg", [item("m1", "Q?", "A", pngs["sinus"])])
    records = json.loads(path.read_text())
    for name, words in (("../../secret.png", "is not a path inside the image folder"), ("y" * 5000, "file name")):
        path.write_text(json.dumps([{**records[0], "image": name}]))
        with pytest.raises(InputError, match=words):
            load_ecgbench(tmp_path, subset="mmmu")


def test_an_ecgbench_json_file_is_read_as_ecgbench_not_as_ecginstruct(tmp_path: Path,
                                                                      pngs: dict[str, bytes]) -> None:
    """Read as ECGInstruct, ECGBench's test data was recorded as training data in the scales and the manifest."""
    from pulse_edge.calibration.samples import load_samples

    path = write_json_subset(tmp_path, "ptb-test", [item("p1", "Which rhythm is shown?", "Sinus rhythm",
                                                         pngs["sinus"])])
    assert path.name == "ptb-test.json"
    # the same subset as parquet in the folder too: the file named is the one read
    write_parquet_subset(tmp_path / "ptb-test" / "test-00000-of-00001.parquet",
                         [item("q9", "Which rhythm is shown?", "Sinus rhythm", pngs["sinus"])])
    (sample,) = load_samples(path)
    assert (sample.source, sample.id) == ("ecgbench", "ptb-test/p1")


# --- source dispatch and task rules --------------------------------------------------------------------------


def test_load_samples_dispatches_on_the_argument(instruct: Path, tmp_path: Path, pngs: dict[str, bytes]) -> None:
    assert len(load_samples("synthetic:12")) == 12
    assert len(load_samples("synthetic")) == DEFAULT_SYNTHETIC_COUNT
    assert [s.id for s in load_samples(instruct)] == ["a1", "a2", "3"]
    parquet = write_parquet_subset(tmp_path / "arena.parquet", [item("r1", "Q?", "A", pngs["sinus"])])
    assert [s.id for s in load_samples(parquet)] == ["arena/r1"]
    with pytest.raises(ConfigError, match="must be a number"):
        load_samples("synthetic:many")
    with pytest.raises(InputError, match="ECGInstruct file not found"):
        load_samples(tmp_path / "missing.json")
    with pytest.raises(InputError, match=r"no such ECGBench \.parquet or \.json file"):
        load_samples(tmp_path / "missing.parquet")
    with pytest.raises(InputError, match=r"not a calibration source; pass 'synthetic\[:N\]'") as err:
        load_samples(tmp_path / "notes.txt")
    assert "\n" not in str(err.value)
    for carried in ("synthetic:4", parquet):  # they carry their images: --image-root is refused, not ignored
        with pytest.raises(ConfigError, match=r"^--image-root /data/images: where an ECGInstruct \.json file's "):
            load_samples(carried, image_root="/data/images")


@pytest.mark.parametrize(("question", "task"), [
    ("Which of the following is shown?\nA. AF B. SR C. VT D. AFL", "multiple_choice"),
    ("Options: sinus rhythm, atrial flutter. Which rhythm is it?", "multiple_choice"),
    ("Write a report on this ECG's rhythm.", "report"),
    ("What is the underlying rhythm?", "rhythm"),
    ("Interpret the ECG.", "diagnosis"),
    ("Is there any abnormality?", "diagnosis"),
    ("What is the patient's age?", "other"),
])
def test_task_rules(question: str, task: str) -> None:
    assert classify_task(question) == task


# --- stratified selection ------------------------------------------------------------------------------------


def _fake(strata: dict[tuple[str, str], int]) -> list[CalibrationSample]:
    """Samples interleaved across strata (so input order is not stratum order); no real images needed."""
    pools = [[CalibrationSample(f"{src}-{task}-{k}", src, task, (("q", "a"),), image_bytes=b"png")
              for k in range(size)] for (src, task), size in strata.items()]
    longest = max(len(pool) for pool in pools)
    return [pool[k] for k in range(longest) for pool in pools if k < len(pool)]


def _counts(samples: list[CalibrationSample]) -> Counter[tuple[str, str]]:
    return Counter((s.source, s.task) for s in samples)


STRATA = {("ecginstruct", "diagnosis"): 6, ("ecginstruct", "rhythm"): 3, ("ecgbench", "report"): 1}


@pytest.mark.parametrize(("n", "expected"), [
    (5, {("ecginstruct", "diagnosis"): 3, ("ecginstruct", "rhythm"): 1, ("ecgbench", "report"): 1}),  # 3, 1.5, .5
    (4, {("ecginstruct", "diagnosis"): 2, ("ecginstruct", "rhythm"): 1, ("ecgbench", "report"): 1}),  # 2.4, 1.2, .4
    (8, {("ecginstruct", "diagnosis"): 5, ("ecginstruct", "rhythm"): 2, ("ecgbench", "report"): 1}),  # 4.8, 2.4, .8
    (2, {("ecginstruct", "diagnosis"): 1, ("ecginstruct", "rhythm"): 1}),  # fewer than strata: largest first
    (50, STRATA),
])
def test_selection_is_proportional_with_one_per_stratum(n: int, expected: dict[tuple[str, str], int]) -> None:
    samples = _fake(STRATA)
    chosen = select_samples(samples, n, seed=0)
    assert _counts(chosen) == Counter(expected)
    positions = [samples.index(s) for s in chosen]
    assert positions == sorted(positions)  # input order kept


def test_one_each_floor_is_paid_by_the_largest_stratum() -> None:
    strata = {("synthetic", "diagnosis"): 97, ("synthetic", "rhythm"): 1, ("synthetic", "report"): 1,
              ("synthetic", "multiple_choice"): 1}
    counts = _counts(select_samples(_fake(strata), 10, seed=3))  # quotas 9.7, .1, .1, .1
    assert counts == Counter({("synthetic", "diagnosis"): 7, ("synthetic", "rhythm"): 1, ("synthetic", "report"): 1,
                              ("synthetic", "multiple_choice"): 1})


def test_the_datasets_inside_a_source_are_strata_too() -> None:
    """ECGInstruct's prints come from several datasets (its image folders); all were one stratum, and 12 drawn from
    90% MIMIC, 6% PTB-XL, 3% CODE-15, 1% CPSC were 12 MIMIC prints (seed 0)."""
    shares = {"mimic-ecg": 900, "ptb-xl": 60, "code15": 30, "cpsc": 10}
    samples = [CalibrationSample(f"{folder}-{k}", "ecginstruct", "diagnosis", (("q", "a"),), image_bytes=b"png",
                                 origin=folder) for folder, size in shares.items() for k in range(size)]
    chosen = select_samples(samples, 12, seed=0)
    assert Counter(s.origin for s in chosen) == Counter({"mimic-ecg": 9, "ptb-xl": 1, "code15": 1, "cpsc": 1})
    assert [s.id for s in chosen] == [s.id for s in select_samples(samples, 12, seed=0)]  # seeded


def test_a_seed_draws_the_same_samples_in_every_version_and_each_dataset_its_own() -> None:
    """A manifest records the calibration's seed: the same seed must draw the same samples to redo it. Strata that
    differ only in their dataset are drawn with seeds of their own (one seed took the same positions in each), and
    `synthetic[:N]` is drawn with seed 0."""
    samples = [CalibrationSample(f"{o}{i}", "ecginstruct", "diagnosis", (("q", "a"),), image_bytes=b"x", origin=o)
               for o in ("ptb-xl", "code15") for i in range(20)]
    assert [s.id for s in select_samples(samples, 6, seed=0)] == ["ptb-xl1", "ptb-xl6", "ptb-xl11", "code153",
                                                                  "code1512", "code1516"]
    assert load_samples("synthetic:2")[0].id == "synthetic/0/000000"


def test_the_one_each_overshoot_is_taken_where_the_share_was_exceeded_most() -> None:
    """Seven over six strata of 1, 1, 1, 1, 20 and 10 (quotas .21 each, 4.12, 2.06): one each, then the 20s
    take the larger remainder; the wrong key took it from them."""
    from pulse_edge.calibration.samples import _allocate

    assert _allocate([1, 1, 1, 1, 20, 10], 7) == [1, 1, 1, 1, 2, 1]


def test_an_ecginstruct_prints_origin_is_its_image_folder(tmp_path: Path, pngs: dict[str, bytes]) -> None:
    (tmp_path / "ptb-xl").mkdir()
    (tmp_path / "ptb-xl" / "a.png").write_bytes(pngs["sinus"])
    (tmp_path / "flat.png").write_bytes(pngs["sinus"])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([{"id": i, "image": image, "conversations": _conversation([(DIAG_Q, "Normal ECG.")])}
                                for i, image in (("a", "ptb-xl/a.png"), ("b", "flat.png"))]))
    assert [s.origin for s in load_ecginstruct(path)] == ["ptb-xl", ""]


def test_items_whose_image_is_missing_are_left_out_said_where_others_have_theirs(
        tmp_path: Path, pngs: dict[str, bytes], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One missing print of 1000 refused the whole file: a partly unpacked image set could not calibrate at all.
    The question is stripped around the marker, as LLaVA's training took it."""
    import logging

    (tmp_path / "a.png").write_bytes(pngs["sinus"])
    path = tmp_path / "train.json"
    path.write_text(json.dumps([
        {"id": "a", "image": "a.png", "conversations": _conversation([(DIAG_Q, "Normal ECG.")])},
        {"id": "b", "image": "gone/b.png", "conversations": _conversation([(DIAG_Q, "Normal ECG.")])},
        {"id": "c", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\n\n" + DIAG_Q + " "},
                                                        {"from": "gpt", "value": "Normal ECG."}]}]))
    monkeypatch.setattr(logging.getLogger("pulse_edge"), "propagate", True)  # a CLI test in this process cut it
    with caplog.at_level("WARNING"):
        samples = load_ecginstruct(path)
    assert [s.id for s in samples] == ["a", "c"] and samples[1].turns[0][0] == DIAG_Q
    assert "1 of 3 ECGInstruct items have no image under" in caplog.text and "(first: gone/b.png)" in caplog.text


def test_selection_is_deterministic_by_seed() -> None:
    samples = _fake({("synthetic", "diagnosis"): 40, ("ecginstruct", "report"): 30})
    ids = [s.id for s in select_samples(samples, 10, seed=7)]
    assert ids == [s.id for s in select_samples(list(samples), 10, seed=7)]
    assert ids != [s.id for s in select_samples(samples, 10, seed=8)]


def test_held_out_split_is_disjoint_stratified_and_deterministic() -> None:
    samples = _fake(STRATA)
    calibration, held = split_held_out(samples, 5, seed=1)
    assert {s.id for s in calibration}.isdisjoint({s.id for s in held})
    assert sorted(s.id for s in calibration + held) == sorted(s.id for s in samples)
    assert _counts(held) == Counter({("ecginstruct", "diagnosis"): 3, ("ecginstruct", "rhythm"): 1,
                                     ("ecgbench", "report"): 1})
    assert [s.id for s in held] == [s.id for s in split_held_out(samples, 5, seed=1)[1]]
    assert split_held_out(samples, 0, seed=1) == (samples, [])
    with pytest.raises(ConfigError, match="calibration needs at least one"):
        split_held_out(samples, len(samples), seed=1)


# --- runtime-exact model inputs ------------------------------------------------------------------------------


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def test_prepared_sample_is_what_the_runtime_computes(instruct: Path, layout: ImageLayout, tokenizer) -> None:
    sample = load_ecginstruct(instruct)[1]  # multi-turn
    prepared = prepare_sample(sample, layout, tokenizer)
    expected = preprocess(load_image(sample.image_path), layout)
    np.testing.assert_array_equal(prepared.pixel_values, expected.pixel_values)
    assert prepared.pixel_values.dtype == np.float32 and prepared.pixel_values.shape[1:] == (3, 336, 336)
    assert prepared.image_size == expected.image_size
    assert prepared.image_tokens == image_token_count(expected.image_size, layout) == expected.num_image_tokens
    assert prepared.input_ids == prompt_ids([Turn(q, a) for q, a in MULTI], tokenizer)
    assert prepared.input_ids.count(IMAGE_SLOT) == 1
    for _, answer in MULTI:
        assert _contains(prepared.input_ids, tokenizer.encode(answer))
    assert not prepared.truncated and (prepared.id, prepared.source, prepared.task) == ("a2", "ecginstruct", "rhythm")


def test_too_long_conversations_drop_later_turns_then_cut_the_answer(instruct: Path, layout: ImageLayout,
                                                                     tokenizer) -> None:
    sample = load_ecginstruct(instruct)[1]
    image_tokens = prepare_sample(sample, layout, tokenizer).image_tokens
    first_turn = prompt_ids([Turn(*MULTI[0])], tokenizer)
    fits_first = spliced_length(first_turn, image_tokens)
    dropped = prepare_sample(sample, layout, tokenizer, max_length=fits_first + 3)
    assert dropped.truncated and dropped.input_ids == first_turn
    question_only = spliced_length(prompt_ids([Turn(MULTI[0][0])], tokenizer), image_tokens)
    cut = prepare_sample(sample, layout, tokenizer, max_length=question_only + 1)
    assert cut.truncated and spliced_length(cut.input_ids, image_tokens) == question_only + 1
    assert cut.input_ids == first_turn[:len(cut.input_ids)] and cut.input_ids.count(IMAGE_SLOT) == 1
    with pytest.raises(PromptError, match=r"the image .* and the first question need"):
        prepare_sample(sample, layout, tokenizer, max_length=question_only - 1)
    whole = spliced_length(prompt_ids([Turn(q, a) for q, a in MULTI], tokenizer), image_tokens)
    exact = prepare_sample(sample, layout, tokenizer, max_length=whole)  # fits to the last position: nothing cut
    assert not exact.truncated and spliced_length(exact.input_ids, image_tokens) == whole


# --- synthetic -----------------------------------------------------------------------------------------------

# What each of the synthesizer's label sets must be called in an answer (independent of the module's wording).
LABEL_WORDS = {("NORM", "SR"): "normal", ("STACH",): "tachycardia", ("SBRAD",): "bradycardia",
               ("AFIB",): "atrial fibrillation", ("SR", "1AVB"): "first-degree av block"}
RHYTHM_WORDS = {"sinus": "sinus rhythm", "tachycardia": "sinus tachycardia", "bradycardia": "sinus bradycardia",
                "afib": "atrial fibrillation", "first_degree_av_block": "sinus rhythm"}


def _option(question: str, letter: str) -> str:
    match = re.search(rf"\b{letter}\. (.*?)(?= [A-D]\. |$)", question)
    assert match is not None
    return match.group(1)


def test_synthetic_answers_are_true_of_the_signal() -> None:
    samples = synthetic_samples(20, seed=5)  # 5 rhythms x 4 tasks, each once
    assert Counter((s.synthetic.rhythm, s.task) for s in samples) == Counter(
        {(r, t): 1 for r in {s.synthetic.rhythm for s in samples} for t in TASKS[:4]})
    for sample in samples:
        record = sample.synthetic.record()
        question, answer = sample.turns[0]
        assert round(record.heart_rate_bpm) == sample.synthetic.heart_rate_bpm
        assert classify_task(question) == sample.task
        said = _option(question, answer.split("option is ")[1][0]) if sample.task == "multiple_choice" else answer
        if sample.task != "rhythm":
            assert LABEL_WORDS[record.labels] in said.lower(), (sample.id, said)
        if sample.task in ("rhythm", "report"):
            assert RHYTHM_WORDS[record.rhythm] in said.lower(), (sample.id, said)
            assert f"{round(record.heart_rate_bpm)} bpm" in answer
        if record.rhythm == "afib":
            assert "sinus" not in said.lower()


def test_synthetic_samples_are_deterministic_lazy_and_vary_in_tiles(layout: ImageLayout) -> None:
    first = synthetic_samples(40, seed=0)
    assert first == synthetic_samples(40, seed=0)
    assert first[:10] == synthetic_samples(10, seed=0)  # a sample does not depend on how many are listed
    assert [s.synthetic for s in first] != [s.synthetic for s in synthetic_samples(40, seed=1)]
    assert {s.source for s in first} == {"synthetic"} and set(SOURCES) >= {s.source for s in first}
    sizes = {(s.synthetic.width_px, s.synthetic.height_px) for s in first}
    assert sizes == set(PRINT_SIZES)
    assert len({image_token_count(size, layout) for size in sizes}) == 3  # 2x2, 2x1 and 3x1 grids
    small = next(s for s in first if s.synthetic.width_px == 1100)
    image = small.load_image()
    assert image.size == (1100, 850) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(small.load_image()))


def test_samples_module_imports_neither_torch_nor_transformers() -> None:
    code = ("import sys; import pulse_edge.calibration.samples; "
            "from pulse_edge.calibration.datasets.synthetic import synthetic_samples; "
            "synthetic_samples(5, seed=0)[0].load_image(); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
