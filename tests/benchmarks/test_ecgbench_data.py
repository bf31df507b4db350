"""ECGBench loading in both layouts, prediction files (torn lines, duplicates), the progress bar."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from pulse_testing.ecgbench_data import ecg_png, item, write_json_subset, write_parquet_subset

from pulse_edge.benchmarks.common.progress import Progress
from pulse_edge.benchmarks.ecgbench.predictions import prepare_for_append, read_predictions
from pulse_edge.calibration.datasets.ecgbench.readers import discover, find_subset, iter_samples, load_samples
from pulse_edge.cli.eval import eval_group
from pulse_edge.errors import InputError


@pytest.fixture(scope="module")
def png() -> bytes:
    return ecg_png(seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory, png: bytes) -> Path:
    """Four subsets in four of the accepted places: HF snapshot, data/<subset>/, flat parquet, JSON + images/."""
    pytest.importorskip("pyarrow", reason="the parquet layout needs pyarrow (pulse-edge[bench])")
    root = tmp_path_factory.mktemp("ecgbench")
    write_parquet_subset(root / "ptb-test" / "test-00000-of-00001.parquet",
                         [item("p1", "Which classes?", "NORM", png), item("p2", "Which classes?", "MI, STTC", png)])
    write_parquet_subset(root / "data" / "cpsc-test" / "test-00000-of-00001.parquet",
                         [item("c1", "q", "AF", png)], image_struct=False)
    write_parquet_subset(root / "mmmu-ecg.parquet", [item("m1", "Pick one", "B", png)])
    write_json_subset(root, "ecgqa-test", [item("e1", "Options: yes, no", ("yes",), png),
                                           item("e2", "Options: lead i, lead ii", ("lead i", "lead ii"), png)])
    return root


def test_discovers_every_layout_in_paper_order(data_dir: Path) -> None:
    found = discover(data_dir)
    assert list(found) == ["ptb-test", "ecgqa-test", "cpsc-test", "mmmu-ecg"]
    assert {k: v.layout for k, v in found.items()} == {"ptb-test": "parquet", "ecgqa-test": "json",
                                                       "cpsc-test": "parquet", "mmmu-ecg": "parquet"}


def test_parquet_samples_decode_and_lose_the_image_marker(data_dir: Path, png: bytes) -> None:
    samples = list(iter_samples(find_subset(data_dir, "ptb-test"), with_images=True))
    assert [s.id for s in samples] == ["p1", "p2"]
    assert samples[1].question == "Which classes?" and samples[1].answer == "MI, STTC"
    assert samples[0].image_bytes == png and samples[0].load_image().size == (880, 680)
    raw = next(iter_samples(find_subset(data_dir, "cpsc-test"), with_images=True))  # raw bytes column
    assert raw.load_image().mode == "RGB"


def test_scoring_reads_no_image_bytes_and_ids_filter(data_dir: Path) -> None:
    source = find_subset(data_dir, "ptb-test")
    assert all(s.image_bytes is None for s in load_samples(source))
    assert [s.id for s in iter_samples(source, with_images=True, ids={"p2"})] == ["p2"]
    assert [s.id for s in load_samples(source, limit=1)] == ["p1"]


def test_json_layout_keeps_list_answers_and_finds_images(data_dir: Path) -> None:
    samples = list(iter_samples(find_subset(data_dir, "ecgqa-test"), with_images=True))
    assert samples[1].answer == ("lead i", "lead ii")
    assert samples[0].image_file == data_dir / "images" / "ecgqa-test" / "e1.png"
    assert samples[0].load_image().size == (880, 680)


def test_missing_subset_and_missing_image_are_one_line_errors(data_dir: Path, tmp_path: Path, png: bytes) -> None:
    with pytest.raises(InputError, match="subsets present: ptb-test, ecgqa-test, cpsc-test, mmmu-ecg"):
        find_subset(data_dir, "arena")
    write_json_subset(tmp_path, "g12-test-no-cot", [item("g", "q", "A", png)])
    (tmp_path / "images" / "g12-test-no-cot" / "g.png").unlink()
    sample = next(iter_samples(find_subset(tmp_path, "g12-test-no-cot"), with_images=True))
    with pytest.raises(InputError, match="not found under the data folder") as e:
        sample.load_image()
    assert "\n" not in str(e.value)


def test_bad_conversations_are_refused(tmp_path: Path) -> None:
    (tmp_path / "arena.json").write_text(json.dumps([{"id": 1, "image": "x.png",
                                                       "conversations": [{"from": "gpt", "value": "A"}]}]))
    with pytest.raises(InputError, match="question and an answer"):
        load_samples(find_subset(tmp_path, "arena"))


def _conversation(gold: object, question: object = "Which?") -> list[dict]:
    return [{"id": "a1", "image": "x.png",
             "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": gold}]}]


@pytest.mark.parametrize(("write", "expected"), [
    (lambda path: path.write_text(json.dumps(_conversation(None))), "a conversation turn has no answer"),
    (lambda path: path.write_text(json.dumps(_conversation("A", None))), "a conversation turn has no question"),
    (lambda path: path.write_bytes(json.dumps(_conversation("Caf\u00e9")).encode().replace(b"Caf", b"\xe9")),
     "not UTF-8 text"),
], ids=["null gold", "null question", "latin-1 bytes"])
def test_a_damaged_subset_file_is_one_line(tmp_path: Path, write, expected: str) -> None:
    """A null gold would become "" and be scored (an empty answer matching it); Latin-1 bytes a traceback."""
    write(tmp_path / "mmmu-ecg.json")
    with pytest.raises(InputError, match=expected):
        load_samples(find_subset(tmp_path, "mmmu-ecg"))


def test_a_parquet_id_column_that_is_not_strings_or_integers_is_refused(tmp_path: Path, png: bytes) -> None:
    """str(1.0) is "1.0" where arrow's cast that selects rows by id gives "1": the samples were listed, never read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_parquet_subset(tmp_path / "mmmu-ecg" / "test-00000-of-00001.parquet", [item("1", "Which?", "A", png)])
    table = pq.read_table(path)
    pq.write_table(table.set_column(0, "id", pa.array([1.0])), path)
    with pytest.raises(InputError, match="the id column holds double, not strings or integers"):
        load_samples(find_subset(tmp_path, "mmmu-ecg"))


def test_a_null_answer_in_predictions_is_an_error_not_an_answer(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": null}\n{"id": "b", "text": null, "response": "B"}\n')
    a, b = read_predictions(path).predictions
    assert (a.text, a.error) == ("", "no answer (its text is null)") and (b.text, b.error) == ("B", None)
    path.write_text('{"id": "a", "text": 7}\n')
    with pytest.raises(InputError, match="line 1's text is a int, not text"):
        read_predictions(path)


@pytest.mark.parametrize(("line", "expected"), [
    # made text, they were scored: an id "['m0']" or "1.0"
    ('{"id": ["m0"], "text": "A"}', "line 1's id is a list, not a string or an integer"),
    ('{"id": 1.0, "text": "A"}', "line 1's id is a float, not a string or an integer"),
    ('{"question_id": true, "text": "A"}', "line 1's id is a bool, not a string or an integer")])
def test_a_prediction_id_of_another_type_is_refused(tmp_path: Path, line: str, expected: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(InputError, match=re.escape(expected)):
        read_predictions(path)
    path.write_text('{"id": 7, "text": "A", "prompt": {"prompt": "Options: A, B"}}\n')  # as LLaVA's scripts write
    assert read_predictions(path).predictions[0].prompt == "Options: A, B"
    path.write_text('{"id": "row-3", "question_id": "mmmu-17", "text": "A"}\n')  # both: the paper reads question_id
    assert read_predictions(path).predictions[0].id == "mmmu-17"


def test_a_prompt_that_is_not_text_is_refused_where_it_is_read(data_dir: Path, tmp_path: Path) -> None:
    """ECG-QA reads its options from the recorded prompt: a list made text read "yes" and "no']" (scored 100); the
    other subsets never read it, and a chat-message list there is the paper's script's to ignore too."""
    predictions = tmp_path / "ecgqa.jsonl"
    predictions.write_text('{"question_id": "e1", "prompt": ["Options: yes, no"], "text": "yes"}\n')
    result = CliRunner().invoke(eval_group, ["score", "--subset", "ecgqa", "--data", str(data_dir),
                                             "--predictions", str(predictions)])
    assert result.exit_code == 2 and "the prompt recorded for e1 is not text" in result.output, result.output
    predictions.write_text('{"id": "a", "prompt": [{"role": "user", "content": "?"}], "text": "NORM"}\n')
    read = read_predictions(predictions).predictions[0]
    assert (read.prompt, read.prompt_not_text, read.text) == (None, True, "NORM")


@pytest.mark.parametrize("answer", [{"x": "NORM"}, ["yes", None], True, [["yes"]]])
def test_a_reference_answer_that_is_not_text_is_refused(tmp_path: Path, answer: object) -> None:
    """A dict gold was made text ("{'x': 'NORM'}") and scored by substring: F1 100 for an answer naming NORM."""
    (tmp_path / "ecgqa-test.json").write_text(json.dumps([{"id": "q1", "image": "x.png", "conversations": [
        {"from": "human", "value": "Is it normal?"}, {"from": "gpt", "value": answer}]}]))
    with pytest.raises(InputError, match=r"q1: an answer is a \w+ .*, not text; not an ECGBench item"):
        load_samples(find_subset(tmp_path, "ecgqa-test"))


def test_subsets_command_lists_what_is_there(data_dir: Path) -> None:
    result = CliRunner().invoke(eval_group, ["subsets", "--data", str(data_dir)])
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    assert [(r["subset"], r["samples"]) for r in listing["found"]] == [
        ("ptb-test", 2), ("ecgqa-test", 2), ("cpsc-test", 1), ("mmmu-ecg", 1)]
    assert "arena" in listing["not_found"]


def test_predictions_tolerate_a_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"id": "a", "text": "A"}\n{"question_id": "b", "response": "B", "prompt": {"prompt": "Q"}}\n'
                    '{"id": "a", "text": "again"}\n{"id": "c", "te')
    read = read_predictions(path)
    assert [(p.id, p.text, p.text_key) for p in read.predictions] == [("a", "A", "text"), ("b", "B", "response")]
    assert read.predictions[1].prompt == "Q"
    assert read.duplicates == ("a",) and read.torn_tail
    prepare_for_append(read)
    assert path.read_text().endswith('"again"}\n')
    path.write_text('{"id": "a", "text": "A"}\nnot json\n{"id": "b", "text": "B"}\n')
    with pytest.raises(InputError, match="line 2 is not valid JSON"):
        read_predictions(path)


def test_progress_bar_shows_eta_in_plain_logs() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress(4, "csn", stream=stream, clock=lambda: now[0], log_every_s=100)
    for _ in range(4):
        now[0] += 2.0
        progress.advance()
    progress.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "csn [######..................] 1/4  25% 0:02 elapsed, ETA 0:06, 2.0 s/sample"
    assert lines[-1].startswith("csn [########################] 4/4 100% 0:08 elapsed")
    assert len(lines) == 2  # throttled: the first line and the last, not repeated on close


def test_score_command_reads_paper_style_predictions(data_dir: Path, tmp_path: Path) -> None:
    # e1 gold ["yes"], e2 gold ["lead i", "lead ii"] (JSON lists); both answered right in both modes:
    # e2 compat: "lead i" and "lead ii" both occur in the lower-cased answer -> the set of both options
    predictions = tmp_path / "ecgqa.jsonl"
    predictions.write_text(
        '{"question_id": "e1", "prompt": "<image>\\nOptions: yes, no", "text": "yes"}\n'
        '{"question_id": "e2", "prompt": "<image>\\nOptions: lead i, lead ii", "text": "Lead I, lead II"}\n'
        '{"question_id": "zz", "text": "yes"}\n')
    result = CliRunner().invoke(eval_group, ["score", "--subset", "ecgqa", "--data", str(data_dir),
                                             "--predictions", str(predictions)])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["compat"] == {"accuracy": 100.0, "unwinnable": 0} and out["strict"] == {"accuracy": 100.0, "unparsed": 0}
    assert (out["coverage"]["scored"], out["coverage"]["unknown"], out["coverage"]["unknown_ids"]) == (2, 1, ["zz"])


def test_predictions_of_another_subset_are_refused_not_an_empty_score(data_dir: Path, tmp_path: Path) -> None:
    """Scored with the wrong --subset, no id matched: the JSON said "scored": false, and the command exited 0."""
    predictions = tmp_path / "ptb.jsonl"
    predictions.write_text('{"question_id": "ptb-1", "text": "NORM"}\n{"question_id": "ptb-2", "text": "MI"}\n')
    result = CliRunner().invoke(eval_group, ["score", "--subset", "ecgqa", "--data", str(data_dir),
                                             "--predictions", str(predictions)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "none of its 2 answer ids (e.g. 'ptb-1') is a sample of ecgqa" in result.output
    assert result.output.rstrip().endswith("check --subset")


def test_each_subset_is_read_in_the_shape_its_release_stores(tmp_path: Path, png: bytes) -> None:
    """The dataset card's configs: ECG-QA's parquet stores every `value` as a list of strings (its question was
    put before the model as "['Question: ...\\n...']", brackets, quotes and escaped line breaks, and the options
    the scorer parses from it lost the last one: perfect answers scored 50), arena's turns are {question,
    answer} (refused as not alternating), and the PULSE repository's report file says "conversation", user /
    assistant (refused as no ECGBench item)."""
    pytest.importorskip("pyarrow", reason="the parquet layout needs pyarrow (pulse-edge[bench])")
    asked = "Question: What is the rhythm?\nOptions: sinus rhythm, atrial flutter"
    write_parquet_subset(tmp_path / "ecgqa-test" / "test-00000-of-00001.parquet",
                         [item("q1", asked, ("atrial flutter",), png)])
    write_parquet_subset(tmp_path / "arena" / "test-00000-of-00001.parquet",
                         [item("a1", "Describe it.", "Sinus rhythm.", png, ("And the axis?", "Normal."))])
    (tmp_path / "ptb-test-report.json").write_text(json.dumps([{"id": "r1", "image": "r.png", "conversation": [
        {"from": "user", "value": "<image>\nWrite a report."}, {"from": "assistant", "value": "Sinus rhythm."}]}]))
    qa = load_samples(find_subset(tmp_path, "ecgqa-test"))[0]
    assert (qa.question, qa.turns[0].answer) == (asked, ("atrial flutter",))
    arena = load_samples(find_subset(tmp_path, "arena"))[0]
    assert [(t.question, t.answer) for t in arena.turns] == [("Describe it.", "Sinus rhythm."),
                                                             ("And the axis?", "Normal.")]
    report = load_samples(find_subset(tmp_path, "ptb-test-report"))[0]
    assert (report.question, report.turns[0].answer) == ("Write a report.", "Sinus rhythm.")


def test_a_question_of_several_strings_is_refused_not_joined(tmp_path: Path) -> None:
    (tmp_path / "ecgqa-test.json").write_text(json.dumps([{"id": "q1", "image": "x.png", "conversations": [
        {"from": "human", "value": ["one", "two"]}, {"from": "gpt", "value": ["yes"]}]}]))
    with pytest.raises(InputError, match=r"q1: a question is a list \(\['one', 'two'\]\), not text"):
        load_samples(find_subset(tmp_path, "ecgqa-test"))
