"""The synthetic 12-lead generator: lead physics, rhythm facts, labels, determinism."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.synthetic import LEADS, RHYTHMS, EcgRecord, synthesize_ecg

# The rate each rhythm must realise; written out here rather than read from the module.
RATE_RANGES = {
    "sinus": (60.0, 100.0),
    "tachycardia": (100.0, 150.0),
    "bradycardia": (40.0, 59.0),
    "afib": (50.0, 150.0),
    "first_degree_av_block": (60.0, 100.0),
}
LABELS = {
    "sinus": ("NORM", "SR"),
    "tachycardia": ("STACH",),
    "bradycardia": ("SBRAD",),
    "afib": ("AFIB",),
    "first_degree_av_block": ("SR", "1AVB"),
}
DESCRIPTION_PREFIX = {
    "sinus": "Sinus rhythm at ",
    "tachycardia": "Sinus tachycardia at ",
    "bradycardia": "Sinus bradycardia at ",
    "afib": "Atrial fibrillation",
    "first_degree_av_block": "Sinus rhythm at ",
}


def lead(record: EcgRecord, name: str) -> np.ndarray:
    return record.signals[LEADS.index(name)].astype(np.float64)


def windows(record: EcgRecord, name: str, start_s: float, stop_s: float, keep: np.ndarray) -> np.ndarray:
    """[beats, samples] of lead `name` from R + start_s to R + stop_s for the beats in `keep`."""
    fs, signal = record.fs, lead(record, name)
    rows = []
    for r_peak in record.beat_times_s[keep]:
        first, last = round((r_peak + start_s) * fs), round((r_peak + stop_s) * fs)
        if first >= 0 and last <= signal.size:
            rows.append(signal[first:last])
    return np.array(rows)


def rr_cv(record: EcgRecord) -> float:
    rr = np.diff(record.beat_times_s)
    return float(np.std(rr) / np.mean(rr))


def test_rhythms_cover_the_required_set() -> None:
    assert {"sinus", "tachycardia", "bradycardia", "afib"} <= set(RHYTHMS)
    assert set(RHYTHMS) == set(RATE_RANGES)
    assert LEADS == ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


@pytest.mark.parametrize("rhythm", RHYTHMS)
def test_record_shape_and_types(rhythm: str) -> None:
    record = synthesize_ecg(rhythm, seed=3, duration_s=10.0, fs=500)
    assert record.signals.shape == (12, 5000)
    assert record.signals.dtype == np.float32
    assert np.isfinite(record.signals).all()
    assert record.fs == 500 and record.rhythm == rhythm
    assert record.duration_s == pytest.approx(10.0)
    assert np.all(np.diff(record.beat_times_s) > 0)
    assert record.beat_times_s[0] >= 0.0 and record.beat_times_s[-1] < 10.0


@pytest.mark.parametrize("rhythm", RHYTHMS)
def test_einthoven_and_goldberger_hold_exactly(rhythm: str) -> None:
    record = synthesize_ecg(rhythm, seed=11)
    i, ii = lead(record, "I"), lead(record, "II")
    np.testing.assert_allclose(lead(record, "III"), ii - i, atol=1e-5)
    np.testing.assert_allclose(lead(record, "aVR"), -(i + ii) / 2.0, atol=1e-5)
    np.testing.assert_allclose(lead(record, "aVL"), i - ii / 2.0, atol=1e-5)
    np.testing.assert_allclose(lead(record, "aVF"), ii - i / 2.0, atol=1e-5)


@pytest.mark.parametrize("rhythm", RHYTHMS)
def test_realised_rate_is_in_range_and_equals_beat_times(rhythm: str) -> None:
    lo, hi = RATE_RANGES[rhythm]
    for seed in range(8):
        record = synthesize_ecg(rhythm, seed=seed)
        from_beats = 60.0 / np.mean(np.diff(record.beat_times_s))
        assert record.heart_rate_bpm == pytest.approx(from_beats, rel=1e-9)
        assert lo <= record.heart_rate_bpm <= hi


def test_rate_override_is_realised_and_described() -> None:
    record = synthesize_ecg("sinus", seed=5, heart_rate_bpm=72.0)
    assert record.heart_rate_bpm == pytest.approx(72.0, abs=1e-6)
    assert record.description == "Sinus rhythm at 72 bpm."
    fast = synthesize_ecg("afib", seed=5, heart_rate_bpm=130.0)
    assert fast.heart_rate_bpm == pytest.approx(130.0, abs=1e-6)


@pytest.mark.parametrize(("rhythm", "rate"), [("sinus", 120.0), ("bradycardia", 70.0), ("tachycardia", 80.0)])
def test_rate_override_outside_the_rhythm_is_rejected(rhythm: str, rate: float) -> None:
    with pytest.raises(ConfigError, match="outside"):
        synthesize_ecg(rhythm, seed=0, heart_rate_bpm=rate)


def test_unknown_rhythm_lists_the_allowed_values() -> None:
    with pytest.raises(ConfigError) as caught:
        synthesize_ecg("vtach", seed=0)
    message = str(caught.value)
    assert "vtach" in message
    for rhythm in RHYTHMS:
        assert rhythm in message


@pytest.mark.parametrize(("duration", "fs"), [(2.0, 500), (10.0, 20)])
def test_unusable_duration_or_sampling_rate_is_rejected(duration: float, fs: int) -> None:
    with pytest.raises(ConfigError):
        synthesize_ecg("sinus", seed=0, duration_s=duration, fs=fs)


@pytest.mark.parametrize("rhythm", RHYTHMS)
def test_labels_and_description_match_the_rhythm(rhythm: str) -> None:
    record = synthesize_ecg(rhythm, seed=2)
    assert record.labels == LABELS[rhythm]
    assert record.description.startswith(DESCRIPTION_PREFIX[rhythm])
    assert record.description.endswith(".")
    assert f"{round(record.heart_rate_bpm)} bpm" in record.description


def test_same_seed_same_record_different_seed_different_record() -> None:
    first, again, other = (synthesize_ecg("afib", seed=s) for s in (42, 42, 43))
    np.testing.assert_array_equal(first.signals, again.signals)
    np.testing.assert_array_equal(first.beat_times_s, again.beat_times_s)
    assert first.description == again.description
    assert not np.array_equal(first.beat_times_s, other.beat_times_s)
    assert np.abs(first.signals - other.signals).max() > 0.1


def test_other_durations_and_sampling_rates() -> None:
    record = synthesize_ecg("sinus", seed=1, duration_s=12.5, fs=250)
    assert record.signals.shape == (12, 3125)
    assert record.duration_s == pytest.approx(12.5)
    assert record.beat_times_s[-1] < 12.5


def test_af_rr_is_irregularly_irregular() -> None:
    af = [rr_cv(synthesize_ecg("afib", seed=s)) for s in range(10)]
    sinus = [rr_cv(synthesize_ecg("sinus", seed=s)) for s in range(10)]
    assert max(sinus) < 0.05  # sinus arrhythmia is gentle
    assert min(af) > 0.08
    assert np.mean(af) > 4.0 * np.mean(sinus)


def test_p_waves_precede_each_qrs_in_sinus_but_not_in_af() -> None:
    """The beat-averaged lead II before each R keeps a P wave; AF's f-waves average away."""

    def p_wave_mv(rhythm: str, seed: int) -> float:
        record = synthesize_ecg(rhythm, seed=seed, heart_rate_bpm=70.0)
        # Skip beats after a short RR, where the previous T wave reaches into the window.
        keep = np.diff(record.beat_times_s, prepend=-np.inf) >= 0.7
        template = windows(record, "II", -0.28, -0.07, keep).mean(axis=0)
        return float(np.ptp(template))

    for seed in range(5):
        assert p_wave_mv("sinus", seed) > 0.09
        assert p_wave_mv("afib", seed) < 0.07


def test_af_has_fibrillatory_baseline_in_v1() -> None:
    """Between T end and the next QRS, AF's V1 keeps oscillating; slow sinus is flat there."""

    def diastolic_wobble_mv(rhythm: str, seed: int) -> float:
        record = synthesize_ecg(rhythm, seed=seed, heart_rate_bpm=50.0)
        keep = np.diff(record.beat_times_s, append=np.inf) >= 1.0
        segments = windows(record, "V1", 0.5, 0.85, keep)
        x = np.arange(segments.shape[1])
        residual = [np.std(s - np.polyval(np.polyfit(x, s, 1), x)) for s in segments]
        return float(np.median(residual))

    for seed in range(5):
        assert diastolic_wobble_mv("afib", seed) > 0.014
        assert diastolic_wobble_mv("bradycardia", seed) < 0.012


def test_first_degree_block_lengthens_pr() -> None:
    """The P wave sits further before the R in first-degree AV block (PR > 200 ms) than in sinus."""

    def p_lead_s(rhythm: str, seed: int) -> float:
        record = synthesize_ecg(rhythm, seed=seed, heart_rate_bpm=65.0)
        keep = np.ones(record.beat_times_s.size, dtype=bool)
        template = windows(record, "II", -0.40, -0.07, keep).mean(axis=0)
        # Centroid of the hump: steadier than the argmax of a flat, noisy P wave.
        hump = np.clip(template - np.percentile(template, 30), 0.0, None)
        centre = float(np.sum(hump * np.arange(hump.size)) / np.sum(hump))
        return 0.40 - centre / record.fs

    for seed in range(4):
        assert p_lead_s("sinus", seed) < 0.20
        assert p_lead_s("first_degree_av_block", seed) > 0.20
        description = synthesize_ecg("first_degree_av_block", seed=seed).description
        assert int(re.search(r"PR (\d+) ms", description)[1]) > 200


def test_amplitudes_and_precordial_progression_are_physiological() -> None:
    """R ~1-1.5 mV in II, negative aVR, R growing and S shrinking from V1 to V5."""
    peaks: dict[str, list[float]] = {name: [] for name in LEADS}
    troughs: dict[str, list[float]] = {name: [] for name in LEADS}
    for seed in range(6):
        record = synthesize_ecg("sinus", seed=seed, heart_rate_bpm=60.0)
        keep = np.ones(record.beat_times_s.size, dtype=bool)
        for name in LEADS:
            qrs = windows(record, name, -0.06, 0.06, keep).mean(axis=0)
            baseline = windows(record, name, -0.30, -0.26, keep).mean()
            peaks[name].append(qrs.max() - baseline)
            troughs[name].append(qrs.min() - baseline)
    r, s = ({n: float(np.median(v)) for n, v in d.items()} for d in (peaks, troughs))
    assert 0.8 <= r["II"] <= 1.8
    assert s["aVR"] < -0.5 and r["aVR"] < 0.3
    assert r["V1"] < 0.5 and s["V1"] < -0.6  # rS in V1
    assert r["V1"] < r["V3"] < r["V5"]
    assert s["V1"] < s["V4"] < s["V6"]  # S waves get shallower towards V6


def test_qrs_is_narrow() -> None:
    """The QRS of lead II stays above half its R height for well under 60 ms."""
    record = synthesize_ecg("sinus", seed=7, heart_rate_bpm=60.0)
    keep = np.ones(record.beat_times_s.size, dtype=bool)
    qrs = windows(record, "II", -0.08, 0.08, keep).mean(axis=0)
    above_half = np.count_nonzero(qrs > qrs.max() / 2.0) / record.fs
    assert 0.01 < above_half < 0.04
