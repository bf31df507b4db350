"""HL7 v3 annotated ECG (aECG, the FDA submission format), namespace urn:hl7-org:v3.

The waveforms sit at AnnotatedECG/component/series/component/sequenceSet/
component/sequence. Each sequenceSet holds one time sequence (code
TIME_ABSOLUTE with a GLIST_TS value, or TIME_RELATIVE with GLIST_PQ; both carry
the sample interval as <increment value=".002" unit="s"/>) and one sequence per
lead (code MDC_ECG_LEAD_I ..., value SLIST_PQ). A sample's physical value is

    origin + scale * digit      (origin and scale each carry a unit, e.g. uV)

Representative beats live in series/derivation/derivedSeries, so reading only
the direct series/component/sequenceSet path skips them by construction.

Parsing goes through defusedxml with DTDs, entities and external references
all forbidden: an aECG never needs them, and they are how XML bombs and
external-entity reads get in.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from pulse_edge.runtime.ecg.checks import check_fs, one_line, recording_error
from pulse_edge.runtime.ecg.leads import normalise_lead_name
from pulse_edge.runtime.ecg.recording import Recording
from pulse_edge.runtime.ecg.units import require_mv_per_unit
from pulse_edge.runtime.inputs.extras import require

HL7_NS = "urn:hl7-org:v3"
_NS = {"h": HL7_NS}
_XSI_TYPE = "{http://www.w3.org/2001/XMLSchema-instance}type"
_TIME_CODES = ("TIME_ABSOLUTE", "TIME_RELATIVE")
_SECONDS_PER = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_FIX = "export the ECG as HL7 aECG (AnnotatedECG, urn:hl7-org:v3) with a rhythm series"


def read_aecg(source: str | os.PathLike | bytes, *, name: str | None = None) -> Recording:
    """The rhythm waveforms of an aECG document (path or bytes)."""
    label = name or ("<aECG bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source))
    root = _parse(source, label)
    if root.tag != f"{{{HL7_NS}}}AnnotatedECG":
        raise recording_error(label, f"XML root is {root.tag!r}, not an HL7 AnnotatedECG", _FIX)
    series, notes = _pick_series(root, label)
    sets = series.findall("h:component/h:sequenceSet", _NS)
    if not sets:
        raise recording_error(label, "the rhythm series has no sequenceSet (no waveforms)", _FIX)
    by_timing: dict[tuple, dict[str, np.ndarray]] = defaultdict(dict)
    others: dict[str, None] = {}  # sequences that are no lead (Recording.others), each named once
    for sequence_set in sets:
        timing, leads = _read_sequence_set(sequence_set, label, notes, others)
        for lead, samples in leads.items():
            if lead in by_timing[timing]:
                notes.append(f"lead {lead} is recorded twice over the same time span; kept the first")
            by_timing[timing].setdefault(lead, samples)
    if not by_timing:  # time sequences only, or leads without a code or a value
        raise recording_error(label, "the rhythm series holds no lead sequences (MDC_ECG_LEAD_... with values)", _FIX)
    timing = max(by_timing, key=lambda key: len(by_timing[key]))
    if len(by_timing) > 1:
        notes.append(
            f"used the {len(by_timing[timing])} leads recorded together; skipped leads recorded at other times"
        )
    fs = 1.0 / timing[1]
    check_fs(fs, label)  # first: a 1e-320 s increment gives inf, which round() cannot take
    fs = float(round(fs)) if abs(fs - round(fs)) < 1e-4 * fs else fs  # "0.00277778" s is 360 Hz
    return Recording(dict(by_timing[timing]), fs, "hl7-aecg", notes, source=label, others=tuple(others))


def _parse(source, label: str):
    from xml.etree.ElementTree import ParseError

    require("defusedxml", reading="HL7 aECG", source=label)
    from defusedxml import DefusedXmlException
    from defusedxml import ElementTree as SafeET

    strict = {"forbid_dtd": True, "forbid_entities": True, "forbid_external": True}
    try:
        if isinstance(source, bytes | bytearray):
            return SafeET.fromstring(bytes(source), **strict)
        return SafeET.parse(os.fspath(source), **strict).getroot()
    except FileNotFoundError:
        raise recording_error(label, "file not found", "check the path") from None
    except DefusedXmlException as exc:
        raise recording_error(label, f"XML uses a forbidden construct ({type(exc).__name__})", _FIX) from exc
    except (ParseError, OSError, UnicodeDecodeError, LookupError) as exc:  # LookupError: unknown encoding=
        raise recording_error(label, f"not well-formed XML, corrupt or truncated ({one_line(exc)})", _FIX) from exc


def _pick_series(root, label: str):
    series = root.findall("h:component/h:series", _NS)
    if not series:
        raise recording_error(label, "AnnotatedECG has no component/series (no waveforms)", _FIX)
    rhythm = [s for s in series if _code(s) == "RHYTHM"]
    chosen = (rhythm or series)[0]
    notes = [f"used the {'RHYTHM' if rhythm else 'first'} series of {len(series)}"] if len(series) > 1 else []
    return chosen, notes


def _code(element) -> str | None:
    code = element.find("h:code", _NS)
    return code.get("code") if code is not None else None


def _read_sequence_set(sequence_set, label: str, notes: list[str], others: dict[str, None]
                       ) -> tuple[tuple, dict[str, np.ndarray]]:
    """((time head, seconds per sample), {lead code: mV samples}) of one sequenceSet; a lead's second sequence is
    said in `notes`, a sequence that is no lead (its unit not judged) named in `others`."""
    timing, leads = None, {}
    for sequence in sequence_set.findall("h:component/h:sequence", _NS):
        code, value = _code(sequence), sequence.find("h:value", _NS)
        if value is None or not code:
            continue
        if code in _TIME_CODES:
            timing = _timing(value, label)
        elif normalise_lead_name(code) is None:
            others[code] = None
        elif code in leads:
            notes.append(f"lead {code} has a second sequence in one sequenceSet; kept the first")
        else:
            leads[code] = _lead_samples(code, value, label)
    if timing is None:
        raise recording_error(label, "a sequenceSet has no TIME_ABSOLUTE/TIME_RELATIVE sequence", _FIX)
    return timing, leads


def _timing(value, label: str) -> tuple[str, float]:
    increment = value.find("h:increment", _NS)
    head = value.find("h:head", _NS)
    if increment is None:
        raise recording_error(label, "the time sequence has no <increment> (sample interval)", _FIX)
    unit = increment.get("unit", "s")
    try:
        seconds = float(increment.get("value", "")) * _SECONDS_PER[unit]
    except (KeyError, ValueError):
        raise recording_error(
            label, f"time increment {increment.get('value')!r} {unit!r} is not a time in s, ms or us", _FIX
        ) from None
    if not seconds > 0:
        raise recording_error(label, f"time increment {seconds:g} s is not positive", _FIX)
    return (head.get("value", "") if head is not None else ""), seconds


def _lead_samples(code: str, value, label: str) -> np.ndarray:
    kind = value.get(_XSI_TYPE, "SLIST_PQ")
    if kind != "SLIST_PQ":
        raise recording_error(label, f"lead {code} is stored as {kind}, not SLIST_PQ with units", _FIX)
    origin_mv = _quantity_mv(value.find("h:origin", _NS), code, "origin", label, default=0.0)
    scale_mv = _quantity_mv(value.find("h:scale", _NS), code, "scale", label, default=None)
    digits = value.find("h:digits", _NS)
    try:
        numbers = np.array((digits.text or "").split() if digits is not None else [], dtype=np.float64)
    except ValueError:
        raise recording_error(label, f"digits of lead {code} contain something that is not a number", _FIX) from None
    if numbers.size == 0:
        raise recording_error(label, f"lead {code} has no digits", _FIX)
    return origin_mv + scale_mv * numbers


def _quantity_mv(element, code: str, what: str, label: str, default: float | None) -> float:
    if element is None:
        if default is None:
            raise recording_error(label, f"lead {code} has no {what}", _FIX)
        return default
    factor = require_mv_per_unit(element.get("unit"), label, f"the {what} of lead {code}")
    try:
        return float(element.get("value", "")) * factor
    except ValueError:
        raise recording_error(label, f"the {what} of lead {code} is not a number", _FIX) from None
