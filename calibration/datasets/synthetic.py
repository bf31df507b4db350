"""Synthetic calibration samples: rendered 12-lead prints of known rhythms with true answers (no data needed).

Rhythms and tasks cycle so every (rhythm, task) pair appears; each answer is built only
from what is true of the synthesized record, and the image renders lazily.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample, SyntheticEcg
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.synthetic import RHYTHMS, synthesize_ecg

# Whole-bpm rates well inside each rhythm's definition (never near the 60 / 100 bpm
# borders), so the answer's rhythm name is unambiguous to anyone reading the print.
_SYNTHETIC_RATES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "sinus": (62, 95), "tachycardia": (106, 145), "bradycardia": (42, 56),
    "afib": (60, 140), "first_degree_av_block": (62, 95),
})
_RHYTHM_TEXT: Mapping[str, str] = MappingProxyType({
    "sinus": "sinus rhythm, regular", "tachycardia": "sinus tachycardia, regular",
    "bradycardia": "sinus bradycardia, regular", "afib": "atrial fibrillation, irregularly irregular",
    "first_degree_av_block": "sinus rhythm, regular",
})
# The diagnosis sentence for each statement-code set the synthesizer labels a record with.
_DIAGNOSES: Mapping[tuple[str, ...], str] = MappingProxyType({
    ("NORM", "SR"): "Normal ECG: sinus rhythm.", ("STACH",): "Sinus tachycardia.",
    ("SBRAD",): "Sinus bradycardia.", ("AFIB",): "Atrial fibrillation.",
    ("SR", "1AVB"): "Sinus rhythm with first-degree AV block.",
})
# PR wording per label set: true by definition (1AVB means PR > 200 ms, AF has no P waves)
# and by the synthesizer's PR ranges for the sinus rhythms (120-200 ms).
_PR_TEXT: Mapping[tuple[str, ...], str] = MappingProxyType({
    ("NORM", "SR"): "PR interval normal.", ("STACH",): "PR interval normal.", ("SBRAD",): "PR interval normal.",
    ("AFIB",): "No P waves; irregularly irregular RR intervals.", ("SR", "1AVB"): "PR interval prolonged (>200 ms).",
})
# Page sizes (width, height) and the anyres grid each lands on: letter at 200 and 100 dpi
# (2x2 tiles), and the print centred on wide 2:1 and 3:1 pages, as screen captures and
# scans with margins are (2x1 and 3x1 tiles), so the tile count varies as in real inputs.
PRINT_SIZES: tuple[tuple[int, int], ...] = ((2200, 1700), (1100, 850), (1600, 800), (2400, 800))
_QUESTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "diagnosis": ("What is the diagnosis of this ECG?",
                  "Interpret this 12-lead ECG and give the most likely diagnosis.",
                  "Is this ECG normal or abnormal? State the diagnosis."),
    "rhythm": ("What is the rhythm of this ECG?", "Identify the cardiac rhythm and the heart rate shown here."),
    "report": ("Write a brief report for this ECG.", "Generate a structured report of this 12-lead ECG."),
    "multiple_choice": ("Which of the following best describes this ECG?",
                        "Choose the correct interpretation of this ECG."),
})
_SYNTHETIC_TASKS: tuple[str, ...] = ("diagnosis", "rhythm", "report", "multiple_choice")
_LETTERS = "ABCD"


def synthetic_samples(n: int, seed: int) -> list[CalibrationSample]:
    """`n` synthetic samples; rhythms and tasks cycle so every (rhythm, task) pair appears, images render lazily."""
    if n < 1:
        raise ConfigError(f"the number of synthetic samples must be >= 1, got {n}")
    # The answers name the synthesizer's own statement codes, read once per rhythm from a short record.
    labels = {rhythm: _labels_of(rhythm) for rhythm in RHYTHMS}
    return [_synthetic_sample(i, seed, labels) for i in range(n)]


def _synthetic_sample(index: int, seed: int, all_labels: Mapping[str, tuple[str, ...]]) -> CalibrationSample:
    rng = np.random.default_rng([seed, index])  # per sample, so sample i never depends on n
    rhythm = RHYTHMS[index % len(RHYTHMS)]
    task = _SYNTHETIC_TASKS[(index // len(RHYTHMS)) % len(_SYNTHETIC_TASKS)]
    low, high = _SYNTHETIC_RATES[rhythm]
    width, height = PRINT_SIZES[int(rng.integers(len(PRINT_SIZES)))]
    ecg = SyntheticEcg(rhythm, int(rng.integers(2**31)), int(rng.integers(low, high + 1)), width, height)
    facts = _Facts(rhythm, all_labels[rhythm], ecg.heart_rate_bpm)
    question, answer = _SYNTHETIC_ANSWERS[task](str(rng.choice(_QUESTIONS[task])), facts, rng)
    return CalibrationSample(id=f"synthetic/{seed}/{index:06d}", source="synthetic", task=task,
                             turns=((question, answer),), synthetic=ecg)


def _labels_of(rhythm: str) -> tuple[str, ...]:
    rate = float(_SYNTHETIC_RATES[rhythm][0])
    return synthesize_ecg(rhythm, seed=0, duration_s=5.0, fs=100, heart_rate_bpm=rate).labels


@dataclass(frozen=True)
class _Facts:
    """What is true of one synthetic record; every answer is built from these alone."""

    rhythm: str
    labels: tuple[str, ...]
    rate: int

    @property
    def diagnosis(self) -> str:
        return _DIAGNOSES[self.labels]


def _diagnosis(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    return question, facts.diagnosis


def _rhythm(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    return question, f"The rhythm is {_RHYTHM_TEXT[facts.rhythm]}, at {facts.rate} bpm."


def _report(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    text = _RHYTHM_TEXT[facts.rhythm]
    return question, (f"Rhythm: {text[0].upper()}{text[1:]}. Heart rate: {facts.rate} bpm. "
                      f"{_PR_TEXT[facts.labels]} Conclusion: {facts.diagnosis}")


def _multiple_choice(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    """Four options: the true diagnosis and three others, in a seeded order."""
    others = [text for text in _DIAGNOSES.values() if text != facts.diagnosis]
    options = [facts.diagnosis, *(others[i] for i in rng.choice(len(others), size=3, replace=False))]
    options = [options[i] for i in rng.permutation(len(options))]
    listed = " ".join(f"{letter}. {text}" for letter, text in zip(_LETTERS, options, strict=True))
    letter = _LETTERS[options.index(facts.diagnosis)]
    return f"{question}\nOptions: {listed}", f"The correct option is {letter}. {facts.diagnosis}"


_SYNTHETIC_ANSWERS = MappingProxyType({"diagnosis": _diagnosis, "rhythm": _rhythm, "report": _report,
                                        "multiple_choice": _multiple_choice})
