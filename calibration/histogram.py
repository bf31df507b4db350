"""Streaming activation statistics for calibration, in fixed memory.

- AbsHistogram: a histogram of |x| whose range grows by merging bins, and the four ways to
  turn it into a clip value (amax): minmax, percentile, entropy (KL), mse.
- ChannelStats: per-input-channel absmax and mean |x| (SmoothQuant and AWQ inputs).
- RowReservoir: a uniform random sample of activation rows (the scale searches' sample rows).

Nothing here keeps the activations themselves: a histogram is num_bins counts, the channel
statistics are two [K] vectors, the reservoir is capacity rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from pulse_edge.calibration.quant_math import FP8_DTYPE
from pulse_edge.choices import CALIBRATION_METHODS

METHODS = CALIBRATION_METHODS
TARGETS = ("int8", "fp8")
DEFAULT_BINS = 2048
# Only where a whole quantization level held no values before the clipped outliers were folded
# into the last bin can Q be 0 where P is not; this floor keeps that divergence finite but large.
_KL_FLOOR = 1e-12
# Candidate clip values the mse search evaluates at once: bounds the [candidates, bins] work array.
_MSE_CHUNK = 256


def _finite_abs(x: np.ndarray) -> np.ndarray:
    """|x| flattened, float64; ValueError on NaN or inf (a calibration batch with them is broken)."""
    a = np.abs(np.asarray(x, dtype=np.float64)).reshape(-1)
    if a.size and not np.isfinite(a.max()):
        raise ValueError("activation batch has NaN or infinite values")
    return a


def _merge_bins(counts: np.ndarray, factor: int) -> np.ndarray:
    """Sum each group of `factor` adjacent bins into one; the result keeps len(counts) bins."""
    padded = np.concatenate([counts, np.zeros((-len(counts)) % factor, dtype=counts.dtype)])
    merged = padded.reshape(-1, factor).sum(axis=1)
    out = np.zeros_like(counts)
    out[: len(merged)] = merged
    return out


@dataclass(frozen=True)
class _Query:
    percentile: float
    num_bits: int
    target: str


class AbsHistogram:
    """Histogram of |x| over [0, num_bins * bin_width), updated batch by batch.

    The first non-zero batch sets bin_width = max / num_bins. When a later batch exceeds the
    range, the width grows by the smallest integer factor that covers it and groups of that many
    adjacent bins merge into one: every old bin lies inside exactly one new bin, so the counts
    stay exact and no statistic restarts. The exact max is tracked on the side for minmax.
    """

    def __init__(self, num_bins: int = DEFAULT_BINS) -> None:
        if num_bins < 2:
            raise ValueError(f"num_bins must be >= 2; got {num_bins}")
        self._counts = np.zeros(num_bins, dtype=np.int64)
        self._width = 0.0
        self._max = 0.0

    @property
    def num_bins(self) -> int:
        return len(self._counts)

    @property
    def bin_width(self) -> float:
        return self._width

    @property
    def max(self) -> float:
        return self._max

    @property
    def counts(self) -> np.ndarray:
        return self._counts.copy()

    def update(self, x: np.ndarray) -> None:
        a = _finite_abs(x)
        if a.size == 0:
            return
        batch_max = float(a.max())
        self._grow(batch_max)
        if self._width == 0.0:  # everything so far is exactly 0; bin 0 holds 0 whatever the width becomes
            self._counts[0] += a.size
        else:
            index = np.minimum((a / self._width).astype(np.int64), self.num_bins - 1)
            self._counts += np.bincount(index, minlength=self.num_bins)
        self._max = max(self._max, batch_max)

    def _grow(self, batch_max: float) -> None:
        if batch_max <= self._width * self.num_bins:
            return
        if self._width == 0.0:
            self._width = batch_max / self.num_bins
            return
        factor = math.ceil(batch_max / (self._width * self.num_bins))
        self._counts = _merge_bins(self._counts, factor)
        self._width *= factor

    def amax(self, method: str, *, percentile: float = 99.99, num_bits: int = 8, target: str = "int8") -> float:
        """The clip value by `method` (one of METHODS); 0.0 while nothing non-zero has been seen.

        minmax: the largest |x| seen. percentile: the `percentile`-th percentile of |x|, linear
        within a bin. entropy: see _amax_entropy (integer grid of num_bits). mse: see _amax_mse
        (target "int8": the symmetric integer grid of num_bits, 8 by default; "fp8": E4M3).
        """
        if method not in _AMAX:
            raise ValueError(f"unknown calibration method {method!r}; expected one of {', '.join(METHODS)}")
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; expected one of {', '.join(TARGETS)}")
        if not 2 <= num_bits <= 16:
            raise ValueError(f"num_bits must be in [2, 16]; got {num_bits}")
        if not 0.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100]; got {percentile}")
        if self._width == 0.0:
            return 0.0
        return float(_AMAX[method](self, _Query(percentile=percentile, num_bits=num_bits, target=target)))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain arrays, e.g. for np.savez."""
        return {"counts": self._counts.copy(), "bin_width": np.array(self._width), "max": np.array(self._max)}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> AbsHistogram:
        missing = {"counts", "bin_width", "max"} - set(d)
        if missing:
            raise ValueError(f"histogram arrays lack {sorted(missing)}")
        hist = cls(num_bins=len(d["counts"]))
        hist._counts = np.asarray(d["counts"], dtype=np.int64).copy()
        hist._width = float(d["bin_width"])
        hist._max = float(d["max"])
        return hist


# ----------------------------------------------------------------------------- the four methods


def _amax_minmax(hist: AbsHistogram, query: _Query) -> float:
    return hist.max


def _amax_percentile(hist: AbsHistogram, query: _Query) -> float:
    counts = hist.counts
    cdf = np.cumsum(counts)
    target = query.percentile / 100.0 * cdf[-1]
    i = int(np.searchsorted(cdf, target, side="left"))  # the first bin whose cdf reaches the target
    below = cdf[i - 1] if i else 0
    inside = (target - below) / counts[i] if counts[i] else 1.0
    return min(hist.bin_width * (i + inside), hist.max)


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two unnormalised histograms, natural log, over the bins where p > 0."""
    p = p / p.sum()
    q = q / q.sum()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], _KL_FLOOR))))


def _threshold_divergence(counts: np.ndarray, i: int, levels: int) -> float:
    """KL between the first i bins with the outliers clipped in (P) and their `levels`-level quantization (Q)."""
    p = counts[:i].copy()
    p[-1] += counts[i:].sum()
    group = np.arange(i) * levels // i  # bin -> level; groups differ in size by at most one bin
    mass = np.bincount(group, weights=counts[:i], minlength=levels)
    nonzero = p > 0
    slots = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, mass[group] / np.maximum(slots[group], 1.0), 0.0)
    return _kl_divergence(p, q) if q.sum() > 0 else math.inf


def _amax_entropy(hist: AbsHistogram, query: _Query) -> float:
    """TensorRT's entropy calibration: the clip value whose quantized distribution loses the least information.

    Source of the method: S. Migacz, "8-bit Inference with TensorRT", NVIDIA GTC 2017. For each
    candidate threshold of i bins (i from the number of levels 2**(num_bits-1) to num_bins):
      P = bins [0, i) with the counts beyond them added to bin i-1 (clipping),
      Q = bins [0, i) without the outliers, merged into 2**(num_bits-1) levels, each level's mass
          spread evenly over its bins where P is non-zero (empty bins stay empty),
      divergence = KL(P || Q).
    The threshold is i * bin_width (the top of the last kept bin) for the i of least divergence,
    capped at the max seen. Clipping too low puts outlier mass in P's last bin that Q lacks;
    clipping too high makes the levels coarse; the minimum balances the two.
    Only the integer grid is modelled: target "fp8" is refused (use mse).
    """
    if query.target != "int8":
        raise ValueError("entropy calibration models a uniform integer grid; use method 'mse' for target 'fp8'")
    counts = hist.counts.astype(np.float64)
    levels = 2 ** (query.num_bits - 1)
    start = min(levels, hist.num_bins)
    divergences = [_threshold_divergence(counts, i, levels) for i in range(start, hist.num_bins + 1)]
    best = start + int(np.argmin(divergences))
    return min(best * hist.bin_width, hist.max)


def _int_levels(num_bits: int) -> np.ndarray:
    """The symmetric integer grid's non-negative points in units of the scale: 0, 1, ..., 2**(b-1) - 1."""
    return np.arange(2 ** (num_bits - 1), dtype=np.float64)


def _fp8_levels(num_bits: int) -> np.ndarray:
    """The non-negative finite E4M3 values 0 ... 448: bit patterns 0x00-0x7E in ascending order (0x7F is NaN)."""
    return np.arange(0x7F, dtype=np.uint8).view(FP8_DTYPE).astype(np.float64)


_LEVELS: Mapping[str, Callable[[int], np.ndarray]] = MappingProxyType({"int8": _int_levels, "fp8": _fp8_levels})


@dataclass(frozen=True)
class _Grid:
    """A symmetric grid's non-negative levels in scaled units (the top level is the clip value), with
    cum[k] = the integral of the squared rounding error from 0 to levels[k]."""

    levels: np.ndarray
    cum: np.ndarray

    @classmethod
    def of(cls, levels: np.ndarray) -> _Grid:
        # a cell of width h between two levels is two half-sawteeth: 2 * (h/2)**3 / 3 = h**3 / 12
        return cls(levels=levels, cum=np.concatenate([[0.0], np.cumsum(np.diff(levels) ** 3 / 12)]))

    @property
    def top(self) -> float:
        return float(self.levels[-1])

    def _cell(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k = np.clip(np.searchsorted(self.levels, t, side="right") - 1, 0, len(self.levels) - 2)
        return k, self.levels[k], self.levels[k + 1]

    def integral(self, t: np.ndarray) -> np.ndarray:
        """The integral from 0 to t (>= 0) of (u - q(u))**2, q rounding to the nearest level and clipping at the top."""
        inside = np.minimum(t, self.top)
        k, lo, hi = self._cell(inside)
        rounding = np.where(inside <= (lo + hi) / 2, self.cum[k] + (inside - lo) ** 3 / 3,
                            self.cum[k + 1] - (hi - inside) ** 3 / 3)
        return rounding + np.maximum(t - self.top, 0.0) ** 3 / 3

    def point(self, t: np.ndarray) -> np.ndarray:
        """(t - q(t))**2 itself, for bins of zero width."""
        inside = np.minimum(t, self.top)
        _, lo, hi = self._cell(inside)
        return np.minimum(inside - lo, hi - inside) ** 2 + np.maximum(t - self.top, 0.0) ** 2


def mse_curve(hist: AbsHistogram, candidates: np.ndarray, *, num_bits: int = 8, target: str = "int8") -> np.ndarray:
    """Expected squared quantization error (clip + rounding) per value, for each candidate amax (> 0).

    The values are taken as spread evenly within their bins (the last bin ends at the max seen) and
    the error is integrated exactly over each bin against the grid: with s = amax / top level,
    a bin [a, b] has mean error s**2 * (G(b/s) - G(a/s)) / ((b - a)/s), G being _Grid.integral.
    Evaluating only bin centres instead is biased when a bin is not much narrower than a step.
    """
    candidates = np.asarray(candidates, dtype=np.float64)
    if np.any(candidates <= 0):
        raise ValueError("candidate amax values must be > 0")
    counts = hist.counts
    nonzero = np.flatnonzero(counts)
    # adjacent bins share an edge: G is evaluated once per edge, up to the last non-empty bin
    edges = np.minimum(np.arange(nonzero[-1] + 2) * hist.bin_width, hist.max)
    lo, hi = edges[nonzero], edges[nonzero + 1]
    weights = counts[nonzero] / counts.sum()
    grid = _Grid.of(_LEVELS[target](num_bits))
    out = []
    for start in range(0, len(candidates), _MSE_CHUNK):
        scale = candidates[start : start + _MSE_CHUNK, None] / grid.top
        g = grid.integral(edges / scale)
        width = (hi - lo) / scale
        mean = (g[:, nonzero + 1] - g[:, nonzero]) / np.where(width > 0, width, 1.0)
        if not np.all(width > 0):  # a bin holding only values equal to the max seen at its lower edge
            mean = np.where(width > 0, mean, grid.point(lo / scale))
        out.append(scale[:, 0] ** 2 * (mean @ weights))
    return np.concatenate(out)


def _amax_mse(hist: AbsHistogram, query: _Query) -> float:
    """The clip value minimising the expected squared error, searched over bin edges below the max and the max."""
    edges = np.arange(1, math.ceil(hist.max / hist.bin_width)) * hist.bin_width
    candidates = np.append(edges[edges < hist.max], hist.max)
    curve = mse_curve(hist, candidates, num_bits=query.num_bits, target=query.target)
    return float(candidates[int(np.argmin(curve))])


_AMAX: Mapping[str, Callable[[AbsHistogram, _Query], float]] = MappingProxyType(
    {"minmax": _amax_minmax, "percentile": _amax_percentile, "entropy": _amax_entropy, "mse": _amax_mse}
)


# ----------------------------------------------------------------------------- per-channel statistics


def _rows(x: np.ndarray, dtype: type) -> np.ndarray:
    x = np.asarray(x, dtype=dtype)
    if x.ndim < 1:
        raise ValueError("expected a batch [..., K]; got a scalar")
    return x.reshape(-1, x.shape[-1])


@dataclass(eq=False)
class ChannelStats:
    """Per-input-channel absmax and mean |x| [K] over all rows seen (rows = the leading dims flattened).

    K is fixed by the first non-empty batch. The mean is updated incrementally, weighted by row
    counts, in float64: it stays accurate over many batches where a running float32 sum would not.
    """

    absmax: np.ndarray = field(default_factory=lambda: np.zeros(0))
    mean_abs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rows: int = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(_rows(x, np.float64))
        if a.shape[0] == 0:
            return
        if not np.isfinite(a).all():
            raise ValueError("activation batch has NaN or infinite values")
        if self.rows == 0:
            self.absmax = np.zeros(a.shape[1])
            self.mean_abs = np.zeros(a.shape[1])
        elif a.shape[1] != self.absmax.shape[0]:
            raise ValueError(f"batch has {a.shape[1]} channels; earlier batches had {self.absmax.shape[0]}")
        total = self.rows + a.shape[0]
        self.absmax = np.maximum(self.absmax, a.max(axis=0))
        self.mean_abs = self.mean_abs + (a.mean(axis=0) - self.mean_abs) * (a.shape[0] / total)
        self.rows = total

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"absmax": self.absmax.copy(), "mean_abs": self.mean_abs.copy(), "rows": np.array(self.rows)}

    @classmethod
    def from_arrays(cls, d: Mapping[str, np.ndarray]) -> ChannelStats:
        missing = {"absmax", "mean_abs", "rows"} - set(d)
        if missing:
            raise ValueError(f"channel statistics arrays lack {sorted(missing)}")
        return cls(absmax=np.asarray(d["absmax"], dtype=np.float64).copy(),
                   mean_abs=np.asarray(d["mean_abs"], dtype=np.float64).copy(), rows=int(d["rows"]))


# ----------------------------------------------------------------------------- row sample


class RowReservoir:
    """A uniform random sample of up to `capacity` rows [capacity, K] (float32) from batches [..., K].

    Reservoir sampling, Algorithm R (J. S. Vitter, "Random Sampling with a Reservoir", ACM TOMS
    1985): the first `capacity` rows fill the reservoir; row t (0-based) after that replaces a
    uniformly chosen slot with probability capacity / (t + 1), so every row seen is in the sample
    with the same probability. Seeded: the same stream in the same batches gives the same sample.
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1; got {capacity}")
        self._capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._buffer: np.ndarray | None = None
        self._seen = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def seen(self) -> int:
        return self._seen

    def update(self, x: np.ndarray) -> None:
        rows = _rows(x, np.float32)
        if self._buffer is None:
            self._buffer = np.empty((self._capacity, rows.shape[1]), dtype=np.float32)
        elif rows.shape[1] != self._buffer.shape[1]:
            raise ValueError(f"batch has {rows.shape[1]} channels; earlier batches had {self._buffer.shape[1]}")
        fill = max(0, min(self._capacity - self._seen, len(rows)))
        self._buffer[self._seen : self._seen + fill] = rows[:fill]
        self._replace(self._buffer, rows[fill:], self._seen + fill)
        self._seen += len(rows)

    def _replace(self, buffer: np.ndarray, rows: np.ndarray, first_index: int) -> None:
        slots = self._rng.integers(0, first_index + np.arange(len(rows)) + 1)  # uniform in [0, t] for row t
        chosen = np.flatnonzero(slots < self._capacity)
        # Several rows of one batch may pick the same slot; the later one must win, as in the
        # sequential algorithm. np.unique on the reversed order finds each slot's last taker.
        _, last = np.unique(slots[chosen][::-1], return_index=True)
        winners = chosen[::-1][last]
        buffer[slots[winners]] = rows[winners]

    def sample(self) -> np.ndarray:
        """The rows kept so far, [min(seen, capacity), K]; empty [0, 0] before any update."""
        if self._buffer is None:
            return np.zeros((0, 0), dtype=np.float32)
        return self._buffer[: min(self._seen, self._capacity)].copy()
