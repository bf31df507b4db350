"""A tiny LLaMA-style SentencePiece tokenizer, trained in memory, for tests and fixtures.

The real PULSE-7B `tokenizer.model` (the LLaMA/Vicuna one) is 500 kB and under a
licence we do not redistribute, so tests train a small model with the same
SentencePiece settings on generated ECG-report text instead: BPE, byte
fallback, split digits, identity normalisation, dummy prefix, whitespace kept.
What the converter and the runtime must get right (merge order, byte fallback,
the dummy prefix, whitespace runs) is exercised the same way at 1000 pieces as
at 32000.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from pathlib import Path
from types import MappingProxyType

import sentencepiece as spm

# LLaMA's tokenizer.model trainer settings, less the ones that only matter at
# scale. `num_threads=1` because the BPE trainer's result may depend on thread
# scheduling; one thread makes the model file a pure function of the corpus.
_LLAMA_TRAINER_SETTINGS = MappingProxyType(
    {
        "model_type": "bpe",
        "byte_fallback": True,
        "split_digits": True,
        "normalization_rule_name": "identity",
        "remove_extra_whitespaces": False,
        "add_dummy_prefix": True,
        "allow_whitespace_only_pieces": True,
        "split_by_unicode_script": True,
        "split_by_number": True,
        "split_by_whitespace": True,
        "unk_id": 0,
        "bos_id": 1,
        "eos_id": 2,
        "pad_id": -1,
        "character_coverage": 0.9995,
        "num_threads": 1,
        "minloglevel": 2,
    }
)

_RHYTHMS = (
    "Sinus rhythm",
    "Sinus bradycardia",
    "Sinus tachycardia",
    "Atrial fibrillation",
    "Atrial flutter with 2:1 conduction",
    "Junctional rhythm",
    "Ectopic atrial rhythm",
    "Ventricular tachycardia",
    "Ventricular paced rhythm",
    "Multifocal atrial tachycardia",
)
_MODIFIERS = (
    "with first-degree AV block",
    "with rapid ventricular response",
    "with slow ventricular response",
    "with premature ventricular complexes",
    "with premature atrial complexes",
    "with left bundle branch block",
    "with right bundle branch block",
    "with left anterior fascicular block",
    "with Mobitz type I second-degree AV block",
    "with occasional aberrantly conducted beats",
)
_FINDINGS = (
    "ST elevation in V1-V4",
    "ST depression in II, III and aVF",
    "T-wave inversion in V5–V6",
    "Pathological Q waves in leads II, III, aVF",
    "Left ventricular hypertrophy by voltage criteria",
    "Prolonged QTc interval",
    "Low QRS voltage in limb leads",
    "Poor R-wave progression",
    "Early repolarization pattern",
    "Nonspecific ST-T wave abnormality",
    "Inferior myocardial infarction, age undetermined",
    "Anterolateral ST-elevation myocardial infarction (STEMI)",
    "Peaked T waves, consider hyperkalemia",
    "Delta wave, short PR: Wolff–Parkinson–White pattern",
)
_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_NAMES = ("Müller", "René Dupont", "Zoë Brontë", "Jürgen Groß", "Inés Peña", "Søren Ødegård")
_QUESTIONS = (
    "What is the rhythm?",
    "What is the most likely diagnosis?",
    "Is there evidence of ischemia?",
    "What is the heart rate?",
    "Which leads show ST elevation?",
    "Describe the ECG.",
)
_OPTIONS = ("Normal ECG", "Anterior MI", "Pericarditis", "Hyperkalemia", "Atrial fibrillation", "LBBB")


def _rhythm_statement(rng: random.Random) -> str:
    statement = rng.choice(_RHYTHMS)
    if rng.random() < 0.6:
        statement = f"{statement} {rng.choice(_MODIFIERS)}"
    return statement + rng.choice((".", "", ";"))


def _finding(rng: random.Random) -> str:
    return rng.choice(_FINDINGS) + rng.choice((".", "", " (new)", " - compare with prior."))


def _measurements(rng: random.Random) -> str:
    qt = rng.randint(320, 480)
    return (
        f"HR {rng.randint(38, 180)} bpm, PR {rng.randint(110, 280)} ms, QRS {rng.randint(70, 160)} ms, "
        f"QT/QTc {qt}/{qt + rng.randint(-20, 60)} ms, axis {rng.randint(-90, 180)}°"
    )


def _amplitudes(rng: random.Random) -> str:
    millimetres = rng.randint(1, 40) / 10
    return (
        f"ST elevation of {millimetres:.1f} mm ({millimetres / 10:.2f} mV) in {rng.choice(_LEADS)}; "
        f"baseline noise ±{rng.randint(5, 60)} µV, QRS ≥ {rng.choice((100, 110, 120))} ms"
    )


def _acquisition(rng: random.Random) -> str:
    return (
        f"Recorded {rng.randint(2015, 2025)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} "
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}, 25 mm/s, 10 mm/mV, 0.05–150 Hz. "
        f"Patient: {rng.choice(_NAMES)}, {rng.randint(18, 95)} y"
    )


def _multiple_choice(rng: random.Random) -> str:
    options = rng.sample(_OPTIONS, 4)
    listed = " ".join(f"{letter}. {option}" for letter, option in zip("ABCD", options, strict=True))
    separator = rng.choice(("\n", " ", "\n\n"))
    return f"{rng.choice(_QUESTIONS)}{separator}Options: {listed}{separator}Answer: {rng.choice('ABCD')}"


def _question_answer(rng: random.Random) -> str:
    answer = f"{_rhythm_statement(rng)} {_finding(rng)}"
    return f"USER: <image>\n{rng.choice(_QUESTIONS)} ASSISTANT: {answer}</s>"


def _spaced_table(rng: random.Random) -> str:
    # Runs of spaces and tabs, as in reports pasted from fixed-width ECG printouts.
    gap = " " * rng.randint(2, 6)
    flag = rng.choice(("ok", "Q", "ST↑"))
    return f"Lead{gap}{rng.choice(_LEADS)}:{gap}{rng.randint(1, 25) / 10} mV\t{flag}  "


_LINE_MAKERS: tuple[Callable[[random.Random], str], ...] = (
    _rhythm_statement,
    _finding,
    _measurements,
    _amplitudes,
    _acquisition,
    _multiple_choice,
    _question_answer,
    _spaced_table,
)


def ecg_report_corpus(n_lines: int = 4000, *, seed: int = 0) -> list[str]:
    """Generated ECG-report-like lines; the same `seed` always gives the same lines."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        parts = [rng.choice(_LINE_MAKERS)(rng) for _ in range(rng.randint(1, 3))]
        lines.append(rng.choice((" ", "\n", ". ")).join(parts))
    return lines


def train_tiny_tokenizer(out_path: Path, *, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a LLaMA-style SentencePiece BPE model on the corpus and write it to `out_path`.

    Trained from memory (no temporary files); the same seed gives a byte-identical file.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ecg_report_corpus(seed=seed)),
        model_writer=model,
        vocab_size=vocab_size,
        **_LLAMA_TRAINER_SETTINGS,
    )
    out_path = Path(out_path)
    out_path.write_bytes(model.getvalue())
    return out_path
