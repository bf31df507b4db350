"""Synthetic 12-lead ECG signals with known labels.

The heart is modelled as one moving electric dipole (a vectorcardiogram): every
beat adds Gaussian-shaped P, Q, R, S and T components, each pointing in its own
3-D direction. Leads are projections of that dipole onto lead vectors, so the
waveforms of different leads are consistent with each other the way real ones
are (R/S progression across V1..V6, negative aVR, biphasic P in V1).

Only I, II and V1..V6 are independent; III, aVR, aVL and aVF are computed from
I and II so that Einthoven's and Goldberger's identities hold exactly, noise and
baseline wander included.

Coordinates: x points to the patient's left, y inferior (towards the feet),
z anterior (out of the chest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from pulse_edge.choices import RHYTHMS
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.leads import LEADS

__all__ = ["LEADS", "RHYTHMS", "EcgRecord", "synthesize_ecg"]

Vec3 = tuple[float, float, float]


@dataclass(frozen=True)
class _RhythmSpec:
    """What distinguishes one rhythm: rate range, RR regularity, atrial activity, labels."""

    rate_range_bpm: tuple[float, float]
    pr_range_s: tuple[float, float]  # P onset to QRS onset; unused without P waves
    has_p_waves: bool
    labels: tuple[str, ...]
    description: str  # str.format template with {rate} (bpm) and {pr} (ms)


# In pulse_edge.choices.RHYTHMS order.
_RHYTHM_SPECS = MappingProxyType(dict(zip(RHYTHMS, (
    _RhythmSpec((60.0, 100.0), (0.13, 0.19), True, ("NORM", "SR"), "Sinus rhythm at {rate} bpm."),
    _RhythmSpec((100.0, 150.0), (0.12, 0.16), True, ("STACH",), "Sinus tachycardia at {rate} bpm."),
    _RhythmSpec((40.0, 59.0), (0.14, 0.20), True, ("SBRAD",), "Sinus bradycardia at {rate} bpm."),
    _RhythmSpec((50.0, 150.0), (0.0, 0.0), False, ("AFIB",),
                "Atrial fibrillation with a ventricular rate of {rate} bpm."),
    _RhythmSpec((60.0, 100.0), (0.22, 0.30), True, ("SR", "1AVB"),
                "Sinus rhythm at {rate} bpm with first-degree AV block (PR {pr} ms)."),
), strict=True)))



@dataclass(frozen=True)
class _Wave:
    """One Gaussian component of the dipole, timed relative to its anchor (P centre, R peak, T peak)."""

    offset_s: float
    sigma_s: float
    direction: Vec3
    amplitude_mv: float


# Atrial depolarisation: right atrium first (anterior, inferior), then left atrium
# (leftward, posterior) -- which is what makes P biphasic in V1.
_P_WAVES = (
    _Wave(-0.020, 0.017, (0.15, 0.75, 0.65), 0.17),
    _Wave(0.020, 0.018, (0.70, 0.55, -0.45), 0.15),
)

# Ventricular depolarisation, anchored at the R peak: septal forces (rightward,
# anterior -> q in I/V6, r in V1), apical forces (inferior, anterior), the dominant
# left-ventricular free wall (leftward, posterior -> tall R in V5/V6, deep S in V1/V2)
# and terminal basal forces (superior, posterior -> small s waves).
_QRS_WAVES = (
    _Wave(-0.028, 0.008, (-0.55, 0.20, 0.80), 0.18),
    _Wave(-0.010, 0.010, (0.50, 0.70, 0.50), 1.00),
    _Wave(0.004, 0.011, (0.60, 0.30, -0.75), 1.30),
    _Wave(0.026, 0.010, (-0.30, -0.50, -0.80), 0.40),
)
_QRS_ONSET_S = 0.045  # QRS onset before the R peak; the QRS lasts about twice this

# Repolarisation, anchored at the T peak: a broad early lobe and a narrower late
# one, so the T wave rises slowly and falls faster, as real T waves do.
_T_WAVES = (
    _Wave(-0.030, 0.050, (0.60, 0.60, 0.50), 0.22),
    _Wave(0.008, 0.032, (0.60, 0.60, 0.50), 0.16),
)
_T_END_AFTER_PEAK_S = 0.085

# Lead vectors of the independent leads (I, II, V1..V6). Precordial electrodes sit
# around the horizontal plane, V1 right of the sternum to V6 on the left flank; their
# gains exceed the limb leads' because the electrodes are closer to the heart.
_LIMB_VECTORS: tuple[Vec3, ...] = ((1.0, 0.0, 0.0), (0.5, math.sqrt(3.0) / 2.0, 0.0))
_PRECORDIAL = (  # (angle from the left axis towards anterior in degrees, gain)
    (120.0, 1.20),
    (100.0, 1.80),
    (75.0, 1.90),
    (55.0, 1.90),
    (30.0, 1.60),
    (5.0, 1.25),
)
_PRECORDIAL_TILT = 0.12  # electrodes sit a little below the heart's centre


@dataclass(frozen=True)
class EcgRecord:
    """A synthetic 12-lead recording and the facts it was generated from."""

    signals: np.ndarray  # [12, n_samples] float32 millivolts, rows in LEADS order
    fs: int
    rhythm: str
    heart_rate_bpm: float  # 60 / mean RR of beat_times_s
    beat_times_s: np.ndarray  # R-peak times in seconds
    labels: tuple[str, ...]  # PTB-XL style statement codes
    description: str  # one-sentence plain-English reading

    @property
    def duration_s(self) -> float:
        return self.signals.shape[1] / self.fs


def synthesize_ecg(
    rhythm: str,
    *,
    seed: int,
    duration_s: float = 10.0,
    fs: int = 500,
    heart_rate_bpm: float | None = None,
) -> EcgRecord:
    """A reproducible 12-lead ECG of `rhythm`; the same seed gives the same record."""
    spec = _validate(rhythm, duration_s, fs, heart_rate_bpm)
    rng = np.random.default_rng(seed)
    rate = heart_rate_bpm if heart_rate_bpm is not None else rng.uniform(*spec.rate_range_bpm)
    resp_hz, resp_phase = rng.uniform(0.18, 0.32), rng.uniform(0.0, 2.0 * math.pi)
    beats, in_window = _beat_times(spec, rng, rate, duration_s, (resp_hz, resp_phase))
    pr_s = rng.uniform(*spec.pr_range_s)
    n = round(duration_s * fs)
    t = np.arange(n) / fs
    dipole = _heart_dipole(spec, rng, beats, pr_s, (resp_hz, resp_phase), n, fs)
    independent = dipole @ _lead_matrix().T
    independent += _artifacts(rng, t, resp_hz, independent.shape[1])
    kept = beats[in_window]
    realised = 60.0 / float(np.mean(np.diff(kept)))
    return EcgRecord(
        signals=_twelve_leads(independent),
        fs=fs,
        rhythm=rhythm,
        heart_rate_bpm=realised,
        beat_times_s=kept,
        labels=spec.labels,
        description=spec.description.format(rate=round(realised), pr=round(pr_s * 1000.0)),
    )


def _validate(rhythm: str, duration_s: float, fs: int, heart_rate_bpm: float | None) -> _RhythmSpec:
    if rhythm not in _RHYTHM_SPECS:
        raise ConfigError(f"unknown rhythm {rhythm!r}; allowed: {', '.join(RHYTHMS)}")
    spec = _RHYTHM_SPECS[rhythm]
    lo, hi = spec.rate_range_bpm
    if heart_rate_bpm is not None and not lo <= heart_rate_bpm <= hi:
        raise ConfigError(f"heart_rate_bpm {heart_rate_bpm} is outside {lo:g}-{hi:g} bpm for {rhythm!r}")
    # Below 5 s a 40-bpm record may hold fewer than two beats, so no rate exists.
    if not 5.0 <= duration_s <= 600.0:
        raise ConfigError(f"duration_s {duration_s} must be between 5 and 600 seconds")
    if not 100 <= fs <= 10_000:
        raise ConfigError(f"fs {fs} must be between 100 and 10000 Hz")
    return spec


def _beat_times(
    spec: _RhythmSpec, rng: np.random.Generator, rate: float, duration_s: float, resp: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times, one unrecorded beat either side, and the mask of those inside the record.

    The RR intervals between recorded beats are rescaled so their mean is exactly
    60 / rate: the rate the caller asked for is the rate the beat times realise.
    """
    mean_rr = 60.0 / rate
    first = rng.uniform(0.1, 0.1 + 0.8 * mean_rr)
    n_intervals = int((duration_s - 0.02 - first) // mean_rr)
    relative = _relative_rr(spec, rng, n_intervals + 2, mean_rr, resp)
    inner = relative[1:-1] * (mean_rr * n_intervals / relative[1:-1].sum())
    recorded = first + np.concatenate(([0.0], np.cumsum(inner)))
    before = first - relative[0] * mean_rr
    # The beat after the record must not land inside it, or the trace would show a
    # QRS that beat_times_s does not list.
    after = recorded[-1] + max(relative[-1] * mean_rr, duration_s - recorded[-1] + 0.05)
    beats = np.concatenate(([before], recorded, [after]))
    in_window = np.zeros(beats.size, dtype=bool)
    in_window[1:-1] = True
    return beats, in_window


def _relative_rr(
    spec: _RhythmSpec, rng: np.random.Generator, n: int, mean_rr: float, resp: tuple[float, float]
) -> np.ndarray:
    """RR intervals as multiples of the mean RR."""
    if not spec.has_p_waves:
        # AF: the AV node passes impulses at random -- irregularly irregular, CV ~0.2-0.3.
        return np.clip(rng.lognormal(0.0, rng.uniform(0.25, 0.32), n), 0.5, 1.9)
    # Sinus: respiratory sinus arrhythmia plus a little beat-to-beat jitter; the
    # swing shrinks at fast rates as it does physiologically.
    resp_hz, resp_phase = resp
    swing = 0.035 * min(1.0, mean_rr / 0.8)
    times = np.arange(n) * mean_rr
    return 1.0 + swing * np.sin(2.0 * math.pi * resp_hz * times + resp_phase) + rng.normal(0.0, 0.008, n)


def _heart_dipole(
    spec: _RhythmSpec,
    rng: np.random.Generator,
    beats: np.ndarray,
    pr_s: float,
    resp: tuple[float, float],
    n: int,
    fs: int,
) -> np.ndarray:
    """The [n, 3] dipole of all beats (and f-waves for AF) in millivolts."""
    rotation = _anatomy(rng)
    resp_hz, resp_phase = resp
    # Breathing moves the heart relative to the electrodes: QRS amplitude swings a few %.
    scale = (
        1.0 + 0.04 * np.sin(2.0 * math.pi * resp_hz * beats + resp_phase) + rng.normal(0.0, 0.01, beats.size)
    )
    scale *= rng.uniform(0.85, 1.15)
    rr = np.diff(beats, prepend=beats[0] - (beats[1] - beats[0]))
    qt = rng.uniform(0.39, 0.42) - 0.154 * (1.0 - rr)  # Framingham: QT shortens with RR
    t_peak = beats - _QRS_ONSET_S + qt - _T_END_AFTER_PEAK_S
    events = [
        _events(_QRS_WAVES, beats, scale, rotation, 1.0),
        _events(_T_WAVES, t_peak, scale, rotation, qt / 0.40),
    ]
    if spec.has_p_waves:
        p_centre = beats - _QRS_ONSET_S - pr_s + 0.05
        events.append(_events(_P_WAVES, p_centre, np.ones_like(beats), rotation, 1.0))
    centres, sigmas, amps = (np.concatenate(parts) for parts in zip(*events, strict=True))
    dipole = _sum_gaussians(centres, sigmas, amps, n, fs)
    if not spec.has_p_waves:
        dipole += _fibrillation(rng, np.arange(n) / fs) @ rotation.T
    return dipole


def _anatomy(rng: np.random.Generator) -> np.ndarray:
    """A random rotation of the heart in the chest: electrical axis varies between people."""
    frontal = math.radians(rng.normal(0.0, 10.0))  # about z: shifts the frontal-plane axis
    horizontal = math.radians(rng.normal(0.0, 8.0))  # about y: shifts the R/S transition
    cf, sf, ch, sh = math.cos(frontal), math.sin(frontal), math.cos(horizontal), math.sin(horizontal)
    about_z = np.array([[cf, -sf, 0.0], [sf, cf, 0.0], [0.0, 0.0, 1.0]])
    about_y = np.array([[ch, 0.0, -sh], [0.0, 1.0, 0.0], [sh, 0.0, ch]])
    return about_y @ about_z


def _events(
    waves: tuple[_Wave, ...],
    anchors: np.ndarray,
    scale: np.ndarray,
    rotation: np.ndarray,
    stretch: np.ndarray | float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centres [m], widths [m] and amplitude vectors [m, 3] of `waves` placed at every anchor."""
    stretch = np.broadcast_to(np.asarray(stretch, dtype=float), anchors.shape)
    directions = np.array([w.direction for w in waves], dtype=float)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    vectors = (directions @ rotation.T) * np.array([w.amplitude_mv for w in waves])[:, None]
    offsets = np.array([w.offset_s for w in waves])
    sigmas = np.array([w.sigma_s for w in waves])
    centres = anchors[None, :] + offsets[:, None] * stretch[None, :]
    widths = sigmas[:, None] * stretch[None, :]
    amps = vectors[:, None, :] * scale[None, :, None]
    return centres.ravel(), widths.ravel(), amps.reshape(-1, 3)


def _sum_gaussians(centres: np.ndarray, sigmas: np.ndarray, amps: np.ndarray, n: int, fs: int) -> np.ndarray:
    """Sum of Gaussian pulses, each evaluated only within +-4 sigma of its centre."""
    half = math.ceil(4.0 * float(sigmas.max()) * fs)
    index = np.rint(centres * fs).astype(np.int64)[:, None] + np.arange(-half, half + 1)
    shape = np.exp(-0.5 * ((index / fs - centres[:, None]) / sigmas[:, None]) ** 2)
    inside = (index >= 0) & (index < n)
    flat_index, flat_shape = index[inside], shape[inside]
    weights = np.broadcast_to(amps[:, None, :], (*index.shape, 3))[inside]
    return np.stack(
        [np.bincount(flat_index, weights=flat_shape * weights[:, axis], minlength=n) for axis in range(3)],
        axis=1,
    )


def _fibrillation(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """AF f-waves: three drifting 4-9 Hz atrial wavelets, pointed so they show most in V1 and II."""
    out = np.zeros((t.size, 3))
    directions = ((-0.25, 0.45, 0.85), (0.15, 0.90, 0.40), (-0.60, 0.30, 0.75))
    for direction in directions:
        # Wandering frequency and amplitude make the waves chaotic rather than flutter-like.
        drift = sum(
            rng.uniform(0.2, 0.45)
            * np.sin(2.0 * math.pi * rng.uniform(0.2, 1.2) * t + rng.uniform(0, 2 * math.pi))
            for _ in range(3)
        )
        freq = rng.uniform(5.5, 7.0) + drift  # stays within 4-9 Hz
        phase = 2.0 * math.pi * np.cumsum(freq) * (t[1] - t[0]) + rng.uniform(0.0, 2.0 * math.pi)
        swell = np.sin(2.0 * math.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * math.pi))
        envelope = rng.uniform(0.02, 0.04) * (1.0 + 0.5 * swell)
        out += (envelope * np.sin(phase))[:, None] * (np.array(direction) / np.linalg.norm(direction))
    return out


def _lead_matrix() -> np.ndarray:
    """[8, 3] lead vectors of I, II, V1..V6."""
    precordial = [
        (gain * math.cos(math.radians(a)), gain * _PRECORDIAL_TILT, gain * math.sin(math.radians(a)))
        for a, gain in _PRECORDIAL
    ]
    return np.array([*_LIMB_VECTORS, *precordial])


def _artifacts(rng: np.random.Generator, t: np.ndarray, resp_hz: float, n_leads: int) -> np.ndarray:
    """[n, n_leads] baseline wander (breathing plus slow electrode drift) and wide-band noise."""
    shape = (1, n_leads)
    wander = rng.uniform(0.02, 0.06, shape) * np.sin(
        2.0 * math.pi * resp_hz * t[:, None] + rng.uniform(0, 2 * math.pi, shape)
    )
    drift = rng.uniform(0.01, 0.04, shape) * np.sin(
        2.0 * math.pi * rng.uniform(0.03, 0.08, shape) * t[:, None] + rng.uniform(0, 2 * math.pi, shape)
    )
    return wander + drift + rng.normal(0.0, 0.008, (t.size, n_leads))


def _twelve_leads(independent: np.ndarray) -> np.ndarray:
    """[12, n] float32 in LEADS order; III and the augmented leads follow from I and II exactly."""
    lead_i, lead_ii = independent[:, 0], independent[:, 1]
    limb = np.stack(
        [
            lead_i,
            lead_ii,
            lead_ii - lead_i,
            -(lead_i + lead_ii) / 2.0,
            lead_i - lead_ii / 2.0,
            lead_ii - lead_i / 2.0,
        ]
    )
    return np.concatenate([limb, independent[:, 2:].T]).astype(np.float32)
