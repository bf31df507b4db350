"""One entry point for every ECG input: `load_input(source) -> EcgInput`.

An image or the first page of a PDF is read as it is (runtime/inputs/images.py).
A digital recording (DICOM waveform, WFDB record, HL7 aECG, CSV, NPY or a numpy
array) is read into millivolts, brought to the 12 standard leads at 500 Hz
(runtime/ecg/recording.py) and drawn as the standard 12-lead print PULSE reads:
3x4 panels and a lead II rhythm strip, 25 mm/s, 10 mm/mV, 2200x1700 px (US
letter at 200 dpi; runtime/ecg/render.py). From there every input goes through
the same preprocessing. What was done to a recording on the way (derived leads,
resampling, skipped channels) comes back as one-line notes for a person to read.

The format is told by content (DICOM's "DICM", NumPy's magic, XML, image and
PDF signatures), by the suffix only where content cannot tell (WFDB signal
files, CSV text), never by a suffix that contradicts the content.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

import numpy as np
from PIL import Image

from pulse_edge.errors import ConfigError, InputError
from pulse_edge.runtime.ecg.checks import PRINT_SECONDS
from pulse_edge.runtime.ecg.leads import LEADS, normalise_lead_name
from pulse_edge.runtime.ecg.recording import Recording, TwelveLead, to_twelve_lead
from pulse_edge.runtime.ecg.render import FULL_ENOUGH, render_ecg
from pulse_edge.runtime.inputs.aecg import read_aecg
from pulse_edge.runtime.inputs.dicom import bare_dicom, read_dicom
from pulse_edge.runtime.inputs.images import accept_image, load_image, load_image_bytes
from pulse_edge.runtime.inputs.tabular import read_array, read_csv, read_npy
from pulse_edge.runtime.inputs.wfdb_names import RECORD_SUFFIXES, header_of
from pulse_edge.runtime.inputs.wfdb_record import read_wfdb

IMAGE_KINDS = ("image", "pdf")
RECORDING_KINDS = ("dicom", "wfdb", "hl7-aecg", "csv", "npy", "array")
INPUT_KINDS = IMAGE_KINDS + RECORDING_KINDS
PRINT_SIZE_PX = (2200, 1700)  # US letter at 200 dpi, landscape: the size of a typical scanned print
_HEAD_BYTES = 1024
_CSV_SUFFIXES = (".csv", ".tsv")
_NEEDS_FS = ("csv", "npy", "array")
# What a kind reads of the options a caller gives: an option given for another kind is said in a note, never
# dropped in silence. A DICOM, WFDB or aECG file stores its own rate, unit and lead names; a CSV names its leads in
# its header; an image is read as it is drawn. (unit None: not given, read as millivolts where a kind reads it.)
_OPTIONS = ("fs", "leads", "unit", "layout")
_READS = MappingProxyType({"csv": ("fs", "unit"), "npy": _OPTIONS, "array": _OPTIONS})
DEFAULT_UNIT = "mV"
_WHY_UNUSED = MappingProxyType({"csv": "a CSV file names its leads in its header and lays them out as columns",
                                "image": "an image is read as it is drawn", "pdf": "a PDF is read as it is drawn"})
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


@dataclass(frozen=True)
class EcgInput:
    """An ECG ready for the model: the RGB image it reads, and where that image came from."""

    image: Image.Image  # RGB; for a recording, the rendered 12-lead print
    kind: str  # one of INPUT_KINDS
    source: str  # the path or name it was loaded from
    notes: tuple[str, ...] = ()  # one line each, e.g. "derived III, aVR, aVL, aVF from I and II"
    recording: TwelveLead | None = None  # the 12 leads the print was drawn from (recordings only)


@dataclass(frozen=True)
class _Options:
    name: str
    fs: float | None
    leads: tuple[str, ...] | None
    unit: str | None
    layout: str | None

    @property
    def volts(self) -> str:
        return self.unit or DEFAULT_UNIT


def load_input(
    source: str | os.PathLike | bytes | np.ndarray | Image.Image,
    *,
    name: str | None = None,
    fs: float | None = None,
    leads: tuple[str, ...] | None = None,
    unit: str | None = None,
    layout: str | None = None,
) -> EcgInput:
    """Read any accepted ECG input; every way it can be unusable ends in one one-line `InputError`.

    source: a path (image, PDF, .dcm, WFDB .hea/.dat or record name, aECG .xml, .csv, .npy), the bytes of
    one such file (not WFDB, whose record is two files), a PIL image, an [H, W, 3] uint8 image array, or a
    [leads, samples] signal array. name: what errors and notes call it (default: the path, "<bytes>").
    fs (Hz), leads (the lead order of an NPY file or array; default the 12 standard leads), unit (default mV) and
    layout ("leads_first"/"samples_first") are for CSV, NPY and arrays, which store none of them (a CSV names
    its leads in its header); one given where it is not read is not used, and a note says so.
    """
    if isinstance(source, Image.Image):
        return _in_memory_image(source, _Options(name or "<image>", fs, leads, unit, layout))
    if isinstance(source, np.ndarray):
        return _from_array(source, _Options(name or "<array>", fs, leads, unit, layout))
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        options = _Options(name or "<bytes>", fs, leads, unit, layout)
        suffix = Path(options.name).suffix.lower()
        kind = "wfdb" if suffix in RECORD_SUFFIXES else _kind_of(data[:_HEAD_BYTES], suffix)
        return _read(kind, data, options)
    if not isinstance(source, str | os.PathLike):  # a list of samples, None, a number: named, not a TypeError
        hint = " (samples as a list: pass numpy.asarray(them))" if isinstance(source, list | tuple) else ""
        raise InputError(f"{name or '<input>'}: a {type(source).__name__} is not an ECG input; pass a path, the bytes "
                         f"of a file, a PIL image or a numpy array{hint}")
    if not os.fspath(source).strip():  # an unset variable in the cart's software; Path("") is the current folder
        raise InputError("an empty path names no ECG file; pass the ECG file's path")
    path = Path(source)
    options = _Options(name or os.fspath(source), fs, leads, unit, layout)
    return _read(_kind_of_path(path, options.name), path, options)


def _kind_of_path(path: Path, label: str) -> str:
    suffix = path.suffix.lower()
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None  # said below, after a WFDB record's bare name is tried
    except OSError as exc:  # a name too long, a loop of links, a folder on the way that is a file
        raise InputError(f"{label[:200]}: cannot be read as a path ({exc.strerror or exc}); check the path.") from exc
    except ValueError as exc:  # a NUL byte in the name
        raise InputError(f"{label[:200]!r}: is not a path a file can have ({exc}); check the path.") from exc
    if mode is not None and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        # a named pipe would block the read (a batch hung on one) and cannot be read twice; a device never ends
        raise InputError(f"{label}: is not a regular file (a pipe, socket or device); save the ECG to a file and "
                         "pass that")
    if header_of(path) is not None:
        return "wfdb"
    if not path.exists():
        if path.with_name(path.name + ".hea").is_file():  # PTB-XL names records without an extension
            return "wfdb"
        raise InputError(f"{label}: does not exist; check the path.")
    if path.is_dir():
        raise InputError(f"{label}: is a directory, not a file; pass one ECG file (or several inputs with --output)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError as exc:
        raise InputError(f"{label}: cannot be opened ({exc.strerror or exc}); check its permissions.") from exc
    return "wfdb" if suffix == ".dat" else _kind_of(head, suffix)


def _utf16_xml(head: bytes) -> bool:
    """XML written as UTF-16 with its byte-order mark (some carts' aECG export): the XML parser reads it by the
    mark, as the standard says; only this sniff did not know it."""
    if not head.startswith(_UTF16_BOMS):
        return False
    return head[:64].decode("utf-16", errors="ignore").lstrip().startswith("<")


def _kind_of(head: bytes, suffix: str) -> str:
    """The input kind the first bytes say; images.py decides (and explains a refusal) for all the rest."""
    if head[128:132] == b"DICM" or bare_dicom(head):  # PS3.10: a preamble, then "DICM"; or a bare data set
        return "dicom"
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if b"%PDF-" in head:
        return "pdf"
    if head.removeprefix(_UTF8_BOM).lstrip(b" \t\r\n").startswith(b"<") or _utf16_xml(head):
        return "hl7-aecg"
    if suffix.lower() in _CSV_SUFFIXES:
        return "csv"
    return "image"


def _in_memory_image(image: Image.Image, options: _Options) -> EcgInput:
    said: list[str] = []  # which page of several it read
    accepted = accept_image(image, name=options.name, said=said)
    return EcgInput(accepted, "image", options.name, (*said, *_unused("image", options)))


def _unused(kind: str, options: _Options) -> tuple[str, ...]:
    """The note on options given that `kind` does not read (empty when none)."""
    unused = [n for n in _OPTIONS if getattr(options, n) is not None and n not in _READS.get(kind, ())]
    if not unused:
        return ()
    why = _WHY_UNUSED.get(kind, f"a {kind.upper()} file stores its own")
    return (f"{', '.join(unused)} given but not used: {why}",)


def _read(kind: str, source: Path | bytes, options: _Options) -> EcgInput:
    ecg = _read_kind(kind, source, options)
    return replace(ecg, notes=(*ecg.notes, *_unused(kind, options)))


def _read_kind(kind: str, source: Path | bytes, options: _Options) -> EcgInput:
    if kind in IMAGE_KINDS:
        said: list[str] = []  # which page of several it read: a note, as the server's clients see none of the log
        image = (load_image(source, said=said) if isinstance(source, Path)
                 else load_image_bytes(source, name=options.name, said=said))
        return EcgInput(image, kind, options.name, tuple(said))
    if kind in _NEEDS_FS and options.fs is None:
        raise InputError(f"{options.name}: a {kind.upper()} file stores no sampling rate; "
                         "pass it (--fs HZ; fs= in Python; the server's `fs` field).")
    if kind == "wfdb" and not isinstance(source, Path):
        raise InputError(f"{options.name}: a WFDB record is a .hea header and its signal files; pass its path.")
    return rendered(_READERS[kind](source, options), kind, options.name)


def _from_array(array: np.ndarray, options: _Options) -> EcgInput:
    if array.ndim == 3 and array.shape[-1] in (3, 4) and array.dtype == np.uint8:  # [H, W, C] pixels
        return _in_memory_image(Image.fromarray(array), options)
    if array.ndim == 3:  # pixels, but not as 8-bit RGB(A): a signal is [leads, samples]
        raise InputError(f"{options.name}: a 3-D array is read as an image, which must be uint8 [height, width, 3 or "
                         f"4]; got {array.dtype} {list(array.shape)} (convert it, e.g. with np.clip(a, 0, 255)"
                         ".astype(np.uint8))")
    if options.fs is None:
        raise InputError(f"{options.name}: a signal array needs its sampling rate; pass fs= (Hz).")
    return rendered(_READERS["array"](array, options), "array", options.name)


def rendered(recording: Recording, kind: str, name: str) -> EcgInput:
    """A recording as the model reads it: 12 checked leads drawn as the standard print."""
    twelve = to_twelve_lead(recording)
    notes = [*twelve.notes, *_print_notes(twelve)]
    image = render_ecg(twelve, width_px=PRINT_SIZE_PX[0], height_px=PRINT_SIZE_PX[1])
    return EcgInput(image, kind, name, tuple(notes), twelve)


def _print_notes(twelve: TwelveLead) -> list[str]:
    seconds = twelve.recorded_s if twelve.recorded_s is not None else twelve.duration_s
    if seconds < (0.75 + 0.25 * FULL_ENOUGH) * PRINT_SECONDS:  # render.column_spans: too little for the last column
        return [f"the recording lasts {seconds:.2f} s, under the print's {PRINT_SECONDS:g} s: every column shows "
                f"its first 2.5 s and the rhythm strip stops at {seconds:.2f} s"]
    if seconds < PRINT_SECONDS:
        return [f"the recording lasts {seconds:.2f} s, under the print's {PRINT_SECONDS:g} s: the last column and "
                f"the rhythm strip stop at {seconds:.2f} s"]
    if seconds > PRINT_SECONDS + 1 / twelve.fs:
        return [f"the print shows the first {PRINT_SECONDS:g} s of {seconds:.2f} s"]
    return []


def _leads(options: _Options) -> dict[str, tuple[str, ...]]:
    """The lead order; a string is the CLI's and the server's spelling, "I,II,V1" (tuple() of it read letters)."""
    if options.leads is None:
        return {}
    given = options.leads
    if isinstance(given, bytes) or not isinstance(given, str | Iterable):  # leads=5: tuple()'s TypeError before
        raise ConfigError(f"leads must name the leads in order, as \"I,II,V1,...\" or a sequence of names; got "
                          f"{given!r:.80}")
    names = tuple(n.strip() for n in given.split(",")) if isinstance(given, str) else tuple(given)
    if any(not isinstance(n, str) for n in names):
        raise ConfigError(f"leads must be lead names (text), got {given!r:.80}")
    # none a lead: said so ("foo" was told its array's shape did not say which axis holds its 1 lead); a channel
    # that is no lead beside leads ("RESP") is dropped later with a note
    if names and all(normalise_lead_name(n) is None for n in names):
        raise ConfigError(f"leads: {', '.join(map(repr, names[:3]))} name no ECG lead; name each row's lead from "
                          f"{', '.join(LEADS)} (e.g. \"{','.join(LEADS[:3])},...\")")
    return {"leads": names}


_Reader = Callable[[object, _Options], Recording]
_READERS: MappingProxyType[str, _Reader] = MappingProxyType({
    "dicom": lambda source, o: read_dicom(source, name=o.name),
    "wfdb": lambda source, o: read_wfdb(source, name=o.name),
    "hl7-aecg": lambda source, o: read_aecg(source, name=o.name),
    "csv": lambda source, o: read_csv(source, o.fs, unit=o.volts, name=o.name),
    "npy": lambda source, o: read_npy(source, o.fs, unit=o.volts, layout=o.layout, name=o.name, **_leads(o)),
    "array": lambda source, o: read_array(source, o.fs, unit=o.volts, layout=o.layout, name=o.name, **_leads(o)),
})
