"""Anti-aliased sample-rate conversion with numpy alone (scipy is too heavy for the cart runtime).

Method: band-limited interpolation with a Kaiser-windowed sinc kernel (the
classic method for arbitrary ratios, as in Smith's resampling notes). Every
output sample is a weighted sum of the input samples around its position on
the input time axis; the kernel is a low-pass filter whose cut-off sits below
the *lower* of the two Nyquist frequencies, so

* downsampling (1000 -> 500 Hz) removes what the new rate cannot hold instead
  of folding it back as aliases (a plain decimation or linear interpolation
  would fold 300 Hz pacemaker-spike energy down to 200 Hz);
* upsampling (250 -> 500 Hz) interpolates with the ideal (sinc) interpolator
  rather than straight lines, which would flatten R peaks.

It works for any ratio, rational or not (257.5 Hz happens), unlike polyphase
filtering that needs up/down integers. The cost is 2*half_width (48) taps (more when
decimating) per output sample per lead: about 0.15 s for 10 s of 12 leads at 1 kHz on one core.

The window's edges are handled by repeating the first/last sample, not by
zeros: an ECG rarely sits at 0 mV and zero padding would draw a step at the ends.
"""

from __future__ import annotations

import math

import numpy as np

# The gathered [leads, chunk, taps] float64 array's budget: the chunk of output samples shrinks as the taps grow
# (20 kHz -> 500 Hz takes 1920 taps: a 2048-sample chunk of 12 leads was 377 MB, 16 MiB now).
_BLOCK_BYTES = 16 * 2**20
_MAX_CHUNK = 2048


def resample(
    signals: np.ndarray,
    fs_in: float,
    fs_out: float,
    *,
    half_width: int = 24,
    beta: float = 8.6,
    rolloff: float = 0.9,
) -> np.ndarray:
    """[leads, n] sampled at `fs_in` -> [leads, round(n * fs_out / fs_in)] at `fs_out` (float64).

    half_width: kernel zero crossings on each side; beta: Kaiser shape (8.6 gives
    about 80 dB stop-band); rolloff: the -6 dB point as a fraction of the lower
    Nyquist frequency. With the defaults, 1000 -> 500 Hz passes 0-200 Hz within
    0.2 % (the diagnostic ECG band ends at 150 Hz), halves 225 Hz and stops
    250 Hz and up below -80 dB, so nothing aliases into the output band.
    """
    x = np.asarray(signals, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"signals must be [leads, samples], got shape {x.shape}")
    if fs_in <= 0 or fs_out <= 0:
        raise ValueError(f"sampling rates must be positive, got {fs_in} and {fs_out}")
    if fs_in == fs_out:
        return x.copy()
    n_in = x.shape[1]
    n_out = max(1, round(n_in * fs_out / fs_in))
    step = fs_in / fs_out  # input samples per output sample
    shrink = min(1.0, fs_out / fs_in)  # < 1 when decimating: the kernel widens by 1/shrink
    cutoff = rolloff * shrink  # in units of the input Nyquist frequency
    reach = math.ceil(half_width / shrink)  # input samples on each side of an output position
    offsets = np.arange(-reach + 1, reach + 1)
    out = np.empty((x.shape[0], n_out))
    chunk = max(1, min(_MAX_CHUNK, _BLOCK_BYTES // (8 * x.shape[0] * offsets.size)))
    for start in range(0, n_out, chunk):
        positions = np.arange(start, min(start + chunk, n_out)) * step
        taps = np.floor(positions).astype(np.int64)[:, None] + offsets  # [chunk, 2*reach]
        weights = _kernel(positions[:, None] - taps, cutoff, reach, beta)
        # Clipping the indices repeats the edge samples: see the module docstring.
        gathered = x[:, np.clip(taps, 0, n_in - 1)]  # [leads, chunk, taps]
        out[:, start : start + positions.size] = np.einsum("lct,ct->lc", gathered, weights)
    return out


def _kernel(distance: np.ndarray, cutoff: float, reach: int, beta: float) -> np.ndarray:
    """Windowed-sinc weights for `distance` (input samples from each tap to the output position).

    Rows are normalised to sum to 1 so a constant (the baseline) passes unchanged
    at every output position, whatever the truncation error of the window.
    """
    window_arg = np.clip(1.0 - (distance / reach) ** 2, 0.0, None)
    window = np.i0(beta * np.sqrt(window_arg)) / np.i0(beta)
    weights = cutoff * np.sinc(cutoff * distance) * window
    return weights / weights.sum(axis=1, keepdims=True)


def resampled_length(n_in: int, fs_in: float, fs_out: float) -> int:
    """How many samples `resample` returns for `n_in` input samples."""
    return n_in if fs_in == fs_out else max(1, round(n_in * fs_out / fs_in))
