"""Predictions as JSON lines: one `{id, text, ...}` object per sample, appended as they come.

The same files the paper's scripts read: `id` (or `question_id`), the answer in
`text` (or `response`), and for ECG-QA the `prompt` the model saw (a string or
`{"prompt": ...}`). A run killed mid-write leaves a torn last line; it is
reported and ignored, and cut off before a resumed run appends to the file. A
broken line anywhere else is corruption, not a crash, and is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pulse_edge.errors import InputError

ID_KEYS = ("id", "question_id")
TEXT_KEYS = ("text", "response")


@dataclass(frozen=True)
class Prediction:
    """One answer; `text_key` says which field held it (`text` or `response`, read alike)."""

    id: str
    text: str
    text_key: str = "text"
    prompt: str | None = None
    error: str | None = None


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
    if not path.is_file():
        if missing_ok:
            return PredictionFile(path, ())
        raise InputError(f"{path}: predictions file not found")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" for a complete file
    seen: dict[str, Prediction] = {}
    duplicates: list[str] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            _keep(_parse_line(line, path, number), seen, duplicates)
    good_bytes = len(data) - len(tail)
    torn = unterminated = False
    if tail.strip():
        try:
            record = _parse_line(tail, path, len(lines) + 1)
        except InputError:
            torn = True  # a write cut short by a crash or a kill
        else:
            _keep(record, seen, duplicates)
            unterminated = True
            good_bytes = len(data)
    return PredictionFile(path, tuple(seen.values()), tuple(duplicates), torn, good_bytes, unterminated)


def prepare_for_append(existing: PredictionFile) -> None:
    """Cut a torn last line off (or terminate an unterminated one) so that appended lines stay whole."""
    if existing.torn_tail:
        with open(existing.path, "r+b") as f:
            f.truncate(existing.good_bytes)
    elif existing.unterminated:
        with open(existing.path, "ab") as f:
            f.write(b"\n")


def append_record(handle: IO[str], record: Mapping[str, Any]) -> None:
    """Write one line and push it to disk now, so that a crash loses at most the sample in flight."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _keep(prediction: Prediction, seen: dict[str, Prediction], duplicates: list[str]) -> None:
    if prediction.id in seen:
        duplicates.append(prediction.id)
    else:
        seen[prediction.id] = prediction


def _parse_line(line: bytes, path: Path, number: int) -> Prediction:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: line {number} is not valid JSON ({e})") from e
    if not isinstance(record, Mapping):
        raise InputError(f"{path}: line {number} is not a JSON object")
    sample_id = next((record[k] for k in ID_KEYS if k in record), None)
    text_key = next((k for k in TEXT_KEYS if k in record), None)
    if sample_id is None or text_key is None:
        raise InputError(f"{path}: line {number} needs an id (or question_id) and a text (or response)")
    prompt = record.get("prompt")
    if isinstance(prompt, Mapping):  # some LLaVA scripts store {"prompt": ...}
        prompt = prompt.get("prompt")
    error = record.get("error")
    return Prediction(str(sample_id), str(record[text_key] or ""), text_key,
                      None if prompt is None else str(prompt), None if error is None else str(error))
