"""Edges of the ECG readers that earlier tests left open (a fifth mutation round: each test fails on a mutant of
the rule it names): DICOM channels, groups and limits
WFDB headers, rates and names
images
the signal checks,
lead codes and resampling."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from PIL import Image
from pulse_testing.ecg_files import beats, dicom_bytes, dicom_dataset, write_wfdb

from pulse_edge.errors import InputError
from pulse_edge.runtime.ecg import checks
from pulse_edge.runtime.ecg.leads import LEADS, LeadName, lead_from_code
from pulse_edge.runtime.ecg.resample import resample, resampled_length
from pulse_edge.runtime.inputs.dicom import read_dicom
from pulse_edge.runtime.inputs.discover import expand_inputs
from pulse_edge.runtime.inputs.images import load_image_bytes
from pulse_edge.runtime.inputs.wfdb_record import read_wfdb


def test_the_code_value_wins_over_its_meaning():
    assert lead_from_code("2:62", "Lead aVL") == LeadName("aVR")

def test_lengths_round_to_nearest():
    x = np.zeros((1, 1000))
    assert resample(x, 360.0, 500.0).shape[1] == resampled_length(1000, 360.0, 500.0) == 1389

def test_edges_repeat_not_wrap():
    x = np.linspace(0.0, 1.0, 1000)[None]
    y = resample(x, 1000.0, 500.0)
    assert abs(y[0, 0] - 0.0) < 0.02 and abs(y[0, -1] - 1.0) < 0.02

def test_the_limits_themselves_pass():
    checks.check_fs(50.0, "x")
    checks.check_fs(20000.0, "x")
    checks.check_duration(1250, 500.0, "x")

def test_a_bool_rate_is_not_a_number():
    with pytest.raises(InputError, match="must be a number"):
        checks.check_fs(True, "x")

def test_a_largest_lead_under_50_uv_is_refused():
    t = np.arange(5000) / 500.0
    with pytest.raises(InputError, match="largest lead spans only"):
        checks.check_amplitudes(0.01 * np.sin(2 * np.pi * t)[None].repeat(2, 0), ("I", "II"), "x")

def test_a_few_pacemaker_spikes_are_not_the_amplitude():
    t = np.arange(5000) / 500.0
    x = np.sin(2 * np.pi * t)[None].repeat(2, 0)
    x[:, ::500] = 40.0  # 10 spikes of 40 mV: 0.2 % of the samples
    assert checks.check_amplitudes(x, ("I", "II"), "x") == []


def _relabel(ds, k, label):
    ch = ds.WaveformSequence[0].ChannelDefinitionSequence[k]
    del ch.ChannelSourceSequence
    ch.ChannelLabel = label

def test_an_inverted_channel_keeps_its_sign_in_its_name():
    ds = dicom_dataset(beats(5000, 500.0), 500.0)
    _relabel(ds, 3, "-aVR")
    assert "-aVR" in read_dicom(dicom_bytes(ds)).leads

def test_a_repeated_lead_keeps_the_first():
    x = beats(5000, 500.0)
    ds = dicom_dataset(x, 500.0)
    _relabel(ds, 2, "II")  # channel 3 (III's samples) says II
    rec = read_dicom(dicom_bytes(ds))
    assert np.allclose(rec.leads["II"], x[1], atol=0.01) and any("repeats" in n for n in rec.notes)

def test_a_rhythm_group_beats_an_original_median_beat():
    ds = dicom_dataset(beats(5000, 500.0), 500.0, groups=("MEDIAN BEAT", "RHYTHM"))
    ds.WaveformSequence[0].WaveformOriginality = "ORIGINAL"
    ds.WaveformSequence[1].WaveformOriginality = "DERIVED"
    assert read_dicom(dicom_bytes(ds)).leads["I"].size == 5000

def test_the_sample_limit():
    checks.check_samples(checks.MAX_SAMPLES, "x")
    with pytest.raises(InputError, match="more than"):
        checks.check_samples(checks.MAX_SAMPLES + 1, "x")


def _trace(mode):
    a = np.zeros((200, 300), np.uint8)
    a[100, :] = 200
    return Image.fromarray(a, "L").convert(mode)

def test_grey_with_a_transparent_colour_goes_on_white():
    buf = io.BytesIO()
    _trace("L").save(buf, "PNG", transparency=0)
    img = load_image_bytes(buf.getvalue())
    assert img.getpixel((5, 5)) == (255, 255, 255)

def test_a_pdf_header_after_leading_bytes():
    buf = io.BytesIO()
    _trace("RGB").save(buf, "PDF", resolution=72)
    img = load_image_bytes(b"\r\n" + buf.getvalue())
    assert img.size[0] > 300

def test_an_upper_case_suffix_names_the_record(tmp_path):
    write_wfdb(tmp_path, "rec", beats(5000, 500.0), 500.0)
    assert len(read_wfdb(tmp_path / "rec.HEA").leads) == 12


def _record_line(folder, words):
    h = (folder / "rec.hea").read_text().splitlines()
    h[0] = " ".join(words(h[0].split()))
    (folder / "rec.hea").write_text("\n".join(h) + "\n")

def test_a_record_line_without_length_says_nothing_of_the_rate(tmp_path):
    write_wfdb(tmp_path, "rec", beats(5000, 500.0), 500.0)
    _record_line(tmp_path, lambda w: w[:3])
    assert read_wfdb(tmp_path / "rec.hea").notes == []

def test_a_rate_wfdb_reads_otherwise_is_refused(tmp_path):  # wfdb reads "+500" as its default 250
    write_wfdb(tmp_path, "rec", beats(5000, 500.0), 500.0)
    _record_line(tmp_path, lambda w: [w[0], w[1], "+500", *w[3:]])
    with pytest.raises(InputError, match=r"sampling frequency '\+500' is read by wfdb as 250 Hz, not as written"):
        read_wfdb(tmp_path / "rec.hea")

def test_a_repeated_signal_keeps_the_first(tmp_path):
    x = beats(5000, 500.0)
    write_wfdb(tmp_path, "rec", x, 500.0)
    h = (tmp_path / "rec.hea").read_text().splitlines()
    h[3] = h[3].rsplit(" ", 1)[0] + " II"  # signal 3 (III) is named II
    (tmp_path / "rec.hea").write_text("\n".join(h) + "\n")
    rec = read_wfdb(tmp_path / "rec.hea")
    assert np.allclose(rec.leads["II"], x[1], atol=0.01) and any("repeats" in n for n in rec.notes)

def test_a_channel_named_by_its_label_only():
    ds = dicom_dataset(beats(5000, 500.0), 500.0)
    ch = ds.WaveformSequence[0].ChannelDefinitionSequence[0]
    del ch.ChannelSourceSequence
    ch.ChannelLabel = "Lead I"
    assert "I" in read_dicom(dicom_bytes(ds)).leads

def test_the_sample_limit_holds_for_dicom(monkeypatch):
    import pulse_edge.runtime.ecg.checks as checks
    monkeypatch.setattr(checks, "MAX_SAMPLES", 1000)
    with pytest.raises(InputError, match="more than"):
        read_dicom(dicom_bytes(dicom_dataset(beats(5000, 500.0), 500.0)))


def test_a_lone_dat_file_is_an_input(tmp_path):
    (tmp_path / "a.dat").write_bytes(b"\0" * 10)
    assert expand_inputs([str(tmp_path)]) == [str(tmp_path / "a.dat")]

def _edit(folder, k, edit):
    h = edit((folder / "rec.hea").read_text().splitlines())
    (folder / "rec.hea").write_text("\n".join(h) + "\n")

def test_a_counter_frequency_is_no_segment_list(tmp_path):
    write_wfdb(tmp_path, "rec", beats(5000, 500.0), 500.0)
    def edit(h):
        w = h[1].split()
        w[2] = "0/mV"  # signal 1 uncalibrated
        return [h[0].replace(" 500 ", " 500/500 ", 1), " ".join(w), *h[2:]]
    _edit(tmp_path, 0, edit)
    from pulse_edge.errors import InputError
    with pytest.raises(InputError, match="no ADC gain"):
        read_wfdb(tmp_path / "rec.hea")

def test_an_indented_comment_is_a_comment(tmp_path):
    write_wfdb(tmp_path, "rec", beats(5000, 500.0), 500.0)
    _edit(tmp_path, 0, lambda h: ["  # exported by cart X", *h])
    assert read_wfdb(tmp_path / "rec.hea").notes == []


def test_a_named_pipe_is_refused_not_read(tmp_path) -> None:
    """A FIFO in a batch folder blocked the read for ever (the batch hung with no message), and a pipe given as
    a path (`<(cat print.png)`) was half read, then a traceback: both are one line now."""
    import threading

    from pulse_edge.runtime.inputs.load import load_input

    fifo = tmp_path / "b.png"
    os.mkfifo(fifo)
    said: list[BaseException] = []

    def read() -> None:
        try:
            load_input(fifo)
        except InputError as e:
            said.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # unblock the reader before failing, so that the run can end
        with open(fifo, "wb"):
            pass
        pytest.fail("load_input blocked on a named pipe")
    assert said and "is not a regular file" in str(said[0])


@pytest.mark.parametrize("source, hint", [([[0.0] * 5000] * 12, "numpy.asarray"), (None, "a NoneType"),
                                          (3.0, "a float"), ("/tmp/a\x00b.png", "not a path a file can have")])
def test_a_source_of_another_type_is_an_input_error(source, hint: str) -> None:
    """The Python API raised TypeError / ValueError from deep inside pathlib for these."""
    from pulse_edge.runtime.inputs.load import load_input

    with pytest.raises(InputError, match=hint.replace(".", r"\.")):
        load_input(source)


def test_damaged_exif_is_one_note_not_pillow_s_warnings() -> None:
    """Pillow printed two "Corrupt EXIF data" warnings with its source lines on stderr and went on without the
    orientation, which nothing said."""
    import warnings

    from pulse_edge.runtime.inputs.load import load_input

    pixels = np.full((400, 600, 3), 255, np.uint8)
    pixels[200] = 0  # a trace, so that the page is not blank
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", exif=exif.tobytes())
    data = bytearray(buf.getvalue())
    at = data.find(b"Exif\x00\x00") + 6 + 8  # the first IFD's entry count, past the TIFF header
    data[at:at + 2] = b"\xff\x7f"  # far more entries than the segment holds
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_input(bytes(data), name="photo.jpg")
    assert not [w for w in caught if "EXIF" in str(w.message)]
    assert any("EXIF data is damaged" in note and "upright" in note for note in loaded.notes)


def test_leads_that_name_no_lead_are_said_so(tmp_path) -> None:
    """leads="foo" was told that the array's shape does not say which axis holds its 1 lead."""
    from pulse_edge.errors import ConfigError
    from pulse_edge.runtime.inputs.load import load_input

    signals = beats(5000, 500.0)
    with pytest.raises(ConfigError, match="leads: 'foo' name no ECG lead; name each row's lead from I, II"):
        load_input(signals, fs=500.0, leads="foo")
    with pytest.raises(ConfigError, match="leads must be lead names"):
        load_input(signals, fs=500.0, leads=(1, 2))
    for odd in (5, b"I,II", None.__class__):  # not text nor a sequence: a TypeError traceback from tuple()
        with pytest.raises(ConfigError, match="leads must name the leads in order"):
            load_input(signals, fs=500.0, leads=odd)
    assert load_input(signals, fs=500.0, leads=np.array(LEADS)).kind == "array"  # any sequence of names: numpy's
    thirteen = np.vstack([signals, signals[:1]])  # a respiration channel beside the 12 leads: dropped, said
    loaded = load_input(thirteen, fs=500.0, leads=(*LEADS, "RESP"))
    assert any("'RESP'" in note for note in loaded.notes)
