"""Plain arrays: CSV with a header of lead names, `.npy`, and numpy arrays handed over in Python.

None of them stores a sampling rate or a unit, so the caller must give them;
nothing here guesses a rate from the sample count.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import warnings
from typing import BinaryIO

import numpy as np

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.checks import check_fs, check_samples, one_line, recording_error
from pulse_edge.runtime.ecg.leads import LEADS
from pulse_edge.runtime.ecg.recording import Recording, samples_kept
from pulse_edge.runtime.ecg.units import require_mv_per_unit
from pulse_edge.runtime.inputs.warned import caught_warnings

LAYOUTS = ("leads_first", "samples_first")
_DELIMITERS = (",", ";", "\t")
_CSV_FIX = "fix or re-export the CSV"
# A column of times, as carts and spreadsheets name it ("time", "Time (s)", "time_ms", "timestamp", "seconds"), with
# the unit its name says (None: not said). Not a bare "t" or "s": a column of sample indices is often so named.
_TIME_COLUMN = re.compile(r"(?:time(?:stamp)?|elapsed)[\s_]*[(\[]?(s|sec|seconds|ms|msec)?[)\]]?|(sec|seconds|ms|msec)",
                          re.IGNORECASE)
_SECONDS_PER_TIME_UNIT = {"s": 1.0, "sec": 1.0, "seconds": 1.0, "ms": 1e-3, "msec": 1e-3}
TIME_RATE_TOLERANCE = 0.01  # a time column's rate may differ from the given one by 1% (rounded stamps average out)


def read_csv(source: str | os.PathLike | bytes, fs: float, *, unit: str = "mV", name: str | None = None) -> Recording:
    """Columns named by a header line (e.g. I,II,V1,...; a time column is ignored), one row per sample."""
    label = name or ("<CSV bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source))
    check_fs(fs, label)
    factor = require_mv_per_unit(unit, label, "the CSV")
    text = _csv_text(source, label)
    # universal line ends, read without copying the text: a classic Mac's (or an old cart's) CR-only lines made
    # the csv module fail with a traceback
    stream = io.StringIO(text, newline=None)
    header, delimiter = _header(stream.readline().rstrip("\n"), label)
    # the rows after the header, blank ones left out as loadtxt leaves them ("\r\r\n" ends are a row and a blank);
    # one line at a time, not a list of all of them
    lines = sum(1 for line in io.StringIO(text, newline=None) if line.strip()) - 1
    check_samples(lines * len(header), label)  # before parsing: numpy holds ~7x the text's bytes while it does
    kept = samples_kept(fs)  # only the start the print draws is parsed; how long the rest is, is counted
    try:
        with caught_warnings():  # "input contained no data": refused below in one line
            warnings.simplefilter("ignore", UserWarning)
            values = np.loadtxt(stream, delimiter=delimiter, ndmin=2, dtype=np.float64, max_rows=kept)
    except ValueError as exc:
        raise recording_error(label, f"CSV rows are not all numbers ({one_line(exc)})", _CSV_FIX) from exc
    if values.size == 0:
        raise recording_error(label, "the CSV has a header but no rows of samples", _CSV_FIX)
    if values.shape[1] != len(header):
        raise recording_error(
            label, f"header names {len(header)} columns but rows have {values.shape[1]}", "fix the CSV header"
        )
    _check_time_columns(header, values, fs, label)
    leads, notes = {}, []
    for k, name in enumerate(header):  # a repeated column: the first is kept and said, as the other readers do
        if name in leads:
            notes.append(f"column {k + 1} repeats {name!r}; kept the first")
        else:
            leads[name] = values[:, k] * factor
    recorded_s = lines / fs if lines > kept else None
    return Recording(leads, float(fs), "csv", notes, source=label, recorded_s=recorded_s)


def _check_time_columns(header: list[str], values: np.ndarray, fs: float, label: str) -> None:
    """A time column is left out of the print, but it says the rate the samples were taken at: a rate given
    otherwise (250 Hz samples read at --fs 500) drew the ECG at twice its speed, its heart rate doubled, in
    silence. Its mean step over the rows read is held to 1 / fs (in seconds or, where its name does not say,
    in milliseconds as well)."""
    for k, name in enumerate(header):
        match = _TIME_COLUMN.fullmatch(name.strip())
        said = (match.group(1) or match.group(2)) if match else None
        # 0, 1, 2, ... under a name without a unit: sample numbers as likely as times (a "time_ms" one is 1 kHz)
        if not match or values.shape[0] < 2 or (not said and _sample_indices(values[:, k])):
            continue
        step = (values[-1, k] - values[0, k]) / (values.shape[0] - 1)
        units = [said.lower()] if said else ["s", "ms"]
        rates = [1.0 / (step * _SECONDS_PER_TIME_UNIT[unit]) if step > 0 else math.nan for unit in units]
        if any(abs(rate - fs) <= TIME_RATE_TOLERANCE * fs for rate in rates):
            continue
        given = f"{rates[0]:.4g} Hz" if rates[0] > 0 else "no rate: its times do not increase"
        raise recording_error(label, f"its {name!r} column steps {step:.6g}{' ' + said if said else ''} from row to "
                              f"row ({given}{' if in seconds' if not said and rates[0] > 0 else ''}), but the "
                              f"sampling rate given is {fs:g} Hz", "give the rate the samples were taken at (--fs), "
                              "or fix the time column")


def _sample_indices(column: np.ndarray) -> bool:
    """0, 1, 2, ... (or from any start): sample numbers, which say no rate."""
    return bool(np.all(np.diff(column) == 1.0)) and float(column[0]).is_integer()


def _csv_text(source, label: str) -> str:
    try:
        if isinstance(source, bytes | bytearray):
            data = bytes(source)
        else:
            with open(source, "rb") as stream:
                data = stream.read()
        return data.decode("utf-8-sig")  # -sig: Excel writes a byte-order mark
    except FileNotFoundError:
        raise recording_error(label, "file not found", "check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise recording_error(label, f"unreadable CSV ({one_line(exc)})", "save it as UTF-8 text") from exc


def _header(first: str, label: str) -> tuple[list[str], str]:
    delimiter = max(_DELIMITERS, key=first.count)  # the header's most frequent candidate; Europe uses ';'
    try:
        names = [cell.strip() for cell in next(csv.reader([first.strip()], delimiter=delimiter), [])]
    except csv.Error as exc:
        raise recording_error(label, f"the CSV header cannot be parsed ({one_line(exc)})", _CSV_FIX) from exc
    if not names or _is_number(names[0]):
        raise recording_error(label, "the first line is not a header of lead names", "add a header: I,II,III,...")
    return names, delimiter


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_npy(
    source: str | os.PathLike | bytes,
    fs: float,
    *,
    leads: tuple[str, ...] = LEADS,
    unit: str = "mV",
    layout: str | None = None,
    name: str | None = None,
) -> Recording:
    """A saved [len(leads), n] or [n, len(leads)] array; `layout` settles it when both sides match."""
    label = name or ("<NPY bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source))
    try:
        with io.BytesIO(source) if isinstance(source, bytes | bytearray) else open(source, "rb") as stream:
            _check_npy_header(stream, label)
            array = np.load(stream, allow_pickle=False)  # never unpickle: a .npy can carry code
    except FileNotFoundError:
        raise recording_error(label, "file not found", "check the path") from None
    except (ValueError, OSError, EOFError) as exc:
        raise recording_error(label, f"not a readable .npy array ({one_line(exc)})", "save it with numpy.save") from exc
    return read_array(array, fs, leads=leads, unit=unit, layout=layout, name=label, source_format="npy")


def _check_npy_header(stream: BinaryIO, label: str) -> None:
    """From the header alone, before numpy allocates what it declares: a shape of (12, 10**11) over 100 bytes
    of data is a damaged file, not 8.7 TiB to reserve. Leaves the stream where it was."""
    start = stream.tell()
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    data_start = stream.tell()
    count, data_bytes = math.prod(shape), stream.seek(0, io.SEEK_END) - data_start
    stream.seek(start)
    check_samples(count, label)
    if not dtype.hasobject and count * dtype.itemsize > data_bytes:
        raise recording_error(label, f"the header declares {shape} {dtype} but the file holds {data_bytes:,} bytes "
                              "of data (truncated or damaged)", "save it again with numpy.save")


def read_array(
    array: np.ndarray,
    fs: float,
    *,
    leads: tuple[str, ...] = LEADS,
    unit: str = "mV",
    layout: str | None = None,
    name: str = "<array>",
    source_format: str = "array",
) -> Recording:
    """Signals already in memory: [len(leads), n] or [n, len(leads)], in `unit`, sampled at `fs`."""
    check_fs(fs, name)
    factor = require_mv_per_unit(unit, name, "the array")
    array = np.asarray(array)
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.ndim != 2 or not numeric:
        raise recording_error(
            name, f"array is {array.dtype} with shape {array.shape}, not a 2-D numeric array", "pass [leads, samples]"
        )
    if repeated := sorted({lead for lead in leads if leads.count(lead) > 1}):  # a dict would keep the last in silence
        raise ConfigError(f"the lead order names {', '.join(repeated)} more than once; give each row's lead once")
    rows = _rows_are_leads(array.shape, len(leads), layout, name)
    data = array if rows else array.T
    signals = {lead: data[k].astype(np.float64) * factor for k, lead in enumerate(leads)}
    return Recording(signals, float(fs), source_format, [], source=name)


def _rows_are_leads(shape: tuple[int, int], n_leads: int, layout: str | None, label: str) -> bool:
    if layout is not None:
        if layout not in LAYOUTS:
            raise ConfigError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        rows = layout == "leads_first"
        if shape[0 if rows else 1] != n_leads:
            raise recording_error(
                label, f"array shape {shape} has no axis of {n_leads} leads as {layout}", "check the lead order"
            )
        return rows
    if shape[0] == n_leads and shape[1] != n_leads:
        return True
    if shape[1] == n_leads and shape[0] != n_leads:
        return False
    raise recording_error(
        label,
        f"array shape {shape} does not tell which axis holds the {n_leads} leads",
        "pass the layout (leads_first or samples_first) and the lead order",
    )
