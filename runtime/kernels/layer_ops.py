"""The native decode step's elementwise work between its kernels (runtime/kernels/layer_ops.c), and its numpy twins.

    ops = LayerOps.load()                     # builds once per machine; KernelUnavailable where it cannot
    ops.add_rms_norm(hidden, delta, w, eps, normed)   # hidden += delta (in place); normed = RMSNorm(hidden) x w
    ops.rotary_store(qkv, cos, sin, k_scale, v_scale, keys, values, past, heads, q)  # q rotated; k, v cached
    ops.silu_mul(gate_up, out)                # out = SiLU(gate) x up

    hidden, delta, normed  [rows, H] float32
    qkv                    [rows, (N + 2 KVN) D] float32: the fused projection's output
    cos, sin               [positions, D / 2] float32: the rotary tables
    keys, values           [KVN, capacity, D] int8: one layer's cache buffers, positions [past, past + rows) written
    q                      [rows, N, D] float32
    gate_up, out           [rows, 2 I], [rows, I] float32

The twins below are what the decode step computed in numpy before: the tests' oracle and the load's self-test.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels import build

SOURCE = "layer_ops.c"
# no contraction of a product and a sum into one FMA: the twins' roundings, whatever the compiler's default
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-ffp-contract=off")
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl")
INT8_LIMIT = 127.0  # the store rule the attention kernels read the cache by (decode_index.STORE_RULE)
SELF_TEST_TOL = 1e-5  # float32 rounding of another sum order and of 2^x: ~1e-7

_P = ctypes.c_void_p
_I = ctypes.c_int
_F = ctypes.c_float


def _c_float32(name: str, array: np.ndarray, shape: tuple[int, ...] | None = None) -> int:
    """The address of a C-contiguous float32 array (of `shape` where given); else a caller's bug (ValueError)."""
    if array.dtype != np.float32 or not array.flags.c_contiguous or (shape is not None and array.shape != shape):
        raise ValueError(f"{name} must be C-contiguous float32{f' {list(shape)}' if shape else ''}, got "
                         f"{array.dtype} {list(array.shape)}")
    return array.ctypes.data


@dataclass(frozen=True)
class LayerOps:
    library: ctypes.CDLL
    path: Path

    @classmethod
    def load(cls, cache: Path | None = None) -> LayerOps:
        build.require_cpu(CPU_FEATURES, "the decode step's AVX-512 elementwise kernels")
        path = build.build(build.SOURCE_DIR / SOURCE, ISA_FLAGS, cache)
        library = build.load(path)
        library.pe_add_rms_norm.argtypes = (_P, _P, _P, _P, _I, _I, _F)
        library.pe_rotary_store.argtypes = (_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, _P)
        library.pe_silu_mul.argtypes = (_P, _P, _I, _I)
        for entry in (library.pe_add_rms_norm, library.pe_rotary_store, library.pe_silu_mul):
            entry.restype = _I
        ops = cls(library, path)
        ops.self_test()
        return ops

    def self_test(self) -> None:
        """Each operation against its twin on a small layer (odd widths: the vectors' tails): a compiler or CPU that
        makes the library compute something else is refused here."""
        rng = np.random.default_rng(13)
        rows, heads, kv_heads, d, hidden, inter, past = 2, 4, 2, 48, 200, 170, 5
        x, delta, w = (rng.standard_normal((rows, hidden)).astype(np.float32) for _ in range(3))
        normed, twin_hidden = np.empty_like(x), x + delta
        self.add_rms_norm(x, delta, w[0], 1e-5, normed)
        errors = [_relative(x, twin_hidden), _relative(normed, rms_norm(twin_hidden, w[0], 1e-5))]
        gate_up = (rng.standard_normal((rows, 2 * inter)) * 6).astype(np.float32)
        errors.append(_relative(self.silu_mul(gate_up, np.empty((rows, inter), np.float32)), silu_mul(gate_up)))
        qkv = rng.standard_normal((rows, (heads + 2 * kv_heads) * d)).astype(np.float32)
        cos, sin = (rng.uniform(-1, 1, (past + rows, d // 2)).astype(np.float32) for _ in range(2))
        scales = [rng.uniform(0.005, 0.02, (kv_heads, d)).astype(np.float32) for _ in range(2)]
        caches = [np.zeros((kv_heads, past + rows + 1, d), np.int8) for _ in range(4)]
        q = self.rotary_store(qkv, cos, sin, *scales, caches[0], caches[1], past, heads,
                              np.empty((rows, heads, d), np.float32))
        twin_q = rotary_store(qkv, cos, sin, *scales, caches[2], caches[3], past, heads)
        errors.append(_relative(q, twin_q))
        errors += [float(np.abs(a.astype(np.int16) - b).max()) for a, b in zip(caches[:2], caches[2:], strict=True)]
        if not max(errors) <= SELF_TEST_TOL:
            raise KernelUnavailable(f"the decode step's elementwise kernels built here ({self.path.name}) disagree "
                                    f"with their twins (worst {max(errors):.2g}); report it, with the compiler's "
                                    "version: ONNX Runtime decodes instead")

    def add_rms_norm(self, hidden: np.ndarray, delta: np.ndarray | None, weight: np.ndarray, eps: float,
                     normed: np.ndarray) -> np.ndarray:
        rows, n = hidden.shape
        status = self.library.pe_add_rms_norm(
            _c_float32("hidden", hidden), None if delta is None else _c_float32("delta", delta, hidden.shape),
            _c_float32("weight", weight, (n,)), _c_float32("normed", normed, hidden.shape), rows, n, eps)
        if status != 0:
            raise ValueError(f"the RMSNorm kernel refused [{rows}, {n}]")
        return normed

    def rotary_store(self, qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_scale: np.ndarray,
                     v_scale: np.ndarray, keys: np.ndarray, values: np.ndarray, past: int, heads: int,
                     q: np.ndarray) -> np.ndarray:
        kv_heads, capacity, d = keys.shape
        rows = qkv.shape[0]
        for name, cache in (("keys", keys), ("values", values)):
            if cache.dtype != np.int8 or not cache.flags.c_contiguous or cache.shape != keys.shape:
                raise ValueError(f"{name} must be C-contiguous int8 {list(keys.shape)}")
        if cos.shape != sin.shape or cos.shape[0] < past + rows or cos.shape[1:] != (d // 2,):
            raise ValueError(f"the rotary tables must be [>= {past + rows}, {d // 2}], got {list(cos.shape)}")
        scratch = np.empty(d, np.float32)
        status = self.library.pe_rotary_store(
            _c_float32("qkv", qkv, (rows, (heads + 2 * kv_heads) * d)), rows, heads, kv_heads, d,
            _c_float32("cos", cos), _c_float32("sin", sin), _c_float32("k_scale", k_scale, (kv_heads, d)),
            _c_float32("v_scale", v_scale, (kv_heads, d)), keys.ctypes.data, values.ctypes.data, capacity, past,
            _c_float32("q", q, (rows, heads, d)), scratch.ctypes.data)
        if status != 0:
            raise ValueError(f"positions [{past}, {past + rows}) exceed the cache's {capacity}, or a head dim of {d}")
        return q

    def silu_mul(self, gate_up: np.ndarray, out: np.ndarray) -> np.ndarray:
        rows, inter = out.shape
        status = self.library.pe_silu_mul(_c_float32("gate_up", gate_up, (rows, 2 * inter)),
                                          _c_float32("out", out), rows, inter)
        if status != 0:
            raise ValueError(f"the SiLU kernel refused [{rows}, {inter}]")
        return out


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    error = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))
    return error if np.isfinite(error) else float("inf")


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm as SimplifiedLayerNormalization: x / sqrt(mean(x^2) + eps) * weight."""
    mean_square = np.mean(np.square(x), axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.sqrt(mean_square + np.float32(eps)) * weight)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """x [r, heads, D] rotated by halves (GroupQueryAttention's rotary_interleaved=0); cos, sin [r, 1, D / 2]."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def store(new: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """new [r, KVN, D] float -> int8 codes [KVN, r, D]: x / scale rounded half to even, clipped to +-127."""
    grid = np.rint(new / scale[None])
    return np.clip(grid, -INT8_LIMIT, INT8_LIMIT).astype(np.int8).transpose(1, 0, 2)


def rotary_store(qkv: np.ndarray, cos: np.ndarray, sin: np.ndarray, k_scale: np.ndarray, v_scale: np.ndarray,
                 keys: np.ndarray, values: np.ndarray, past: int, heads: int) -> np.ndarray:
    """LayerOps.rotary_store in numpy: q [r, N, D] rotated; the rotated keys and the values stored."""
    kv_heads, _, d = keys.shape
    rows = qkv.shape[0]
    q = qkv[:, :heads * d].reshape(rows, heads, d)
    k = qkv[:, heads * d:(heads + kv_heads) * d].reshape(rows, kv_heads, d)
    v = qkv[:, (heads + kv_heads) * d:].reshape(rows, kv_heads, d)
    at = slice(past, past + rows)
    c, s = cos[at, None], sin[at, None]  # [r, 1, D/2]
    keys[:, at] = store(rotate(k, c, s), k_scale)
    values[:, at] = store(v, v_scale)
    return np.ascontiguousarray(rotate(q, c, s))


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """[rows, 2 I] (gate, then up) -> gate x sigmoid(gate) x up."""
    gate, up = np.split(gate_up, 2, axis=-1)
    with np.errstate(over="ignore"):  # exp(-gate) is inf below gate = -88: sigmoid 0, as it should be
        sigmoid = np.float32(1.0) / (np.float32(1.0) + np.exp(-gate))
    return np.ascontiguousarray(gate * sigmoid * up)
