"""ECG recordings written with the formats' own writers (pydicom, wfdb.wrsamp, ElementTree, numpy), for tests.

Signals are beat-like (a Gaussian QRS on a slow T wave) so amplitudes stay in
the range the checks accept, and every lead differs so a swapped lead shows.
The aECG documents follow the HL7 v3 AnnotatedECG structure (series,
sequenceSet, a TIME_ABSOLUTE or TIME_RELATIVE sequence, SLIST_PQ leads).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pulse_edge.runtime.ecg.leads import LEADS

# SCP-ECG code values (DICOM CID 3001, scheme SCPECG) and the meanings carts write.
SCPECG = {
    "I": ("5.6.3-9-1", "Lead I (Einthoven)"),
    "II": ("5.6.3-9-2", "Lead II"),
    "III": ("5.6.3-9-61", "Lead III"),
    "aVR": ("5.6.3-9-62", "Lead aVR"),
    "aVL": ("5.6.3-9-63", "Lead aVL"),
    "aVF": ("5.6.3-9-64", "Lead aVF"),
    **{f"V{k}": (f"5.6.3-9-{k + 2}", f"Lead V{k}") for k in range(1, 7)},
}
UCUM = {"uV": "microvolt", "mV": "millivolt", "V": "volt"}


def beats(n: int, fs: float, leads: tuple[str, ...] = LEADS, seed: int = 0, noise_mv: float = 0.01) -> np.ndarray:
    """[len(leads), n] float64 mV: 72 bpm beats with lead-specific gains, consistent limb leads."""
    t = np.arange(n) / fs
    phase = (t * 1.2) % 1.0
    qrs = np.exp(-0.5 * ((phase - 0.3) / 0.012) ** 2)
    twave = 0.25 * np.exp(-0.5 * ((phase - 0.6) / 0.05) ** 2)
    rng = np.random.default_rng(seed)
    lead_i = 0.8 * qrs + 0.8 * twave + rng.normal(0, noise_mv, n)
    lead_ii = 1.2 * qrs + 1.0 * twave + rng.normal(0, noise_mv, n)
    limb = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2,
        "aVL": lead_i - lead_ii / 2,
        "aVF": lead_ii - lead_i / 2,
    }
    chest = {f"V{k}": (-1.0 + 0.45 * k) * qrs + 0.6 * twave + rng.normal(0, noise_mv, n) for k in range(1, 7)}
    table = {**limb, **chest}
    return np.stack([table[name] for name in leads])


# --- DICOM ---------------------------------------------------------------------------------------


def dicom_dataset(
    signals_mv: np.ndarray,
    fs: float,
    leads: tuple[str, ...] = LEADS,
    *,
    unit: str = "uV",
    sensitivity: float = 2.5,
    baseline: float = 0.0,
    groups: tuple[str, ...] = ("RHYTHM",),
    sop_class: str = "1.2.840.10008.5.1.4.1.1.9.1.1",
):
    """A 12-lead ECG Waveform dataset; int16 samples = (value - baseline) / sensitivity in `unit`.

    `groups` lists multiplex group labels; a group labelled with 'MEDIAN' holds
    a 1.2 s slice (a stand-in for a median beat), the others the full signal.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "ECG"
    ds.PatientName = "Test^Synthetic"
    per_unit = {"uV": 1e-3, "mV": 1.0, "V": 1e3}[unit]
    items = []
    for label in groups:
        part = signals_mv[:, : round(1.2 * fs)] if "MEDIAN" in label else signals_mv
        items.append(_multiplex_group(part / per_unit, fs, leads, unit, sensitivity, baseline, label))
    ds.WaveformSequence = Sequence(items)
    assert pydicom.uid.UID(sop_class).is_valid
    return ds


def _multiplex_group(values, fs, leads, unit, sensitivity, baseline, label):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.WaveformOriginality = "DERIVED" if "MEDIAN" in label else "ORIGINAL"
    item.MultiplexGroupLabel = label
    item.NumberOfWaveformChannels = len(leads)
    item.NumberOfWaveformSamples = values.shape[1]
    item.SamplingFrequency = f"{fs:g}"
    item.ChannelDefinitionSequence = Sequence([_channel(lead, unit, sensitivity, baseline) for lead in leads])
    item.WaveformBitsAllocated = 16
    item.WaveformSampleInterpretation = "SS"
    counts = np.rint((values - baseline) / sensitivity)
    assert np.abs(counts).max() < 32767, "test signal does not fit int16 at this sensitivity"
    # Multiplexed: all channels of sample 1, then all channels of sample 2, ...
    item.WaveformData = counts.T.astype("<i2").tobytes()
    return item


def _channel(lead, unit, sensitivity, baseline):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    code_value, meaning = SCPECG[lead]
    source = Dataset()
    source.CodeValue = code_value
    source.CodingSchemeDesignator = "SCPECG"
    source.CodingSchemeVersion = "1.3"
    source.CodeMeaning = meaning
    units = Dataset()
    units.CodeValue = unit
    units.CodingSchemeDesignator = "UCUM"
    units.CodingSchemeVersion = "1.4"
    units.CodeMeaning = UCUM[unit]
    channel = Dataset()
    channel.ChannelSourceSequence = Sequence([source])
    channel.ChannelSensitivity = f"{sensitivity:g}"
    channel.ChannelSensitivityUnitsSequence = Sequence([units])
    channel.ChannelSensitivityCorrectionFactor = "1"
    channel.ChannelBaseline = f"{baseline:g}"
    channel.ChannelSampleSkew = "0"
    channel.WaveformBitsStored = 16
    return channel


def write_dicom(path: Path, ds) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dicom_bytes(ds) -> bytes:
    import io

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# --- WFDB ----------------------------------------------------------------------------------------

PTBXL_NAMES = ("I", "II", "III", "AVR", "AVL", "AVF", "V1", "V2", "V3", "V4", "V5", "V6")


def write_wfdb(folder: Path, name: str, signals_mv: np.ndarray, fs: float, *, units: str = "mV", gain=1000.0):
    """A PTB-XL-like record: format 16, gain 1000 adu/mV (1 uV steps), baseline 0."""
    import wfdb

    per_unit = {"uV": 1e-3, "mV": 1.0}[units]
    wfdb.wrsamp(
        name,
        fs=fs,
        units=[units] * signals_mv.shape[0],
        sig_name=list(PTBXL_NAMES[: signals_mv.shape[0]]),
        p_signal=(signals_mv / per_unit).T,
        fmt=["16"] * signals_mv.shape[0],
        adc_gain=[gain * per_unit] * signals_mv.shape[0],
        baseline=[0] * signals_mv.shape[0],
        write_dir=str(folder),
    )
    return folder / f"{name}.hea"


# --- HL7 aECG ------------------------------------------------------------------------------------

HL7 = "urn:hl7-org:v3"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MDC_CODES = {lead: f"MDC_ECG_LEAD_{lead.upper()}" for lead in LEADS}


def aecg_document(
    signals_mv: np.ndarray,
    fs: float,
    leads: tuple[str, ...] = LEADS,
    *,
    scale_uv: float = 5.0,
    origin_uv: float = 0.0,
    time_code: str = "TIME_ABSOLUTE",
    median_first: bool = True,
) -> bytes:
    """An AnnotatedECG with a RHYTHM series; a representative beat as derivedSeries when asked."""
    import xml.etree.ElementTree as ET

    ET.register_namespace("", HL7)
    ET.register_namespace("xsi", XSI)
    root = ET.Element(_q("AnnotatedECG"))
    ET.SubElement(root, _q("id"), root="2.16.840.1.113883.3.999.1")
    ET.SubElement(root, _q("code"), code="93000", codeSystem="2.16.840.1.113883.6.12")
    series = ET.SubElement(ET.SubElement(root, _q("component")), _q("series"))
    ET.SubElement(series, _q("code"), code="RHYTHM", codeSystem="2.16.840.1.113883.5.4")
    if median_first:  # a derived series comes first in document order, to catch naive readers
        derived = ET.SubElement(ET.SubElement(series, _q("derivation")), _q("derivedSeries"))
        ET.SubElement(derived, _q("code"), code="REPRESENTATIVE_BEAT", codeSystem="2.16.840.1.113883.5.4")
        _sequence_set(derived, signals_mv[:, : round(1.2 * fs)] * 0.5, fs, leads, scale_uv, origin_uv, time_code)
    _sequence_set(series, signals_mv, fs, leads, scale_uv, origin_uv, time_code)
    return ET.tostring(root, xml_declaration=True, encoding="utf-8")


def _q(tag: str) -> str:
    return f"{{{HL7}}}{tag}"


def _sequence_set(parent, signals_mv, fs, leads, scale_uv, origin_uv, time_code):
    import xml.etree.ElementTree as ET

    seq_set = ET.SubElement(ET.SubElement(parent, _q("component")), _q("sequenceSet"))
    time_seq = ET.SubElement(ET.SubElement(seq_set, _q("component")), _q("sequence"))
    ET.SubElement(time_seq, _q("code"), code=time_code, codeSystem="2.16.840.1.113883.5.4")
    absolute = time_code == "TIME_ABSOLUTE"
    value = ET.SubElement(time_seq, _q("value"), {f"{{{XSI}}}type": "GLIST_TS" if absolute else "GLIST_PQ"})
    ET.SubElement(
        value, _q("head"), value="20240101120000.000" if absolute else "0", **({} if absolute else {"unit": "s"})
    )
    ET.SubElement(value, _q("increment"), value=f"{1.0 / fs:.6g}", unit="s")
    for lead, row in zip(leads, signals_mv, strict=True):
        seq = ET.SubElement(ET.SubElement(seq_set, _q("component")), _q("sequence"))
        ET.SubElement(seq, _q("code"), code=MDC_CODES[lead], codeSystem="2.16.840.1.113883.6.24")
        val = ET.SubElement(seq, _q("value"), {f"{{{XSI}}}type": "SLIST_PQ"})
        ET.SubElement(val, _q("origin"), value=f"{origin_uv:g}", unit="uV")
        ET.SubElement(val, _q("scale"), value=f"{scale_uv:g}", unit="uV")
        digits = np.rint((row * 1000.0 - origin_uv) / scale_uv).astype(np.int64)
        ET.SubElement(val, _q("digits")).text = " ".join(map(str, digits.tolist()))


# --- CSV / NPY -----------------------------------------------------------------------------------


def write_csv(path: Path, signals_mv: np.ndarray, header: tuple[str, ...], *, delimiter: str = ",") -> Path:
    np.savetxt(path, signals_mv.T, delimiter=delimiter, header=delimiter.join(header), comments="", fmt="%.6f")
    return path


def write_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array)
    return path
