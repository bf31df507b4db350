"""ECGBench scoring against hand computations: the paper's rules (compat), quirks included, and strict mode."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from pulse_edge.benchmarks.ecgbench import parse
from pulse_edge.benchmarks.ecgbench.metrics import hard_auc, multilabel_scores
from pulse_edge.benchmarks.ecgbench.predictions import Prediction, PredictionFile
from pulse_edge.benchmarks.ecgbench.score import score_subset
from pulse_edge.calibration.datasets.ecgbench.readers import Sample, Turn
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS, resolve_subset
from pulse_edge.errors import ConfigError


def _score(subset: str, rows: list[tuple[str, str | tuple[str, ...], str]], *, question: str = "q",
           text_key: str = "text"):
    """rows: (id, gold answer, response), predictions in that order."""
    samples = [Sample(i, subset, (Turn(question, gold),)) for i, gold, _ in rows]
    predictions = PredictionFile(Path("p.jsonl"), tuple(Prediction(i, text, text_key) for i, _, text in rows))
    return score_subset(SUBSETS[subset], samples, predictions)


def test_ptb_four_samples_three_labels_and_the_norm_inside_abnormal_quirk() -> None:
    # gold            compat prediction                 strict prediction
    # s1 {NORM}       "The ECG is NORM."   -> {NORM}      {NORM}
    # s2 {MI, STTC}   "Findings: MI"       -> {MI}        {MI}
    # s3 {STTC}       "STTC and MI"        -> {MI, STTC}  {MI, STTC}
    # s4 {MI}         "ABNORMAL ECG"       -> {NORM} (NORM is a substring of ABNORMAL)   {} (unreadable)
    # compat classes fitted on gold: MI, NORM, STTC
    #   MI:   gold 0101 pred 0110: TP1 FP1 FN1 -> F1 2/4 = .5;   TPR 1/2, FPR 1/2 -> AUC (1+.5-.5)/2 = .5
    #   NORM: gold 1000 pred 1001: TP1 FP1 FN0 -> F1 2/3;        TPR 1, FPR 1/3   -> AUC (1+1-1/3)/2 = 5/6
    #   STTC: gold 0110 pred 0010: TP1 FP0 FN1 -> F1 2/3;        TPR 1/2, FPR 0   -> AUC .75
    #   F1 = (.5+2/3+2/3)/3 = 61.11; AUC = (.5+5/6+.75)/3 = 69.44; HL = 4 wrong of 12 cells = 33.33
    # strict: NORM F1 becomes 1 (s4 no longer predicts it): F1 = (.5+1+2/3)/3 = 72.22;
    #   HL over the 5 PTB labels: 3 wrong of 20 cells = 15; exact set matches: s1 only = 25; unreadable: 1
    score = _score("ptb-test", [("s1", "NORM", "The ECG is NORM."), ("s2", "MI, STTC", "Findings: MI"),
                                ("s3", "STTC", "STTC and MI"), ("s4", "MI", "ABNORMAL ECG")])
    assert score.compat["classes"] == ["MI", "NORM", "STTC"]
    assert score.compat["f1"] == pytest.approx(100 * (0.5 + 2 / 3 + 2 / 3) / 3, abs=1e-3)
    assert score.compat["auc"] == pytest.approx(100 * (0.5 + 5 / 6 + 0.75) / 3, abs=1e-3)
    assert score.compat["hl"] == pytest.approx(100 / 3, abs=1e-3)
    assert score.strict["f1"] == pytest.approx(100 * (0.5 + 1 + 2 / 3) / 3, abs=1e-3)
    assert score.strict["hl"] == pytest.approx(15.0)
    assert score.strict["exact_match"] == pytest.approx(25.0)
    assert score.strict["unparsed"] == 1
    assert score.strict["auc"] is None
    assert score.details["s4"].parsed == []


def test_code15_norm_abnormal_rules() -> None:
    # gold: c1 "NORM" -> [NORM]; c2 "ABNORMAL" -> [ABNORMAL]; c3 "RBBB"; c4 "AF"
    # compat (text after the last "Answer:"):
    #   c1 " NORM"                    -> [NORM]
    #   c2 " ABNORMAL"                -> [ABNORMAL]   (contains NORM, but ABNORMAL wins by the order of tests)
    #   c3 " ABNORMAL, RBBB" (the NORMAL before "Answer:" is ignored) -> [ABNORMAL, RBBB]
    #   c4 " STRONGLY ABNORMAL AF"   -> [ABNORMAL, ST (inside STRONGLY), AF]; ST is no gold class: dropped
    # classes ABNORMAL, AF, NORM, RBBB:
    #   ABNORMAL gold 0100 pred 0111: TP1 FP2 -> F1 2/4 = .5, AUC (1+1-2/3)/2 = 2/3; others F1 1, AUC 1
    #   F1 = 3.5/4 = 87.5; AUC = (2/3+3)/4 = 91.67; HL = 2 wrong of 16 = 12.5
    # strict: c4 -> [ABNORMAL, AF] (no ST); HL over 8 codes: 2 of 32 = 6.25; exact: c1, c2 = 50
    score = _score("code15-test", [("c1", "NORM", "Answer: NORM"), ("c2", "ABNORMAL", "Answer: ABNORMAL"),
                                   ("c3", "RBBB", "The rhythm looks NORMAL. Answer: ABNORMAL, RBBB"),
                                   ("c4", "AF", "Answer: STRONGLY ABNORMAL AF")])
    assert score.compat["classes"] == ["ABNORMAL", "AF", "NORM", "RBBB"]
    assert score.compat["f1"] == pytest.approx(87.5)
    assert score.compat["auc"] == pytest.approx(100 * (2 / 3 + 3) / 4, abs=1e-3)
    assert score.compat["hl"] == pytest.approx(12.5)
    assert score.strict["f1"] == pytest.approx(87.5)
    assert score.strict["hl"] == pytest.approx(6.25)
    assert score.strict["exact_match"] == pytest.approx(50.0)
    labels = SUBSETS["code15-test"].labels
    assert parse.code15_compat("Answer: STRONGLY ABNORMAL AF", labels) == ["ABNORMAL", "ST", "AF"]
    assert score.details["c4"].parsed == ["ABNORMAL", "AF"]


def test_cpsc_strict_counts_labels_the_gold_never_has() -> None:
    # gold [AF], [I-AVB]; answers "AF" and "I-AVB and PAC"
    # compat: classes AF, I-AVB (PAC is dropped by the binarizer fitted on gold) -> F1 100, AUC 100, HL 0
    # strict: PAC is a class too: F1 (1 + 1 + 0)/3 = 66.67; HL over 9 codes: 1 wrong of 18 cells = 5.56
    score = _score("cpsc-test", [("a", "AF", "AF"), ("b", "I-AVB", "I-AVB and PAC")])
    assert (score.compat["f1"], score.compat["auc"], score.compat["hl"]) == (100.0, 100.0, 0.0)
    assert score.strict["f1"] == pytest.approx(200 / 3, abs=1e-3)
    assert score.strict["hl"] == pytest.approx(100 / 18, abs=1e-3)


def test_auc_is_nan_for_a_class_every_sample_has() -> None:
    # NORM in both gold sets: its gold column is constant -> no ROC curve -> NaN, and the mean is NaN (reported as None)
    score = _score("ptb-test", [("a", "NORM", "NORM"), ("b", "NORM, MI", "NORM")])
    assert score.compat["auc"] is None
    assert any("class NORM" in n for n in score.notes)
    assert score.compat["f1"] == pytest.approx(50.0)  # NORM 1, MI 0


def test_choice_extraction_and_random_fallback_seed_42() -> None:
    # g1 "A"                                   compat A (lone letter)                      strict A
    # g2 "The finding is PAC. Answer: B"       compat C ("C." inside "PAC.")               strict B (after Answer:)
    # g3 "I cannot tell"                       compat random: Random(42).choice(A..H) 1st = B   strict none
    # g4 "Hmm"                                 compat random, 2nd draw = A                 strict none
    # g5 "Answer: Because of the E wave"       compat B (first of A..H *in order* present: B of Because)  strict E
    # g6 "The correct option is F"             compat F                                    strict F
    # gold A, B, D, A, E, F:
    #   compat hits g1, g4 (lucky), g6 = 3/6 = 50; 2 random fallbacks
    #   strict hits g1, g2, g5, g6 = 4/6 = 66.67; 2 unreadable
    score = _score("csn-test-no-cot", [("g1", "A", "A"), ("g2", "B", "The finding is PAC. Answer: B"),
                                       ("g3", "D", "I cannot tell"), ("g4", "A", "Hmm"),
                                       ("g5", "E", "Answer: Because of the E wave"),
                                       ("g6", "F", "The correct option is F")])
    assert score.compat == {"accuracy": 50.0, "random_fallbacks": 2}
    assert score.strict["accuracy"] == pytest.approx(400 / 6, abs=1e-3)
    assert score.strict["unparsed"] == 2
    assert [score.details[g].parsed for g in ("g1", "g2", "g3", "g5")] == ["A", "B", None, "E"]


def test_a_sample_whose_generation_failed_is_wrong_not_a_lucky_guess() -> None:
    """An unreadable image leaves an error record with no text: compat drew the paper's guess for it (Random(42)
    over A..H gives B first: correct here) and scored 100 for an ECG the model never saw. It is scored wrong now,
    and its draw is still taken, as the paper's script takes it: the next sample gets the second draw (A), the
    paper's guess for it (a review found every later guess one draw off when the failed sample drew nothing)."""
    samples = [Sample("e1", "csn-test-no-cot", (Turn("q", "B"),)), Sample("e2", "csn-test-no-cot", (Turn("q", "A"),))]
    predictions = PredictionFile(Path("p.jsonl"), (Prediction("e1", "", error="e1 (x.png): not an image"),
                                                   Prediction("e2", "Hmm")))
    score = score_subset(SUBSETS["csn-test-no-cot"], samples, predictions)
    assert score.compat == {"accuracy": 50.0, "random_fallbacks": 1}  # e1 wrong, e2's guess the second draw, A
    assert score.strict["accuracy"] == 0.0 and score.coverage.errors == 1
    assert any("1 sample(s) whose generation failed are scored wrong" in note for note in score.notes)


def test_mmmu_guesses_among_four_letters() -> None:
    # MMMU has 4 options: Random(42).choice(A..D) first gives A (over A..H it would be B)
    assert _score("mmmu-ecg", [("m", "A", "no idea")]).compat["accuracy"] == 100.0
    assert _score("csn-test-no-cot", [("m", "A", "no idea")]).compat["accuracy"] == 0.0
    assert _score("mmmu-ecg", [("m", "A", "no idea")]).strict == {"accuracy": 0.0, "unparsed": 1}


def test_choice_compat_edge_cases() -> None:
    # the paper's extract() rule by rule, each where another reading gives another letter (mutations survived):
    assert parse.choice_compat("Answer: E or B") == "B"  # after "Answer:" the first in A..H order, not by position
    assert parse.choice_compat("The correct option is A. Correction: the correct option is C") == "A"  # "A." first
    assert parse.choice_compat("The correct option is B; on review The correct option is D") == "D"  # the last one
    assert parse.choice_compat("c. sinus rhythm") is None  # "X." as written: a lower-case letter is none
    assert parse.choice_compat(" A") is None and parse.choice_compat("A") == "A"  # a lone letter as it stands
    assert parse.choice_compat("H. LBBB") == "H"  # eight options (CSN, G12EC)
    assert parse.choice_strict("The correct answer is B. No: the correct answer is C.", "ABCD") == "C"
    assert parse.choice_compat("The correct option is ") is None  # the paper's script would crash here
    assert parse.choice_compat("The correct option is x. Answer: C") is None  # no fall-through to Answer:
    assert parse.choice_strict("(C)", "ABCD") == "C"
    assert parse.choice_strict("E", "ABCD") is None  # not an option of a 4-option question


QUESTION = ("Question: Which leads show ST elevation?\nOptions: lead I, lead II, lead III, None\n\n"
            "Only answer based on the given Options without any explanation.")
_INSTRUCTION = "\n\nOnly answer based on the given Options without any explanation."
YES_NO = "Question: Does this ECG show atrial fibrillation?\nOptions: yes, no, not sure" + _INSTRUCTION
LEADS = "Question: Which leads show ST elevation?\nOptions: lead i, lead ii, lead iii, lead v1, none" + _INSTRUCTION
REPEATED = "Question: Is the axis normal?\nOptions: yes, no, yes" + _INSTRUCTION
TRAILING_COMMA = "Question: Is there noise?\nOptions: yes, no, " + _INSTRUCTION
CAPITALS = "Question: Which lead?\nOptions: lead I, lead II" + _INSTRUCTION

# (id, prompt, gold, response, compat correct, strict correct, why compat can never be right), worked out from
# the paper's rule: options = the prompt after the last "Options:", instruction removed, split on ",", stripped;
# predicted = [o for o in options if o in response.lower()]; correct = set(predicted) == set(gold).
ECGQA_CASES = [
    # "No" lower-cased is "no": {no} == {no}
    ("y1", YES_NO, ("no",), "No", True, True, None),
    # "not sure" contains "no": {no, not sure} != {not sure}; no response can avoid it
    ("y2", YES_NO, ("not sure",), "Not sure", False, True, parse.ECGQA_SHADOWED),
    ("y3", YES_NO, ("yes",), "YES, it does.", True, True, None),
    # a text gold: set("no") == {"n", "o"}, never a set of options
    ("y4", YES_NO, "no", "no", False, True, parse.ECGQA_TEXT_GOLD),
    # a repeated option is predicted twice; the sets are equal
    ("y5", REPEATED, ("yes",), "yes", True, True, None),
    # "lead ii" contains "lead i": {lead i, lead ii} != {lead ii}
    ("l1", LEADS, ("lead ii",), "Lead II", False, True, parse.ECGQA_SHADOWED),
    # ... and is credited when the gold is both (strict reads lead II only)
    ("l2", LEADS, ("lead i", "lead ii"), "lead II", True, False, None),
    # "lead iii" contains both others
    ("l3", LEADS, ("lead iii",), "lead iii", False, True, parse.ECGQA_SHADOWED),
    # a trailing comma makes an empty option, found in every response: {yes, ""} != {yes}
    ("e1", TRAILING_COMMA, ("yes",), "yes", False, True, parse.ECGQA_EMPTY_OPTION),
    # an option written with capitals is never in the lower-cased response: {} != {lead I}
    ("c1", CAPITALS, ("lead I",), "lead I", False, True, parse.ECGQA_GOLD_NOT_FINDABLE),
]


def _score_ecgqa_cases(cases: list[tuple]) -> object:
    samples = [Sample(i, "ecgqa-test", (Turn("unused: the recorded prompt wins", gold),))
               for i, _, gold, *_ in cases]
    predictions = tuple(Prediction(i, response, "text", prompt) for i, prompt, _, response, *_ in cases)
    return score_subset(SUBSETS["ecgqa-test"], samples, PredictionFile(Path("p.jsonl"), predictions))


def test_ecgqa_compat_is_the_papers_rule_quirk_by_quirk() -> None:
    for i, prompt, gold, response, compat, _, why in ECGQA_CASES:
        predicted = parse.ecgqa_compat(response, parse.ecgqa_candidates(prompt))
        assert parse.ecgqa_compat_correct(predicted, gold) is compat, i
        assert parse.ecgqa_compat_unwinnable(parse.ecgqa_candidates(prompt), gold) == why, i
    assert parse.ecgqa_candidates(YES_NO) == ["yes", "no", "not sure"]
    assert parse.ecgqa_candidates(TRAILING_COMMA) == ["yes", "no", ""]
    assert parse.ecgqa_compat("Lead II", parse.ecgqa_candidates(LEADS)) == ["lead i", "lead ii"]
    assert parse.ecgqa_compat("yes", parse.ecgqa_candidates(REPEATED)) == ["yes", "yes"]
    # Python's semantics to the letter: an empty text gold is set() and is won by naming no option
    assert parse.ecgqa_compat_correct([], "") and parse.ecgqa_compat_unwinnable(["yes", "no"], "") is None
    # a text gold of single characters can be won when those characters are options
    assert parse.ecgqa_compat_correct(["a", "b"], "ab") and parse.ecgqa_compat_unwinnable(["a", "b"], "ba") is None


def test_ecgqa_compat_and_strict_scores_with_unwinnable_notes() -> None:
    # compat right: y1 y3 y5 l2 = 4/10; strict right: all but l2 = 9/10, none unreadable
    score = _score_ecgqa_cases(ECGQA_CASES)
    assert score.compat == {"accuracy": 40.0, "unwinnable": 6}
    assert score.strict == {"accuracy": 90.0, "unparsed": 0}
    assert [score.details[c[0]].correct for c in ECGQA_CASES] == [c[5] for c in ECGQA_CASES]
    notes = [n for n in score.notes if n.startswith("compat:")]
    assert len(notes) == 4
    assert any("3 sample(s)" in n and "contains another option" in n for n in notes)
    assert any("1 sample(s)" in n and "set(golden) is the set of its characters" in n for n in notes)


def test_ecgqa_text_and_response_fields_are_read_alike() -> None:
    for key in ("text", "response"):
        rows = [("q", ("lead ii", "lead i"), "Lead II")]
        samples = [Sample("q", "ecgqa-test", (Turn(LEADS, rows[0][1]),))]
        prediction = Prediction("q", "Lead II", key, LEADS)
        assert score_subset(SUBSETS["ecgqa-test"], samples,
                            PredictionFile(Path("p"), (prediction,))).compat["accuracy"] == 100.0


def test_label_codes_and_answers_are_read_as_the_paper_reads_them() -> None:
    assert parse.labels_compat("Normal ECG", ["NORM"]) == []  # case-sensitive: "Norm" is no code
    assert parse.labels_compat("first degree AV block", ["ST"]) == []  # ... and "st" inside "first" none
    # CODE-15: what follows the last "Answer:" only
    assert parse.code15_compat("Not ABNORMAL? Answer: NORM", []) == ["NORM"]
    # ECG-QA: the options after the last "Options:" (an earlier one belongs to an example)
    assert parse.ecgqa_candidates("Options: a, b\nQuestion: which?\nOptions: yes, no") == ["yes", "no"]


def test_ecgqa_options_come_from_the_recorded_prompt() -> None:
    # the prompt the model saw lists "lead v1"; the dataset question does not: the prompt wins
    sample = Sample("q", "ecgqa-test", (Turn(QUESTION, ("lead v1",)),))
    prediction = Prediction("q", "Lead V1", prompt="Options: lead v1, lead v2")
    score = score_subset(SUBSETS["ecgqa-test"], [sample], PredictionFile(Path("p"), (prediction,)))
    assert score.strict["accuracy"] == 100.0 and score.compat["accuracy"] == 100.0


def test_metrics_by_hand() -> None:
    # hard AUC = (1 + TPR - FPR) / 2: gold 1100, pred 1010 -> TPR 1/2, FPR 1/2 -> .5
    assert hard_auc(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == pytest.approx(0.5)
    assert math.isnan(hard_auc(np.array([1, 1]), np.array([1, 0])))
    scores = multilabel_scores([["A"], ["B"]], [["A", "C"], []])  # C unknown: dropped; B: 0/(0+0+1) -> F1 0
    assert scores.classes == ("A", "B")
    assert scores.f1_per_class == (1.0, 0.0)
    assert scores.hamming == pytest.approx(0.25)


def test_every_subset_has_a_scorer_and_aliases_resolve() -> None:
    assert resolve_subset("csn").name == "csn-test-no-cot"
    assert resolve_subset("PTB").name == "ptb-test"
    with pytest.raises(ConfigError, match="choose from ptb-test"):
        resolve_subset("ptb-xl-rhythm")
    for spec in SUBSETS.values():
        rows = [("x", "A" if spec.kind == "choice" else "NORM", "A")]
        assert score_subset(spec, [Sample("x", spec.name, (Turn(QUESTION, rows[0][1]),))],
                            PredictionFile(Path("p"), (Prediction("x", "A"),))).coverage.scored == 1


def test_missing_and_unknown_ids_are_counted() -> None:
    samples = [Sample(i, "mmmu-ecg", (Turn("q", "A"),)) for i in ("a", "b", "c")]
    predictions = PredictionFile(Path("p"), (Prediction("a", "A"), Prediction("zz", "B")), duplicates=("a",))
    score = score_subset(SUBSETS["mmmu-ecg"], samples, predictions)
    c = score.coverage
    assert (c.samples, c.scored, c.missing, c.unknown, c.duplicates) == (3, 1, 2, 1, 1)
    assert c.missing_ids == ("b", "c") and c.unknown_ids == ("zz",)
    assert score.compat["accuracy"] == 100.0  # scored on what was answered; the counts say what was not
    assert any("paper's subset has 200" in n for n in score.notes)


def test_the_guessing_subsets_draw_from_one_generator_in_the_papers_order() -> None:
    """The paper's script seeds Python's generator once and scores MMMU-ECG, CSN, then G12EC: CSN's guesses
    continue after MMMU's. Scored apart, each from its own Random(42), CSN's accuracy differed."""
    import random

    from pulse_edge.benchmarks.ecgbench.score import score_subsets

    def run(subset: str, golds: str) -> tuple:
        rows = [(f"{subset}{i}", g, "I cannot tell") for i, g in enumerate(golds)]  # every answer unreadable
        samples = [Sample(i, subset, (Turn("q", gold),)) for i, gold, _ in rows]
        return SUBSETS[subset], samples, PredictionFile(Path("p"), tuple(Prediction(i, t, "text") for i, _, t in rows))

    golds = {"mmmu-ecg": "ABCD" * 50, "csn-test-no-cot": "ABCDEFGH" * 5, "g12-test-no-cot": "HGFEDCBA" * 5}
    paper = random.Random(42)  # the script's one generator, in its order
    expected = {name: 100 * sum(paper.choice(list(SUBSETS[name].letters)) == g for g in gold) / len(gold)
                for name, gold in golds.items()}
    runs = [run(name, golds[name]) for name in ("g12-test-no-cot", "csn-test-no-cot", "mmmu-ecg")]  # any order
    scores = score_subsets(runs)
    assert [s.subset for s in scores] == [spec.name for spec, _, _ in runs]  # returned in the order given
    together = {s.subset: s for s in scores}
    assert {name: s.compat["accuracy"] for name, s in together.items()} == pytest.approx(expected)
    # MMMU-ECG whole (its 200): CSN draws as the script did; CSN is 40 of 1611, so G12EC cannot and says so
    assert not any("generator" in note for note in together["csn-test-no-cot"].notes)
    assert any("did not first draw all of csn-test-no-cot's guesses" in note
               for note in together["g12-test-no-cot"].notes)
    alone = score_subset(*runs[1])  # CSN without MMMU before it: its own Random(42), and said so
    assert alone.compat["accuracy"] != pytest.approx(expected["csn-test-no-cot"])
    assert any("did not first draw all of mmmu-ecg's guesses" in note for note in alone.notes)


def test_percentages_are_rounded_once_as_the_paper_does() -> None:
    """887 of 1317 is 67.35003%: the paper prints round(x, 1) = 67.4; rounded to 4 places first it printed 67.3."""
    from pulse_edge.benchmarks.ecgbench.score import percent

    assert f"{percent(887 / 1317):.1f}" == "67.4" == f"{round(887 / 1317 * 100, 1)}"


def test_the_arena_row_says_it_is_not_the_papers_measure() -> None:
    """The paper's judge scores arena's whole two-turn conversation; here turn 1 is judged: said in the row that
    sets it beside the paper's 38.9, not only in the notes."""
    from pulse_edge.benchmarks.ecgbench.report import _compat_table
    from pulse_edge.benchmarks.ecgbench.score import Coverage, SubsetScore

    def score(subset: str, metric: str) -> SubsetScore:
        spec = SUBSETS[subset]
        return SubsetScore(subset, spec.title, spec.kind, Coverage(50, 50, 50, 0, 0, 0, 0, False), {metric: 30.0},
                           {}, ())

    rows = {line.split(" | ")[0]: line for line in _compat_table([score("arena", "score"),
                                                                   score("mmmu-ecg", "accuracy")]) if "|" in line}
    assert "turn 1 only: the paper's judge scores the whole two-turn conversation" in rows["| ECG Arena"]
    assert "turn 1" not in rows["| MMMU-ECG"]


def test_one_gold_class_is_scored_as_scikit_learn_reads_a_one_column_matrix() -> None:
    """The paper's f1_score(average=None) takes an [n, 1] matrix as a binary target and gives F1 for 0 and for 1;
    its loop (evaluation/evaluate_ecgbench.py: `for idx, cls in enumerate(mlb.classes_)`) reads entry 0 for its one
    class: the F1 of the label 0. The mean of both was taken here before (a second review read the loop; 897 of
    4000 random one-class cases differed, none with two classes or more)."""
    # gold {}, {STTC}; predicted {NORM, STTC}, {STTC}: class STTC F1 = 2/3; label 0 (STTC absent) F1 = 0
    scores = multilabel_scores([[], ["STTC"]], [["NORM", "STTC"], ["STTC", "XX"]])
    assert scores.classes == ("STTC",) and scores.f1_per_class == pytest.approx((2 / 3,))
    assert scores.f1 == 0.0
    # gold 0, 0, 1; predicted 0, 1, 0: label 0 TP 1, FP 1, FN 1 (F1 1/2); label 1 TP 0 (F1 0); their mean 1/4
    assert multilabel_scores([[], [], ["STTC"]], [[], ["STTC"], []]).f1 == pytest.approx(1 / 2)
    assert multilabel_scores([["STTC"], ["STTC"]], [["STTC"], ["STTC"]]).f1 == 1.0  # only 1s: one label, as sklearn
    two = multilabel_scores([["MI"], ["STTC"]], [["MI"], ["MI"]])  # two classes: the plain per-class mean
    assert two.f1 == pytest.approx((2 / 3 + 0) / 2)
    # strict mode names its classes: the per-class mean, one class or several (only compat follows sklearn)
    assert multilabel_scores([[], ["STTC"]], [["STTC"], ["STTC"]], ("STTC",)).f1 == pytest.approx(2 / 3)
