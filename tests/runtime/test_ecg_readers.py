"""The recording readers (runtime/inputs): files written with pydicom, wfdb.wrsamp, ElementTree (HL7 aECG) and
numpy, read back; every broken file ends in one one-line InputError, never a library exception."""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from pulse_testing.assertions import one_line
from pulse_testing.ecg_files import (
    PTBXL_NAMES,
    aecg_document,
    beats,
    dicom_bytes,
    dicom_dataset,
    write_csv,
    write_dicom,
    write_npy,
    write_wfdb,
)
from pulse_testing.pages import page

from pulse_edge.errors import InputError
from pulse_edge.runtime.ecg.leads import LEADS
from pulse_edge.runtime.ecg.recording import to_twelve_lead
from pulse_edge.runtime.inputs import load_input
from pulse_edge.runtime.inputs.aecg import read_aecg
from pulse_edge.runtime.inputs.dicom import read_dicom
from pulse_edge.runtime.inputs.tabular import read_csv, read_npy
from pulse_edge.runtime.inputs.wfdb_record import read_wfdb

pytest.importorskip("pydicom", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("wfdb", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("defusedxml", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:::wfdb")  # wfdb 4.3 trips pandas 3's deprecation warnings

FS = 500
N = 10 * FS
EIGHT = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")


def twelve(rec):
    """(signals [12, n], fs) of a read recording; its notes stay on `rec`."""
    out = to_twelve_lead(rec)
    return out.signals, out.fs


def load_twelve_lead(source, **kwargs):
    """load_input's 12 leads (signals, fs) and what it says about them (notes, source, format)."""
    ecg = load_input(source, **kwargs)
    said = SimpleNamespace(notes=list(ecg.notes), source=ecg.source, source_format=ecg.kind)
    return ecg.recording.signals, ecg.recording.fs, said


@pytest.fixture
def signals():
    return beats(N, FS)


# --- DICOM ---------------------------------------------------------------------------------------

def test_twelve_lead_round_trip_within_half_a_step(tmp_path, signals):
    path = write_dicom(tmp_path / "ecg.dcm", dicom_dataset(signals, FS, sensitivity=2.5))  # 2.5 uV per count
    rec = read_dicom(path)
    assert (rec.source_format, rec.fs, list(rec.leads)) == ("dicom", 500.0, list(LEADS))
    out, fs = twelve(rec)
    assert (out.shape, out.dtype, fs) == ((12, N), np.float32, 500)
    assert np.abs(out - signals).max() <= 0.5 * 2.5e-3 + 1e-6
    assert rec.notes == []


def _padded(signals, rows: slice, vr: str = "OW"):
    """The 12-lead dataset with WaveformPaddingValue -32768 written over the samples at `rows` of every channel,
    the value stored as OW bytes (the standard's VR) or, as some carts write it, as SS or US."""
    ds = dicom_dataset(signals, FS, sensitivity=2.5)
    item = ds.WaveformSequence[0]
    raw = np.frombuffer(item.WaveformData, "<i2").reshape(-1, 12).copy()
    raw[rows] = -32768
    item.WaveformData = raw.tobytes()
    value = {"OW": np.int16(-32768).tobytes(), "SS": -32768, "US": 32768}[vr]
    item.add_new(0x5400100A, vr, value)  # WaveformPaddingValue
    return ds


@pytest.mark.parametrize("vr", ["OW", "SS", "US"])
def test_padding_after_the_recording_is_cut_off_with_a_note(tmp_path, signals, vr: str):
    """pydicom scales the padding code like a sample: -32768 at 2.5 uV per count is -81.92 mV, drawn as a plunge
    off the row. The padded tail goes, said."""
    rec = read_dicom(write_dicom(tmp_path / "tail.dcm", _padded(signals, slice(N - 20, None), vr)))
    assert rec.notes == ["cut 20 padding samples off the end"]
    assert all(len(v) == N - 20 and np.abs(v).max() < 10 for v in rec.leads.values())


def test_32_bit_samples_have_their_padding_cut_off_too(tmp_path, signals):
    """The 32-bit ECG Waveform Storage class stores SL samples: a padding code of -2**31 was drawn as a line of
    -5 million mV through every row before SL had a raw type."""
    ds = dicom_dataset(signals, FS, sop_class="1.2.840.10008.5.1.4.1.1.9.1.4")
    item = ds.WaveformSequence[0]
    raw = np.frombuffer(item.WaveformData, "<i2").reshape(-1, 12).astype("<i4")
    raw[N - 20:] = -2**31
    item.WaveformBitsAllocated, item.WaveformSampleInterpretation = 32, "SL"
    item.WaveformData = raw.tobytes()
    item.add_new(0x5400100A, "OB", np.int32(-2**31).tobytes())  # WaveformPaddingValue
    rec = read_dicom(write_dicom(tmp_path / "sl.dcm", ds))
    assert rec.notes == ["cut 20 padding samples off the end"]
    assert all(len(v) == N - 20 and np.abs(v).max() < 10 for v in rec.leads.values())


@pytest.mark.parametrize(("status", "refused", "outcome"), [
    ("TEST DATA", True, "is marked TEST DATA by the cart"), ("INVALID", True, "is marked INVALID by the cart"),
    (["OK", "UNCALIBRATED"], True, "is marked UNCALIBRATED by the cart"),
    ("DISCONNECTED", False, "left out channel 8 (V2): the cart marks it DISCONNECTED"),
    ("QUESTIONABLE", False, "channel 8 (V2) is marked QUESTIONABLE by the cart; drawn as recorded")])
def test_the_carts_channel_status_is_refused_left_out_or_said(tmp_path, signals, status, refused, outcome):
    """A cart marks its test signal, an uncalibrated or invalid channel, a loose electrode: read as a patient's
    calibrated lead before, in silence."""
    ds = dicom_dataset(signals, FS)
    ds.WaveformSequence[0].ChannelDefinitionSequence[LEADS.index("V2")].ChannelStatus = status
    path = write_dicom(tmp_path / "status.dcm", ds)
    if refused:
        one_line(rf"channel 8 \(V2\) {outcome} \(ChannelStatus\)", read_dicom, path)
        return
    rec = read_dicom(path)
    assert rec.notes == [outcome]
    assert ("V2" in rec.leads) == ("DISCONNECTED" not in status)


def test_a_status_on_a_channel_that_is_not_a_lead_refuses_nothing(tmp_path, signals):
    """A respiration channel the cart marks TEST DATA is left out as any non-lead channel is; the ECG is read."""
    ds = dicom_dataset(np.vstack([signals, signals[-1:]]), FS, (*LEADS, "V6"))
    extra = ds.WaveformSequence[0].ChannelDefinitionSequence[12]
    extra.ChannelSourceSequence[0].CodeValue, extra.ChannelSourceSequence[0].CodeMeaning = "RESP", "Respiration"
    extra.ChannelStatus = "TEST DATA"
    rec = read_dicom(write_dicom(tmp_path / "resp.dcm", ds))
    assert set(LEADS) <= set(rec.leads)


def test_a_channel_that_is_no_lead_is_left_out_whatever_its_unit(tmp_path, signals):
    """A cart's 12 leads plus respiration in Ohm (DICOM) or blood pressure in mmHg (WFDB): the whole file was
    refused for a unit that is not the ECG's."""
    import wfdb

    ds = dicom_dataset(np.vstack([signals, signals[-1:]]), FS, (*LEADS, "V6"))
    extra = ds.WaveformSequence[0].ChannelDefinitionSequence[12]
    extra.ChannelSourceSequence[0].CodeValue, extra.ChannelSourceSequence[0].CodeMeaning = "RESP", "Respiration"
    extra.ChannelSensitivityUnitsSequence[0].CodeValue = "Ohm"
    extra.ChannelSensitivityUnitsSequence[0].CodeMeaning = "ohm"
    wfdb.wrsamp("abp", fs=FS, units=[*["mV"] * 12, "mmHg"], sig_name=[*PTBXL_NAMES, "ABP"],
                p_signal=np.vstack([signals, 80 + 40 * signals[:1]]).T, fmt=["16"] * 13,
                adc_gain=[1000.0] * 12 + [100.0], baseline=[0] * 13, write_dir=str(tmp_path))
    for path, other in ((write_dicom(tmp_path / "resp.dcm", ds), "Respiration"), (tmp_path / "abp.hea", "ABP")):
        out, _, rec = load_twelve_lead(path)
        assert np.abs(out - signals).max() <= 1.25e-3 + 1e-6, path  # half a step of 2.5 uV (DICOM), 1 uV (WFDB)
        assert f"ignored channels that are not standard leads: {other!r}" in rec.notes
    # nor its gain: WFDB's mark of an uncalibrated signal, on a channel that is never drawn
    header = tmp_path / "abp.hea"
    lines = header.read_text().splitlines()
    fields = lines[13].split()
    lines[13] = " ".join([*fields[:2], "0/mmHg", *fields[3:]])
    header.write_text("\n".join(lines) + "\n")
    assert np.abs(load_twelve_lead(header)[0] - signals).max() <= 1.25e-3 + 1e-6
    # an ECG channel that is none of the 12 standard leads (MIT-BIH's modified lead II): said as such
    wfdb.wrsamp("mitdb", fs=FS, units=["mV", "mV"], sig_name=["MLII", "CM5"], p_signal=signals[:2].T, fmt=["16"] * 2,
                adc_gain=[200.0] * 2, baseline=[0] * 2, write_dir=str(tmp_path))
    one_line(r"holds none of the 12 standard leads \(its channels: 'MLII', 'CM5'\)", read_wfdb, tmp_path / "mitdb.hea")
    # a lead in a unit that is no voltage is still refused
    extra.ChannelSourceSequence[0].CodeValue, extra.ChannelSourceSequence[0].CodeMeaning = "5.6.3-9-1", "Lead I"
    one_line(r"channel 13 \(I\) is in unit 'Ohm', which is not a voltage unit", read_dicom,
             write_dicom(tmp_path / "ohm.dcm", ds))


def test_a_big_endian_file_is_refused_not_read_byte_swapped(tmp_path, signals):
    from pydicom.uid import ExplicitVRBigEndian

    ds = dicom_dataset(signals, FS)
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    path = tmp_path / "be.dcm"
    ds.save_as(path, enforce_file_format=True)
    one_line("retired Explicit VR Big Endian transfer syntax", read_dicom, path)


def test_padding_inside_the_recording_is_a_gap_named_by_its_code(tmp_path, signals):
    path = write_dicom(tmp_path / "gap.dcm", _padded(signals, slice(1000, 1100)))
    with pytest.raises(InputError, match=r"group 0: lead I has 100 samples equal to the file's WaveformPaddingValue "
                       r"\(code -32768\), which marks samples the cart did not record \(first at 2.000 s\)"):
        read_dicom(path)


def test_a_padding_code_real_samples_take_is_named_in_the_refusal(tmp_path, signals):
    """A cart that writes WaveformPaddingValue 0 has every sample at the baseline read as a gap; DICOM says the
    code marks absent samples wherever it stands, so the file is refused, and the line says which code did it
    (it said "missing or non-finite samples", and to re-export)."""
    ds = dicom_dataset(signals, FS, sensitivity=2.5)
    item = ds.WaveformSequence[0]
    raw = np.frombuffer(item.WaveformData, "<i2").reshape(-1, 12).copy()
    raw[[10, 500], 1] = 0  # lead II crosses zero twice
    raw[:, 0] = np.where(raw[:, 0] == 0, 1, raw[:, 0])  # lead I never does
    item.WaveformData = raw.tobytes()
    item.add_new(0x5400100A, "OW", np.int16(0).tobytes())
    with pytest.raises(InputError, match=r"lead II has \d+ samples equal to the file's WaveformPaddingValue \(code 0\)"
                       r".*have the cart write no padding value or one no sample takes"):
        read_dicom(write_dicom(tmp_path / "zero.dcm", ds))


def test_bytes_and_paths_read_the_same(tmp_path, signals):
    path = write_dicom(tmp_path / "ecg.dcm", dicom_dataset(signals, FS))
    from_bytes = read_dicom(path.read_bytes(), name="upload.dcm")
    assert from_bytes.source == "upload.dcm"
    for lead in LEADS:
        assert np.array_equal(from_bytes.leads[lead], read_dicom(path).leads[lead])


def test_eight_lead_file_gets_derived_limb_leads(tmp_path, signals):
    eight = signals[[LEADS.index(lead) for lead in EIGHT]]
    path = write_dicom(tmp_path / "eight.dcm", dicom_dataset(eight, FS, EIGHT))
    out, _, rec = load_twelve_lead(path)
    assert "derived III, aVR, aVL, aVF from I and II" in rec.notes
    # Derived from quantised I and II, so the error can reach 1.5 steps (aVR = -(I+II)/2 keeps 1).
    assert np.abs(out - signals).max() <= 1.5 * 2.5e-3 + 1e-6


@pytest.mark.parametrize(("unit", "sensitivity"), [("mV", 0.005), ("V", 5e-6), ("uV", 1.0)])
def test_units_are_converted_to_millivolts(tmp_path, signals, unit, sensitivity):
    path = write_dicom(tmp_path / f"{unit}.dcm", dicom_dataset(signals, FS, unit=unit, sensitivity=sensitivity))
    out, _, _ = load_twelve_lead(path)
    step_mv = sensitivity * {"mV": 1.0, "V": 1e3, "uV": 1e-3}[unit]
    assert np.abs(out - signals).max() <= 0.5 * step_mv + 1e-6


def test_every_spelling_of_a_unit_has_its_own_power_of_ten():
    from pulse_edge.runtime.ecg.units import mv_per_unit

    for spelling, mv in (("nV", 1e-6), ("nanovolts", 1e-6), ("uV", 1e-3), ("\u00b5V", 1e-3), ("\u03bcV", 1e-3),
                         ("microvolts", 1e-3), ("mV", 1.0), ("millivolt", 1.0), ("V", 1e3), ("Volts", 1e3)):
        assert mv_per_unit(spelling) == mv, spelling


def test_channel_baseline_is_added_in_physical_units(tmp_path, signals):
    # DICOM: Channel Baseline is the offset of encoded 0 in sensitivity units (pydicom >= 2.4 adds it).
    path = write_dicom(tmp_path / "base.dcm", dicom_dataset(signals, FS, baseline=40.0))
    out, _, _ = load_twelve_lead(path)
    assert np.abs(out - signals).max() <= 0.5 * 2.5e-3 + 1e-6


def test_a_twelve_lead_group_is_chosen_over_a_rhythm_strip_of_fewer_leads(tmp_path, signals):
    """A lead II strip labelled RHYTHM outranked an unlabelled 12-lead group: the file was refused for missing
    leads it holds."""
    from pydicom.sequence import Sequence

    strip = dicom_dataset(signals[1:2], FS, leads=("II",), groups=("RHYTHM",)).WaveformSequence[0]
    ds = dicom_dataset(signals, FS, groups=("ACQUISITION",))
    ds.WaveformSequence = Sequence([strip, ds.WaveformSequence[0]])
    rec = read_dicom(write_dicom(tmp_path / "strip.dcm", ds))
    assert np.abs(twelve(rec)[0] - signals).max() < 0.01
    assert rec.notes == ["used waveform group 1 'ACQUISITION'; skipped 0 'RHYTHM'"]


def test_a_dicom_written_without_its_preamble_is_read_as_one_with_it(tmp_path, signals):
    """Older exporters write the data set with no 128-byte preamble and no "DICM": pydicom reads it when forced,
    and it was refused as unknown content (an image it is not). Its first bytes tell it, not its name (a PNG named
    .dcm is read as the PNG it is); group 0008's first bytes without a VR after them are no data set."""
    import pydicom

    bare = tmp_path / "bare.dcm"
    pydicom.dcmwrite(bare, dicom_dataset(signals, FS), enforce_file_format=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    shutil.copyfile(bare, bare.with_suffix(".bin"))  # told by its first bytes, not its name
    for source in (bare, bare.with_suffix(".bin")):
        assert np.abs(load_twelve_lead(source)[0] - signals).max() < 0.01
    (tmp_path / "ecg.dcm").write_bytes((tmp_path / "bare.dcm").read_bytes()[:2] + b"\x10\x00\x01\x02" * 40)
    one_line(r"ecg\.dcm: is not an image, PDF or ECG recording", load_input, tmp_path / "ecg.dcm")  # no VR after
    page((300, 200)).save(tmp_path / "scan.dcm", format="PNG")
    assert load_input(tmp_path / "scan.dcm").kind == "image"


def test_rhythm_group_is_chosen_over_a_median_beat_listed_first(tmp_path, signals):
    path = write_dicom(tmp_path / "two.dcm", dicom_dataset(signals, FS, groups=("MEDIAN BEAT", "RHYTHM")))
    rec = read_dicom(path)
    assert rec.n_samples == N
    assert rec.notes == ["used waveform group 1 'RHYTHM'; skipped 0 'MEDIAN BEAT'"]


def test_general_ecg_sop_class_and_1000_hz(tmp_path):
    signals = beats(10_000, 1000, noise_mv=0.0)
    ds = dicom_dataset(signals, 1000, sop_class="1.2.840.10008.5.1.4.1.1.9.1.2")
    out, fs, rec = load_twelve_lead(write_dicom(tmp_path / "general.dcm", ds))
    assert (out.shape, fs) == ((12, N), 500)
    assert "resampled 1000 Hz -> 500 Hz" in rec.notes
    np.testing.assert_allclose(out, beats(N, 500, noise_mv=0.0), atol=3e-3)


def test_no_waveform_sequence(tmp_path, signals):
    ds = dicom_dataset(signals, FS)
    del ds.WaveformSequence
    path = write_dicom(tmp_path / "empty.dcm", ds)
    message = one_line("has no WaveformSequence", read_dicom, path)
    assert message.startswith(f"{path}: ")


def test_an_image_is_not_an_ecg(tmp_path, signals):
    ds = dicom_dataset(signals, FS, sop_class="1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    one_line(
        "DICOM object is a CT Image Storage, not an ECG waveform", read_dicom, write_dicom(tmp_path / "ct.dcm", ds)
    )


def test_not_dicom_at_all(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("hello\nworld\n")
    one_line(r"not a DICOM file \(no DICM header\)", read_dicom, path)


def test_missing_file_dicom(tmp_path):
    one_line("file not found", read_dicom, tmp_path / "nope.dcm")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_files_dicom(tmp_path, signals, keep):
    data = write_dicom(tmp_path / "full.dcm", dicom_dataset(signals, FS)).read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    # the reason after the name: "truncated" alone would match this test's own temporary folder
    one_line(r"cut\.dcm: WaveformData of group 0 holds \d+ bytes but needs 120000 \(truncated file\)", read_dicom, cut)


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the cut UIDs
def test_truncation_anywhere_gives_one_line_errors(signals):
    data = dicom_bytes(dicom_dataset(signals[:, :1500], FS))
    for end in range(0, len(data), 97):
        one_line(".", read_dicom, data[:end])


def test_unknown_unit_dicom(tmp_path, signals):
    ds = dicom_dataset(signals, FS)
    ds.WaveformSequence[0].ChannelDefinitionSequence[4].ChannelSensitivityUnitsSequence[0].CodeValue = "mm[Hg]"
    one_line(r"channel 5 \(aVL\) is in unit 'mm\[Hg\]'", read_dicom, write_dicom(tmp_path / "unit.dcm", ds))


def test_missing_sensitivity(tmp_path, signals):
    ds = dicom_dataset(signals, FS)
    del ds.WaveformSequence[0].ChannelDefinitionSequence[0].ChannelSensitivity
    one_line(r"channel 1 \(I\) has no ChannelSensitivity", read_dicom, write_dicom(tmp_path / "sens.dcm", ds))


def test_mu_law_samples_are_refused(tmp_path, signals):
    ds = dicom_dataset(signals, FS)
    ds.WaveformSequence[0].WaveformSampleInterpretation = "MB"
    one_line("mu-law/A-law", read_dicom, write_dicom(tmp_path / "mulaw.dcm", ds))




def test_missing_unit_dicom(tmp_path, signals):
    ds = dicom_dataset(signals, FS)
    del ds.WaveformSequence[0].ChannelDefinitionSequence[6].ChannelSensitivityUnitsSequence
    one_line(r"channel 7 \(V1\) has no unit", read_dicom, write_dicom(tmp_path / "nounit.dcm", ds))

# --- WFDB ----------------------------------------------------------------------------------------

def test_ptbxl_like_record_round_trips_within_half_a_microvolt(tmp_path):
    signals = beats(N, 500)
    header = write_wfdb(tmp_path, "00001_hr", signals, 500)
    rec = read_wfdb(header)
    assert (rec.source_format, rec.fs, list(rec.leads)) == ("wfdb", 500.0, list(PTBXL_NAMES))
    out, fs = twelve(rec)
    assert fs == 500 and rec.notes == []
    assert np.abs(out - signals).max() <= 0.5e-3 + 1e-6  # 1000 adu/mV: 1 uV steps


@pytest.mark.parametrize("suffix", ["", ".hea", ".dat"])
def test_record_can_be_named_by_header_signal_file_or_bare_name(tmp_path, suffix):
    write_wfdb(tmp_path, "rec", beats(N, 500), 500)
    assert read_wfdb(tmp_path / f"rec{suffix}").n_samples == N


def test_1000_hz_record_is_resampled(tmp_path):
    signals = beats(10_000, 1000, noise_mv=0.0)
    out, fs, rec = load_twelve_lead(write_wfdb(tmp_path, "fast", signals, 1000))
    assert (out.shape, fs, rec.notes) == ((12, N), 500, ["resampled 1000 Hz -> 500 Hz"])
    np.testing.assert_allclose(out, beats(N, 500, noise_mv=0.0), atol=3e-3)


def test_microvolt_record_is_converted(tmp_path):
    signals = beats(N, 500)
    out, _, _ = load_twelve_lead(write_wfdb(tmp_path, "uv", signals, 500, units="uV"))
    assert np.abs(out - signals).max() <= 0.5e-3 + 1e-6


def test_invalid_samples_come_back_as_nan_and_are_refused(tmp_path):
    signals = beats(N, 500)
    signals[7, 100:110] = np.nan  # wrsamp stores NaN as the format's invalid value (-32768)
    rec = read_wfdb(write_wfdb(tmp_path, "gap", signals, 500))
    one_line(r"lead V2 has 10 missing or non-finite samples \(first at 0.200 s\)", to_twelve_lead, rec)


def test_unknown_unit_wfdb(tmp_path):
    path = write_wfdb(tmp_path, "nu", beats(N, 500), 500)
    text = path.read_text().replace("/mV", "/NU", 1)
    path.write_text(text)
    one_line(r"signal 1 \(I\) is in unit 'NU'", read_wfdb, path)


def test_missing_header(tmp_path):
    one_line("no WFDB header nope.hea", read_wfdb, tmp_path / "nope.dat")


def test_truncated_signal_file(tmp_path):
    path = write_wfdb(tmp_path, "cut", beats(N, 500), 500)
    dat = tmp_path / "cut.dat"
    dat.write_bytes(dat.read_bytes()[:30_000])
    one_line(r"corrupt or truncated WFDB record", read_wfdb, path)


def test_garbled_header(tmp_path):
    path = write_wfdb(tmp_path, "bad", beats(N, 500), 500)
    path.write_text("bad twelve five-hundred\n")
    one_line(r"corrupt or truncated WFDB record", read_wfdb, path)


def _record_line(path: Path, edit) -> Path:
    lines = path.read_text().splitlines()
    lines[0] = " ".join(edit(lines[0].split()))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_record_read_under_a_name_is_called_by_it_in_its_errors_and_result(tmp_path, signals):
    """The server writes an uploaded record's two files into a temporary folder: its errors named that deleted
    folder ("/tmp/pulse-edge-wfdb-x/rec.hea: ..."), not the client's files, as every other reader's do."""
    path = write_wfdb(tmp_path, "rec", signals, FS)
    assert load_input(path, name="rec.hea + rec.dat").source == "rec.hea + rec.dat"
    _record_line(path, lambda f: [*f[:2], "abc", *f[3:]])
    one_line(r"^rec\.hea \+ rec\.dat: the header's sampling frequency 'abc'", load_input, path,
             name="rec.hea + rec.dat")


@pytest.mark.parametrize("fs", ["-500", "nan", "five"])
def test_a_sampling_frequency_wfdb_cannot_parse_is_refused_not_taken_as_250(tmp_path, fs: str):
    """wfdb falls back to 250 Hz for a frequency its header regex cannot read: a 500 Hz record would be drawn at
    half speed (the rate halved) with no error."""
    path = _record_line(write_wfdb(tmp_path, "odd", beats(N, 500), 500), lambda f: [*f[:2], fs, *f[3:]])
    one_line(rf"the header's sampling frequency '{fs}' is not a positive number", read_wfdb, path)


@pytest.mark.parametrize("gain", ["0", None])
def test_a_signal_without_an_adc_gain_is_refused_not_read_at_wfdbs_200(tmp_path, signals, gain):
    """WFDB marks an uncalibrated signal with gain 0 (or none); wfdb reads it at 200 units per mV, which drew a
    1000-per-mV lead 5x too large, with no note."""
    header = write_wfdb(tmp_path, "g", signals, FS)
    lines = header.read_text().splitlines()
    fields = lines[3].split()  # signal 3 (III)
    lines[3] = " ".join([*fields[:2], "0/mV", *fields[3:]] if gain == "0" else fields[:2])
    header.write_text("\n".join(lines) + "\n")
    # with no gain written, the line ends there: no description, so no name
    one_line(r"signal 3( \(III\))? has no ADC gain in the header \((0|none written)\): WFDB's mark of an uncalibrated",
             read_wfdb, header)


def _two_segments(folder: Path, signals: np.ndarray) -> Path:
    """A fixed-layout multi-segment record: the master header names two segments, each a record of its own."""
    half = signals.shape[1] // 2
    for name, part in (("s1", signals[:, :half]), ("s2", signals[:, half:])):
        write_wfdb(folder, name, part, FS)
    master = folder / "multi.hea"
    master.write_text(f"multi/2 12 {FS} {signals.shape[1]}\ns1 {half}\ns2 {signals.shape[1] - half}\n")
    return master


@pytest.mark.parametrize("gain", ["0", None])
def test_a_segment_without_an_adc_gain_is_refused_as_a_record_is(tmp_path, signals, gain):
    """Only a single-segment header's gains were checked: a multi-segment record whose second segment wrote none
    drew its last 5 s (V1-V6 and half the rhythm strip) 5x too large, with no note."""
    master = _two_segments(tmp_path, signals)
    out, _, _ = load_twelve_lead(master)
    assert np.abs(out - signals).max() <= 0.5e-3 + 1e-6  # whole, both segments at their own gain
    header = tmp_path / "s2.hea"
    lines = header.read_text().splitlines()
    fields = lines[3].split()  # signal 3 (III)
    lines[3] = " ".join([*fields[:2], "0/mV", *fields[3:]] if gain == "0" else fields[:2])
    header.write_text("\n".join(lines) + "\n")
    one_line(r"multi\.hea \(segment s2\): signal 3( \(III\))? has no ADC gain in the header", read_wfdb, master)
    master.write_text(f"multi/2 12 {FS} {N}\nsub/s1 {N // 2}\ns2 {N // 2}\n")  # a name no file beside it can have
    one_line("corrupt or truncated WFDB record", read_wfdb, master)  # wfdb's header parser refuses it first


def _segment(folder: Path, name: str, signals: np.ndarray, order: list[int], unit: str) -> None:
    import wfdb

    per_unit = {"uV": 1e-3, "mV": 1.0}[unit]
    wfdb.wrsamp(name, fs=FS, units=[unit] * 12, sig_name=[LEADS[k] for k in order], fmt=["16"] * 12,
                p_signal=(signals[order] / per_unit).T, adc_gain=[1000 * per_unit] * 12, baseline=[0] * 12,
                write_dir=str(folder))


@pytest.mark.parametrize(("second", "words"), [
    ("mV", "segment b writes I in mV, segment a in uV: wfdb reads every segment in the first one's units"),
    ("order", "segment b lists its signals as I, II, III, aVR, aVL, aVF, V6, V5, V4, V3, V2, V1, segment a as I, "
              "II, III, aVR, aVL, aVF, V1, V2, V3, V4, V5, V6: wfdb stacks them by position")], ids=["units", "order"])
@pytest.mark.parametrize("layout", [False, True], ids=["fixed layout", "variable layout"])
def test_segments_in_other_units_or_another_lead_order_are_refused_not_drawn_wrong(tmp_path, signals, second,
                                                                                     words, layout):
    """wfdb reads every segment in the first one's units and, in a fixed layout, stacks its signals by position
    under the first one's names: a segment in mV after one in uV was drawn 1000x too small (flat V1-V6 and half the
    rhythm strip), one listing V6..V1 swapped them, in silence; a variable layout's segments in other units crashed
    (wfdb drops the record's units)."""
    half, flipped = N // 2, [0, 1, 2, 3, 4, 5, 11, 10, 9, 8, 7, 6]
    _segment(tmp_path, "a", signals[:, :half], list(range(12)), "uV")
    _segment(tmp_path, "b", signals[:, half:], flipped if second == "order" else list(range(12)),
             "uV" if second == "order" else "mV")
    if layout:  # the layout segment lists the signals (0 samples): wfdb maps each segment's by name
        lines = "".join(f"~ 0 1/uV 16 0 0 0 0 {lead}\n" for lead in LEADS)
        (tmp_path / "lay.hea").write_text(f"lay 12 {FS} 0\n{lines}")
    master = tmp_path / "multi.hea"
    master.write_text(f"multi/{2 + layout} 12 {FS} {N}\n{'lay 0' + chr(10) if layout else ''}a {half}\nb {half}\n")
    if layout and second == "order":  # by name: read whole
        assert np.abs(load_twelve_lead(master)[0] - signals).max() <= 0.5e-3 + 1e-6
        return
    one_line(words, read_wfdb, master)


def test_a_segment_that_leaves_out_its_names_and_units_is_read_as_the_first_one_says(tmp_path, signals):
    """A signal's description and unit are optional in a header (no unit is mV): a fixed layout's later segment
    without them is read by wfdb under the first one's names, and was refused as another lead order."""
    half = N // 2
    _segment(tmp_path, "a", signals[:, :half], list(range(12)), "mV")
    _segment(tmp_path, "b", signals[:, half:], list(range(12)), "mV")
    header = tmp_path / "b.hea"
    lines = header.read_text().splitlines()
    header.write_text("\n".join([lines[0], *(" ".join([*f.split()[:2], f.split()[2].split("/")[0], *f.split()[3:8]])
                                              for f in lines[1:13])]) + "\n")
    master = tmp_path / "multi.hea"
    master.write_text(f"multi/2 12 {FS} {N}\na {half}\nb {half}\n")
    assert np.abs(load_twelve_lead(master)[0] - signals).max() <= 0.5e-3 + 1e-6


def test_a_variable_layout_whose_other_signals_differ_in_units_is_one_line_not_a_crash(tmp_path, signals):
    """wfdb drops every unit of a variable-layout record whose segments disagree on any signal's, a respiration
    channel's "Ohm" against "ohm" included: a TypeError traceback, exit 1."""
    import wfdb

    half, names = N // 2, [*LEADS, "RESP"]
    for name, part, resp in (("a", signals[:, :half], "Ohm"), ("b", signals[:, half:], "ohm")):
        wfdb.wrsamp(name, fs=FS, units=["mV"] * 12 + [resp], sig_name=names, fmt=["16"] * 13,
                    p_signal=np.vstack([part, np.zeros((1, half))]).T, adc_gain=[1000] * 13, baseline=[0] * 13,
                    write_dir=str(tmp_path))
    (tmp_path / "lay.hea").write_text(f"lay 13 {FS} 0\n" + "".join(f"~ 0 1000 16 0 0 0 0 {n}\n" for n in names))
    master = tmp_path / "multi.hea"
    master.write_text(f"multi/3 13 {FS} {N}\nlay 0\na {half}\nb {half}\n")
    one_line("its segments write their signals in different units, so wfdb reads none", read_wfdb, master)


def test_signals_without_names_are_named_as_the_headers_fault(tmp_path, signals):
    """It read "missing I ... V6: no limb lead was recorded", blaming the leads for what the header left out."""
    header = write_wfdb(tmp_path, "anon", signals, FS)
    lines = header.read_text().splitlines()
    lines[1:13] = [" ".join(line.split()[:-1]) for line in lines[1:13]]  # each signal line without its name
    header.write_text("\n".join(lines) + "\n")
    one_line("signal 1 has no name in the header", read_wfdb, header)


def test_a_header_without_a_frequency_says_it_assumes_wfdbs_default(tmp_path):
    path = _record_line(write_wfdb(tmp_path, "nofs", beats(N, 250), 250), lambda f: f[:2])
    assert "WFDB's default 250 Hz is assumed" in " ".join(read_wfdb(path).notes)


def test_an_absurd_declared_length_is_refused_before_anything_is_allocated(tmp_path):
    path = _record_line(write_wfdb(tmp_path, "huge", beats(N, 500), 500), lambda f: [*f[:3], "1000000000000"])
    one_line(r"holds 12,000,000,000,000 samples, more than the", read_wfdb, path)


def test_header_sampling_rate_is_checked(tmp_path):
    path = write_wfdb(tmp_path, "slow", beats(N, 500), 500)
    lines = path.read_text().splitlines()
    lines[0] = lines[0].replace(" 500 ", " 20 ")
    path.write_text("\n".join(lines) + "\n")
    one_line("sampling rate 20 Hz is outside", read_wfdb, path)


def test_lead_order_in_file_does_not_matter(tmp_path):
    signals = beats(N, 500)
    order = [11, 0, 5, 1, 3, 2, 4, 6, 7, 8, 9, 10]
    import wfdb

    wfdb.wrsamp(
        "shuffled",
        fs=500,
        units=["mV"] * 12,
        sig_name=[PTBXL_NAMES[k] for k in order],
        p_signal=signals[order].T,
        fmt=["16"] * 12,
        adc_gain=[1000.0] * 12,
        baseline=[0] * 12,
        write_dir=str(tmp_path),
    )
    out, _, _ = load_twelve_lead(tmp_path / "shuffled.hea")
    assert np.abs(out - signals).max() <= 0.5e-3 + 1e-6
    assert LEADS[0] == "I"

# --- HL7 aECG ------------------------------------------------------------------------------------

def test_round_trip_within_half_a_scale_step(tmp_path, signals):
    path = tmp_path / "ecg.xml"
    path.write_bytes(aecg_document(signals, FS, scale_uv=5.0))
    rec = read_aecg(path)
    assert (rec.source_format, rec.fs) == ("hl7-aecg", 500.0)
    assert list(rec.leads) == [f"MDC_ECG_LEAD_{lead.upper()}" for lead in LEADS]
    out, fs = twelve(rec)
    assert fs == 500 and np.abs(out - signals).max() <= 0.5 * 5e-3 + 1e-6
    assert rec.n_samples == N  # the representative beat (a derivedSeries listed first) was skipped


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_an_aecg_written_as_utf16_is_read_as_its_utf8_twin(tmp_path, signals, encoding):
    """Refused as "unknown content" before, though the parser reads UTF-16 by its byte-order mark."""
    text = aecg_document(signals, FS).decode().replace("encoding='utf-8'", "encoding='UTF-16'")
    bom = b"\xff\xfe" if encoding.endswith("le") else b"\xfe\xff"
    path = tmp_path / "ecg16.xml"
    path.write_bytes(bom + text.encode(encoding))
    ecg = load_input(path)
    assert ecg.kind == "hl7-aecg"
    utf8 = load_input(aecg_document(signals, FS), name="ecg8.xml")
    assert np.array_equal(ecg.recording.signals, utf8.recording.signals)


def test_origin_and_relative_time(signals):
    doc = aecg_document(signals, FS, origin_uv=-250.0, scale_uv=2.5, time_code="TIME_RELATIVE")
    out, _, rec = load_twelve_lead(doc, name="relative.xml")
    assert rec.source == "relative.xml"
    assert np.abs(out - signals).max() <= 0.5 * 2.5e-3 + 1e-6


def test_eight_leads_get_derived_limb_leads(signals):
    eight = signals[[LEADS.index(lead) for lead in EIGHT]]
    out, _, rec = load_twelve_lead(aecg_document(eight, FS, EIGHT))
    assert "derived III, aVR, aVL, aVF from I and II" in rec.notes
    assert np.abs(out - signals).max() <= 1.5 * 5e-3 + 1e-6


def test_250_hz_increment_is_resampled(signals):
    slow = beats(2500, 250, noise_mv=0.0)
    out, fs, rec = load_twelve_lead(aecg_document(slow, 250, scale_uv=1.0))
    assert (out.shape, fs, rec.notes) == ((12, N), 500, ["resampled 250 Hz -> 500 Hz"])


@pytest.mark.parametrize(("value", "unit"), [("4", "ms"), ("4000", "us")])
def test_an_increment_in_milli_or_microseconds_is_read_at_its_rate(signals, value, unit):
    """The time step in its own unit: 4 ms or 4000 us is 250 Hz (a wrong factor reads another rate)."""
    slow = beats(2500, 250, noise_mv=0.0)
    doc = aecg_document(slow, 250, scale_uv=1.0).replace(b'value="0.004" unit="s"', f'value="{value}" unit="{unit}"'
                                                         .encode())
    out, fs, rec = load_twelve_lead(doc)
    assert (out.shape, fs, rec.notes) == ((12, N), 500, ["resampled 250 Hz -> 500 Hz"])


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<AnnotatedECG xmlns="urn:hl7-org:v3">&lol2;</AnnotatedECG>"""
EXTERNAL_ENTITY = b"""<?xml version="1.0"?>
<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<AnnotatedECG xmlns="urn:hl7-org:v3">&x;</AnnotatedECG>"""


@pytest.mark.parametrize("document", [BILLION_LAUGHS, EXTERNAL_ENTITY])
def test_dtds_and_entities_are_refused(document):
    one_line(r"XML uses a forbidden construct \(DTDForbidden\)", read_aecg, document, name="evil.xml")


def test_not_xml(tmp_path):
    path = tmp_path / "ecg.xml"
    path.write_bytes(b"\x00\x01 binary junk")
    one_line("not well-formed XML", read_aecg, path)


def test_truncated_document(signals):
    doc = aecg_document(signals, FS)
    one_line("not well-formed XML, corrupt or truncated", read_aecg, doc[: len(doc) // 2])


def test_other_xml_is_not_an_aecg():
    one_line("XML root is 'svg', not an HL7 AnnotatedECG", read_aecg, b"<svg/>")


def test_unknown_unit_hl7(signals):
    doc = aecg_document(signals, FS, median_first=False).replace(b'unit="uV"', b'unit="mmHg"', 1)
    one_line("the origin of lead MDC_ECG_LEAD_I is in unit 'mmHg'", read_aecg, doc)


def test_a_series_with_timing_but_no_leads_is_one_line(signals):
    doc = aecg_document(signals, FS, median_first=False).replace(b'code="MDC_ECG_LEAD_', b'label="MDC_ECG_LEAD_')
    one_line(r"the rhythm series holds no lead sequences", read_aecg, doc)


def test_missing_increment(signals):
    doc = aecg_document(signals, FS, median_first=False)
    start = doc.index(b"<increment")
    doc = doc[:start] + doc[doc.index(b"/>", start) + 2 :]
    one_line(r"time sequence has no <increment>", read_aecg, doc)


@pytest.mark.parametrize("increment", [b"1e-320", b"1e-9", b"0", b"-0.002", b"nan"])
def test_an_absurd_increment_is_one_line(signals, increment: bytes):
    """A sample interval whose rate is infinite (1e-320 s), too high, zero, negative or NaN: the file's fault."""
    doc = aecg_document(signals, FS, median_first=False)
    start = doc.index(b'value="', doc.index(b"<increment")) + len(b'value="')
    doc = doc[:start] + increment + doc[doc.index(b'"', start):]
    one_line(r"sampling rate .* Hz is outside|time increment .* is not positive", read_aecg, doc)


def test_garbage_digits(signals):
    doc = aecg_document(signals, FS, median_first=False).replace(b"<digits>", b"<digits>12 abc ", 1)
    one_line("digits of lead MDC_ECG_LEAD_I contain something that is not a number", read_aecg, doc)


def test_hl7_a_second_sequence_of_a_lead_is_said_and_one_of_no_lead_is_left_out(tmp_path, signals):
    """A V1 sequence before the real one won in silence (twice as tall here), where every other reader says "kept the
    first"; a respiration sequence in Ohm refused the whole file for a unit that is not the ECG's."""
    import copy
    import xml.etree.ElementTree as ET

    ns = {"h": "urn:hl7-org:v3"}
    root = ET.fromstring(aecg_document(signals, FS, median_first=False))
    sequence_set = root.find("h:component/h:series/h:component/h:sequenceSet", ns)
    components = sequence_set.findall("h:component", ns)
    v1 = components[1 + LEADS.index("V1")]
    twin = copy.deepcopy(v1)
    twin.find("h:sequence/h:value/h:scale", ns).set("value", "10")
    resp = copy.deepcopy(v1)
    resp.find("h:sequence/h:code", ns).set("code", "MDC_RESP")
    for part in ("origin", "scale"):
        resp.find(f"h:sequence/h:value/h:{part}", ns).set("unit", "Ohm")
    for k, extra in enumerate((twin, resp)):
        sequence_set.insert(list(sequence_set).index(v1) + k, extra)
    rec = read_aecg(ET.tostring(root), name="twice.xml")
    assert "lead MDC_ECG_LEAD_V1 has a second sequence in one sequenceSet; kept the first" in rec.notes
    out, _ = twelve(rec)
    assert np.abs(out[LEADS.index("V1")] - 2 * signals[LEADS.index("V1")]).max() <= 5e-3 + 1e-6  # the first
    assert "ignored channels that are not standard leads: 'MDC_RESP'" in rec.notes


def test_missing_file_hl7(tmp_path):
    one_line("file not found", read_aecg, tmp_path / "nope.xml")

# --- CSV, NPY and format detection ---------------------------------------------------------------

def test_csv_round_trip(tmp_path, signals):
    path = write_csv(tmp_path / "ecg.csv", signals, LEADS)
    out, fs, rec = load_twelve_lead(path, fs=FS)
    assert (rec.source_format, fs) == ("csv", 500)
    assert np.abs(out - signals).max() <= 0.5e-6 + 1e-7  # written with 6 decimals


def test_csv_with_semicolons_iec_names_microvolts_and_a_time_column(tmp_path, signals):
    header = ("time", "DI", "DII", "DIII", "aVR", "aVL", "aVF", "C1", "C2", "C3", "C4", "C5", "C6")
    table = np.vstack([np.arange(N) / FS, signals * 1000.0])
    path = write_csv(tmp_path / "ecg.csv", table, header, delimiter=";")
    out, _, rec = load_twelve_lead(path, fs=FS, unit="uV")
    assert np.abs(out - signals).max() <= 1e-6
    assert "ignored channels that are not standard leads: 'time'" in rec.notes


def test_csv_with_lead_hyphen_names_is_drawn_upright(tmp_path, signals):
    """"Lead-II": the hyphen joins a word to the name. Read as a minus sign, every lead was inverted "back" and the
    whole print drawn upside down, with notes calling it a correction."""
    path = write_csv(tmp_path / "ecg.csv", signals, tuple(f"Lead-{lead}" for lead in LEADS))
    out, _, rec = load_twelve_lead(path, fs=FS)
    assert np.abs(out - signals).max() <= 1e-6
    assert not any("invert" in note for note in rec.notes)


@pytest.mark.parametrize(("column", "times", "fs", "refused"), [
    ("time", np.arange(N) / 250, 500, r"its .time. column steps 0.004 from row to row \(250 Hz if in seconds\), but "
                                      "the sampling rate given is 500 Hz"),
    ("Time (ms)", np.arange(N) * 4.0, 500, r"its 'Time \(ms\)' column steps 4 ms from row to row \(250 Hz\)"),
    ("time", np.zeros(N), 500, "no rate: its times do not increase"),
    # not time: sample numbers, or a name that says nothing (the file was read before; it still is)
    ("t", np.arange(N, dtype=float), 500, None), ("time", np.arange(N, dtype=float) + 1, 500, None),
    ("s", np.arange(N) / 250, 500, None),
    ("time_ms", np.arange(N, dtype=float), 500, r"steps 1 ms from row to row \(1000 Hz\)"),  # not sample numbers
    ("time", np.arange(N) / 500, 500, None),
    ("time_ms", np.arange(N) * 2.0, 500, None),
    ("Time", np.arange(N) * 2.0, 500, None),  # no unit said: milliseconds fit
    ("time (s)", np.round(np.arange(N) / 360, 3), 360, None),  # stamps rounded to 1 ms: 7% off step by step
])
def test_a_csv_time_column_that_contradicts_the_given_rate_is_refused(tmp_path, signals, column, times, fs, refused):
    """The time column was dropped unread: 250 Hz samples read at --fs 500 were drawn as 5 s at twice the heart
    rate, with no word."""
    path = write_csv(tmp_path / "ecg.csv", np.vstack([times, signals]), (column, *LEADS))
    if refused:
        one_line(refused, read_csv, path, fs)
    else:
        assert read_csv(path, fs).fs == fs


def test_csv_with_a_repeated_column_keeps_the_first_and_says_so(tmp_path, signals):
    table = np.vstack([signals, signals[:1] * 0.0])  # a 13th column named I again, all zeros
    rec = read_csv(write_csv(tmp_path / "ecg.csv", table, (*LEADS, "I")), FS)
    assert rec.notes == ["column 13 repeats 'I'; kept the first"]
    assert np.abs(rec.leads["I"] - signals[0]).max() <= 1e-6


def test_csv_with_classic_mac_line_ends_reads_like_any_other(tmp_path, signals):
    """CR-only line ends: the csv module raised its own error, a traceback from infer and a 500 from the server."""
    path = write_csv(tmp_path / "ecg.csv", signals, LEADS)
    mac = tmp_path / "mac.csv"
    mac.write_bytes(path.read_bytes().replace(b"\n", b"\r"))
    assert np.array_equal(read_csv(mac, FS).leads["V3"], read_csv(path, FS).leads["V3"])


def test_a_long_csv_is_parsed_only_as_far_as_the_print_reads_and_says_how_long_it_was(tmp_path):
    """numpy holds ~7x a CSV's bytes while it parses: a minute of 12 leads is parsed for its first 11 s, and the
    print still says the recording's whole length."""
    path = write_csv(tmp_path / "long.csv", beats(60 * FS, FS), LEADS)
    rec = read_csv(path, FS)
    assert rec.n_samples == 11 * FS and rec.recorded_s == pytest.approx(60.0)
    assert "the print shows the first 10 s of 60.00 s" in load_input(path, fs=FS).notes


def test_blank_lines_and_doubled_line_ends_are_not_counted_as_samples(tmp_path):
    """Windows' csv.writer without newline='' writes "\\r\\r\\n": counted as two lines each, a 6 s recording was
    said to last 12 s and its "under the print's 10 s" note went missing."""
    path = write_csv(tmp_path / "six.csv", beats(6 * FS, FS), LEADS)
    doubled = tmp_path / "doubled.csv"
    doubled.write_bytes(path.read_bytes().replace(b"\n", b"\r\r\n") + b"\r\n\r\n")
    rec = read_csv(doubled, FS)
    assert rec.n_samples == 6 * FS and rec.recorded_s is None
    assert any("lasts 6.00 s, under the print's 10 s" in n for n in load_input(doubled, fs=FS).notes)


def test_a_header_only_csv_is_one_line_and_no_numpy_warning(tmp_path):
    import warnings

    path = tmp_path / "empty.csv"
    path.write_text(",".join(LEADS) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_line("the CSV has a header but no rows of samples", read_csv, path, FS)


def test_a_lead_named_twice_in_the_order_is_refused_not_overwritten(signals):
    """A dict kept the last row of a repeated name in silence: V1 drawn from another row."""
    from pulse_edge.errors import ConfigError
    from pulse_edge.runtime.inputs.tabular import read_array

    with pytest.raises(ConfigError, match="the lead order names V1 more than once"):
        read_array(np.vstack([signals, signals[:1]]), FS, leads=(*LEADS, "V1"))


def test_an_npz_archive_is_told_to_be_saved_as_one_array(tmp_path, signals):
    path = tmp_path / "ecg.npz"
    np.savez(path, signals=signals)
    one_line(r"numpy's \.npz.*save one signal array with numpy\.save \(\.npy\)", load_input, path)


def test_csv_without_header(tmp_path, signals):
    path = tmp_path / "bare.csv"
    np.savetxt(path, signals.T, delimiter=",")
    one_line("the first line is not a header of lead names", read_csv, path, FS)


def test_csv_with_text_in_rows(tmp_path, signals):
    path = write_csv(tmp_path / "ecg.csv", signals, LEADS)
    path.write_text(path.read_text().replace("\n", "\n1,2,oops,4,5,6,7,8,9,10,11,12\n", 1))
    one_line("CSV rows are not all numbers", read_csv, path, FS)


@pytest.mark.parametrize("transpose", [False, True])
def test_npy_in_either_orientation(tmp_path, signals, transpose):
    array = (signals.T if transpose else signals).astype(np.float32)
    out, _, rec = load_twelve_lead(write_npy(tmp_path / "ecg.npy", array), fs=FS)
    assert rec.source_format == "npy"
    np.testing.assert_array_equal(out, signals.astype(np.float32))


def test_npy_with_caller_lead_order(tmp_path, signals):
    order = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    eight = signals[[LEADS.index(lead) for lead in order]]
    rec = read_npy(write_npy(tmp_path / "eight.npy", eight), FS, leads=order)
    assert list(rec.leads) == list(order)


def test_the_api_takes_the_lead_order_as_the_cli_spells_it_too(tmp_path, signals):
    """load_input(leads="I,II,V1,...") read the string letter by letter ("the lead order names ,, I, V, a more
    than once")."""
    order = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")
    eight = signals[[LEADS.index(lead) for lead in order]]
    path = write_npy(tmp_path / "eight.npy", eight)
    spelled = load_input(path, fs=FS, leads="I, II,V1,V2,V3,V4,V5,V6")
    np.testing.assert_array_equal(np.asarray(spelled.image), np.asarray(load_input(path, fs=FS, leads=order).image))


def test_npy_square_array_is_ambiguous(tmp_path):
    one_line(
        "does not tell which axis holds the 12 leads", read_npy, write_npy(tmp_path / "sq.npy", np.zeros((12, 12))), FS
    )


@pytest.mark.parametrize(("shape", "message"), [
    ("(12, 100000000000)", r"holds 1,200,000,000,000 samples, more than the"),
    (f"(12, {10**30})", r"holds 12(,000){10} samples"),  # numpy itself overflows a C long on it
    ("(12, 5000)", r"header declares \(12, 5000\) float64 but the file holds 100 bytes of data")])
def test_an_npy_header_is_checked_before_numpy_allocates_it(shape: str, message: str):
    header = "{'descr': '<f8', 'fortran_order': False, 'shape': " + shape + ", }"
    header += " " * (118 - len(header)) + "\n"
    data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode() + b"\0" * 100
    one_line(message, read_npy, data, FS)


def test_npy_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "obj.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    one_line("not a readable .npy array", read_npy, path, FS)


def test_formats_are_told_by_content_not_by_a_misleading_suffix(tmp_path, signals):
    dicom = write_dicom(tmp_path / "exam", dicom_dataset(signals, FS))  # no suffix: sniffed
    disguised = write_dicom(tmp_path / "exam.png", dicom_dataset(signals, FS))  # renamed exports happen
    xml = tmp_path / "exam.xml"
    xml.write_bytes(aecg_document(signals, FS))
    header = write_wfdb(tmp_path, "rec", signals, FS)
    cases = {dicom: "dicom", disguised: "dicom", xml: "hl7-aecg", header: "wfdb", tmp_path / "rec": "wfdb",
             tmp_path / "rec.dat": "wfdb"}
    for source, kind in cases.items():
        ecg = load_input(source)
        assert (ecg.kind, ecg.recording.signals.shape, ecg.image.size) == (kind, (12, N), (2200, 1700)), source
    assert load_input(dicom.read_bytes(), name="upload.dcm").kind == "dicom"
    assert load_input(xml.read_bytes()).kind == "hl7-aecg"


def test_arrays_images_and_missing_rates(tmp_path, signals):
    assert load_input(signals, fs=FS).kind == "array"
    assert load_input(signals.T, fs=FS, name="cart.npy").source == "cart.npy"
    pixels = np.full((300, 400, 3), 255, dtype=np.uint8)
    pixels[150] = 0  # a trace: a page of one colour is refused as blank
    assert load_input(pixels).kind == "image" and load_input(pixels).image.size == (400, 300)
    one_line(r"<array>: a signal array needs its sampling rate; pass fs=", load_input, signals)
    for odd in (pixels.astype(np.float32), pixels.astype(np.uint16), pixels[..., :2]):  # pixels, not 8-bit RGB
        one_line(r"a 3-D array is read as an image, which must be uint8 \[height, width, 3 or 4\]", load_input, odd,
                 fs=FS)
    path = write_csv(tmp_path / "ecg.csv", signals, LEADS)
    one_line(r"ecg.csv: a CSV file stores no sampling rate; pass it \(--fs HZ", load_input, path)
    one_line(r"a WFDB record is a .hea header and its signal files; pass its path", load_input,
             write_wfdb(tmp_path, "r", signals, FS).read_bytes(), name="r.hea")


def test_unknown_content_lists_images_and_recordings(tmp_path):
    path = tmp_path / "notes.bin"
    path.write_bytes(b"Sinus rhythm, rate 72.\n")
    one_line("unknown content.*PNG.*DICOM, WFDB", load_input, path)
    one_line("is a GIF image", load_input, b"GIF89a" + b"\0" * 64, name="x.gif")
    one_line("does not exist", load_input, tmp_path / "nope.dcm")
    one_line("is a directory", load_input, tmp_path)
    for root in ("/", "."):  # a name with no suffix at all: pathlib's with_suffix raised a bare ValueError
        one_line(rf"^{re.escape(root)}: is a directory", load_input, root)
    one_line("^an empty path names no ECG file", load_input, "")  # an unset variable in the cart's software


def test_the_print_says_what_it_shows(signals):
    short = load_input(beats(6 * FS, FS), fs=FS)
    assert short.notes == ("the recording lasts 6.00 s, under the print's 10 s: every column shows its first "
                           "2.5 s and the rhythm strip stops at 6.00 s",)
    most = load_input(beats(round(9.6 * FS), FS), fs=FS)  # the columns keep their own time slots
    assert most.notes == ("the recording lasts 9.60 s, under the print's 10 s: the last column and the rhythm "
                          "strip stop at 9.60 s",)
    eight = load_input(beats(8 * FS, FS), fs=FS)  # V4-V6 would get 0.5 s: every column its first 2.5 s
    assert "every column shows its first 2.5 s" in eight.notes[0]
    almost = load_input(beats(10 * FS - 1, FS), fs=FS)  # carts write 4999 samples for "10 s"
    assert not any("under the print's" in note or "shows the first" in note for note in almost.notes)
    long = load_input(beats(30 * FS, FS), fs=FS)
    assert long.notes == ("the print shows the first 10 s of 30.00 s",) and long.recording.recorded_s == 30.0
    assert load_input(signals, fs=FS).notes == ()


def test_a_missing_format_library_names_the_extra(tmp_path, signals, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_pydicom(name, *args, **kwargs):
        if name.split(".")[0] == "pydicom":
            raise ImportError("No module named 'pydicom'")
        return real_import(name, *args, **kwargs)

    path = write_dicom(tmp_path / "ecg.dcm", dicom_dataset(signals, FS))
    monkeypatch.delitem(__import__("sys").modules, "pydicom", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_pydicom)
    one_line(r"ecg.dcm: reading DICOM needs the pydicom package.*pip install 'pulse-edge\[ecg\]'", load_input, path)


# --- damaged files ---------------------------------------------------------------------------------

def _damage(data: bytes, rng: np.random.Generator, limit: int, printable: bool = False) -> bytes:
    damaged = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        damaged[int(rng.integers(0, min(limit, len(data))))] = int(
            rng.integers(32, 127) if printable else rng.integers(0, 256)
        )
    return bytes(damaged)


def _read_or_refuse(read, source) -> None:
    try:
        to_twelve_lead(read(source))
    except InputError as exc:
        assert "\n" not in str(exc)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_dicom():
    buffer = io.BytesIO()
    dicom_dataset(beats(2000, 500), 500).save_as(buffer, enforce_file_format=True)
    rng = np.random.default_rng(1)
    for _ in range(400):  # the header and channel definitions sit in the first 3000 bytes
        _read_or_refuse(read_dicom, _damage(buffer.getvalue(), rng, 3000))


def test_damaged_aecg():
    document = aecg_document(beats(2000, 500), 500)
    rng = np.random.default_rng(1)
    for _ in range(300):
        _read_or_refuse(read_aecg, _damage(document, rng, len(document)))


def test_damaged_wfdb_header(tmp_path):
    header = write_wfdb(tmp_path, "r", beats(2000, 500), 500)
    text = header.read_bytes()
    rng = np.random.default_rng(2)
    for _ in range(200):
        header.write_bytes(_damage(text, rng, len(text), printable=True))
        _read_or_refuse(read_wfdb, header)


def test_calibration_and_benchmark_samples_render_recordings(tmp_path, signals):
    from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample
    from pulse_edge.calibration.datasets.ecgbench.readers import Sample, Turn

    path = write_dicom(tmp_path / "exam.dcm", dicom_dataset(signals, FS))
    expected = np.asarray(load_input(path).image)
    calibration = CalibrationSample(id="c1", source="ecginstruct", task="rhythm", turns=(("q", "a"),),
                                    image_path=path)
    benchmark = Sample("b1", "ptb-test", (Turn("q", "NORM"),), image_file=path, image_name="exam.dcm")
    from_bytes = Sample("b2", "ptb-test", (Turn("q", "NORM"),), image_bytes=path.read_bytes(), image_name="exam.dcm")
    for sample in (calibration, benchmark, from_bytes):
        np.testing.assert_array_equal(np.asarray(sample.load_image()), expected)


def test_an_option_the_input_does_not_read_is_noted_never_dropped_in_silence(tmp_path, signals):
    """`infer a.dcm b.csv --fs 500` is one batch: the DICOM keeps its own rate, and its answer says --fs was not
    used; a CSV's leads come from its header; an image is read as drawn. What an input does read is not noted."""
    dicom = write_dicom(tmp_path / "exam.dcm", dicom_dataset(signals, FS))
    csv = write_csv(tmp_path / "ecg.csv", signals, LEADS)
    npy = write_npy(tmp_path / "ecg.npy", signals)
    pixels = np.full((300, 400, 3), 255, dtype=np.uint8)
    pixels[150] = 0  # a trace: a page of one colour is refused as blank
    cases = [(dicom, {"fs": 250.0}, "fs given but not used: a DICOM file stores its own"),
             (dicom, {"unit": "uV"}, "unit given but not used: a DICOM file stores its own"),
             (csv, {"fs": FS, "unit": "mV"}, None),
             (csv, {"fs": FS, "leads": LEADS}, "leads given but not used: a CSV file names its leads in its header"),
             (pixels, {"fs": FS, "layout": "leads_first", "unit": "mV"},
              "fs, unit, layout given but not used: an image is read as it is"),
             (npy, {"fs": FS, "leads": LEADS}, None), (signals, {"fs": FS, "leads": LEADS}, None)]
    for source, options, note in cases:
        notes = [n for n in load_input(source, **options).notes if "given but not used" in n]
        assert notes == ([] if note is None else [notes[0]]) and (note is None or notes[0].startswith(note)), notes
