"""The signal side of recordings (runtime/ecg): lead names, limb-lead derivation, resampling, checks, 12 leads."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from pulse_testing.assertions import one_line
from pulse_testing.ecg_files import beats

from pulse_edge.runtime.ecg.derive import derive_limb_leads, disagreeing_limb_leads
from pulse_edge.runtime.ecg.leads import LEADS, LIMB_LEADS, PRECORDIAL_LEADS, LeadName, normalise_lead_name
from pulse_edge.runtime.ecg.recording import Recording, to_twelve_lead
from pulse_edge.runtime.ecg.resample import resample

FS = 500
N = 10 * FS


# --- lead names ----------------------------------------------------------------------------------
SPELLINGS = {
    "I": [
        "I",
        "i",
        "Lead I",
        "LEAD I",
        "lead_i",
        "DI",
        "D1",
        "MDC_ECG_LEAD_I",
        "Lead I (Einthoven)",
        "5.6.3-9-1",
        "2:1",
    ],
    # a hyphen joining "Lead" to the lead is no minus sign: "Lead-II" was read as an inverted II, and a file
    # labelled so was drawn upside down, every lead
    "II": ["II", "Lead II", "DII", "D2", "d2", "MDC_ECG_LEAD_II", "5.6.3-9-2", "2:2", " II ", "Lead-II", "LEAD-II",
           "lead - II", "Lead.II", "Ableitung-II", "lead_II"],
    "III": ["III", "DIII", "D3", "Lead III", "MDC_ECG_LEAD_III", "5.6.3-9-61", "2:61"],
    "aVR": ["aVR", "AVR", "avr", "Lead aVR", "MDC_ECG_LEAD_AVR", "5.6.3-9-62", "2:62", "aVR (Goldberger)"],
    "aVL": ["aVL", "AVL", "Lead aVL", "MDC_ECG_LEAD_AVL", "5.6.3-9-63", "2:63"],
    "aVF": ["aVF", "AVF", "Lead aVF", "MDC_ECG_LEAD_AVF", "5.6.3-9-64", "2:64"],
    "V1": ["V1", "v1", "C1", "Lead V1", "MDC_ECG_LEAD_V1", "5.6.3-9-3", "2:3", "Lead V1 (Wilson)"],
    "V4": ["V4", "C4", "c4", "Lead V4", "MDC_ECG_LEAD_V4", "5.6.3-9-6", "2:6"],
    "V6": ["V6", "C6", "MDC_ECG_LEAD_V6", "5.6.3-9-8", "2:8", "lead-V6", "ECG Lead V6"],
}


@pytest.mark.parametrize(("lead", "spelling"), [(lead, s) for lead, names in SPELLINGS.items() for s in names])
def test_spellings_map_to_the_standard_lead(lead, spelling):
    assert normalise_lead_name(spelling) == LeadName(lead)


@pytest.mark.parametrize("spelling", ["-aVR", "-AVR", "neg aVR", "MDC_ECG_LEAD_-aVR", "minus avr", "aVR (inverted)",
                                      "aVR [neg]", "aVR (-)", "aVR inverted", "aVR-", "Lead -aVR", "\u2212aVR",
                                      "Lead \u2212aVR", "aVR (\u2212)", "\u2013aVR"])
def test_negative_avr_is_recognised_as_inverted(spelling):
    assert normalise_lead_name(spelling) == LeadName("aVR", inverted=True)


@pytest.mark.parametrize(
    "spelling", ["MLII", "V4R", "V7", "RESP", "Pacemaker", "", "1", "12", "time", "X", "MDC_ECG_LEAD_V7", None,
                 "I-II", "II-I"]  # a difference of two leads is no lead ("I-II" once read as III)
)
def test_other_channels_are_not_standard_leads(spelling):
    assert normalise_lead_name(spelling) is None


def test_standard_names_are_fixed_points():
    assert [normalise_lead_name(lead).lead for lead in LEADS] == list(LEADS)


# --- resampling ----------------------------------------------------------------------------------

def _tone(freq, fs, seconds=10.0):
    t = np.arange(round(seconds * fs)) / fs
    return np.sin(2 * np.pi * freq * t)[None, :]


def _amplitude(y):
    middle = y[0, y.shape[1] // 4 : 3 * y.shape[1] // 4]  # away from the edges
    return np.sqrt(2 * np.mean(middle**2))


EDGE = 30  # output samples near each end, where the repeated edge sample is not the true signal


@pytest.mark.parametrize("freq", [0.5, 10.0, 40.0, 100.0, 150.0])
def test_downsampling_keeps_the_ecg_band(freq):
    y = resample(_tone(freq, 1000), 1000, 500)
    assert y.shape == (1, 5000)
    np.testing.assert_allclose(y[:, EDGE:-EDGE], _tone(freq, 500)[:, EDGE:-EDGE], atol=2e-3)


@pytest.mark.parametrize("freq", [260.0, 300.0, 400.0, 490.0])
def test_downsampling_removes_what_would_alias(freq):
    assert _amplitude(resample(_tone(freq, 1000), 1000, 500)) < 1e-3


@pytest.mark.parametrize(("fs_in", "freq"), [(250, 40.0), (250, 80.0), (360, 100.0), (257.5, 60.0)])
def test_upsampling_and_odd_ratios_interpolate_band_limited_signals(fs_in, freq):
    y = resample(_tone(freq, fs_in), fs_in, 500)
    expected = _tone(freq, 500)[:, : y.shape[1]]
    np.testing.assert_allclose(y[:, EDGE:-EDGE], expected[:, EDGE:-EDGE], atol=3e-3)


def test_constant_offsets_pass_unchanged_to_the_edges():
    x = np.full((3, 1000), 1.7)
    np.testing.assert_allclose(resample(x, 1000, 500), 1.7, rtol=0, atol=1e-12)


def test_same_rate_is_a_copy():
    x = np.arange(10.0)[None]
    y = resample(x, 500, 500)
    assert np.array_equal(x, y) and y is not x


def test_long_inputs_are_processed_in_blocks():
    x = _tone(5.0, 1000, seconds=60.0)  # 30000 outputs: many blocks
    y, expected = resample(x, 1000, 500), _tone(5.0, 500, seconds=60.0)
    np.testing.assert_allclose(y[:, EDGE:-EDGE], expected[:, EDGE:-EDGE], atol=1e-4)
    assert np.abs(y - expected).max() < 0.01  # the edges stay close too


# --- recordings to 12 leads -----------------------------------------------------------------------

def _rec(leads, fs=FS, source="test.rec"):
    return Recording(dict(leads), fs, "test", source=source)


def _full(n=N, fs=FS, **kwargs):
    return dict(zip(LEADS, beats(n, fs, **kwargs), strict=True))


def test_limb_leads_from_i_and_ii_are_the_textbook_formulas_exactly():
    full = _full()
    rec = _rec({k: v for k, v in full.items() if k not in ("III", "aVR", "aVL", "aVF")})
    out = to_twelve_lead(rec)
    signals, fs = out.signals, out.fs
    i, ii = (rec.leads[k].astype(np.float64) for k in ("I", "II"))
    expected = {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}
    for lead, values in expected.items():
        assert np.array_equal(signals[LEADS.index(lead)], values.astype(np.float32)), lead
    assert fs == FS
    assert rec.notes == ["derived III, aVR, aVL, aVF from I and II"]


def test_lead_i_from_ii_and_iii_is_ii_minus_iii_exactly():
    full = _full()
    rec = _rec({k: full[k] for k in ("II", "III", *PRECORDIAL_LEADS)})
    signals = to_twelve_lead(rec).signals
    ii, iii = (rec.leads[k].astype(np.float64) for k in ("II", "III"))
    assert np.array_equal(signals[0], (ii - iii).astype(np.float32))
    assert rec.notes == ["derived I, aVR, aVL, aVF from II and III"]


@pytest.mark.parametrize("pair", list(combinations(LIMB_LEADS, 2)))
def test_any_two_limb_leads_give_back_all_six(pair):
    full = {k: v.astype(np.float64) for k, v in _full().items()}
    derived, used = derive_limb_leads({k: full[k] for k in pair})
    assert used == pair
    for lead, values in derived.items():
        np.testing.assert_allclose(values, full[lead], rtol=0, atol=1e-12)


def test_missing_chest_leads_are_named():
    full = _full()
    rec = _rec({k: v for k, v in full.items() if k not in ("V3", "V5")})
    message = one_line("missing chest leads V3, V5", to_twelve_lead, rec)
    assert message.startswith("test.rec: ")


def test_one_limb_lead_is_not_enough():
    full = _full()
    rec = _rec({k: full[k] for k in ("II", *PRECORDIAL_LEADS)})
    one_line(r"missing I, III, aVR, aVL, aVF: only limb lead II was recorded", to_twelve_lead, rec)


def test_inverted_avr_is_turned_back_with_a_note():
    full = _full()
    leads = {("-aVR" if k == "aVR" else k): (-v if k == "aVR" else v) for k, v in full.items()}
    rec = _rec(leads)
    signals = to_twelve_lead(rec).signals
    assert np.array_equal(signals[3], full["aVR"].astype(np.float32))
    assert "channel '-aVR' is inverted aVR; inverted it back" in rec.notes


def test_unknown_channels_are_ignored_with_a_note():
    rec = _rec({**_full(), "RESP": np.zeros(N), "Pace": np.zeros(N)})
    to_twelve_lead(rec)
    assert "ignored channels that are not standard leads: 'RESP', 'Pace'" in rec.notes


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples_are_refused(bad):
    leads = _full()
    leads["V2"] = leads["V2"].copy()
    leads["V2"][1234] = bad
    one_line(r"lead V2 has 1 missing or non-finite samples \(first at 2.468 s\)", to_twelve_lead, _rec(leads))


def test_all_flat_is_refused():
    rec = _rec({lead: np.full(N, 0.3) for lead in LEADS})
    one_line("all leads are flat lines.*cables", to_twelve_lead, rec)


def test_one_flat_lead_is_a_note():
    leads = _full()
    leads["V4"] = np.zeros(N)
    rec = _rec(leads)
    to_twelve_lead(rec)
    assert "lead V4 is a flat line (electrode off?)" in rec.notes


def test_microvolts_labelled_as_millivolts_are_refused():
    rec = _rec({k: v * 1000.0 for k, v in _full().items()})
    one_line(r"spans .* mV peak to peak \(limit 20 mV\).*unit is probably wrong", to_twelve_lead, rec)


def test_volts_labelled_as_millivolts_are_refused():
    rec = _rec({k: v / 1000.0 for k, v in _full().items()})
    one_line(r"largest lead spans only .* uV.*unit is probably wrong", to_twelve_lead, rec)


@pytest.mark.parametrize("fs", [10.0, 49.9, 20_001.0, float("nan")])
def test_absurd_sampling_rates_are_refused(fs):
    n = max(int(12 * fs), 10) if fs == fs else 100
    rec = _rec({k: np.zeros(n) for k in LEADS}, fs=fs)
    one_line("sampling rate .* is outside 50-20000 Hz", to_twelve_lead, rec)


def test_under_two_and_a_half_seconds_is_refused():
    rec = _rec(_full(n=round(2.4 * FS)))
    message = one_line(r"only 2.40 s of signal; at least 2.5 s are needed \(the print shows 10 s\)",
                       to_twelve_lead, rec)
    assert message.startswith("test.rec: ") and message.endswith(".")


def test_short_records_are_kept_as_recorded():
    rec = _rec(_full(n=6 * FS))
    out = to_twelve_lead(rec)
    assert out.signals.shape == (12, 6 * FS) and out.duration_s == 6.0
    assert rec.notes == []  # nothing padded, nothing invented


def test_a_few_missing_samples_are_filled_with_a_note():
    rec = _rec(_full(n=N - 3))
    signals = to_twelve_lead(rec).signals
    assert signals.shape == (12, N)
    assert "repeated the last sample to fill the final 0.006 s" in rec.notes


def test_a_long_record_keeps_what_the_print_shows_and_says_how_long_it_was():
    """Only the first 10 s are drawn: the rest is not copied, checked or resampled (an hour's Holter would be)."""
    twelve = to_twelve_lead(_rec(_full(n=30 * FS)))
    assert twelve.signals.shape == (12, 11 * FS) and twelve.recorded_s == 30.0
    resampled = to_twelve_lead(_rec(_full(n=30 * 1000, fs=1000, noise_mv=0.0), fs=1000), 500)
    assert resampled.signals.shape == (12, 11 * 500) and resampled.recorded_s == 30.0


def test_resampling_note_and_length():
    rec = _rec(_full(n=10 * 1000, fs=1000, noise_mv=0.0), fs=1000)
    out = to_twelve_lead(rec, 500)
    signals, fs = out.signals, out.fs
    assert (signals.shape, fs, signals.dtype) == ((12, N), 500, np.float32)
    assert rec.notes == ["resampled 1000 Hz -> 500 Hz"]
    np.testing.assert_allclose(signals, beats(N, 500, noise_mv=0.0), atol=2e-3)


def test_leads_of_different_lengths_are_refused():
    one_line(
        r"leads have different lengths \[4999, 5000\]", Recording, {"I": np.zeros(N), "II": np.zeros(N - 1)}, FS, "t"
    )


def test_empty_recording_is_refused():
    one_line("holds no ECG channels", Recording, {}, FS, "t", source="empty.csv")


def test_bad_fs_out_is_a_programming_error():
    with pytest.raises(ValueError, match="fs_out"):
        to_twelve_lead(_rec(_full()), 62.5)


def test_a_lead_offset_from_its_baseline_is_moved_onto_it_and_said():
    """An unfiltered export's +4 mV on V1 would put V1 40 mm up, across the row above; a cart's baseline filter
    removes it. Leads within 0.5 mV of 0 (every real baseline) are left exactly as recorded."""
    leads = _full(noise_mv=0.0)
    shifted = {**leads, "V1": leads["V1"] + 4.0}
    rec = _rec(shifted)
    twelve = to_twelve_lead(rec)
    v1 = twelve.signals[LEADS.index("V1")]
    assert abs(float(np.median(v1))) < 0.05 and any("moved the baseline of V1 (+4." in note for note in rec.notes)
    untouched = to_twelve_lead(_rec(leads))
    np.testing.assert_array_equal(untouched.signals[LEADS.index("II")], twelve.signals[LEADS.index("II")])
    assert not any("baseline" in note for note in untouched.notes)


def test_supplied_limb_leads_that_break_einthovens_law_are_said():
    """Channels swapped or inverted without a label would be drawn as fact; the laws that tie the six limb leads
    to I and II tell them apart, and a note says which (the print keeps what was supplied)."""
    leads = _full(noise_mv=0.0)
    swapped = {**leads, "III": leads["aVF"], "aVF": leads["III"]}
    rec = _rec(swapped)
    to_twelve_lead(rec)
    note = next(n for n in rec.notes if "disagree with I and II" in n)
    assert "III (off by" in note and "aVF (off by" in note and "aVR" not in note
    unmarked = _rec({**leads, "aVR": -leads["aVR"]})  # inverted, no label says so
    to_twelve_lead(unmarked)
    assert any("aVR (off by 200%)" in n for n in unmarked.notes)
    consistent = _rec(leads)
    to_twelve_lead(consistent)
    assert not any("disagree" in n for n in consistent.notes)


def test_a_flat_limb_lead_is_not_off_by_its_noise():
    """A frontal axis along I makes III flat (I = II): what the laws leave there is each channel's own noise, which
    over III's own tiny rms would read as 100% "off". The 0.15 mV floor under the scale keeps it unsaid, and a
    channel of real size supplied wrongly is still said."""
    rng = np.random.default_rng(0)
    wave = _full(noise_mv=0.0)["II"]
    noise = {lead: rng.normal(0.0, 0.015, wave.shape) for lead in ("I", "II", "III")}  # 15 uV per channel
    leads = {"I": wave + noise["I"], "II": wave + noise["II"], "III": noise["III"]}
    assert disagreeing_limb_leads(leads) == {}
    miss = disagreeing_limb_leads({**leads, "III": -wave})["III"]  # III given as -I: off by its whole size
    assert miss > 0.9
