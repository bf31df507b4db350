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


@pytest.mark.parametrize("text", ["[" * 200_000, '{"a": ' + "9" * 5000 + "}"])
def test_the_project_s_own_json_files_refuse_such_a_text_in_one_line(text: str, tmp_path: Path) -> None:
    """A bundle's manifest, a checkpoint's config.json, an engine set, an --accuracy-gate file, a run's settings and
    the verified stamp: a RecursionError or the digit limit's ValueError escaped as a traceback (or as "use
    sys.set_int_max_str_digits()")."""
    from pulse_edge.benchmarks.ecgbench.compare import _read_settings
    from pulse_edge.calibration.fidelity import AccuracyGate
    from pulse_edge.errors import BundleError, CheckpointError
    from pulse_edge.export.model.config import read_config
    from pulse_edge.runtime.bundle.engines import ENGINES_FILE, read_engines
    from pulse_edge.runtime.bundle.manifest import read_manifest
    from pulse_edge.runtime.bundle.verified import is_stamped, stamp_path

    reason = r"\((nested too deeply|Exceeds the limit \(4300 digits\)[^;)]*)\)"
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=rf"manifest\.json cannot be read as JSON {reason}; re-export"):
        read_manifest(tmp_path)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=rf"config\.json cannot be read as JSON {reason}"):
        read_config(checkpoint)
    (tmp_path / ENGINES_FILE).write_text(text)
    with pytest.raises(BundleError, match=rf"engines\.json cannot be read {reason}; rebuild"):
        read_engines(tmp_path, tmp_path)
    gate = tmp_path / "gate.json"
    gate.write_text(text)
    with pytest.raises(ValueError, match=r"bad accuracy gate: cannot read \S+gate\.json: (nested too deeply|Exceeds)"):
        AccuracyGate.from_string(str(gate))
    (tmp_path / "run.json").write_text(text)
    with pytest.raises(InputError, match=rf"run\.json: not valid JSON {reason}"):
        _read_settings(tmp_path / "run.json")
    record = {"manifest.json": object()}
    stamp_path(tmp_path, "manifest.json").parent.mkdir(parents=True, exist_ok=True)
    stamp_path(tmp_path, "manifest.json").write_text(text)
    assert is_stamped(tmp_path, record) is False  # unreadable: hashed whole again, no traceback
