"""JSON lines appended one record at a time, so that a crash loses at most the record being written.

Used for ECGBench predictions (benchmarks/ecgbench/predictions.py) and `pulse-edge infer --output`.
Each record is flushed and fsynced as soon as it exists. A run killed mid-write leaves a torn last line:
reading reports it and ignores it, and `prepare_for_append` cuts it off before a resumed run appends.
A broken line anywhere else is corruption, not a crash, and is an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from pulse_edge.errors import InputError

T = TypeVar("T")
# What json.loads raises on text it cannot read: JSONDecodeError and UnicodeDecodeError (both ValueErrors), the bare
# ValueError of an integer past Python's 4300-digit limit, and RecursionError for arrays nested past its stack.
JSON_TEXT_ERRORS = (ValueError, RecursionError)


def json_error_reason(error: Exception) -> str:
    """Why json.loads refused a text, in a few words (no advice about interpreter settings)."""
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} at line {error.lineno} column {error.colno}"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error).split(";")[0]  # the digit limit's own text goes on to name sys.set_int_max_str_digits


@dataclass(frozen=True)
class JsonLines(Generic[T]):
    """A JSON-lines file as read: its records in file order, and whether its end was cut short."""

    path: Path
    records: tuple[T, ...]
    torn_tail: bool = False
    good_bytes: int = 0  # end of the last complete line
    unterminated: bool = False  # the last record is complete but lacks its newline


def read_json_lines(path: str | Path, convert: Callable[[Mapping[str, Any], Path, int], T], *,
                    missing_ok: bool = False) -> JsonLines[T]:
    """Parse every line with `convert(record, path, line_number)`, which raises InputError on a bad record.
    A last line without its newline that starts a record (`{`) but does not parse is a torn tail (a write cut
    short: a record's prefix never parses), not an error. Any other last line that is not a record (text, a JSON
    list, an object of another file) is another file's content and an error like any bad line: a resumed run
    would otherwise cut it off (`--output config.json` emptied)."""
    path = Path(path)
    if not path.is_file():
        if missing_ok:
            return JsonLines(path, ())
        raise InputError(f"{path}: file not found")
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: b"" for a complete file
    records = [convert(_parse_line(line, path, number), path, number)
               for number, line in enumerate(lines, start=1) if line.strip()]
    good_bytes = len(data) - len(tail)
    torn = unterminated = False
    if tail.strip():
        try:
            last = json.loads(tail)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if not tail.lstrip().startswith(b"{"):  # not a record's start: another file's text, never cut off
                raise InputError(f"{path}: line {len(lines) + 1} is not JSON; is it a JSON-lines file of "
                                 "pulse-edge's?") from None
            torn = True  # a write cut short by a crash or a kill: a record's prefix never parses
        except JSON_TEXT_ERRORS as e:  # whole but unreadable (no prefix of a line json.dumps wrote is): kept, refused
            raise InputError(f"{path}: line {len(lines) + 1} is not valid JSON ({json_error_reason(e)})") from e
        else:  # whole JSON: a record without its newline, or another file's content (an error, not cut off)
            records.append(convert(_as_record(last, path, len(lines) + 1), path, len(lines) + 1))
            unterminated = True
            good_bytes = len(data)
    return JsonLines(path, tuple(records), torn, good_bytes, unterminated)


def prepare_for_append(existing: JsonLines[Any]) -> None:
    """Cut a torn last line off (or terminate an unterminated one) so that appended lines stay whole."""
    if existing.torn_tail:
        with open(existing.path, "r+b") as f:
            f.truncate(existing.good_bytes)
    elif existing.unterminated:
        with open(existing.path, "ab") as f:
            f.write(b"\n")


def append_record(handle: IO[str], record: Mapping[str, Any]) -> None:
    """Write one line and push it to disk now, so that a crash loses at most the record in flight."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def parse_json_line(line: str | bytes, path: Path, number: int) -> Any:
    """One line of a JSON-lines file (ours, or a dataset's) as JSON; unreadable, one line naming file and line."""
    try:
        return json.loads(line)
    except JSON_TEXT_ERRORS as e:
        raise InputError(f"{path}: line {number} is not valid JSON ({json_error_reason(e)})") from e


def _parse_line(line: bytes, path: Path, number: int) -> Mapping[str, Any]:
    return _as_record(parse_json_line(line, path, number), path, number)


def _as_record(value: Any, path: Path, number: int) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InputError(f"{path}: line {number} is not a JSON object")
    return value
