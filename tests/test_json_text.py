"""JSON that json.loads cannot read for reasons other than syntax (a number past Python's 4300-digit limit, arrays
nested past its stack) is one line naming the file or field, like a syntax error, in every reader of user files."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulse_edge.calibration.datasets.json_text import parse_json
from pulse_edge.errors import InputError
from pulse_edge.jsonl import json_error_reason, read_json_lines

UNREADABLE = {  # text -> the reason json_error_reason gives
    "[1, 2": "Expecting ',' delimiter at line 1 column 6",
    "1" * 5000: "Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits",
    "[" * 5000: "nested too deeply",
}


@pytest.mark.parametrize("text", list(UNREADABLE))
def test_every_way_json_refuses_a_text_is_one_reason(text: str, tmp_path: Path) -> None:
    import json

    with pytest.raises((ValueError, RecursionError)) as caught:
        json.loads(text)
    assert json_error_reason(caught.value) == UNREADABLE[text]
    with pytest.raises(InputError, match=r"^\S+data\.json: not valid JSON \(") as refused:
        parse_json(text, tmp_path / "data.json")
    assert str(refused.value).endswith(f"({UNREADABLE[text]})")
    lines = tmp_path / "answers.jsonl"
    lines.write_text('{"id": 1}\n{"id": ' + text + "}\n{\"id\": 3}\n")  # a broken line before the last is corruption
    with pytest.raises(InputError, match=r"answers\.jsonl: line 2 is not valid JSON \((Expecting|Exceeds|nested)"):
        read_json_lines(lines, lambda record, path, number: record)
