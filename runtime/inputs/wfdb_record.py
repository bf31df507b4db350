"""WFDB records (a .hea header plus signal files), as PTB-XL and most PhysioNet ECG sets are stored.

`wfdb.rdrecord(name)` returns physical values, (digital - baseline) / adc_gain,
as float64 `p_signal` [samples, channels] in each channel's `units`; samples
that hold the format's "invalid" value (-32768 for format 16) come back as
NaN, which the checks then report. The record name is given without the .hea
extension (with it, wfdb looks for "x.hea.hea").

Importing wfdb costs about 0.5 s and pulls in pandas; the import happens here
only, when a WFDB record is actually read.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Any

from pulse_edge.runtime.ecg.checks import check_fs, check_samples, one_line, recording_error
from pulse_edge.runtime.ecg.leads import normalise_lead_name
from pulse_edge.runtime.ecg.recording import Recording
from pulse_edge.runtime.ecg.units import mv_per_unit, require_mv_per_unit
from pulse_edge.runtime.inputs.extras import require
from pulse_edge.runtime.inputs.warned import caught_warnings
from pulse_edge.runtime.inputs.wfdb_names import RECORD_SUFFIXES, header_words, multi_segment

_LIBRARY_ERRORS = (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, AttributeError, struct.error)
_FIX = "check that the .hea header and its signal files are complete and side by side"


def read_wfdb(path: str | os.PathLike, name: str | None = None) -> Recording:
    """A WFDB record from its header path, signal-file path, or record name without extension; `name` is what
    errors and the recording call it (an upload's file names, not the server's temporary folder)."""
    label = name or os.fspath(path)
    record_name = _record_name(Path(path))
    if not record_name.with_name(record_name.name + ".hea").is_file():
        raise recording_error(label, f"no WFDB header {record_name.name}.hea next to it", _FIX)
    notes = _check_header(record_name, label)
    record = _read(record_name, label, "rdrecord", physical=True)
    fs = float(record.fs)
    check_fs(fs, label)
    if record.p_signal is None or record.p_signal.ndim != 2 or record.p_signal.shape[0] == 0:
        raise recording_error(label, "WFDB record holds no samples", _FIX)
    if record.units is None:  # wfdb drops them when a variable-layout record's segments disagree on any signal's
        raise recording_error(label, "its segments write their signals in different units, so wfdb reads none",
                              _SAME_UNITS)
    leads, others = {}, []
    for k, (name, unit) in enumerate(zip(record.sig_name, record.units, strict=True)):
        if not name:  # "missing I ... V6" would blame the leads, not the header that names none
            raise recording_error(label, f"signal {k + 1} has no name in the header, so which lead it is cannot be "
                                  "told", "write each signal's lead name at the end of its line in the .hea file")
        if normalise_lead_name(name) is None:  # respiration in Ohm, blood pressure in mmHg: no lead to draw
            others.append(name)
            continue
        factor = require_mv_per_unit(unit, label, f"signal {k + 1} ({name})")
        if name in leads:
            notes.append(f"signal {k + 1} repeats {name!r}; kept the first")
            continue
        leads[name] = record.p_signal[:, k] * factor
    return Recording(leads, fs, "wfdb", notes, source=label, others=tuple(others))


def _record_name(path: Path) -> Path:
    # PTB-XL lists records as "records500/00000/00001_hr" without extension; accept that too.
    return path.with_suffix("") if path.suffix.lower() in RECORD_SUFFIXES else path


def _check_header(record_name: Path, label: str) -> list[str]:
    """Before any sample is read: the sampling frequency as the header writes it, and the samples it declares.
    wfdb falls back to the format's default 250 Hz where it cannot parse the frequency ("-500", "nan"), which
    would draw a 500 Hz ECG at half speed in silence; a declared length of 10**12 samples would be allocated."""
    header = _read(record_name, label, "rdheader")
    check_samples(int(header.sig_len or 0) * int(header.n_sig or 0), label)
    records = header_words(record_name.with_name(record_name.name + ".hea").read_text(errors="replace"))
    fields = records[0] if records else []
    if not multi_segment(records):  # its signal lines follow
        _check_gains(records[1:1 + int(header.n_sig or 0)], list(header.sig_name or []), label)
    else:  # each segment read is a record of its own, with its own gains
        _check_segments(_read_segments(record_name, records[1:]), label, layout=_has_layout(records[1:]))
    if len(fields) < 3:  # no frequency written: the WFDB specification's default
        return [f"the header gives no sampling frequency; WFDB's default {float(header.fs):g} Hz is assumed"]
    written = fields[2].split("/")[0].split("(")[0]
    try:
        value = float(written)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise recording_error(label, f"the header's sampling frequency {fields[2]!r} is not a positive number",
                              "correct the record line of the .hea file (e.g. `rec 12 500 5000`)")
    if abs(value - float(header.fs)) > 1e-6 * value:  # "5e2", "+500": wfdb reads another rate than written
        raise recording_error(label, f"the header's sampling frequency {fields[2]!r} is read by wfdb as "
                              f"{float(header.fs):g} Hz, not as written",
                              "write it as a plain number on the record line of the .hea file (e.g. `rec 12 500 5000`)")
    return []


def _read_segments(record_name: Path, lines: list[list[str]]) -> list[tuple[str, list[list[str]]]]:
    """The segments of a multi-segment record that hold samples, each (name, its header's lines as words): not the
    null segments ("~") nor a layout segment (0 samples; it only lists the signals). One whose header cannot be
    read is left to wfdb's read, which refuses it."""
    segments = []
    for words in lines:
        if len(words) < 2 or words[0] == "~" or words[1] == "0":
            continue
        try:  # a name with a "/" is no segment beside the record (with_name refuses it: ValueError)
            text = record_name.with_name(f"{words[0]}.hea").read_text(errors="replace")
        except (OSError, ValueError):
            continue
        segments.append((words[0], header_words(text)))
    return segments


def _has_layout(lines: list[list[str]]) -> bool:
    """Whether a multi-segment record has a variable layout: its first segment lists the signals with 0 samples."""
    return bool(lines) and len(lines[0]) > 1 and lines[0][1] == "0"


def _check_segments(segments: list[tuple[str, list[list[str]]]], label: str, *, layout: bool) -> None:
    """Each data segment's gains, as a record's; and what wfdb takes from the first segment alone: it reads every
    segment in the first one's units (a segment in mV after one in uV drawn 1000x too small) and, in a fixed layout,
    stacks the signals by position under the first one's names (a segment listing V6..V1 swapped them), in silence.
    A variable layout maps signals by name: there the order may differ."""
    first: tuple[str, list[str], list[Any]] | None = None
    units: dict[str, tuple[float | None, str, str]] = {}  # lead -> (mV per unit, its unit, the segment)
    for segment, words in segments:
        names = [" ".join(line[8:]) for line in words[1:]]
        _check_gains(words[1:], names, f"{label} (segment {segment})")
        leads = [normalise_lead_name(name) or name for name in names]  # a lead's label as the reader takes it
        if first is None:
            first = (segment, names, leads)
        elif not layout and len(leads) == len(first[2]):  # descriptions are optional: a blank one is the first's
            leads = [lead or theirs for lead, theirs in zip(leads, first[2], strict=True)]
        if not layout and leads != first[2]:
            raise recording_error(label, f"segment {segment} lists its signals as {', '.join(names)}, segment "
                                  f"{first[0]} as {', '.join(first[1])}: wfdb stacks them by position",
                                  "write every segment's signals in the same order")
        for lead, line in zip(leads, words[1:], strict=True):
            if isinstance(lead, str):  # no lead (respiration, blood pressure): not drawn, its unit unused
                continue
            unit = _unit(line)
            factor, was, where = units.setdefault(lead.lead, (mv_per_unit(unit), unit, segment))
            if mv_per_unit(unit) != factor:
                raise recording_error(label, f"segment {segment} writes {lead.lead} in {unit}, segment {where} in "
                                      f"{was}: wfdb reads every segment in the first one's units", _SAME_UNITS)


_SAME_UNITS = "write every segment's signals in the same units"


def _unit(signal_line: list[str]) -> str:
    """A signal line's unit ("200(0)/uV" -> "uV"); none written is mV (the WFDB header format)."""
    gain = signal_line[2] if len(signal_line) > 2 else ""
    return gain.partition("/")[2] or "mV"


def _check_gains(signal_lines: list[list[str]], names: list[str], label: str) -> None:
    """An ADC gain of 0, or none written, marks an uncalibrated signal (the WFDB header format); wfdb puts its
    default 200 in its place, which read a 1000-per-mV cart's lead 5x too large, in silence. A signal that is no
    lead (respiration, blood pressure) is left out by the reader whatever its gain."""
    for k, fields in enumerate(signal_lines):
        if k < len(names) and names[k] and normalise_lead_name(names[k]) is None:
            continue
        written = fields[2].split("/")[0].split("(")[0] if len(fields) > 2 else ""
        try:
            gain = float(written)
        except ValueError:
            gain = 0.0
        if gain == 0.0:
            name = names[k] if k < len(names) else ""
            raise recording_error(label, f"signal {k + 1}{f' ({name})' if name else ''} has no ADC gain in the header "
                                  f"({written or 'none written'}): WFDB's mark of an uncalibrated signal, with no "
                                  "voltage scale", "write the cart's gain (units per mV) into the .hea file, e.g. "
                                  "`1000/mV`")


def _read(record_name: Path, label: str, call: str, **kwargs: Any):
    try:
        with caught_warnings():
            # wfdb 4.3 parses headers with pandas and trips pandas 3.1's deprecation
            # warnings (inplace=...) on every read and at import: noise for the cart log.
            warnings.filterwarnings("ignore", module="wfdb")
            wfdb = require("wfdb", reading="WFDB records", source=label)
            return getattr(wfdb, call)(str(record_name), **kwargs)
    except _LIBRARY_ERRORS as exc:
        raise recording_error(label, f"corrupt or truncated WFDB record ({one_line(exc)})", _FIX) from exc
