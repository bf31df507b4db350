"""`eval ecgbench` with a fake pipeline: resume after an interruption, settings pinning, reports. No torch."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image
from pulse_testing.ecgbench_data import ecg_png, item, write_json_subset, write_parquet_subset

from pulse_edge.benchmarks.ecgbench.runner import RunSettings, pin_settings, plan_run, run_plans
from pulse_edge.cli.eval import eval_group
from pulse_edge.errors import InputError
from pulse_edge.runtime.generation.result import GenerationResult, Timings

_LETTERS = {"g1": "A", "g2": "B", "g3": "Answer: C", "g4": "no idea", "g5": "E"}  # g4: unreadable


class FakePipeline:
    """Answers from a table keyed by the sample id written in the question; can be interrupted."""

    def __init__(self, answer: Callable[[str], str] = lambda q: _LETTERS.get(_id(q), "A"),
                 interrupt_after: int | None = None) -> None:
        self.answer = answer
        self.interrupt_after = interrupt_after
        self.asked: list[str] = []

    def generate(self, image: Image.Image, question: str, *, max_new_tokens: int, sampling: Any = None,
                 on_text: Any = None) -> GenerationResult:
        assert isinstance(image, Image.Image) and max_new_tokens >= 1 and sampling.greedy
        if self.interrupt_after is not None and len(self.asked) >= self.interrupt_after:
            raise KeyboardInterrupt
        self.asked.append(_id(question))
        return GenerationResult(text=self.answer(question), token_ids=[5, 6], image_tokens=2880, prompt_tokens=2950,
                                generated_tokens=2, stop_reason="eos", timings=Timings(1, 2, 3, 4, 5, 6),
                                backend="fake")


class FakeChat:
    """A conversation: the image comes with the first question only."""

    def __init__(self, pipeline: FakePipeline) -> None:
        self.pipeline, self.turn = pipeline, 0

    def ask(self, question: str, image: Image.Image | None = None, *, max_new_tokens: int, sampling: Any = None,
            on_text: Any = None) -> GenerationResult:
        assert (image is not None) == (self.turn == 0)
        self.turn += 1
        if self.turn > 1:
            return GenerationResult(text=f"turn {self.turn}", token_ids=[5], image_tokens=0, prompt_tokens=9,
                                    generated_tokens=1, stop_reason="eos", timings=Timings(1, 2, 3, 4, 5, 6),
                                    backend="fake")
        return self.pipeline.generate(image, question, max_new_tokens=max_new_tokens, sampling=sampling)


class FakeChatPipeline(FakePipeline):
    def chat(self) -> FakeChat:
        return FakeChat(self)


def _id(question: str) -> str:
    return re.search(r"\[(\w+)\]", question).group(1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("pyarrow", reason="the parquet layout needs pyarrow (pulse-edge[bench])")
    root = tmp_path_factory.mktemp("bench")
    png = ecg_png(seed=1)
    gold = {"g1": "A", "g2": "B", "g3": "C", "g4": "D", "g5": "H"}
    write_parquet_subset(root / "csn-test-no-cot" / "test-00000-of-00001.parquet",
                         [item(i, f"Which rhythm? [{i}] A. ... H. ...", g, png) for i, g in gold.items()])
    tiny = io.BytesIO()
    Image.new("RGB", (60, 40), "white").save(tiny, format="PNG")  # below the 128 px minimum: an input error
    write_json_subset(root, "arena", [item("a1", "Describe [a1]", "Sinus rhythm.", png, ("And the axis?", "Normal.")),
                                      item("a2", "Describe [a2]", "AF.", tiny.getvalue())])
    return root


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_interrupted_run_resumes_without_redoing_finished_ids(data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = FakePipeline(interrupt_after=2)
    with pytest.raises(KeyboardInterrupt):
        run_plans(plan_run(data_dir, ["csn"], out), lambda: first, stream=io.StringIO())
    answers = out / "csn-test-no-cot.jsonl"
    assert [r["id"] for r in _records(answers)] == ["g1", "g2"]
    with open(answers, "a") as f:
        f.write('{"id": "g3", "te')  # a crash in the middle of a write
    plans = plan_run(data_dir, ["csn"], out)
    assert plans[0].todo == ("g3", "g4", "g5") and plans[0].existing.torn_tail
    second = FakePipeline()
    stats = run_plans(plans, lambda: second, stream=io.StringIO())
    assert second.asked == ["g3", "g4", "g5"]
    assert [r["id"] for r in _records(answers)] == ["g1", "g2", "g3", "g4", "g5"]
    assert (stats[0].answered, stats[0].already_done) == (3, 2)

    def no_model() -> Any:
        raise AssertionError("a finished run must not load the model")

    assert run_plans(plan_run(data_dir, ["csn"], out), no_model)[0].answered == 0


def test_bad_image_is_recorded_and_arena_runs_its_first_turn(data_dir: Path, tmp_path: Path) -> None:
    pipeline = FakePipeline(answer=lambda q: "Sinus rhythm, normal axis.")  # generate() only, no chat()
    run_plans(plan_run(data_dir, ["arena"], tmp_path), lambda: pipeline, stream=io.StringIO())
    a1, a2 = _records(tmp_path / "arena.jsonl")
    assert (a1["turns_run"], a1["turns_not_run"], a1["text"]) == (1, 1, "Sinus rhythm, normal axis.")
    assert a1["prompt"] == "Describe [a1]"  # the <image> marker is the pipeline's job
    assert a2["text"] == "" and "too small" in a2["error"]
    assert pipeline.asked == ["a1"]


def test_arena_runs_every_turn_when_the_pipeline_can_chat(data_dir: Path, tmp_path: Path) -> None:
    pipeline = FakeChatPipeline(answer=lambda q: "Sinus rhythm.")
    run_plans(plan_run(data_dir, ["arena"], tmp_path), lambda: pipeline, stream=io.StringIO())
    a1 = _records(tmp_path / "arena.jsonl")[0]
    assert (a1["text"], a1["turns_run"], a1["turns_not_run"]) == ("Sinus rhythm.", 2, 0)
    assert [(t["question"], t["text"]) for t in a1["turns"]] == [("Describe [a1]", "Sinus rhythm."),
                                                                  ("And the axis?", "turn 2")]


def test_an_arena_question_without_a_reference_answer_is_still_asked(tmp_path: Path) -> None:
    """Arena's later turns follow the model's own answers; a last question the release left unanswered is a
    turn like the others (it was dropped, and turns_not_run said 0)."""
    path = write_json_subset(tmp_path / "data", "arena", [item("a1", "Describe [a1]", "Sinus rhythm.", ecg_png(seed=2),
                                                                ("And the axis?", "Normal."))])
    records = json.loads(path.read_text())
    records[0]["conversations"].append({"question": "And the rate?", "answer": None})  # arena's shape: a dict a turn
    path.write_text(json.dumps(records))
    run_plans(plan_run(tmp_path / "data", ["arena"], tmp_path / "out"), lambda: FakeChatPipeline(lambda q: "SR."),
              stream=io.StringIO())
    a1 = _records(tmp_path / "out" / "arena.jsonl")[0]
    assert (a1["turns_run"], a1["turns_not_run"]) == (3, 0)
    assert [t["question"] for t in a1["turns"]] == ["Describe [a1]", "And the axis?", "And the rate?"]
    records[0]["conversations"].insert(1, {"question": "An unanswered question before others?", "answer": None})
    path.write_text(json.dumps(records))
    with pytest.raises(InputError, match="a conversation turn has no answer"):
        plan_run(tmp_path / "data", ["arena"], tmp_path / "out2")


def test_a_run_folder_keeps_its_model_and_settings(tmp_path: Path) -> None:
    pin_settings(tmp_path, RunSettings(model="/m/fp16", precision="fp16"))
    pin_settings(tmp_path, RunSettings(model="/m/fp16", precision="fp16"))  # same settings: resume
    with pytest.raises(InputError, match=r"precision 'fp16' -> 'int4'"):
        pin_settings(tmp_path, RunSettings(model="/m/fp16", precision="int4"))
    assert json.loads((tmp_path / "run.json").read_text())["machine"]["cores"] >= 1


@pytest.mark.parametrize("damage", ["", '{"format": "pulse-edge', "[1, 2]"])
def test_a_damaged_run_record_is_one_line_and_left_for_the_user(tmp_path: Path, damage: str) -> None:
    """Empty (a full disk), cut mid-write (a kill before it was written whole), or not an object: refused in one
    line naming the file, which stays as it was (the answers beside it are the user's)."""
    (tmp_path / "run.json").write_text(damage)
    with pytest.raises(InputError, match=r"run.json is damaged .* delete it to resume"):
        pin_settings(tmp_path, RunSettings(model="/m/fp16", precision="fp16"))
    assert (tmp_path / "run.json").read_text() == damage


def test_a_second_run_into_the_same_out_is_refused_while_one_runs(data_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.backends
    from pulse_edge.staging import target_lock

    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    monkeypatch.setattr(pulse_edge.backends, "open_backend", lambda *a, **k: FakePipeline())
    out = tmp_path / "out"
    with target_lock(out, what="--out directory"):  # as a running `eval ecgbench` holds it
        result = CliRunner().invoke(eval_group, ["ecgbench", "--model", str(model), "--data", str(data_dir),
                                                 "--subset", "csn", "--limit", "2", "--out", str(out)])
    assert result.exit_code == 2 and f"another pulse-edge command is writing {out}" in result.output
    assert not (out / "csn.jsonl").exists()
    report = tmp_path / "report"
    with target_lock(report, what="--report folder"):  # two runs reporting into one folder would mix its files
        result = CliRunner().invoke(eval_group, ["ecgbench", "--model", str(model), "--data", str(data_dir),
                                                 "--subset", "csn", "--limit", "2", "--out", str(out),
                                                 "--report", str(report)])
    assert result.exit_code == 2 and f"another pulse-edge command is writing {report}" in result.output


def test_a_run_pins_the_bundle_by_its_manifest_not_its_path(data_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """By path, a bundle re-exported in place resumed, and two models' answers were scored as one; a moved copy
    was refused."""
    import pulse_edge.backends

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"precision": "int8"}))
    monkeypatch.setattr(pulse_edge.backends, "open_backend", lambda *a, **k: FakePipeline())
    out = tmp_path / "out"

    def run(model: Path, limit: int) -> Any:
        return CliRunner().invoke(eval_group, ["ecgbench", "--model", str(model), "--data", str(data_dir),
                                               "--subset", "csn", "--limit", str(limit), "--out", str(out)])

    assert run(bundle, 2).exit_code == 0
    moved = bundle.rename(tmp_path / "moved")
    assert run(moved, 3).exit_code == 0  # the same bundle elsewhere: resumes
    (moved / "manifest.json").write_text(json.dumps({"precision": "int8", "note": "re-exported"}))
    refused = run(moved, 4)
    assert refused.exit_code == 2 and "holds answers made with other settings (model 'bundle sha256:" in refused.output
    assert [r["id"] for r in _records(out / "csn-test-no-cot.jsonl")] == ["g1", "g2", "g3"]


def test_cli_runs_scores_reports_and_resumes(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.backends

    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2}))
    interrupted = FakePipeline(interrupt_after=1)
    monkeypatch.setattr(pulse_edge.backends, "open_backend", lambda *a, **k: interrupted)
    out, report = tmp_path / "runs" / "a" / "out", tmp_path / "reports" / "a" / "report"  # folders not there yet
    args = ["ecgbench", "--model", str(model), "--data", str(data_dir), "--subset", "csn", "--limit", "4",
            "--out", str(out), "--report", str(report)]
    stopped = CliRunner().invoke(eval_group, args)
    assert stopped.exit_code == 130 and "rerun the same command to resume" in stopped.output
    monkeypatch.setattr(pulse_edge.backends, "open_backend", lambda *a, **k: FakePipeline())
    result = CliRunner().invoke(eval_group, args)
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output[result.output.index("{"):])
    assert sorted(scores) == ["model", "out", "runs", "subsets"]
    assert scores == json.loads((out / "scores.json").read_text())
    assert json.loads((out / "run.json").read_text())["max_new_tokens"] == 1024  # the paper's setting by default
    csn = scores["subsets"][0]
    # first 4 samples: g1 A ok, g2 B ok, g3 "Answer: C" ok, g4 "no idea" -> compat draws B (seed 42) vs D: wrong
    assert csn["compat"] == {"accuracy": 75.0, "random_fallbacks": 1}
    assert csn["strict"] == {"accuracy": 75.0, "unparsed": 1}
    assert csn["coverage"]["samples"] == 4 and csn["coverage"]["scored"] == 4
    assert [r["id"] for r in _records(out / "csn-test-no-cot.jsonl")] == ["g1", "g2", "g3", "g4"]
    markdown = (report / "report.md").read_text()
    assert "TEST MODEL" in markdown and "MEANINGLESS for accuracy" in markdown
    assert "| CSN | 4 (1611) | accuracy | 75.0 | 85.2 | 57.5 |" in markdown
    assert "checkpoint (fp32/bf16/fp16 as run)" in markdown
    with Image.open(report / "accuracy.png") as png:
        assert png.size[0] > 600
    assert json.loads((report / "report.json").read_text())["subsets"][0]["compat"]["accuracy"] == 75.0


def test_cli_checks_images_before_loading_a_model(data_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import pulse_edge.backends

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    (data / "images" / "arena" / "a1.png").unlink()

    def refuse(*a: Any, **k: Any) -> Any:
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(pulse_edge.backends, "open_backend", refuse)
    result = CliRunner().invoke(eval_group, ["ecgbench", "--model", str(tmp_path), "--data", str(data),
                                             "--subset", "arena", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "pulse-edge: error: arena: 1 of 2 images not found (first: 'arena/a1.png'); unpack the image archives "
        "into images/ beside the JSON file")


def test_repeated_ids_are_refused_over_the_whole_file_and_when_scored(tmp_path: Path) -> None:
    """With ids 1, 2, 1 and --limit 2 the check saw no repeat, the run matched answers across the whole file, and
    scoring matched id 1's answer to the last id 1's question."""
    from pulse_edge.benchmarks.ecgbench.predictions import read_predictions
    from pulse_edge.benchmarks.ecgbench.score import score_subset
    from pulse_edge.calibration.datasets.ecgbench.readers import find_subset, load_samples
    from pulse_edge.calibration.datasets.ecgbench.subsets import resolve_subset

    png = ecg_png(seed=2)
    write_json_subset(tmp_path, "csn-test-no-cot", [item("1", "Q1 A. ... H. ...", "A", png),
                                                    item("2", "Q2 A. ... H. ...", "B", png),
                                                    item("1", "Q3 A. ... H. ...", "C", png)])
    with pytest.raises(InputError, match="1 repeated sample ids"):
        plan_run(tmp_path, ("csn",), tmp_path / "out", 2)
    answers = tmp_path / "p.jsonl"
    answers.write_text(json.dumps({"id": "1", "text": "A"}) + "\n")
    spec = resolve_subset("csn")
    with pytest.raises(InputError, match="repeated sample ids in the reference data"):
        score_subset(spec, load_samples(find_subset(tmp_path, spec.name)), read_predictions(answers))


def test_a_parquet_row_without_an_image_says_to_download_again_not_to_unpack_archives(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet layout needs pyarrow (pulse-edge[bench])")
    from pulse_edge.benchmarks.ecgbench.runner import check_images

    path = write_parquet_subset(tmp_path / "data" / "mmmu-ecg" / "test-00000-of-00001.parquet",
                                [item("m1", "Which?", "A", ecg_png(seed=1))])
    rows = pq.read_table(path).to_pylist()
    rows[0]["image"] = {"bytes": None, "path": None}  # a damaged download: the row holds no image
    pq.write_table(pq.read_table(path).from_pylist(rows, schema=pq.read_table(path).schema), path)
    with pytest.raises(InputError, match=r"mmmu-ecg: 1 of 1 images not found .*its row holds no image: download "
                       r"the subset's parquet files \(and any image files beside them\) again"):
        check_images(plan_run(tmp_path / "data", ["mmmu-ecg"], tmp_path / "out"))
