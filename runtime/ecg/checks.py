"""Plausibility checks on a recording, each raising a one-line `InputError`.

The limits catch broken files and wrong metadata, not disease: the widest real
QRS complexes stay under about 10 mV peak to peak, so 20 mV means the unit is
wrong (microvolts labelled as millivolts); a largest lead under 0.05 mV means
the opposite (volts labelled as millivolts) or a cart with its cables off.
"""

from __future__ import annotations

import numpy as np

from pulse_edge.errors import InputError

MIN_FS_HZ = 50.0  # below this a QRS (about 100 ms) is a handful of samples
MAX_FS_HZ = 20_000.0  # pacemaker-detection carts sample at up to ~16 kHz; above that it is not an ECG rate
MIN_SECONDS = 2.5  # one column of the 3x4 print; less holds at most one or two beats
PRINT_SECONDS = 10.0  # the print's 250 mm at 25 mm/s
MAX_SPAN_MV = 20.0
MIN_SPAN_MV = 0.05
FLAT_SPAN_MV = 1e-6  # float32 round-off of a constant signal
# Every lead's samples together, checked from a file's header where it has one (before anything is allocated):
# 1 GiB as float64, a 12-lead hour at 3 kHz. More is a Holter or a damaged length field, not a resting ECG.
MAX_SAMPLES = 2**27
_MAX_QUOTE = 160  # characters of a library's message quoted inside an error
# Robust span: 0.5th to 99.5th percentile, so a few pacemaker spikes or an
# electrode pop do not count as the lead's amplitude.
_SPAN_PERCENTILES = (0.5, 99.5)


def recording_error(source: str, problem: str, action: str = "") -> InputError:
    """The one-line error a cart operator sees: which file, what is wrong with it, what to do about it."""
    text = f"{source or '<recording>'}: {problem}" + (f"; {action}" if action else "")
    # Library messages quoted in `problem` may span lines; the CLI prints one.
    return InputError(" ".join(text.split()).rstrip(".") + ".")


def one_line(exc: BaseException) -> str:
    """A library exception as short single-line text, for quoting inside a recording error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= _MAX_QUOTE else text[: _MAX_QUOTE - 3] + "..."


def check_samples(total: int, source: str) -> None:
    if total > MAX_SAMPLES:
        raise recording_error(source, f"the recording holds {total:,} samples, more than the {MAX_SAMPLES:,} a "
                                      "resting ECG needs (a Holter, or a damaged length field)",
                              "export the 10 s to read (or the first minute) on its own")


def check_fs(fs: float, source: str) -> None:
    if isinstance(fs, bool) or not isinstance(fs, int | float | np.integer | np.floating):
        raise recording_error(source, f"the sampling rate must be a number of Hz, got {fs!r}",
                              "pass fs as a number (e.g. 500)")
    if not np.isfinite(fs) or not MIN_FS_HZ <= fs <= MAX_FS_HZ:
        raise recording_error(
            source,
            f"sampling rate {fs:g} Hz is outside {MIN_FS_HZ:g}-{MAX_FS_HZ:g} Hz",
            "check the file's sampling-rate field or the fs you passed",
        )


def check_finite(leads: dict[str, np.ndarray], fs: float, source: str) -> None:
    for name, samples in leads.items():
        bad = np.flatnonzero(~np.isfinite(samples))
        if bad.size:
            raise recording_error(
                source,
                f"lead {name} has {bad.size} missing or non-finite samples (first at {bad[0] / fs:.3f} s)",
                "re-export the recording; gaps cannot be printed",
            )


def check_duration(n_samples: int, fs: float, source: str, minimum_s: float = MIN_SECONDS) -> None:
    seconds = n_samples / fs
    if seconds < minimum_s:
        raise recording_error(
            source,
            f"only {seconds:.2f} s of signal; at least {minimum_s:g} s are needed "
            f"(the print shows {PRINT_SECONDS:g} s)",
            f"record at least {PRINT_SECONDS:g} s",
        )


def check_amplitudes(signals: np.ndarray, names: tuple[str, ...], source: str) -> list[str]:
    """Raise on flat or absurd leads; return notes for single flat leads."""
    low, high = np.percentile(signals, _SPAN_PERCENTILES, axis=1)
    spans = high - low
    exact = np.ptp(signals, axis=1)
    if np.all(exact <= FLAT_SPAN_MV):
        raise recording_error(
            source, "all leads are flat lines (constant values)", "check that the cables were connected"
        )
    widest = int(np.argmax(spans))
    if spans[widest] > MAX_SPAN_MV:
        raise recording_error(
            source,
            f"lead {names[widest]} spans {spans[widest]:.1f} mV peak to peak (limit {MAX_SPAN_MV:g} mV)",
            "the unit is probably wrong (microvolts stored as millivolts?); fix the unit in the export",
        )
    if spans[widest] < MIN_SPAN_MV:
        raise recording_error(
            source,
            f"the largest lead spans only {spans[widest] * 1000:.2f} uV peak to peak",
            "the unit is probably wrong (volts stored as millivolts?) or the cables were off",
        )
    return [f"lead {names[k]} is a flat line (electrode off?)" for k in np.flatnonzero(exact <= FLAT_SPAN_MV)]
