"""Causal attention of new positions over the int8 KV cache, in kernels of pulse-edge's own (runtime/kernels/*.c).

Two kernels compute the same function, each fit for one end of a conversation:

    PREFILL  causal_attention.c   a prompt chunk in bf16, on AMX tiles (Sapphire Rapids and later) or else on
                                  AVX-512 BF16 dot products (Zen 4 and later): a 2950-position prefill
                                  spends about half its time in attention, which ONNX Runtime's CPU EP
                                  runs in float32 over every chunk's full S x T product (docs/performance.md);
                                  this one skips the masked half, reads the cache's int8 codes as they are (exact
                                  in bf16; the key scales folded into q, the value scales applied at the end) and
                                  rounds only q and the softmax weights to bf16
    DECODE   decode_attention.c   a decode step's one position (or a few) in float32 on AVX-512: a stream over
                                  the cache at memory speed, where ORT's kernel is compute-bound; exact to float32
                                  rounding

    attention = CausalAttention.load(PREFILL)   # the first of its kinds that builds and passes here, once per
                                                # machine; KernelUnavailable where none does
    out = attention(q, k_codes, v_codes, k_scale, v_scale, past=P, threads=2)

    q                 [S, heads, D] float32, the new positions' queries after the rotary embedding
    k_codes, v_codes  [kv_heads, capacity, D] int8, the cache buffer; positions [0, P + S) written
    k_scale, v_scale  [kv_heads, D] float32, per (kv head, channel)
    out               [S, heads, D] float32: row i attends to cache positions [0, P + i]

`reference` is the same function in float32 numpy: the oracle of the tests and the study.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels import build

log = logging.getLogger(__name__)
D_MULTIPLE = 16  # whole 16-lane vectors (the prefill kernel's blocks run on it rounded up to 64 channels, zeros beyond)


@dataclass(frozen=True)
class KernelKind:
    """One kernel: its source, entry point, the instructions it is built for, and its self-test's bound."""

    source: str
    symbol: str
    # named features, not -march=native: the library's hash then names what it needs, and a build on one
    # machine states the same requirement as on any other
    isa_flags: tuple[str, ...]
    cpu_features: tuple[str, ...]
    what: str
    amx: bool  # Linux grants AMX state only on request (pe_request_amx)
    self_test_tol: float
    max_head_dim: int | None = None
    pooled_symbol: str | None = None  # the entry point on a linear.WorkerPool's threads
    defines: tuple[str, ...] = ()  # -D flags choosing a variant of the source


_BF16 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16")
_BF16_CPU = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
PREFILL_AMX = KernelKind(
    "causal_attention.c", "pe_causal_attention_int8kv", (*_BF16, "-mamx-tile", "-mamx-bf16"),
    (*_BF16_CPU, "amx_tile", "amx_bf16"), "the AMX-BF16 prefill attention",
    amx=True, self_test_tol=1e-2)  # bf16 q and weights give ~2e-3 on scores near N(0, 1); a wrong mask gives O(1)
# The same function and rounding on AVX-512 BF16 dot products, for CPUs with them and no AMX (Zen 4 and later)
PREFILL_AVX512 = KernelKind(
    "causal_attention.c", "pe_causal_attention_int8kv", _BF16, _BF16_CPU, "the AVX-512 BF16 prefill attention",
    amx=False, self_test_tol=1e-2, defines=("-DPE_NO_AMX",))
# The prefill kernel: the first of these this machine runs (CausalAttention.load)
PREFILL = (PREFILL_AMX, PREFILL_AVX512)
DECODE = KernelKind(
    "decode_attention.c", "pe_decode_attention_int8kv", ("-mavx512f", "-mavx512bw", "-mavx512vl"),
    ("avx512f", "avx512bw", "avx512vl"), "the AVX-512 decode attention", amx=False,
    self_test_tol=1e-5, max_head_dim=256,  # float32 throughout: ~1e-7 (measured ~3e-7)
    pooled_symbol="pe_decode_attention_int8kv_pooled")

BAD_ARGUMENTS = -2  # PE_BAD_ARGUMENTS (vector_math.h)
_P = ctypes.c_void_p
_I = ctypes.c_int
_SIGNATURE = (_P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _I)


def _check(q: np.ndarray, k: np.ndarray, v: np.ndarray, ks: np.ndarray, vs: np.ndarray, past: int,
           max_head_dim: int | None = None) -> None:
    """Shapes, dtypes and layout the C code assumes; a violation is a caller's bug (ValueError)."""
    if q.ndim != 3 or k.ndim != 3 or k.shape != v.shape:
        raise ValueError(f"q must be [S, heads, D] and the caches [kv_heads, capacity, D]: {q.shape}, {k.shape}, "
                         f"{v.shape}")
    rows, heads, d = q.shape
    kv_heads, capacity, d_cache = k.shape
    wanted = {"q": (q, np.float32), "k_codes": (k, np.int8), "v_codes": (v, np.int8), "k_scale": (ks, np.float32),
              "v_scale": (vs, np.float32)}
    for name, (array, dtype) in wanted.items():
        if array.dtype != dtype or not array.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous {np.dtype(dtype).name}, got {array.dtype}")
    problems = [
        (d != d_cache or d % D_MULTIPLE or d > (max_head_dim or d),
         f"head dim {d} (cache {d_cache}) must match, a multiple of {D_MULTIPLE}"
         + (f" up to {max_head_dim}" if max_head_dim else "")),
        (kv_heads < 1 or heads % kv_heads, f"{heads} query heads are not a multiple of {kv_heads} kv heads"),
        (ks.shape != (kv_heads, d) or vs.shape != (kv_heads, d), f"scales must be [{kv_heads}, {d}]"),
        (rows < 1 or past < 0 or past + rows > capacity,
         f"positions [0, {past} + {rows}) exceed the cache's {capacity}"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


@dataclass(frozen=True)
class CausalAttention:
    """A compiled kernel (`kind`), with AMX state granted to this process where it needs it."""

    library: ctypes.CDLL
    path: Path
    kind: KernelKind

    @classmethod
    def load(cls, kind: KernelKind | tuple[KernelKind, ...] = PREFILL, cache: Path | None = None) -> CausalAttention:
        """`kind`, or the first of several that loads here. A kind passed over for another reason than the CPU
        (Linux refused AMX state, a self-test failed) is logged as a warning; where none loads, a broken kernel's
        reason is raised first, then the machine's (build.MachineUnsupported), else the last kind's."""
        if isinstance(kind, KernelKind):
            return cls._load_one(kind, cache)
        if not kind:
            raise ValueError("no kernel kind to load")
        refusals: list[KernelUnavailable] = []
        for each in kind:
            try:
                kernel = cls._load_one(each, cache)
            except KernelUnavailable as e:
                refusals.append(e)
                continue
            for e in refusals:
                if not isinstance(e, build.CPUUnsupported):
                    log.warning("%s runs instead: %s", each.what, e)
            return kernel
        # what the user must hear first: a broken kernel, then the machine's reasons beyond the CPU (AMX state refused,
        # no compiler), the CPU's own last
        for quiet in (build.MachineUnsupported, build.CPUUnsupported):
            loud = [e for e in refusals if not isinstance(e, quiet)]
            if loud:
                raise loud[0]
        raise refusals[-1]

    @classmethod
    def _load_one(cls, kind: KernelKind, cache: Path | None) -> CausalAttention:
        build.require_cpu(kind.cpu_features, kind.what)
        path = build.build(build.SOURCE_DIR / kind.source, (*kind.isa_flags, *kind.defines), cache)
        library = build.load(path)
        status = library.pe_request_amx() if kind.amx else 0
        if status != 0:
            reason = os.strerror(-status) if status < 0 else str(status)
            hint = ("a signal stack too small for AMX state (faulthandler or sigaltstack set before)"
                    if -status == errno.ENOSPC else "Linux >= 5.16 grants it")
            raise build.MachineUnsupported(f"Linux refused this process AMX state (arch_prctl: {reason}; {hint})")
        entry = getattr(library, kind.symbol)
        entry.argtypes = _SIGNATURE
        entry.restype = _I
        if kind.pooled_symbol:
            pooled = getattr(library, kind.pooled_symbol)
            pooled.argtypes = (_P, *_SIGNATURE[:-1])
            pooled.restype = _I
        kernel = cls(library, path, kind)
        kernel.self_test()
        return kernel

    def self_test(self) -> None:
        """The library this machine built against the twin, on small cases with every edge (a partial query
        block, a partial key block, a head dim padded inside the tiles, two heads per kv head) and at the head
        dims the models use (64, 128: the decode kernel compiles those apart): a compiler or CPU that makes it
        compute something else is refused here, never used."""
        rng = np.random.default_rng(7)
        checked = CheckedAttention(self)  # a non-finite output counts as an infinite error
        for rows, past, d in ((33, 40, 80), (3, 70, 128), (2, 20, 64)):
            q = rng.standard_normal((rows, 4, d), np.float32)
            k, v = (rng.integers(-127, 128, (2, past + rows + 5, d), dtype=np.int8) for _ in range(2))
            ks, vs = (rng.uniform(0.005, 0.015, (2, d)).astype(np.float32) for _ in range(2))
            try:
                checked(q, k, v, ks, vs, past=past, threads=2)
            except MemoryError as e:  # no scratch or no thread now: the machine, not the bundle; the graph runs
                raise KernelUnavailable(f"the attention kernel could not run its self-test ({e})") from e
        if checked.worst > self.kind.self_test_tol:
            raise KernelUnavailable(f"the attention kernel built here ({self.path.name}) disagrees with its twin "
                                    f"(relative error {checked.worst:.2g}, allowed {self.kind.self_test_tol}); report "
                                    "it, with the compiler's version")

    def __call__(self, q: np.ndarray, k_codes: np.ndarray, v_codes: np.ndarray, k_scale: np.ndarray,
                 v_scale: np.ndarray, *, past: int, threads: int, out: np.ndarray | None = None,
                 pool: Any = None) -> np.ndarray:
        """`pool` (a linear.WorkerPool; the decode kernel only): its threads instead of `threads` started here."""
        _check(q, k_codes, v_codes, k_scale, v_scale, past, self.kind.max_head_dim)
        if out is None:
            out = np.empty_like(q)
        elif out.shape != q.shape or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 {q.shape}")
        rows, heads, d = q.shape
        kv_heads, capacity, _ = k_codes.shape
        arrays = (q.ctypes.data, k_codes.ctypes.data, v_codes.ctypes.data, k_scale.ctypes.data, v_scale.ctypes.data,
                  out.ctypes.data)
        sizes = (rows, past, heads, kv_heads, capacity, d)
        if pool is not None and self.kind.pooled_symbol:
            with pool.lock:
                status = getattr(self.library, self.kind.pooled_symbol)(pool.handle, *arrays, *sizes,
                                                                        float(d) ** -0.5)
        else:
            status = getattr(self.library, self.kind.symbol)(*arrays, *sizes, float(d) ** -0.5, max(1, threads))
        if status == BAD_ARGUMENTS:  # _check above lets no such call through: a caller's bug
            raise ValueError(f"the attention kernel refused its arguments (q {list(q.shape)}, cache "
                             f"{list(k_codes.shape)}, past {past})")
        if status != 0:
            raise MemoryError("the attention kernel could not allocate its scratch or start its threads")
        return out


def reference(q: np.ndarray, k_codes: np.ndarray, v_codes: np.ndarray, k_scale: np.ndarray, v_scale: np.ndarray,
              *, past: int) -> np.ndarray:
    """The kernel's function in float32 numpy, one head at a time."""
    _check(q, k_codes, v_codes, k_scale, v_scale, past)
    rows, heads, d = q.shape
    kv_heads = k_codes.shape[0]
    total, group = past + rows, heads // kv_heads
    keys = k_codes[:, :total].astype(np.float32) * k_scale[:, None]  # [kv_heads, T, D]
    values = v_codes[:, :total].astype(np.float32) * v_scale[:, None]
    masked = np.arange(total)[None, :] > (past + np.arange(rows))[:, None]  # [S, T]: key after the query
    out = np.empty_like(q)
    for h in range(heads):
        scores = q[:, h] @ keys[h // group].T * np.float32(d ** -0.5)  # [S, T]
        scores[masked] = -np.inf
        weights = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, h] = (weights / weights.sum(axis=1, keepdims=True)) @ values[h // group]
    return out


class CheckedAttention:
    """A kernel whose every call is also run by the twin on the same inputs, the worst relative difference kept:
    what the export's validation runs, so a kernel that attends wrongly on this model's own inputs (not only on
    the load's small self-test) is told apart from one whose bf16 rounding is merely coarse here."""

    def __init__(self, kernel: CausalAttention) -> None:
        self.kernel, self.worst = kernel, 0.0

    def __call__(self, q: np.ndarray, k_codes: np.ndarray, v_codes: np.ndarray, k_scale: np.ndarray,
                 v_scale: np.ndarray, *, past: int, threads: int, out: np.ndarray | None = None,
                 pool: Any = None) -> np.ndarray:
        got = self.kernel(q, k_codes, v_codes, k_scale, v_scale, past=past, threads=threads, out=out, pool=pool)
        want = reference(q, k_codes, v_codes, k_scale, v_scale, past=past)
        error = float(np.linalg.norm(got - want) / max(float(np.linalg.norm(want)), 1e-30))
        self.worst = max(self.worst, error if np.isfinite(error) else float("inf"))
        return got


class TwinAttention:
    """`reference` behind the kernel's call: what the export runs the prefill segments with to check the cut
    itself to float32's rounding, apart from the kernel's bf16 (export/validate/parity.py)."""

    def __call__(self, q: np.ndarray, k_codes: np.ndarray, v_codes: np.ndarray, k_scale: np.ndarray,
                 v_scale: np.ndarray, *, past: int, threads: int, out: np.ndarray | None = None) -> np.ndarray:
        result = reference(q, k_codes, v_codes, k_scale, v_scale, past=past)
        if out is None:
            return result
        out[...] = result
        return out
