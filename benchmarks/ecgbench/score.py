"""Score a subset's predictions against its reference answers, in compat and strict mode side by side.

compat follows the paper's evaluation script (see ecgbench_parse for its rules
and their flaws); its numbers are the ones to set beside the paper's table.
strict reads answers as whole words, never guesses, and reports how many
responses it could not read; its numbers are the ones to compare runs by.

Predictions are taken in file order (the order decides which random letter an
unreadable answer gets in compat mode, as in the paper's script); ids that are
not in the subset and subset ids without a prediction are counted, never
dropped silently. Percentages are x100 like the paper's table, unrounded: the
paper rounds once, round(100 x, 1), and so do the printed tables (rounded here
first, 67.35003 became 67.35 and then printed 67.3, not the paper's 67.4).

The paper's script seeds Python's one generator once and scores MMMU-ECG, then
CSN, then G12EC, each guessing from where the last left off; `score_subsets`
scores them in that order from one generator (`score_subset` alone starts its own).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from pulse_edge.benchmarks.ecgbench import parse
from pulse_edge.benchmarks.ecgbench.metrics import binarize, hamming_loss, multilabel_scores
from pulse_edge.benchmarks.ecgbench.predictions import Prediction, PredictionFile
from pulse_edge.calibration.datasets.ecgbench.readers import Sample
from pulse_edge.calibration.datasets.ecgbench.subsets import (
    CHOICE,
    CODE15,
    CODE15_WHOLE,
    ECGQA,
    JUDGE,
    LABELS,
    SubsetSpec,
)
from pulse_edge.errors import InputError

RANDOM_SEED = 42  # the paper's script seeds Python's `random` with 42
PAPER_DRAW_ORDER = ("mmmu-ecg", "csn-test-no-cot", "g12-test-no-cot")  # the subsets that guess, in its order
_LISTED_IDS = 20  # how many missing / unknown ids a score names (the counts are always complete)

Pair = tuple[Sample, Prediction]


@dataclass(frozen=True)
class Coverage:
    samples: int  # reference samples scored against
    predictions: int  # distinct ids in the predictions file
    scored: int
    missing: int  # reference samples without a prediction
    unknown: int  # predicted ids that are not in the subset
    duplicates: int  # repeated ids (the first answer counts)
    errors: int  # samples whose generation failed (scored as an empty answer)
    torn_tail: bool  # the file ended in a half-written line (ignored)
    missing_ids: tuple[str, ...] = ()
    unknown_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class SampleDetail:
    """What strict mode read from one answer; `correct` is None where there is no right or wrong."""

    gold: Any
    parsed: Any
    correct: bool | None


@dataclass(frozen=True)
class SubsetScore:
    subset: str
    title: str
    kind: str
    coverage: Coverage
    compat: Mapping[str, Any]
    strict: Mapping[str, Any]
    notes: tuple[str, ...] = ()
    details: Mapping[str, SampleDetail] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"subset": self.subset, "title": self.title, "kind": self.kind, "coverage": asdict(self.coverage),
                "compat": dict(self.compat), "strict": dict(self.strict), "notes": list(self.notes)}


@dataclass(frozen=True)
class ScoreParts:
    """What one scorer returns: both modes' metrics, what strict mode read per sample, and notes."""

    compat: dict[str, Any]
    strict: dict[str, Any]
    details: dict[str, SampleDetail]
    notes: tuple[str, ...] = ()


# A judge scorer: (spec, pairs) -> ScoreParts; ecgbench_judge provides one when an endpoint is given.
JudgeScorer = Callable[[SubsetSpec, Sequence[Pair]], ScoreParts]


def score_subsets(runs: Sequence[tuple[SubsetSpec, Sequence[Sample], PredictionFile]],
                  judge: JudgeScorer | None = None) -> list[SubsetScore]:
    """`score_subset` of each (spec, samples, predictions), in the given order, the guessing subsets scored in
    the paper's order from one generator, as its script does (module doc)."""
    rng = random.Random(RANDOM_SEED)
    rank = {name: i for i, name in enumerate(PAPER_DRAW_ORDER)}
    scored: dict[int, SubsetScore] = {}
    whole: list[str] = []  # earlier subsets whose every paper sample was scored: they drew as the script did
    for i in sorted(range(len(runs)), key=lambda i: rank.get(runs[i][0].name, -1)):
        scored[i] = score_subset(*runs[i], judge, rng=rng, drawn_before=whole)
        if scored[i].coverage.scored == runs[i][0].paper_size:
            whole = [*whole, runs[i][0].name]
    return [scored[i] for i in range(len(runs))]


def score_subset(spec: SubsetSpec, samples: Sequence[Sample], predictions: PredictionFile,
                 judge: JudgeScorer | None = None, *, rng: random.Random | None = None,
                 drawn_before: Sequence[str] = ()) -> SubsetScore:
    """Compat and strict scores of one subset; `samples` is the reference (all, or the first N of a limited run).
    `rng`: the compat guesses' generator, where earlier subsets `drawn_before` drew from it (score_subsets)."""
    gold = {s.id: s for s in samples}
    if len(gold) != len(samples):  # an answer would be scored against another sample's question (the last one's)
        raise InputError(f"{spec.name}: {len(samples) - len(gold)} repeated sample ids in the reference data; "
                         "answers are matched by id, so ids must be unique: fix or re-download the subset")
    pairs = [(gold[p.id], p) for p in predictions.predictions if p.id in gold]
    coverage = _coverage(samples, predictions, {p.id for _, p in pairs})
    notes: list[str] = []
    if coverage.samples != spec.paper_size:
        notes.append(f"{coverage.samples} reference samples, the paper's subset has {spec.paper_size}")
    if not pairs:
        empty = {"scored": False, "reason": "no predictions for this subset's samples"}
        return SubsetScore(spec.name, spec.title, spec.kind, coverage, empty, empty, tuple(notes))
    if spec.kind == JUDGE:
        result = judge(spec, pairs) if judge is not None else _unjudged()
    elif spec.kind == CHOICE:
        result = _score_choice(spec, pairs, random.Random(RANDOM_SEED) if rng is None else rng)
        notes += _guess_note(spec, result, drawn_before)
    else:
        result = _SCORERS[spec.kind](spec, pairs)
    return SubsetScore(spec.name, spec.title, spec.kind, coverage, result.compat, result.strict,
                       (*notes, *result.notes), result.details)


def answer_text(answer: str | tuple[str, ...]) -> str:
    return ", ".join(answer) if isinstance(answer, tuple) else answer


def percent(value: float) -> float | None:
    """x100, unrounded (module doc); None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else 100.0 * value


def _guess_note(spec: SubsetSpec, result: ScoreParts, drawn_before: Sequence[str]) -> list[str]:
    """Said where the guesses cannot be the paper's: a subset it scores first was not scored with this one."""
    earlier = PAPER_DRAW_ORDER[:PAPER_DRAW_ORDER.index(spec.name)] if spec.name in PAPER_DRAW_ORDER else ()
    missing = [name for name in earlier if name not in drawn_before]
    if not result.compat.get("random_fallbacks") or not missing:
        return []
    return [f"compat guessed {result.compat['random_fallbacks']} unreadable answer(s) from a generator that did not "
            f"first draw all of {', '.join(missing)}'s guesses as the paper's script does (not scored here, or not "
            "every sample): its accuracy may differ from the script's by up to that many answers"]


def _coverage(samples: Sequence[Sample], predictions: PredictionFile, scored: set[str]) -> Coverage:
    ids = [s.id for s in samples]
    known = set(ids)
    missing = [i for i in ids if i not in scored]
    unknown = [p.id for p in predictions.predictions if p.id not in known]
    errors = sum(1 for p in predictions.predictions if p.id in scored and p.error)
    return Coverage(len(samples), len(predictions.predictions), len(scored), len(missing), len(unknown),
                    len(predictions.duplicates), errors, predictions.torn_tail,
                    tuple(missing[:_LISTED_IDS]), tuple(unknown[:_LISTED_IDS]))


def _unjudged() -> ScoreParts:
    reason = "not scored: needs an LLM judge (pass --judge-url and --judge-model)"
    return ScoreParts({"scored": False, "reason": reason}, {"scored": False, "reason": reason}, {})


def _score_labels(spec: SubsetSpec, pairs: Sequence[Pair]) -> ScoreParts:
    gold_c = [parse.labels_compat(answer_text(s.answer), spec.labels) for s, _ in pairs]
    pred_c = [parse.labels_compat(p.text, spec.labels) for _, p in pairs]
    gold_s = [parse.labels_strict(answer_text(s.answer), spec.labels) for s, _ in pairs]
    pred_s = [parse.labels_strict(p.text, spec.labels) for _, p in pairs]
    return _multilabel(pairs, gold_c, pred_c, gold_s, pred_s, spec.labels)


def _score_code15(spec: SubsetSpec, pairs: Sequence[Pair]) -> ScoreParts:
    gold_c = [parse.code15_gold(answer_text(s.answer), spec.labels, strict=False) for s, _ in pairs]
    pred_c = [parse.code15_compat(p.text, spec.labels) for _, p in pairs]
    gold_s = [parse.code15_gold(answer_text(s.answer), spec.labels, strict=True) for s, _ in pairs]
    pred_s = [parse.code15_strict(p.text, spec.labels) for _, p in pairs]
    return _multilabel(pairs, gold_c, pred_c, gold_s, pred_s, (*CODE15_WHOLE, *spec.labels))


def _multilabel(pairs: Sequence[Pair], gold_c: list[list[str]], pred_c: list[list[str]], gold_s: list[list[str]],
                pred_s: list[list[str]], vocabulary: tuple[str, ...]) -> ScoreParts:
    compat = multilabel_scores(gold_c, pred_c)  # classes fitted on the gold labels, as the paper does
    notes = [f"compat AUC is undefined (NaN) for class {c}: its gold column holds one value only"
             for c, a in zip(compat.classes, compat.auc_per_class, strict=True) if math.isnan(a)]
    # strict: the full label vocabulary, so a label predicted but never in the gold counts as an error;
    # F1 is averaged over the labels that occur in gold or prediction (others have no F1 at all)
    present = tuple(c for c in vocabulary if any(c in g for g in gold_s) or any(c in p for p in pred_s))
    strict = multilabel_scores(gold_s, pred_s, present)
    full_hl = hamming_loss(binarize(gold_s, vocabulary), binarize(pred_s, vocabulary))
    details = {s.id: SampleDetail(sorted(g), sorted(p), set(g) == set(p))
               for (s, _), g, p in zip(pairs, gold_s, pred_s, strict=True)}
    return ScoreParts(
        {"auc": percent(compat.auc), "f1": percent(compat.f1), "hl": percent(compat.hamming),
         "classes": list(compat.classes), "f1_per_class": [percent(v) for v in compat.f1_per_class]},
        {"auc": None, "f1": percent(strict.f1), "hl": percent(full_hl), "exact_match": _rate(details),
         "unparsed": sum(1 for p in pred_s if not p), "classes": list(present),
         "f1_per_class": [percent(v) for v in strict.f1_per_class],
         "auc_note": "not reported: the model gives hard labels, not scores, so there is no ROC curve"},
        details, tuple(notes))


def _score_choice(spec: SubsetSpec, pairs: Sequence[Pair], rng: random.Random) -> ScoreParts:
    letters = list(spec.letters)
    compat_hits = fallbacks = strict_hits = unparsed = failed = 0
    details: dict[str, SampleDetail] = {}
    for sample, prediction in pairs:
        gold = answer_text(sample.answer)
        compat = parse.choice_compat(prediction.text)
        # the paper's script guesses; drawn in file order from one seeded generator, for every answer it cannot
        # read. A sample whose generation failed (an unreadable image) answered nothing: scored wrong (its lucky
        # guess was scored correct), its draw still taken so that every later guess is the paper's
        if compat is None:
            guess = rng.choice(letters)
            failed += bool(prediction.error)
            fallbacks += not prediction.error
            compat = None if prediction.error else guess
        compat_hits += compat == gold[:1]
        strict = parse.choice_strict(prediction.text, spec.letters)
        unparsed += strict is None
        correct = strict is not None and strict == gold.strip()[:1]
        strict_hits += correct
        details[sample.id] = SampleDetail(gold.strip()[:1], strict, correct)
    n = len(pairs)
    notes = (f"compat: {failed} sample(s) whose generation failed are scored wrong, where the paper's script "
             "guessed for them (their draws are taken all the same, so the other guesses are the paper's)",) \
        if failed else ()
    return ScoreParts({"accuracy": percent(compat_hits / n), "random_fallbacks": fallbacks},
                   {"accuracy": percent(strict_hits / n), "unparsed": unparsed}, details, notes)


def _score_ecgqa(spec: SubsetSpec, pairs: Sequence[Pair]) -> ScoreParts:
    compat_hits = strict_hits = unparsed = 0
    details: dict[str, SampleDetail] = {}
    unwinnable: Counter[str] = Counter()
    for sample, prediction in pairs:
        if prediction.prompt_not_text:  # its options cannot be read; the dataset's could differ from those it saw
            raise InputError(f"{spec.name}: the prompt recorded for {sample.id} is not text, and ECG-QA reads the "
                             "options from it: write it as text, or leave it out to read the dataset's question")
        # the options the model saw: the prompt it recorded, else the dataset's question
        candidates = parse.ecgqa_candidates(prediction.prompt or sample.question)
        compat_hits += parse.ecgqa_compat_correct(parse.ecgqa_compat(prediction.text, candidates), sample.answer)
        reason = parse.ecgqa_compat_unwinnable(candidates, sample.answer)
        if reason is not None:
            unwinnable[reason] += 1
        picked = parse.ecgqa_strict(prediction.text, candidates)
        gold = parse.ecgqa_gold_strict(sample.answer)
        unparsed += not picked
        correct = bool(picked) and picked == gold
        strict_hits += correct
        details[sample.id] = SampleDetail(sorted(gold), sorted(picked), correct)
    n = len(pairs)
    notes = tuple(f"compat: {count} sample(s) can never be scored correct: {_UNWINNABLE[reason]}"
                  for reason, count in sorted(unwinnable.items()))
    return ScoreParts({"accuracy": percent(compat_hits / n), "unwinnable": sum(unwinnable.values())},
                      {"accuracy": percent(strict_hits / n), "unparsed": unparsed}, details, notes)


# Why a sample cannot be won under the paper's ECG-QA rule, for the notes of a score.
_UNWINNABLE = MappingProxyType({
    parse.ECGQA_TEXT_GOLD: "the gold answer is a string, and the paper's set(golden) is the set of its "
                           "characters, which no set of the options named can equal",
    parse.ECGQA_EMPTY_OPTION: "the options end in a comma, so an empty option is found in every response and "
                              "never in the gold",
    parse.ECGQA_GOLD_NOT_FINDABLE: "a gold option is not among the prompt's options as written in lower case, "
                                   "so the lower-cased response can never name it",
    parse.ECGQA_SHADOWED: "a gold option contains another option (\"not sure\" contains \"no\", \"lead ii\" "
                          "contains \"lead i\"), so a response naming it always names the other too",
})


def _rate(details: Mapping[str, SampleDetail]) -> float | None:
    return percent(sum(bool(d.correct) for d in details.values()) / len(details)) if details else None


_SCORERS: Mapping[str, Callable[[SubsetSpec, Sequence[Pair]], ScoreParts]] = MappingProxyType({
    LABELS: _score_labels, CODE15: _score_code15, ECGQA: _score_ecgqa,  # CHOICE: score_subset passes its generator
})
