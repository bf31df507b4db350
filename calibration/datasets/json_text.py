"""The JSON files the datasets ship as (ECGBench's and ECGInstruct's): read as UTF-8 and parsed, each failure one
line naming the file and what to do. The readers check what the JSON holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pulse_edge.errors import InputError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason


def read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e


def parse_json(text: str, path: Path) -> Any:
    """The whole of `path`'s text as JSON."""
    try:
        return json.loads(text)
    except JSON_TEXT_ERRORS as e:
        raise InputError(f"{path}: not valid JSON ({json_error_reason(e)})") from e
