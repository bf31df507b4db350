"""`pulse-edge infer` on recordings that cannot be printed: one line naming the file and the problem, exit 2,
before any model is opened."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from pulse_testing.ecg_files import aecg_document, beats, dicom_dataset, write_csv, write_dicom, write_wfdb

from pulse_edge.cli.main import main
from pulse_edge.runtime.ecg.leads import LEADS

pytest.importorskip("pydicom", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("wfdb", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytest.importorskip("defusedxml", reason="the ecg extra (pydicom, wfdb, defusedxml) is not installed")
pytestmark = pytest.mark.filterwarnings("ignore:::wfdb")

FS = 500


def _no_waveform(folder: Path) -> Path:
    ds = dicom_dataset(beats(10 * FS, FS), FS)
    del ds.WaveformSequence
    return write_dicom(folder / "empty.dcm", ds)


def _one_limb_lead(folder: Path) -> Path:
    leads = ("II", "V1", "V2", "V3", "V4", "V5", "V6")
    return write_dicom(folder / "seven.dcm", dicom_dataset(beats(10 * FS, FS, leads), FS, leads))


def _no_chest_lead_v3(folder: Path) -> Path:
    leads = tuple(lead for lead in LEADS if lead != "V3")
    return write_dicom(folder / "no_v3.dcm", dicom_dataset(beats(10 * FS, FS, leads), FS, leads))


def _two_seconds(folder: Path) -> Path:
    return write_wfdb(folder, "short", beats(2 * FS, FS), FS)


def _gap(folder: Path) -> Path:
    signals = beats(10 * FS, FS)
    signals[7, 100:110] = np.nan  # wrsamp stores NaN as format 16's invalid value, rdrecord gives NaN back
    return write_wfdb(folder, "gap", signals, FS)


def _flat(folder: Path) -> Path:
    return write_csv(folder / "flat.csv", np.full((12, 10 * FS), 0.2), LEADS)


def _unknown_unit(folder: Path) -> Path:
    path = folder / "mmhg.xml"
    path.write_bytes(aecg_document(beats(10 * FS, FS), FS, median_first=False).replace(b'unit="uV"', b'unit="mmHg"'))
    return path


CASES = {
    "no waveform": (_no_waveform, "empty.dcm: DICOM file has no WaveformSequence"),
    "one limb lead": (_one_limb_lead, "seven.dcm: missing I, III, aVR, aVL, aVF: only limb lead II was recorded"),
    "missing chest lead": (_no_chest_lead_v3, "no_v3.dcm: missing chest leads V3, which cannot be derived"),
    "under 2.5 s": (_two_seconds, "short.hea: only 2.00 s of signal; at least 2.5 s are needed"),
    "NaNs": (_gap, "gap.hea: lead V2 has 10 missing or non-finite samples (first at 0.200 s)"),
    "flat line": (_flat, "flat.csv: all leads are flat lines (constant values)"),
    "unknown unit": (_unknown_unit, "mmhg.xml: the origin of lead MDC_ECG_LEAD_I is in unit 'mmHg'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_recording_gets_one_line_and_exit_2(tmp_path: Path, case: str) -> None:
    make, expected = CASES[case]
    path = make(tmp_path)
    # --model names nothing: the recording must be refused before any model is looked at
    res = CliRunner().invoke(main, ["infer", str(path), "--model", str(tmp_path / "no-model"), "--fs", str(FS)])
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"pulse-edge: error: {tmp_path}/{expected}"), lines[0]


def test_in_a_fresh_process_too(tmp_path: Path) -> None:
    exe = shutil.which("pulse-edge", path=str(Path(sys.executable).parent))
    assert exe, "the pulse-edge console script is not installed next to this interpreter"
    path = _no_waveform(tmp_path)
    done = subprocess.run([exe, "infer", str(path), "--model", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "has no WaveformSequence" in done.stderr


def test_a_csv_without_fs_says_how_to_give_it(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "ecg.csv", beats(10 * FS, FS), LEADS)
    res = CliRunner().invoke(main, ["infer", str(path), "--model", str(tmp_path)])
    assert res.exit_code == 2
    assert res.stderr == (f"pulse-edge: error: {path}: a CSV file stores no sampling rate; "
                          "pass it (--fs HZ; fs= in Python; the server's `fs` field).\n")


def test_several_inputs_need_an_output_file(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["infer", str(tmp_path), str(tmp_path), "--model", str(tmp_path)])
    assert res.exit_code == 2 and "need --output FILE" in res.stderr
