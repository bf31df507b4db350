"""`eval compare`: deltas, agreement, changed samples and the --max-drop gate, on hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image
from pulse_testing.ecgbench_data import ecg_png, item, write_parquet_subset

from pulse_edge.benchmarks.ecgbench.compare import DropRule
from pulse_edge.cli.eval import eval_group
from pulse_edge.errors import ConfigError

CSN_GOLD = {"g1": "A", "g2": "B", "g3": "C", "g4": "D"}
PTB_GOLD = {"p1": "NORM", "p2": "MI"}
# fp16 answers every csn sample right; int4 rewords g2 (same letter), gets g3 wrong, adds an unknown id
FP16 = {"csn-test-no-cot": CSN_GOLD, "ptb-test": {"p1": "NORM", "p2": "MI"}}
INT4 = {"csn-test-no-cot": {"g1": "A", "g2": "Answer: B", "g3": "E", "g4": "D", "zz": "A"},
        "ptb-test": {"p1": "NORM", "p2": "MI"}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    pytest.importorskip("pyarrow", reason="the parquet layout needs pyarrow (pulse-edge[bench])")
    root = tmp_path_factory.mktemp("cmp")
    png = ecg_png(seed=2)
    write_parquet_subset(root / "data" / "csn-test-no-cot" / "test-00000-of-00001.parquet",
                         [item(i, "Which?", g, png) for i, g in CSN_GOLD.items()])
    write_parquet_subset(root / "data" / "ptb-test" / "test-00000-of-00001.parquet",
                         [item(i, "Which?", g, png) for i, g in PTB_GOLD.items()])
    runs = []
    for name, answers in (("fp16", FP16), ("int4", INT4)):
        run = root / f"run-{name}"
        run.mkdir()
        (run / "run.json").write_text(json.dumps({"model": f"/models/{name}", "precision": name}))
        for subset, texts in answers.items():
            (run / f"{subset}.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                         for i, t in texts.items()))
        runs.append(run)
    return root / "data", runs[0], runs[1]


def _compare(setup: tuple[Path, Path, Path], tmp_path: Path, *extra: str):
    data, fp16, int4 = setup
    return CliRunner().invoke(eval_group, ["compare", str(fp16), str(int4), "--data", str(data),
                                           "--changes", str(tmp_path / "changes.json"), *extra])


def test_deltas_agreement_and_changed_samples(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # csn strict accuracy: fp16 4/4 = 100, int4 3/4 = 75 -> delta -25
    # identical text: g1, g4 -> 50 %; identical parsed letter: g1, g2, g4 -> 75 %; changed: g3 (C -> E)
    result = _compare(setup, tmp_path, "--report", str(tmp_path / "report"))
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["label"] for r in out["runs"]] == ["fp16", "int4"]
    csn = next(s for s in out["subsets"] if s["subset"] == "csn-test-no-cot")
    assert csn["common_samples"] == 4 and csn["not_common"] == {"fp16": 0, "int4": 1}
    assert csn["deltas_vs_first"]["int4"]["strict"] == {"accuracy": -25.0}
    # paired strict correctness: g3 right -> wrong (b 1, c 0, n 4): McNemar exact p = 2 x C(1, 0) / 2 = 1;
    # d = -0.25, Wald half-width 1.959964 x sqrt((0.25 - 0.0625) / 4) = 0.42435 -> -67.43 .. +17.43 points
    assert csn["agreement_vs_first"] == [{"run": "int4", "text_identical": 50.0, "parsed_identical": 75.0,
                                          "changed": 1, "strict_paired": {
                                              "right_to_wrong": 1, "wrong_to_right": 0, "samples": 4, "p_value": 1.0,
                                              "delta": -25.0, "ci95": [-67.4345, 17.4345]}}]
    changes = json.loads((tmp_path / "changes.json").read_text())
    assert changes["subsets"]["csn-test-no-cot"]["int4"] == [
        {"id": "g3", "gold": "C", "answers": {"fp16": {"text": "C", "parsed": "C", "correct": True},
                                              "int4": {"text": "E", "parsed": "E", "correct": False}}}]
    ptb = next(s for s in out["subsets"] if s["subset"] == "ptb-test")
    assert ptb["deltas_vs_first"]["int4"]["compat"]["f1"] == 0.0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| strict | accuracy | 100.0 | 75.0 (-25.00) |" in report
    assert "| int4 | 50.0 | 75.0 | 1 | 1 / 0 | -25.00 (-67.43 to +17.43) | 1 |" in report
    with Image.open(tmp_path / "report" / "accuracy.png") as png:
        assert png.size[0] >= 800


def test_gate_fails_with_one_line_and_passes_within_budget(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    failed = _compare(setup, tmp_path, "--max-drop", "accuracy=10")
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines()[-1] == (
        "pulse-edge: error: accuracy gate failed: strict.csn-test-no-cot.accuracy fell 25.00 points for int4 "
        "(100.00 -> 75.00; allowed 10)")
    passed = _compare(setup, tmp_path, "--max-drop", "csn.accuracy=30", "--max-drop", "compat.ptb.f1=0",
                      "--max-drop", "hl=0")
    assert passed.exit_code == 0, passed.output
    assert json.loads(passed.output)["gate_failures"] == []
    assert json.loads(_compare(setup, tmp_path).output)["gate_failures"] is None  # no gate asked: none, not passed


def test_the_gate_fails_on_what_it_could_not_compare(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """A run that stopped short (g4 never answered) or never ran a subset (no ptb file): its scores would look
    fine on what it did answer, so a gate over those subsets fails and says what is missing."""
    data, fp16, _ = setup
    short = tmp_path / "run-short"
    short.mkdir()
    (short / "run.json").write_text(json.dumps({"model": "/models/short", "precision": "int8"}))
    (short / "csn-test-no-cot.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                         for i, t in list(CSN_GOLD.items())[:3]))
    result = CliRunner().invoke(eval_group, ["compare", str(fp16), str(short), "--data", str(data), "--changes",
                                             str(tmp_path / "changes.json"), "--max-drop", "accuracy=100"])
    assert result.exit_code == 1, result.output
    last = result.output.strip().splitlines()[-1]
    assert "ptb-test was not compared (no answers in int8)" in last
    assert "csn-test-no-cot was compared on 3 samples only: int8 lacks 1 that another run answered" in last
    csn = next(s for s in json.loads(result.output[:result.output.rindex("}") + 1])["subsets"])
    assert csn["unanswered"] == {"fp16": 0, "int8": 1}
    whole = _compare(setup, tmp_path, "--max-drop", "accuracy=100")  # both runs answered both subsets whole
    assert whole.exit_code == 0, whole.output


def test_a_subset_no_sample_of_which_every_run_answered_fails_the_gate(setup: tuple[Path, Path, Path],
                                                                       tmp_path: Path) -> None:
    """Runs whose ids match none of the reference's (common 0): nothing was compared, so nothing may pass."""
    data, fp16, _ = setup
    other = tmp_path / "run-other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model": "/models/other", "precision": "int8"}))
    for subset, texts in FP16.items():
        (other / f"{subset}.jsonl").write_text("".join(json.dumps({"id": f"x-{i}", "text": t}) + "\n"
                                                       for i, t in texts.items()))
    result = CliRunner().invoke(eval_group, ["compare", str(fp16), str(other), "--data", str(data), "--changes",
                                             str(tmp_path / "changes.json"), "--max-drop", "accuracy=100"])
    assert result.exit_code != 0, result.output
    assert "csn-test-no-cot has no sample every run answered" in result.output


def test_gate_rules_are_checked() -> None:
    assert DropRule.parse("strict.csn.accuracy=1.5") == DropRule("accuracy", 1.5, "strict", "csn-test-no-cot")
    assert DropRule.parse("auc=2").key("ptb-test") == ("compat", "compat.ptb-test.auc")
    for bad in ("accuracy", "accuracy=-1", "bleu=2", "strict.auc=1", "nosuch.f1=1", "f1=nan", "f1=inf"):
        with pytest.raises(ConfigError):
            DropRule.parse(bad)


def test_compare_needs_two_runs(setup: tuple[Path, Path, Path]) -> None:
    data, fp16, _ = setup
    result = CliRunner().invoke(eval_group, ["compare", str(fp16), "--data", str(data)])
    assert result.exit_code == 2 and "at least two run folders" in result.output


@pytest.mark.parametrize(("metric", "base", "value", "allowed", "fails"), [
    # Hamming loss is better lower: a rise is the drop (its sign flipped, a rise passed: a mutation survived)
    ("hl", 10.0, 12.5, 2.0, True), ("hl", 10.0, 5.0, 2.0, False), ("hl", 10.0, 12.0, 2.0, False),
    # the limit itself passes, anything past it fails (only drops of 25 against 10 and 30 were tried)
    ("f1", 80.0, 77.0, 3.0, False), ("f1", 80.0, 76.9, 3.0, True), ("f1", 80.0, 90.0, 0.0, False)])
def test_the_gate_reads_each_metric_in_its_own_direction_to_the_limit(metric: str, base: float, value: float,
                                                                      allowed: float, fails: bool) -> None:
    from types import SimpleNamespace

    from pulse_edge.benchmarks.ecgbench.compare import _check

    scores = [SimpleNamespace(strict={metric: v}, compat={}) for v in (base, value)]
    comparison = SimpleNamespace(subset="ptb-test", scores=scores)
    failures = _check(DropRule.parse(f"{metric}={allowed}"), comparison, [SimpleNamespace(label=r) for r in "ab"])
    assert bool(failures) == fails, failures
    if fails:
        assert failures[0].startswith(f"strict.ptb-test.{metric} {'rose' if metric == 'hl' else 'fell'}")


def test_a_report_folder_another_run_writes_is_refused(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """Two runs into one --report mixed their report.md, report.json and plot (a concurrency review)."""
    from pulse_edge.staging import target_lock

    report = tmp_path / "report"
    with target_lock(report, what="--report folder"):
        result = _compare(setup, tmp_path, "--report", str(report))
    assert result.exit_code == 2 and "another pulse-edge command is writing" in result.output, result.output
    assert _compare(setup, tmp_path, "--report", str(report)).exit_code == 0  # free again: written
    assert (report / "report.md").is_file()


def test_a_report_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill (or a full disk) while the report was written left a report.md cut half-way for the next reader."""
    from pulse_edge.benchmarks.ecgbench import report

    report._write(tmp_path, ["# the last run", "all of it"], {"run": 1})
    real = Path.write_text

    def cut_short(self: Path, text: str, **kwargs: Any) -> int:
        real(self, text[: len(text) // 2], **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_short)
    with pytest.raises(OSError):
        report._write(tmp_path, ["# this run", "cut"], {"run": 2})
    monkeypatch.undo()
    assert (tmp_path / report.MARKDOWN_FILE).read_text() == "# the last run\nall of it"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([report.MARKDOWN_FILE, report.JSON_FILE])
