"""Quantization math of the INT8 / INT4 / FP8 recipes: numpy only, no torch, no onnx.

Weight layout everywhere: a MatMul weight W is [K, N] (K input features, N output
features) and y = x @ W with x [..., K]. "Per channel" means per output column N.

- INT8 per channel: symmetric, q in [-127, 127], scale = absmax / 127 per column.
- Block-wise INT4 / INT8: exactly ONNX Runtime's com.microsoft MatMulNBits layout
  (symmetric, no zero_points input, so the implied zero point is 2**(bits-1)).
- FP8 E4M3 (float8_e4m3fn): saturating cast, round to nearest even.
- SmoothQuant and AWQ scale searches, both measured on sample rows as the relative
  squared output error of the quantized MatMul against the float one.

All weight quantization is done in float32, the precision the graphs store; error
sums are float64 so that large layers do not lose the small differences compared.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import ml_dtypes
import numpy as np

E4M3_MAX = 448.0
INT8_QMAX = 127
FP8_DTYPE = ml_dtypes.float8_e4m3fn

# E4M3: 3 mantissa bits; the smallest normal exponent is -6, below it the subnormal step stays 2**-9.
_E4M3_MANTISSA_BITS = 3
_E4M3_MIN_EXP = -6
_BLOCK_BITS = (4, 8)
_MIN_BLOCK_SIZE = 16
# Clip ratios tried per block by scale_search. 1.0 comes first so plain absmax wins ties:
# the search can only lower a block's error, never raise it.
_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Where the search is the default: int4's 15 steps per block lose much to one large weight (AWQ's release clips
# too, after its scale search); int8's 255 gain little for the search's 8x time. One rule for every caller, so the
# export (ORT and TensorRT), the emulated reference and the AWQ search round alike.
CLIP_SEARCH_BITS = frozenset({4})
# SmoothQuant: floors keep x**alpha / w**(1 - alpha) finite; the range keeps W*s and x/s
# well inside fp16 for realistic magnitudes (activations up to ~1e4, weights ~1e-3..1).
_SMOOTH_FLOOR = 1e-5
_SMOOTH_RANGE = (1e-4, 1e4)
# AWQ: the floor on mean |x| before the power, as in the authors' grid search.
_AWQ_FLOOR = 1e-4
DEFAULT_SMOOTH_ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))


# ----------------------------------------------------------------------------- helpers


def _as_weight(w: np.ndarray) -> np.ndarray:
    """A finite float32 [K, N] matrix, or ValueError."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"a weight must be a [K, N] matrix; got shape {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError("the weight has NaN or infinite values")
    return w


def _as_float(x: np.ndarray) -> np.ndarray:
    """Keep float16/32/64 as they are; anything else (ints, bools) becomes float32."""
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)


def _symmetric_scale(absmax: np.ndarray, qmax: float) -> np.ndarray:
    """absmax / qmax in float32; an all-zero group gets scale 1 (any scale reproduces zeros, 1 avoids 0/0)."""
    absmax = np.asarray(absmax, dtype=np.float32)
    return np.where(absmax > 0, absmax / np.float32(qmax), np.float32(1.0)).astype(np.float32)


def _check_amax(amax: float) -> float:
    value = float(amax)
    if not np.isfinite(value) or value < 0:
        raise ValueError(f"amax must be a finite number >= 0; got {amax!r}")
    return value


def _sq_norm(y: np.ndarray) -> float:
    """||y||^2 summed in float64."""
    return float(np.sum(np.square(y, dtype=np.float64)))


def _relative(noise: float, signal: float) -> float:
    """noise / signal, with 0/0 = 0 (nothing to get wrong) and x/0 = inf."""
    if signal == 0.0:
        return 0.0 if noise == 0.0 else float("inf")
    return noise / signal


# ----------------------------------------------------------------------------- INT8 per channel


def quantize_int8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-column INT8: q int8 [K, N] in [-127, 127], scale float32 [N] = absmax / 127.

    -128 is never used, so the grid is symmetric and -q never overflows. Rounding is to
    nearest even (np.rint), like ONNX QuantizeLinear.
    """
    w = _as_weight(w)
    scale = _symmetric_scale(np.abs(w).max(axis=0), INT8_QMAX)
    q = np.clip(np.rint(w / scale), -INT8_QMAX, INT8_QMAX).astype(np.int8)
    return q, scale


def dequantize_int8_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """q [K, N] * scale [N] -> float32 [K, N]."""
    q = np.asarray(q)
    scale = np.asarray(scale, dtype=np.float32)
    if q.ndim != 2 or scale.shape != (q.shape[1],):
        raise ValueError(f"expected q [K, N] and scale [N]; got {q.shape} and {scale.shape}")
    return q.astype(np.float32) * scale


# ----------------------------------------------------------------------------- block-wise (MatMulNBits)


@dataclass(frozen=True)
class BlockQuantized:
    """A weight in ONNX Runtime's com.microsoft MatMulNBits layout (symmetric, no zero_points input).

    packed: uint8 [N, n_blocks, block_size * bits // 8]; each column's K values, zero padded to
        n_blocks * block_size, stored as unsigned codes q + 2**(bits-1). 4-bit: element 2j in the
        low nibble of byte j, element 2j+1 in the high nibble. 8-bit: one code per byte.
    scales: float32 [N * n_blocks] (flat, column-major over blocks: scales[n * n_blocks + b]).
    The node: MatMulNBits(A [..., K], packed, scales) with attributes K=k, N=n, bits, block_size.
    """

    packed: np.ndarray
    scales: np.ndarray
    k: int
    n: int
    bits: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.k // self.block_size)

    @property
    def zero_point(self) -> int:
        """The code that means 0; MatMulNBits implies it when no zero_points input is given."""
        return 2 ** (self.bits - 1)


def _check_block_args(bits: int, block_size: int) -> None:
    if bits not in _BLOCK_BITS:
        raise ValueError(f"bits must be one of {_BLOCK_BITS}; got {bits}")
    if block_size < _MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= {_MIN_BLOCK_SIZE}; got {block_size}")


def _to_blocks(w: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [n_blocks, block_size, N], K zero padded (zeros never raise a block's absmax).

    Blocks run along K, so this is a reshape of the padded matrix: no float transpose is needed
    until the uint8 codes are laid out for MatMulNBits.
    """
    k, n = w.shape
    n_blocks = -(-k // block_size)
    if n_blocks * block_size == k:
        return w.reshape(n_blocks, block_size, n)
    padded = np.zeros((n_blocks * block_size, n), dtype=np.float32)
    padded[:k] = w
    return padded.reshape(n_blocks, block_size, n)


def _block_codes(blocks: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Signed codes clip(round(w / s), -2**(b-1), 2**(b-1) - 1) as int16, blocks [nb, bs, N], scales [nb, N]."""
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return np.clip(np.rint(blocks / scales[:, None, :]), low, high).astype(np.int16)


def _block_recon(blocks: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """What the runtime computes with, codes * scale, float32 [nb, bs, N]."""
    return _block_codes(blocks, scales, bits).astype(np.float32) * scales[:, None, :]


def _block_sq_error(blocks: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """Squared reconstruction error per (block, column) [nb, N], float64."""
    return np.sum((_block_recon(blocks, scales, bits) - blocks).astype(np.float64) ** 2, axis=1)


def _block_scales(blocks: np.ndarray, bits: int, scale_search: bool) -> np.ndarray:
    """Per (block, column) scales [nb, N]: absmax / (2**(b-1) - 1), or the best clip ratio of _CLIP_RATIOS."""
    qmax = 2 ** (bits - 1) - 1
    absmax = np.abs(blocks).max(axis=1)
    best = _symmetric_scale(absmax, qmax)
    if not scale_search:
        return best
    best_err = _block_sq_error(blocks, best, bits)
    for ratio in _CLIP_RATIOS[1:]:
        scales = _symmetric_scale(absmax * np.float32(ratio), qmax)
        err = _block_sq_error(blocks, scales, bits)
        better = err < best_err  # strict: ties keep the larger (unclipped) scale
        best = np.where(better, scales, best)
        best_err = np.where(better, err, best_err)
    return best


def _pack4(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack4(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)


def _identity(codes: np.ndarray) -> np.ndarray:
    return codes.astype(np.uint8)


_PACK: Mapping[int, Callable[[np.ndarray], np.ndarray]] = MappingProxyType({4: _pack4, 8: _identity})
_UNPACK: Mapping[int, Callable[[np.ndarray], np.ndarray]] = MappingProxyType({4: _unpack4, 8: _identity})


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int, *, scale_search: bool | None = None
                       ) -> BlockQuantized:
    """Symmetric block-wise quantization along K of W [K, N] into MatMulNBits' layout.

    Per (column, block): s = absmax / (2**(bits-1) - 1), q = clip(round(w / s), -2**(bits-1), 2**(bits-1) - 1).
    With scale_search (None: for the bits of CLIP_SEARCH_BITS), each block also tries s * r for the clip ratios
    in _CLIP_RATIOS and keeps the one with the least squared error (clipping a rare large value can buy finer
    steps for the rest).
    """
    _check_block_args(bits, block_size)
    w = _as_weight(w)
    blocks = _to_blocks(w, block_size)
    scales = _block_scales(blocks, bits, _searched(bits, scale_search))
    codes = (_block_codes(blocks, scales, bits) + 2 ** (bits - 1)).astype(np.uint8)  # [nb, bs, N]
    k, n = w.shape
    return BlockQuantized(packed=_PACK[bits](np.ascontiguousarray(codes.transpose(2, 0, 1))),
                          scales=np.ascontiguousarray(scales.T).reshape(-1), k=k, n=n, bits=bits,
                          block_size=block_size)


def fake_quant_blockwise(w: np.ndarray, bits: int, block_size: int, *, scale_search: bool | None = None
                         ) -> np.ndarray:
    """dequantize_blockwise(quantize_blockwise(w, ...)) without packing: float32 [K, N] (used by the searches)."""
    _check_block_args(bits, block_size)
    w = _as_weight(w)
    blocks = _to_blocks(w, block_size)
    recon = _block_recon(blocks, _block_scales(blocks, bits, _searched(bits, scale_search)), bits)
    return recon.reshape(-1, w.shape[1])[: w.shape[0]]


def _searched(bits: int, scale_search: bool | None) -> bool:
    return bits in CLIP_SEARCH_BITS if scale_search is None else scale_search


def signed_block_codes(bq: BlockQuantized) -> np.ndarray:
    """The codes as MatMulNBits reads them from the packed bytes, minus the implied zero point:
    int16 [N, n_blocks, block_size] (K's zero padding included)."""
    _check_block_args(bq.bits, bq.block_size)
    return _UNPACK[bq.bits](np.asarray(bq.packed, dtype=np.uint8)).astype(np.int16) - bq.zero_point


def dequantize_blockwise(bq: BlockQuantized) -> np.ndarray:
    """The float32 [K, N] weight MatMulNBits computes with: (code - 2**(bits-1)) * scale."""
    codes = signed_block_codes(bq)
    scales = np.asarray(bq.scales, dtype=np.float32).reshape(bq.n, bq.n_blocks, 1)
    values = codes.astype(np.float32) * scales  # [N, n_blocks, block_size]
    return np.ascontiguousarray(values.reshape(bq.n, -1)[:, : bq.k].T)


# ----------------------------------------------------------------------------- FP8 E4M3


def to_float8_e4m3(x: np.ndarray) -> np.ndarray:
    """Round to float8_e4m3fn: nearest even, saturating to +-448 (inf too); NaN stays NaN.

    The rounding is done here rather than by ml_dtypes' cast for two reasons: its cast turns
    finite values beyond the range into NaN (e4m3fn has no inf), and from float64 it goes via
    float32 and can round twice (1 + 2**-4 + 2**-40 must become 1.125, not 1). Each value is
    rounded on its own binade's grid, step 2**(e - 3), with exact power-of-two scaling (ldexp);
    the final cast only converts values that are already representable.
    """
    x = _as_float(x)
    _, exp = np.frexp(x)  # x = m * 2**exp with 0.5 <= |m| < 1, so the binade is 2**(exp - 1)
    step_exp = np.maximum(exp - 1, _E4M3_MIN_EXP) - _E4M3_MANTISSA_BITS
    rounded = np.ldexp(np.rint(np.ldexp(x, -step_exp)), step_exp)
    return np.clip(rounded, -E4M3_MAX, E4M3_MAX).astype(FP8_DTYPE)


def quantize_fp8_per_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-output-column E4M3: q float8_e4m3fn [K, N], scale float32 [N] = absmax / 448 (zero column: 1)."""
    w = _as_weight(w)
    scale = _symmetric_scale(np.abs(w).max(axis=0), E4M3_MAX)
    return to_float8_e4m3(w / scale), scale


def fake_quant_int8(x: np.ndarray, amax: float) -> np.ndarray:
    """Per-tensor symmetric INT8 quantize-dequantize with scale float32(amax / 127); values beyond amax clip.

    amax 0 maps everything to 0 (the clip range is empty). The result has x's float dtype.
    """
    x = _as_float(x)
    amax = _check_amax(amax)
    if amax == 0.0:
        return np.zeros_like(x)
    scale = x.dtype.type(np.float32(amax / INT8_QMAX))  # the float32 scale a QDQ graph stores
    return (np.clip(np.rint(x / scale), -INT8_QMAX, INT8_QMAX) * scale).astype(x.dtype)


def fake_quant_fp8(x: np.ndarray, amax: float) -> np.ndarray:
    """Per-tensor E4M3 quantize-dequantize with scale float32(amax / 448); beyond amax saturates."""
    x = _as_float(x)
    amax = _check_amax(amax)
    if amax == 0.0:
        return np.zeros_like(x)
    scale = x.dtype.type(np.float32(amax / E4M3_MAX))
    return (to_float8_e4m3(x / scale).astype(x.dtype) * scale).astype(x.dtype)


# ----------------------------------------------------------------------------- SmoothQuant


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a scale search.

    alpha / scales: the best alpha tried and its per-input-channel scales [K] (float32); the
        activation is divided by them, the weight rows multiplied.
    errors: relative squared output error ||y_q - y||^2 / ||y||^2 on the sample rows, per alpha.
    baseline_error: the same error without any scaling (s = 1). For AWQ this equals errors[0.0];
        for SmoothQuant alpha 0 is not s = 1, so callers can compare and keep s = 1 if it wins.
    """

    alpha: float
    scales: np.ndarray
    errors: dict[float, float]
    baseline_error: float

    @property
    def error(self) -> float:
        return self.errors[self.alpha]


def _best_key(errors: Mapping[float, float]) -> float:
    """The key with the least error; ties go to the first tried (NaN never wins)."""
    finite = {a: e for a, e in errors.items() if not np.isnan(e)}
    if not finite:
        raise ValueError("every candidate gave a NaN error")
    return min(finite, key=lambda a: finite[a])


def _check_x_w(x_rows: np.ndarray, w: np.ndarray, per_channel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.asarray(x_rows, dtype=np.float32)
    w = _as_weight(w)
    stat = np.asarray(per_channel, dtype=np.float64)
    k = w.shape[0]
    if x.ndim != 2 or x.shape[1] != k or stat.shape != (k,):
        raise ValueError(f"expected x_rows [R, {k}] and a statistic [{k}] for W {w.shape}; got {x.shape}, {stat.shape}")
    return x, w, stat


def smooth_scales(act_absmax: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's migration scales s_j = max|X_j|**alpha / max|W_j|**(1 - alpha), float32 [K].

    Formula: Xiao et al. 2022, "SmoothQuant", arXiv 2211.10438, sec. 4, migration strength (W_j is input channel j,
    i.e. row j of our [K, N] layout). A channel that is never active, or whose weight row is all
    zero, has nothing to balance and keeps s = 1; the rest is clipped to _SMOOTH_RANGE.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    w = _as_weight(w)
    act = np.asarray(act_absmax, dtype=np.float64)
    if act.shape != (w.shape[0],):
        raise ValueError(f"act_absmax must have shape [{w.shape[0]}]; got {act.shape}")
    w_absmax = np.abs(w).max(axis=1).astype(np.float64)
    s = np.maximum(act, _SMOOTH_FLOOR) ** alpha / np.maximum(w_absmax, _SMOOTH_FLOOR) ** (1.0 - alpha)
    s = np.where((act > 0) & (w_absmax > 0), s, 1.0)
    return np.clip(s, *_SMOOTH_RANGE).astype(np.float32)


def _w8a8_noise(x: np.ndarray, w: np.ndarray, act_absmax: np.ndarray, s: np.ndarray) -> float:
    """||fq(x/s) @ dq(q(W*s)) - x @ W||^2 for float32 x [R, K], W [K, N], s [K].

    As x @ W = (x/s) @ (W*s), the difference is (fq(x/s) - x/s) @ w_q + (x/s) @ (w_q - W*s):
    float32 products of the small error terms, with no cancellation between two large outputs.
    """
    xs = x / s
    ws = w * s[:, None]
    x_q = fake_quant_int8(xs, float(np.max(act_absmax / s)))
    w_q = dequantize_int8_per_channel(*quantize_int8_per_channel(ws))
    return _sq_norm((x_q - xs) @ w_q + xs @ (w_q - ws))


def w8a8_error(x_rows: np.ndarray, w: np.ndarray, act_absmax: np.ndarray, scales: np.ndarray) -> float:
    """Relative squared output error ||y_q - y||^2 / ||y||^2 of W8A8 after smoothing by `scales`, on x_rows [R, K].

    Weights: INT8 per channel of W * s. Activations: per-tensor static INT8 of x / s with
    amax = max(act_absmax / s), the calibration absmax over all data (not only these rows).
    """
    x, w, act = _check_x_w(x_rows, w, act_absmax)
    noise = _w8a8_noise(x, w, act, np.asarray(scales, dtype=np.float32))
    return _relative(noise, _sq_norm(x @ w))


def search_smooth_alpha(
    x_rows: np.ndarray, w: np.ndarray, act_absmax: np.ndarray, alphas: Sequence[float] = DEFAULT_SMOOTH_ALPHAS,
    *, scales_from: np.ndarray | None = None,
) -> SearchResult:
    """Grid search of SmoothQuant's alpha minimising the W8A8 output error on sample rows (see w8a8_error).

    `w` may be a sample of the weight's columns (the output error is judged on it); `scales_from`, the whole
    weight, is what the scales come from, as the exported ones do: max|W_j| over a column sample is lower, and a
    search with those scored scales no export used (up to 3.9x off the exported ones, another alpha chosen)."""
    if not alphas:
        raise ValueError("alphas must not be empty")
    x, w, act = _check_x_w(x_rows, w, act_absmax)
    basis = w if scales_from is None else _as_weight(scales_from)
    if basis.shape[0] != w.shape[0]:
        raise ValueError(f"scales_from has {basis.shape[0]} rows, the weight {w.shape[0]}")
    signal = _sq_norm(x @ w)
    errors = {float(a): _relative(_w8a8_noise(x, w, act, smooth_scales(act, basis, float(a))), signal)
              for a in alphas}
    baseline = _relative(_w8a8_noise(x, w, act, np.ones(w.shape[0], dtype=np.float32)), signal)
    best = _best_key(errors)
    return SearchResult(alpha=best, scales=smooth_scales(act, basis, best), errors=errors, baseline_error=baseline)


# ----------------------------------------------------------------------------- AWQ


def awq_scales(act_mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    """AWQ's per-input-channel scales s = mean|x|**alpha, normalised so that max(s) * min(s) = 1; float32 [K].

    Formula: Lin et al. 2023, "AWQ", arXiv 2306.00978, sec. 3 (s = s_X**alpha, alpha grid-searched
    in [0, 1)); the normalisation is the one of the authors' release, centring s around 1 in log
    scale so neither W*s nor x/s drifts in magnitude. alpha 0 gives exactly s = 1 (plain RTN).
    """
    m = np.maximum(np.asarray(act_mean_abs, dtype=np.float64), _AWQ_FLOOR) ** alpha
    return (m / np.sqrt(m.max() * m.min())).astype(np.float32)


def _weight_only_noise(x: np.ndarray, w: np.ndarray, s: np.ndarray, bits: int, block_size: int) -> float:
    """||(x/s) @ fq_block(W*s) - x @ W||^2, written as (x/s) @ (fq_block(W*s) - W*s) (see _w8a8_noise)."""
    ws = w * s[:, None]
    return _sq_norm((x / s) @ (fake_quant_blockwise(ws, bits, block_size) - ws))


def weight_only_error(x_rows: np.ndarray, w: np.ndarray, scales: np.ndarray, bits: int, block_size: int) -> float:
    """Relative squared error of (x / s) @ dequant(quantize_blockwise(W * s)) against x @ W, on x_rows [R, K]."""
    x, w, s = _check_x_w(x_rows, w, scales)
    return _relative(_weight_only_noise(x, w, s.astype(np.float32), bits, block_size), _sq_norm(x @ w))


def search_awq_scales(
    x_rows: np.ndarray, w: np.ndarray, act_mean_abs: np.ndarray, bits: int, block_size: int, grid: int = 20
) -> SearchResult:
    """Grid search of AWQ's alpha over {0, 1/grid, ..., (grid-1)/grid} for block-wise weight-only quantization.

    alpha 0 is s = 1, i.e. plain round-to-nearest, so the result is never worse than RTN on x_rows.
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1; got {grid}")
    _check_block_args(bits, block_size)
    x, w, mean_abs = _check_x_w(x_rows, w, act_mean_abs)
    signal = _sq_norm(x @ w)
    errors = {i / grid: _relative(_weight_only_noise(x, w, awq_scales(mean_abs, i / grid), bits, block_size), signal)
              for i in range(grid)}
    best = _best_key(errors)
    return SearchResult(alpha=best, scales=awq_scales(mean_abs, best), errors=errors, baseline_error=errors[0.0])
