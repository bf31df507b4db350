"""A recording as a reader returns it, and its conversion to the 12 standard leads.

Readers keep whatever leads a file has (8 on many carts: I, II, V1..V6) and
convert units to millivolts themselves, because every format stores units its
own way. `to_twelve_lead` does the rest: names, derived limb leads, rate and
the checks, writing what it did into `notes` so it can be shown to a person.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pulse_edge.runtime.ecg import checks
from pulse_edge.runtime.ecg.checks import recording_error
from pulse_edge.runtime.ecg.derive import derive_limb_leads, disagreeing_limb_leads
from pulse_edge.runtime.ecg.leads import LEADS, LIMB_LEADS, PRECORDIAL_LEADS, normalise_lead_name
from pulse_edge.runtime.ecg.resample import resample

PRINT_FS = 500  # the rate every recording is brought to before it is drawn
MIN_FS_OUT = 100  # the renderer draws 25 mm/s; below 100 Hz a QRS is under 10 points
SHORTFALL_TOLERANCE_S = 0.02  # 0.5 mm on the print: filled by repeating the last sample
# Kept past the printed 10 s: the resampling kernel's reach (24 zero crossings: under 0.25 s at 100 Hz) with room.
KEPT_BEYOND_PRINT_S = 1.0
OFFSET_MV = 0.5  # a baseline further from 0 than this is an offset, not an ECG's own (ST shifts are ~0.1-0.3 mV)


@dataclass
class Recording:
    """Leads in millivolts at one sampling rate, as read from one file."""

    leads: dict[str, np.ndarray]  # name as the file spells it (or a standard name) -> [n] float32 mV
    fs: float
    source_format: str  # "dicom", "wfdb", "hl7-aecg", "csv", "npy", "array"
    notes: list[str] = field(default_factory=list)
    source: str = ""  # file name, used in error messages
    recorded_s: float | None = None  # how long the file's recording is, where the reader parsed only its start
    # channels a reader left out as no standard lead (respiration in Ohm, blood pressure in mmHg), as the file names
    # them: their units are not the ECG's to judge; the "ignored channels" note names them with the rest
    others: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.leads:
            if self.others:  # MIT-BIH's MLII is an ECG channel, just none of the 12 standard leads
                raise recording_error(self.source, "the file holds none of the 12 standard leads (its channels: "
                                      f"{', '.join(map(repr, self.others))})", "export the ECG's 12 leads")
            raise recording_error(self.source, "the file holds no ECG channels", "export the ECG leads")
        self.leads = {name: np.asarray(v, dtype=np.float32).reshape(-1) for name, v in self.leads.items()}
        lengths = {v.size for v in self.leads.values()}
        if len(lengths) != 1:
            raise recording_error(
                self.source, f"leads have different lengths {sorted(lengths)}", "export all leads over one time span"
            )

    @property
    def n_samples(self) -> int:
        return next(iter(self.leads.values())).size

    @property
    def duration_s(self) -> float:
        return self.n_samples / self.fs


@dataclass(frozen=True)
class TwelveLead:
    """The 12 standard leads in millivolts, rows in LEADS order, at one integer rate: what the print draws."""

    signals: np.ndarray  # [12, n] float32 mV
    fs: int
    source_format: str
    notes: tuple[str, ...] = ()
    leads: tuple[str, ...] = LEADS
    recorded_s: float | None = None  # how long the recording was, where only its printed start was kept

    @property
    def duration_s(self) -> float:
        return self.signals.shape[1] / self.fs


def samples_kept(fs: float) -> int:
    """How many samples from a recording's start the print uses: its 10 s and KEPT_BEYOND_PRINT_S more."""
    return math.ceil((checks.PRINT_SECONDS + KEPT_BEYOND_PRINT_S) * fs)


def to_twelve_lead(rec: Recording, fs_out: int = PRINT_FS) -> TwelveLead:
    """The recording as 12 checked leads at `fs_out`; appends what it did to rec.notes.

    Under 2.5 s (one column of the print) is refused. A recording a few samples
    short of 10 s (carts write 4999 samples for "10 s") has its last sample
    repeated; anything shorter is kept as it is and the print says so (see
    runtime/ecg/render.py): nothing is drawn that was not recorded.
    """
    source = rec.source
    if int(fs_out) != fs_out or fs_out < MIN_FS_OUT:
        raise ValueError(f"fs_out must be an integer >= {MIN_FS_OUT}, got {fs_out}")
    checks.check_fs(rec.fs, source)
    checks.check_duration(rec.n_samples, rec.fs, source)
    keep = samples_kept(rec.fs)
    recorded_s = rec.recorded_s or (rec.duration_s if rec.n_samples > keep else None)  # said where the rest went
    leads = _standard_leads(rec, keep=keep)
    checks.check_finite(leads, rec.fs, source)
    _complete_limb_leads(leads, rec)
    if odd := disagreeing_limb_leads(leads):  # drawn as supplied; said, since the model will read it as truth
        rec.notes.append("limb leads " + ", ".join(f"{lead} (off by {100 * miss:.0f}%)" for lead, miss in odd.items())
                         + " disagree with I and II by Einthoven's and Goldberger's laws: a channel may be swapped, "
                         "mislabelled or inverted")
    signals = np.stack([leads[name] for name in LEADS])  # [12, n]
    rec.notes.extend(checks.check_amplitudes(signals, LEADS, source))
    signals = _centred(signals, rec)
    if rec.fs != fs_out:
        signals = resample(signals, rec.fs, fs_out)
        rec.notes.append(f"resampled {rec.fs:g} Hz -> {fs_out} Hz")
    signals = _fill_last_samples(signals, int(fs_out), rec)
    return TwelveLead(signals.astype(np.float32), int(fs_out), rec.source_format, tuple(rec.notes),
                      recorded_s=recorded_s)


def _centred(signals: np.ndarray, rec: Recording) -> np.ndarray:
    """Leads whose baseline sits more than OFFSET_MV from 0 (an unfiltered export's DC offset) moved onto it, said
    in a note: drawn as recorded, a +4 mV offset put V1 40 mm up, across the row above. A cart's print removes it
    (its baseline filter); leads within OFFSET_MV are drawn exactly as recorded."""
    offsets = np.median(signals, axis=1)  # [12]: where each lead's isoelectric line lies (most samples are on it)
    moved = np.abs(offsets) > OFFSET_MV
    if moved.any():
        rec.notes.append("moved the baseline of " + ", ".join(
            f"{lead} ({offset:+.2f} mV)" for lead, offset, m in zip(LEADS, offsets, moved, strict=True) if m)
            + " to 0, as a cart's baseline filter would")
    return signals - np.where(moved, offsets, 0.0)[:, None]


def _standard_leads(rec: Recording, keep: int) -> dict[str, np.ndarray]:
    """Recorded channels under their standard names (float64), their first `keep` samples (what the print can
    show, and the resampling kernel's reach past it: an hour's Holter is not copied, checked and resampled whole
    to draw 10 s of it); others are dropped with a note."""
    leads: dict[str, np.ndarray] = {}
    ignored: list[str] = list(rec.others)
    for label, samples in rec.leads.items():
        name = normalise_lead_name(label)
        if name is None:
            ignored.append(label)
        elif name.lead in leads:
            rec.notes.append(f"channel {label!r} repeats lead {name.lead}; kept the first")
        else:
            kept = samples[:keep].astype(np.float64)
            leads[name.lead] = -kept if name.inverted else kept
            if name.inverted:  # a plain respelling ("AVR", "Lead V1") is not worth a note; this is
                rec.notes.append(f"channel {label!r} is inverted {name.lead}; inverted it back")
    if ignored:
        rec.notes.append(f"ignored channels that are not standard leads: {', '.join(map(repr, ignored))}")
    return leads


def _complete_limb_leads(leads: dict[str, np.ndarray], rec: Recording) -> None:
    """Add derived limb leads in place, or raise naming what is missing and why it matters."""
    missing_v = [lead for lead in PRECORDIAL_LEADS if lead not in leads]
    try:
        derived, pair = derive_limb_leads(leads)
    except ValueError:
        present = [lead for lead in LIMB_LEADS if lead in leads]
        why = f"only limb lead {present[0]} was recorded" if present else "no limb lead was recorded"
        raise recording_error(
            rec.source,
            f"missing {', '.join(lead for lead in LEADS if lead not in leads)}: {why}, and deriving the others "
            "needs two of I, II, III, aVR, aVL, aVF",
            "export all 12 leads, or at least I, II and V1-V6",
        ) from None
    if missing_v:
        raise recording_error(
            rec.source,
            f"missing chest leads {', '.join(missing_v)}, which cannot be derived from other leads",
            "export all 12 leads, or at least I, II and V1-V6",
        )
    if derived:
        leads.update(derived)
        rec.notes.append(f"derived {', '.join(derived)} from {' and '.join(pair)}")


def _fill_last_samples(signals: np.ndarray, fs: int, rec: Recording) -> np.ndarray:
    n_needed = round(checks.PRINT_SECONDS * fs)
    missing = n_needed - signals.shape[1]
    if not 0 < missing <= SHORTFALL_TOLERANCE_S * fs:
        return signals
    rec.notes.append(f"repeated the last sample to fill the final {missing / fs:.3f} s")
    return np.pad(signals, ((0, 0), (0, missing)), mode="edge")
