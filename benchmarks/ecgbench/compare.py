"""Compare runs of the same samples (fp16 vs int8 vs int4 bundles): the accuracy gate for real weights.

Every run is scored on the ids that all runs answered, so deltas compare like
with like. Against the first run: the metric deltas (compat and strict), how
often the answer text is identical, how often the parsed answer is (choice and
label subsets), and every sample whose answer changed, with both answers.

`--max-drop METRIC=POINTS` turns the comparison into a gate. METRIC is
`[MODE.][SUBSET.]NAME`: NAME one of auc, f1, hl, accuracy, score, exact_match;
SUBSET a subset name or alias (all compared subsets with that metric when left
out); MODE compat or strict, strict by default (auc exists in compat only).
A drop is a fall for every metric except hl, where it is a rise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.machine import CHECKPOINT_PRECISION
from pulse_edge.benchmarks.ecgbench.paired import PairedChange, paired_change
from pulse_edge.benchmarks.ecgbench.predictions import Prediction, PredictionFile, read_predictions
from pulse_edge.benchmarks.ecgbench.runner import RUN_FILE
from pulse_edge.benchmarks.ecgbench.score import JudgeScorer, SubsetScore, answer_text, score_subset
from pulse_edge.calibration.datasets.ecgbench.readers import discover, load_samples
from pulse_edge.calibration.datasets.ecgbench.subsets import JUDGE, LOWER_IS_BETTER, SUBSETS, resolve_subset
from pulse_edge.errors import ConfigError, InputError, PulseEdgeError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason

MODES = ("compat", "strict")
METRICS = ("auc", "f1", "hl", "accuracy", "score", "exact_match")
JUDGED_METRIC = "score"  # the one metric judged subsets report (with a judge)


class GateFailed(PulseEdgeError):
    """A metric fell more than `--max-drop` allows; exit 1 (2 is for usage errors)."""

    exit_code = 1


@dataclass(frozen=True)
class RunDir:
    label: str
    path: Path
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Agreement:
    """One run against the first on one subset."""

    other: str
    text_rate: float | None  # identical answer text, %
    parsed_rate: float | None  # identical parsed answer, % (None for judged subsets)
    changed: tuple[dict[str, Any], ...]
    paired: PairedChange | None = None  # strict correctness, sample by sample (None: no right or wrong to pair)


@dataclass(frozen=True)
class SubsetComparison:
    subset: str
    common: int
    not_common: Mapping[str, int]  # per run: answered ids left out because another run lacks them
    scores: tuple[SubsetScore, ...]  # one per run, on the common ids
    deltas: tuple[Mapping[str, Mapping[str, float]], ...]  # per later run: mode -> metric -> delta vs the first
    agreement: tuple[Agreement, ...]
    unanswered: Mapping[str, int] = field(default_factory=dict)  # per run: reference samples another run answered


@dataclass(frozen=True)
class Comparison:
    runs: tuple[RunDir, ...]
    subsets: tuple[SubsetComparison, ...]
    skipped: Mapping[str, str]  # subset -> why it was not compared

    def to_dict(self) -> dict[str, Any]:
        labels = [r.label for r in self.runs]
        return {"runs": [{"label": r.label, "path": str(r.path), "settings": dict(r.settings)} for r in self.runs],
                "skipped": dict(self.skipped),
                "subsets": [{"subset": c.subset, "common_samples": c.common, "not_common": dict(c.not_common),
                             "unanswered": dict(c.unanswered),
                             "scores": dict(zip(labels, (s.to_dict() for s in c.scores), strict=True)),
                             "deltas_vs_first": dict(zip(labels[1:], (dict(d) for d in c.deltas), strict=True)),
                             "agreement_vs_first": [{"run": a.other, "text_identical": a.text_rate,
                                                     "parsed_identical": a.parsed_rate, "changed": len(a.changed),
                                                     "strict_paired": a.paired and a.paired.to_dict()}
                                                    for a in c.agreement]} for c in self.subsets]}


@dataclass(frozen=True)
class DropRule:
    metric: str
    points: float
    mode: str | None = None
    subset: str | None = None

    @classmethod
    def parse(cls, text: str) -> DropRule:
        name, sep, value = text.partition("=")
        try:
            points = float(value)
        except ValueError:
            points = -1.0
        if not sep or not 0 <= points < float("inf"):  # nan would pass every comparison: a gate that never fails
            raise ConfigError(f"--max-drop {text!r}: expected METRIC=POINTS with POINTS >= 0, e.g. f1=2")
        parts = name.strip().split(".")
        mode = parts.pop(0) if len(parts) > 1 and parts[0] in MODES else None
        metric = parts.pop()
        if metric not in METRICS or len(parts) > 1:
            raise ConfigError(f"--max-drop {text!r}: metric must be [compat.|strict.][SUBSET.]NAME with NAME one of "
                              f"{', '.join(METRICS)}")
        if mode == "strict" and metric == "auc":
            raise ConfigError(f"--max-drop {text!r}: strict mode reports no auc (hard labels have no ROC curve)")
        subset = resolve_subset(parts[0]).name if parts else None
        return cls(metric, points, mode, subset)

    def key(self, subset: str) -> tuple[str, str]:
        mode = self.mode or ("compat" if self.metric == "auc" else "strict")
        return mode, f"{mode}.{subset}.{self.metric}"


def load_runs(paths: Sequence[str | Path]) -> tuple[RunDir, ...]:
    if len(paths) < 2:
        raise ConfigError("compare needs at least two run folders")
    runs: list[RunDir] = []
    for path in map(Path, paths):
        if not path.is_dir():
            what = "is a file, not a run folder" if path.exists() else "run folder not found"
            raise InputError(f"{path}: {what} (the --out folder of `pulse-edge eval ecgbench`)")
        settings = _read_settings(path / RUN_FILE)
        precision = settings.get("precision")
        label = precision if precision and precision != CHECKPOINT_PRECISION else path.name
        if any(r.label == label for r in runs):
            label = f"{label} ({path.name})"
        runs.append(RunDir(label, path, settings))
    return tuple(runs)


def compare_runs(runs: Sequence[RunDir], data_dir: str | Path,
                 judges: Sequence[JudgeScorer | None] | None = None) -> Comparison:
    """Compare every subset that all runs answered; `judges` gives one judge scorer per run (or none)."""
    found = discover(data_dir)
    compared: list[SubsetComparison] = []
    skipped: dict[str, str] = {}
    for name in SUBSETS:
        files = [r.path / f"{name}.jsonl" for r in runs]
        if not any(f.is_file() for f in files):
            continue
        lacking = [r.label for r, f in zip(runs, files, strict=True) if not f.is_file()]
        if lacking or name not in found:
            skipped[name] = f"no answers in {', '.join(lacking)}" if lacking else "subset not in the data folder"
            continue
        judge_list = list(judges) if judges is not None else [None] * len(runs)
        compared.append(_compare_subset(name, found[name], runs, files, judge_list))
    if not compared:
        raise InputError("no subset was answered by every run: nothing to compare"
                         + (f" ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})" if skipped else ""))
    return Comparison(tuple(runs), tuple(compared), skipped)


def gate_failures(comparison: Comparison, rules: Sequence[DropRule]) -> list[str]:
    """One message per metric that fell more than allowed (or cannot be checked), and per subset a rule covers that
    was not compared whole: one run has no answers for it, or left out samples another run answered (an int8 run
    stopped after 10 of 1000 would otherwise be gated on those 10). A check not done never passes."""
    failures = _coverage_failures(comparison, rules)
    names = {c.subset for c in comparison.subsets}
    for rule in rules:
        if rule.subset is not None and rule.subset not in names:
            raise ConfigError(f"--max-drop names {rule.subset}, which is not among the compared subsets "
                              f"({', '.join(sorted(names))})")
        covered = [c for c in comparison.subsets if rule.subset in (None, c.subset)]
        tables = [(c, getattr(c.scores[0], rule.key(c.subset)[0])) for c in covered]  # the first run's scores
        # a check not done never passes: a subset the rule names, or a judged score that no verdict gave
        failures += [f"{c.subset} could not be scored for {rule.metric} ({table.get('reason', 'no score')})"
                     for c, table in tables if table.get("scored") is False
                     and (rule.subset == c.subset or rule.metric == JUDGED_METRIC)]
        matched = [c for c, table in tables if rule.metric in table]
        if not matched and not failures:  # else nothing could be compared, which the failures already say
            raise ConfigError(f"--max-drop {rule.metric}: no compared subset reports that metric (judged "
                              "subsets report score only with --judge-url and --judge-model)")
        for c in matched:
            failures += _judged_partly(rule, c, comparison.runs) + _check(rule, c, comparison.runs)
    return failures


def _judged_partly(rule: DropRule, c: SubsetComparison, runs: Sequence[RunDir]) -> list[str]:
    """A judged score is the mean over the samples the judge scored: a run whose judge failed on some (a 503)
    is averaged over others than the first run's, and identical answers could read as a 50-point change."""
    if rule.metric != JUDGED_METRIC:
        return []
    mode, _ = rule.key(c.subset)
    partly = [(run.label, getattr(score, mode)) for run, score in zip(runs, c.scores, strict=True)]
    return [f"{c.subset}: the judge scored {table.get('judged', 0)} of {c.common} samples for {label} "
            f"({table['unscored']} not: {next(iter(table.get('unscored_reasons', {}).values()), 'no verdict')}); "
            "rerun the comparison to judge the rest (verdicts already given are cached)"
            for label, table in partly if table.get("unscored")]


def _coverage_failures(comparison: Comparison, rules: Sequence[DropRule]) -> list[str]:
    named = {rule.subset for rule in rules}

    def covered(subset: str) -> bool:  # a rule without a subset covers them all
        return None in named or subset in named

    failures = [f"{name} was not compared ({why})" for name, why in comparison.skipped.items() if covered(name)]
    for c in (c for c in comparison.subsets if covered(c.subset)):
        if c.common == 0:
            failures.append(f"{c.subset} has no sample every run answered (do the runs' ids match the reference's?)")
        short = {label: n for label, n in c.unanswered.items() if n}
        if short:
            failures.append(f"{c.subset} was compared on {c.common} samples only: " + ", ".join(
                f"{label} lacks {n} that another run answered" for label, n in short.items())
                + " (resume the run with `eval ecgbench` to finish it)")
    return failures


def write_changes(comparison: Comparison, path: str | Path) -> Path:
    """The samples whose answers changed, per subset and run, with both answers (JSON)."""
    path = Path(path)
    first = comparison.runs[0].label
    payload = {"first": first, "subsets": {c.subset: {a.other: list(a.changed) for a in c.agreement}
                                           for c in comparison.subsets}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _compare_subset(name: str, source: Any, runs: Sequence[RunDir], files: Sequence[Path],
                    judges: Sequence[JudgeScorer | None]) -> SubsetComparison:
    spec = SUBSETS[name]
    reference = load_samples(source)
    read = [read_predictions(f) for f in files]
    common = set.intersection(*({p.id for p in r.predictions} for r in read)) & {s.id for s in reference}
    samples = [s for s in reference if s.id in common]
    trimmed = [PredictionFile(r.path, tuple(p for p in r.predictions if p.id in common), r.duplicates, r.torn_tail)
               for r in read]
    scores = tuple(score_subset(spec, samples, t, judge) for t, judge in zip(trimmed, judges, strict=True))
    deltas = tuple(_deltas(scores[0], s) for s in scores[1:])
    answers = [_RunAnswers(r.label, t.by_id(), sc) for r, t, sc in zip(runs, trimmed, scores, strict=True)]
    agreement = tuple(_agreement(samples, answers[0], other, spec.kind == JUDGE) for other in answers[1:])
    not_common = {r.label: sum(1 for p in f.predictions if p.id not in common) for r, f in zip(runs, read, strict=True)}
    answered = [{p.id for p in r.predictions} & {s.id for s in reference} for r in read]
    anyone = set.union(*answered)
    unanswered = {r.label: len(anyone - a) for r, a in zip(runs, answered, strict=True)}
    return SubsetComparison(name, len(samples), not_common, scores, deltas, agreement, unanswered)


def _deltas(base: SubsetScore, other: SubsetScore) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for mode in MODES:
        a, b = getattr(base, mode), getattr(other, mode)
        out[mode] = {m: round(b[m] - a[m], 4) for m in METRICS if _is_number(a.get(m)) and _is_number(b.get(m))}
    return out


@dataclass(frozen=True)
class _RunAnswers:
    label: str
    by_id: Mapping[str, Prediction]
    score: SubsetScore


def _agreement(samples: Sequence[Any], first: _RunAnswers, other: _RunAnswers, judged: bool) -> Agreement:
    """How often `other` says the same as `first`; judged subsets compare text only (nothing is parsed)."""
    if not samples:
        return Agreement(other.label, None, None, ())
    same_text = same_parsed = 0
    changed: list[dict[str, Any]] = []
    for sample in samples:
        a, b = first.by_id[sample.id], other.by_id[sample.id]
        text_same = a.text.strip() == b.text.strip()
        da, db = first.score.details.get(sample.id), other.score.details.get(sample.id)
        parsed_same = text_same if judged or da is None or db is None else da.parsed == db.parsed
        same_text += text_same
        same_parsed += parsed_same
        if not parsed_same:
            changed.append({"id": sample.id, "gold": answer_text(sample.answer),
                            "answers": {first.label: _side(a, da), other.label: _side(b, db)}})
    n = len(samples)
    return Agreement(other.label, round(100 * same_text / n, 4), None if judged else round(100 * same_parsed / n, 4),
                     tuple(changed), _paired(samples, first, other))


def _paired(samples: Sequence[Any], first: _RunAnswers, other: _RunAnswers) -> PairedChange | None:
    """Strict right/wrong of both runs on each sample (paired.py); None where a sample has no right or wrong."""
    sides = [[getattr(run.score.details.get(s.id), "correct", None) for s in samples] for run in (first, other)]
    if any(v is None for side in sides for v in side):
        return None
    return paired_change(*sides)


def _side(prediction: Prediction, detail: Any) -> dict[str, Any]:
    side: dict[str, Any] = {"text": prediction.text}
    if detail is not None:
        side.update(parsed=detail.parsed, correct=detail.correct)
    return side


def _check(rule: DropRule, c: SubsetComparison, runs: Sequence[RunDir]) -> list[str]:
    mode, key = rule.key(c.subset)
    base = getattr(c.scores[0], mode).get(rule.metric)
    failures = []
    for run, score in zip(runs[1:], c.scores[1:], strict=True):
        value = getattr(score, mode).get(rule.metric)
        if not (_is_number(base) and _is_number(value)):
            failures.append(f"{key} cannot be checked for {run.label} (undefined: {base} -> {value})")
            continue
        drop = value - base if rule.metric in LOWER_IS_BETTER else base - value
        if drop > rule.points:
            verb = "rose" if rule.metric in LOWER_IS_BETTER else "fell"
            failures.append(f"{key} {verb} {drop:.2f} points for {run.label} ({base:.2f} -> {value:.2f}; "
                            f"allowed {rule.points:g})")
    return failures


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _read_settings(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except JSON_TEXT_ERRORS as e:
        raise InputError(f"{path}: not valid JSON ({json_error_reason(e)})") from e
    return data if isinstance(data, dict) else {}
