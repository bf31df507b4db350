"""DICOM ECG waveforms (12-Lead ECG, General ECG, Ambulatory and 32-bit ECG Waveform Storage).

Samples come from pydicom's `Dataset.waveform_array(index)`, which (pydicom 3.0)
returns float64 [samples, channels] as

    raw * ChannelSensitivity * ChannelSensitivityCorrectionFactor + ChannelBaseline

with 1.0 / 1.0 / 0.0 standing in for absent elements, in whatever unit each
channel's ChannelSensitivityUnitsSequence names. It does NOT convert units, does
not look at WaveformPaddingValue, and hands back the raw 8-bit codes of mu-law
(MB) and A-law (AB) samples undecoded. So this reader insists on a sensitivity
and a known unit per channel, converts units itself, and refuses MB/AB.
"""

from __future__ import annotations

import io
import os
import struct
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from pulse_edge.runtime.ecg.checks import check_fs, check_samples, one_line, recording_error
from pulse_edge.runtime.ecg.leads import LIMB_LEADS, PRECORDIAL_LEADS, lead_from_code
from pulse_edge.runtime.ecg.recording import Recording
from pulse_edge.runtime.ecg.units import require_mv_per_unit
from pulse_edge.runtime.inputs.extras import require

_ECG_SOP_CLASSES = MappingProxyType(
    {
        "1.2.840.10008.5.1.4.1.1.9.1.1": "12-Lead ECG Waveform",
        "1.2.840.10008.5.1.4.1.1.9.1.2": "General ECG Waveform",
        "1.2.840.10008.5.1.4.1.1.9.1.3": "Ambulatory ECG Waveform",
        "1.2.840.10008.5.1.4.1.1.9.1.4": "General 32-bit ECG Waveform",
    }
)
# Multiplex groups that hold an averaged or representative beat, not the recording.
_BEAT_GROUP_WORDS = ("MEDIAN", "BEAT", "AVERAGE", "TEMPLATE", "REPRESENTATIVE")
_COMPANDED = ("MB", "AB")  # mu-law / A-law: pydicom returns the raw codes
# NotImplementedError: pydicom's answer to a garbled explicit VR ("Unknown Value Representation").
_LIBRARY_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    IndexError,
    NotImplementedError,
    struct.error,
)
_FIX = "export the ECG from the cart as a 12-lead or General ECG Waveform DICOM"


def read_dicom(source: str | os.PathLike | bytes, *, name: str | None = None) -> Recording:
    """The rhythm multiplex group of a DICOM ECG waveform file (path) or object (bytes)."""
    label = name or ("<DICOM bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source))
    ds = _open(source, label)
    try:
        leads, fs, notes, others = _read_dataset(ds, label)
    except _library_errors() as exc:
        raise recording_error(label, f"corrupt or truncated DICOM waveform ({one_line(exc)})", _FIX) from exc
    check_fs(fs, label)
    return Recording(leads, fs, "dicom", notes, source=label, others=others)


def _read_dataset(ds, label: str) -> tuple[dict[str, np.ndarray], float, list[str], tuple[str, ...]]:
    _check_sop_class(ds, label)
    if str(getattr(ds.get("file_meta"), "TransferSyntaxUID", "")) == _BIG_ENDIAN:
        raise recording_error(label, "the file is in the retired Explicit VR Big Endian transfer syntax, whose "
                              "waveform samples this reader would take in the wrong byte order",
                              "export it from the cart (or convert it) as Explicit VR Little Endian")
    groups = ds.get("WaveformSequence")
    if not groups:
        raise recording_error(
            label, "DICOM file has no WaveformSequence (not an ECG waveform, or the file is cut short)", _FIX
        )
    index, notes = _pick_group(groups)
    leads, channel_notes, others = _read_group(ds, index, groups[index], label)
    return leads, float(groups[index].SamplingFrequency), notes + channel_notes, others


def bare_dicom(head: bytes) -> bool:
    """A DICOM data set written without the file's 128-byte preamble and "DICM" (older ECG exporters): its first
    element's tag is of group 0002 (file meta) or 0008 (identification), its VR explicit. pydicom reads it when
    forced; a file that only starts so is refused by the checks after (no ECG SOP class, no waveform)."""
    return head[:2] in (b"\x02\x00", b"\x08\x00") and head[4:6].isalpha() and head[4:6].isupper()


def _head(stream) -> bytes:
    """The first bytes of a path or stream, the stream left where it was."""
    if not hasattr(stream, "read"):
        with open(stream, "rb") as handle:
            return handle.read(6)
    at = stream.tell()
    head = stream.read(6)
    stream.seek(at)
    return head


def _open(source, label: str):
    pydicom = require("pydicom", reading="DICOM", source=label)
    from pydicom.errors import InvalidDicomError

    # dcmread() takes bytes as a *file name*, so file contents go in as a stream.
    stream = io.BytesIO(source) if isinstance(source, bytes | bytearray) else source
    try:
        ds = pydicom.dcmread(stream, force=bare_dicom(_head(stream)))
        # pydicom parses sequences lazily and stops quietly at the end of a cut-short
        # file; walking every element now turns a broken file into an error here.
        for _ in ds.iterall():
            pass
        return ds
    except FileNotFoundError:
        raise recording_error(label, "file not found", "check the path") from None
    except InvalidDicomError:
        raise recording_error(label, "not a DICOM file (no DICM header)", _FIX) from None
    except _library_errors() as exc:
        raise recording_error(label, f"corrupt or truncated DICOM file ({one_line(exc)})", _FIX) from exc


def _library_errors() -> tuple[type[BaseException], ...]:
    """What pydicom raises on broken input; its own BytesLengthException derives from Exception only."""
    from pydicom.errors import BytesLengthException

    return (*_LIBRARY_ERRORS, BytesLengthException)


def _check_sop_class(ds, label: str) -> None:
    sop = str(ds.get("SOPClassUID", ""))
    if sop and sop not in _ECG_SOP_CLASSES:
        kind = getattr(ds.SOPClassUID, "name", "") or sop
        raise recording_error(label, f"DICOM object is a {kind}, not an ECG waveform", _FIX)


def _pick_group(groups) -> tuple[int, list[str]]:
    """Index of the rhythm group: not a median/average beat, one that makes a 12-lead print (V1-V6 and two limb
    leads), ORIGINAL, labelled RHYTHM, most leads, longest. A lead II strip labelled RHYTHM beside an unlabelled
    12-lead group was taken, and the file refused for missing leads."""
    scores = [_group_score(item) for item in groups]
    best = max(range(len(groups)), key=scores.__getitem__)
    if len(groups) == 1:
        return best, []
    others = ", ".join(_group_name(groups[k], k) for k in range(len(groups)) if k != best)
    return best, [f"used waveform group {_group_name(groups[best], best)}; skipped {others}"]


def _group_score(item) -> tuple:
    label = str(item.get("MultiplexGroupLabel", "")).upper()
    is_beat = any(word in label for word in _BEAT_GROUP_WORDS)
    original = str(item.get("WaveformOriginality", "")).upper() == "ORIGINAL"
    leads = [lead.lead for ch in item.get("ChannelDefinitionSequence", []) if (lead := _channel_lead(ch))]
    complete = set(PRECORDIAL_LEADS) <= set(leads) and len(set(LIMB_LEADS) & set(leads)) >= 2
    fs = float(item.get("SamplingFrequency", 0) or 0)
    duration = int(item.get("NumberOfWaveformSamples", 0) or 0) / fs if fs > 0 else 0.0
    return (not is_beat, complete, original, "RHYTHM" in label, len(leads), duration)


def _group_name(item, index: int) -> str:
    label = item.get("MultiplexGroupLabel")
    return f"{index} {str(label)!r}" if label else str(index)


def _read_group(ds, index: int, item, label: str) -> tuple[dict[str, np.ndarray], list[str], tuple[str, ...]]:
    """The group's leads in mV, its notes, and the channels that are no standard lead (Recording.others): their
    units (respiration in Ohm) are not judged."""
    channels = list(item.get("ChannelDefinitionSequence", []))
    n_channels = int(item.NumberOfWaveformChannels)
    if len(channels) != n_channels:
        raise recording_error(
            label, f"group {index} declares {n_channels} channels but defines {len(channels)} (file cut short?)", _FIX
        )
    _check_samples(item, label, index)
    check_samples(int(item.NumberOfWaveformSamples) * n_channels, label)  # before pydicom scales it as float64
    factors = {k: _mv_factor(ch, k, label) for k, ch in enumerate(channels) if _channel_lead(ch) is not None}
    values = ds.waveform_array(index)  # [samples, channels], sensitivity and baseline applied
    values, notes, gaps = _without_padding(item, values)
    leads, others = {}, []
    for k, ch in enumerate(channels):
        name = _channel_name(ch, k)
        if k not in factors:
            others.append(name)
            continue
        if _status_leaves_out(ch, k, name, label, notes):
            continue
        if name in leads:
            notes.append(f"channel {k + 1} repeats {name!r}; kept the first")
            continue
        if gaps is not None:
            _refuse_padding_inside(gaps, k, name, label, index, float(item.SamplingFrequency))
        leads[name] = values[:, k] * factors[k]
    return leads, notes, tuple(others)


def _status_leaves_out(channel, k: int, name: str, label: str, notes: list[str]) -> bool:
    """What the cart's ChannelStatus says of channel k: refused (not a patient's calibrated signal), left out
    with a note (nothing connected), or said in a note (the cart doubts it); True where it is left out."""
    status = channel.get("ChannelStatus")
    items = [status] if isinstance(status, str) else list(status or [])  # one value, or pydicom's MultiValue
    values = {str(v).strip().upper() for v in items if v}
    if refused := sorted(values.intersection(_STATUS_REFUSED)):
        raise recording_error(label, f"channel {k + 1} ({name}) is marked {' and '.join(refused)} by the cart "
                              "(ChannelStatus), so its samples are not a patient's calibrated signal",
                              "record the ECG again, or export it without the test or uncalibrated channels")
    if left := sorted(values.intersection(_STATUS_LEFT_OUT)):
        notes.append(f"left out channel {k + 1} ({name}): the cart marks it {left[0]}")
        return True
    if said := sorted(values.intersection(_STATUS_SAID)):
        notes.append(f"channel {k + 1} ({name}) is marked {' and '.join(said)} by the cart; drawn as recorded")
    return False


# WaveformSampleInterpretation -> the stored sample's numpy type (little endian: the explicit VR LE transfer
# syntaxes pydicom writes and carts send), to read WaveformPaddingValue and the raw codes it marks.
_RAW_TYPES = MappingProxyType({"SB": "i1", "UB": "u1", "SS": "<i2", "US": "<u2", "SL": "<i4", "UL": "<u4",
                               "SV": "<i8", "UV": "<u8"})
# ChannelStatus (003A,0205) values a cart sets on a channel: refused where the samples are not a patient's
# calibrated signal, the lead left out where nothing was connected, said where the cart doubts it.
_STATUS_REFUSED = ("INVALID", "TEST DATA", "UNCALIBRATED")
_STATUS_LEFT_OUT = ("DISCONNECTED",)
_STATUS_SAID = ("QUESTIONABLE", "UNZEROED")
_BIG_ENDIAN = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired): pydicom reads waveform words as stored


@dataclass(frozen=True)
class _Gaps:
    """Padding before a group's last real sample: where ([samples, channels]) and the code that marks it."""

    padded: np.ndarray
    code: int


def _without_padding(item, values: np.ndarray) -> tuple[np.ndarray, list[str], _Gaps | None]:
    """pydicom scales WaveformPaddingValue's code like any sample (a -32768 pad becomes -81.92 mV at 2.5 uV per
    count, drawn as a plunge off the row). Padding after the last real sample is cut off with a note; padding
    anywhere else becomes NaN, and is returned as _Gaps for _refuse_padding_inside (None: there is none)."""
    raw_type = _RAW_TYPES.get(str(item.get("WaveformSampleInterpretation", "")))
    pad = _padding_code(item.get("WaveformPaddingValue"), raw_type)
    if pad is None:
        return values, [], None
    raw = np.frombuffer(bytes(item.WaveformData), raw_type, count=values.size).reshape(values.shape)
    padded = raw == pad  # [samples, channels]
    if not padded.any():
        return values, [], None
    real = np.flatnonzero(~padded.all(axis=1))
    end = int(real[-1]) + 1 if real.size else 0
    values = np.where(padded, np.nan, values)[:end]
    trimmed = padded.shape[0] - end
    gaps = _Gaps(padded[:end], int(pad)) if padded[:end].any() else None
    return values, [f"cut {trimmed} padding samples off the end"] if trimmed else [], gaps


def _refuse_padding_inside(gaps: _Gaps, k: int, name: str, label: str, index: int, fs: float) -> None:
    """Channel k, lead `name`, with padding before its last real sample has gaps, which cannot be printed. The line
    names the padding code: a cart that writes one its real samples take (0) has sound samples read as gaps, and
    DICOM defines the padding value as marking absent samples wherever it stands, so they cannot be told apart."""
    at = np.flatnonzero(gaps.padded[:, k])
    if at.size:
        raise recording_error(
            label, f"group {index}: lead {name} has {at.size} samples equal to the file's WaveformPaddingValue "
            f"(code {gaps.code}), which marks samples the cart did not record (first at {at[0] / fs:.3f} s)",
            "re-export the recording without gaps; if those samples are real, have the cart write no padding value "
            "or one no sample takes (e.g. -32768)")


def _padding_code(padding: Any, raw_type: str | None) -> Any:
    """The stored code padding is written as: OB/OW give its bytes; a file that wrote it as SS, US (or another
    integer VR) gives pydicom an int, taken modulo the sample type (32768 as US is -32768 as SS)."""
    if raw_type is None or padding is None:
        return None
    if isinstance(padding, bytes | bytearray):
        size = np.dtype(raw_type).itemsize
        return np.frombuffer(bytes(padding), raw_type, count=1)[0] if len(padding) >= size else None
    if isinstance(padding, int) and not isinstance(padding, bool):
        return np.array(padding, dtype=np.int64).astype(raw_type)[()]
    return None  # a multi-valued or odd element: no padding this reader can tell


def _check_samples(item, label: str, index: int) -> None:
    interpretation = str(item.WaveformSampleInterpretation)
    if interpretation in _COMPANDED:
        raise recording_error(
            label, f"group {index} stores mu-law/A-law samples ({interpretation}), which are not supported", _FIX
        )
    expected = (
        int(item.NumberOfWaveformSamples) * int(item.NumberOfWaveformChannels) * int(item.WaveformBitsAllocated) // 8
    )
    stored = len(item.WaveformData)
    if stored < expected:
        raise recording_error(
            label, f"WaveformData of group {index} holds {stored} bytes but needs {expected} (truncated file)", _FIX
        )


def _mv_factor(channel, k: int, label: str) -> float:
    if "ChannelSensitivity" not in channel:
        raise recording_error(
            label,
            f"channel {k + 1} ({_channel_name(channel, k)}) has no ChannelSensitivity, "
            "so its samples have no voltage scale",
            _FIX,
        )
    units = channel.get("ChannelSensitivityUnitsSequence")
    unit = (units[0].get("CodeValue") or units[0].get("CodeMeaning")) if units else None
    return require_mv_per_unit(unit, label, f"channel {k + 1} ({_channel_name(channel, k)})")


def _channel_lead(channel):
    source = (channel.get("ChannelSourceSequence") or [None])[0]
    code = (source.get("CodeValue"), source.get("CodeMeaning")) if source is not None else (None, None)
    return lead_from_code(*code) or lead_from_code(channel.get("ChannelLabel"))


def _channel_name(channel, k: int) -> str:
    """The standard name if the channel is a known lead, else its label for the 'ignored' note."""
    lead = _channel_lead(channel)
    if lead is not None:
        return f"-{lead.lead}" if lead.inverted else lead.lead
    source = (channel.get("ChannelSourceSequence") or [None])[0]
    meaning = source.get("CodeMeaning") if source is not None else None
    return str(meaning or channel.get("ChannelLabel") or f"channel {k + 1}")
