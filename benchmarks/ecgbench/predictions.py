"""Predictions as JSON lines: one `{id, text, ...}` object per sample, appended as they come.

The same files the paper's scripts read: `id` (or `question_id`), the answer in
`text` (or `response`), and for ECG-QA the `prompt` the model saw (a string or
`{"prompt": ...}`). Appending and torn-line handling are pulse_edge/jsonl.py's:
a run killed mid-write leaves a torn last line; it is reported and ignored, and
cut off before a resumed run appends to the file. A broken line anywhere else is
corruption, not a crash, and is an error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.errors import InputError
from pulse_edge.jsonl import JsonLines, read_json_lines
from pulse_edge.jsonl import append_record as append_record  # re-exported for the runner
from pulse_edge.jsonl import prepare_for_append as prepare_lines

ID_KEYS = ("question_id", "id")  # the paper's script's order, where a line has both
TEXT_KEYS = ("text", "response")


@dataclass(frozen=True)
class Prediction:
    """One answer; `text_key` says which field held it (`text` or `response`, read alike)."""

    id: str
    text: str
    text_key: str = "text"
    prompt: str | None = None
    error: str | None = None
    prompt_not_text: bool = False  # a prompt of another type (chat messages): ECG-QA, which reads it, refuses it


@dataclass(frozen=True)
class PredictionFile:
    """A predictions file as read: first answer per id, in file order, and what was odd about it."""

    path: Path
    predictions: tuple[Prediction, ...]
    duplicates: tuple[str, ...] = ()
    torn_tail: bool = False
    good_bytes: int = 0  # end of the last complete line
    unterminated: bool = False  # the last record is complete but lacks its newline

    def by_id(self) -> dict[str, Prediction]:
        return {p.id: p for p in self.predictions}


def read_predictions(path: str | Path, *, missing_ok: bool = False) -> PredictionFile:
    """Parse a predictions JSONL file; `missing_ok` reads a file that does not exist yet as empty."""
    path = Path(path)
    if not path.is_file() and not missing_ok:
        raise InputError(f"{path}: predictions file not found")
    lines = read_json_lines(path, _prediction, missing_ok=True)
    seen: dict[str, Prediction] = {}
    duplicates: list[str] = []
    for prediction in lines.records:
        _keep(prediction, seen, duplicates)
    return PredictionFile(path, tuple(seen.values()), tuple(duplicates), lines.torn_tail, lines.good_bytes,
                          lines.unterminated)


def prepare_for_append(existing: PredictionFile) -> None:
    """Cut a torn last line off (or terminate an unterminated one) so that appended lines stay whole."""
    prepare_lines(JsonLines(existing.path, (), existing.torn_tail, existing.good_bytes, existing.unterminated))


def _keep(prediction: Prediction, seen: dict[str, Prediction], duplicates: list[str]) -> None:
    if prediction.id in seen:
        duplicates.append(prediction.id)
    else:
        seen[prediction.id] = prediction


def _prediction(record: Mapping[str, Any], path: Path, number: int) -> Prediction:
    sample_id = next((record[k] for k in ID_KEYS if k in record), None)
    text_key = next((k for k in TEXT_KEYS if record.get(k) is not None), None)  # a null text yields to response
    if sample_id is None or not any(k in record for k in TEXT_KEYS):
        raise InputError(f"{path}: line {number} needs an id (or question_id) and a text (or response)")
    if text_key is not None and not isinstance(record[text_key], str):
        raise InputError(f"{path}: line {number}'s {text_key} is a {type(record[text_key]).__name__}, not text")
    # an id or prompt of another type was made text ("['m0']", "1.0", "True"; a list prompt's options read
    # "no']"): ids are strings or integers, as the datasets write them, and a prompt is text
    if isinstance(sample_id, bool) or not isinstance(sample_id, str | int):
        raise InputError(f"{path}: line {number}'s id is a {type(sample_id).__name__}, not a string or an integer")
    prompt = record.get("prompt")
    if isinstance(prompt, Mapping):  # some LLaVA scripts store {"prompt": ...}
        prompt = prompt.get("prompt")
    # only ECG-QA reads the prompt (its options): elsewhere one of another type is not read, as the paper's script
    not_text = prompt is not None and not isinstance(prompt, str)
    error = record.get("error")
    if text_key is None:  # every text field null: the sample was never answered, never scored as an answer
        error = error if error is not None else "no answer (its text is null)"
    return Prediction(str(sample_id), "" if text_key is None else record[text_key], text_key or TEXT_KEYS[0],
                      None if not_text else prompt, None if error is None else str(error), not_text)
