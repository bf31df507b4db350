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


def test_a_whole_last_line_json_cannot_read_is_refused_not_cut_off_as_torn(tmp_path: Path) -> None:
    """Only a prefix of a line json.dumps wrote (a write cut short) is cut off on resuming; a last line too deep
    or too long a number for json.loads is no such prefix (json.dumps would not have written it): kept, refused."""
    from pulse_edge.jsonl import prepare_for_append

    lines = tmp_path / "answers.jsonl"
    for tail in ('{"id": 2, "note": ' + "[" * 5000 + "]" * 5000 + "}", '{"id": ' + "1" * 5000 + "}"):
        lines.write_text('{"id": 1}\n' + tail)
        with pytest.raises(InputError, match=r"answers\.jsonl: line 2 is not valid JSON \((nested|Exceeds)"):
            read_json_lines(lines, lambda record, path, number: record)
        assert lines.read_text().endswith(tail)
    lines.write_text('{"id": 1}\n{"id": 2, "no')  # a torn write: cut off before appending
    torn = read_json_lines(lines, lambda record, path, number: record)
    prepare_for_append(torn)
    assert torn.torn_tail and lines.read_text() == '{"id": 1}\n'
