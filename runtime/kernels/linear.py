"""A weight-only quantized linear layer for a few rows, in a kernel of pulse-edge's own (runtime/kernels/block_gemv.c).

It computes what ONNX Runtime's MatMulNBits computes at accuracy level 4 (4 or 8 bits, block-wise scales along
K, the implied zero point 2^(bits - 1)): the activations quantized to int8 per block, exact integer dot
products, one float rescale per block. The weights stay in MatMulNBits' own layout, read in place.

    gemv = BlockGemv.load()                       # builds once per machine; KernelUnavailable where it cannot
    w = BlockWeight(codes, scales, k=4096, n=12288, bits=4, block=128)
    x8 = gemv.quantize(x, w)                      # x [rows, K] float32, rows <= MAX_ROWS
    y = gemv(x8, w, threads=2)                    # [rows, N] float32

    codes   uint8 [N, blocks, block * bits / 8]   MatMulNBits' input B (4 bits: k = 2j low nibble, 2j + 1 high)
    scales  float32 [N * blocks]                  its input scales

`reference` is the same function in numpy (float64 sums): the load's self-test and the tests' oracle.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels import build

SOURCE = "block_gemv.c"
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
CPU_FEATURES = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
MAX_ROWS = 4  # block_gemv.c: rows sharing one pass over the weights
BLOCK_MULTIPLE = {4: 128, 8: 64}  # one 64-byte load of codes
INT8_MAX = 127.0
SELF_TEST_TOL = 1e-5  # float32 sums of exact integer dots: ~1e-7 (measured 3-8e-7 against ORT's own kernel)

_P = ctypes.c_void_p
_I = ctypes.c_int


@dataclass(frozen=True)
class BlockWeight:
    """One MatMulNBits weight: its packed codes and block scales, as the graph stores them."""

    codes: np.ndarray
    scales: np.ndarray
    k: int
    n: int
    bits: int
    block: int

    def __post_init__(self) -> None:
        self.check()  # once, here: the calls pass the arrays' addresses to C unchecked

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block)

    @cached_property
    def addresses(self) -> tuple[int, int]:
        """The codes' and scales' addresses, taken once (numpy's .ctypes.data costs ~1 us a call)."""
        return self.codes.ctypes.data, self.scales.ctypes.data

    def check(self) -> None:
        """The layout the C code reads; a violation is the bundle's (or a caller's) bug."""
        if self.bits not in BLOCK_MULTIPLE or self.block < 1 or self.block % BLOCK_MULTIPLE[self.bits]:
            raise ValueError(f"a block-quantized weight the kernel cannot read: {self.bits}-bit blocks of {self.block} "
                             "(the kernel takes 4 bits in blocks of 128k, 8 bits of 64k)")
        row = self.block * self.bits // 8
        problems = [
            (self.codes.dtype != np.uint8 or self.codes.shape != (self.n, self.blocks, row),
             f"codes {self.codes.dtype} {list(self.codes.shape)}, not uint8 [{self.n}, {self.blocks}, {row}]"),
            (self.scales.dtype != np.float32 or self.scales.shape != (self.n * self.blocks,),
             f"scales {self.scales.dtype} {list(self.scales.shape)}, not float32 [{self.n * self.blocks}]"),
            (not (self.codes.flags.c_contiguous and self.scales.flags.c_contiguous), "arrays not C-contiguous"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(f"a block-quantized weight the kernel cannot read: {message}")


@dataclass(frozen=True)
class QuantizedRows:
    """Rows of activations as the kernel reads them (block_gemv.c's pe_block_quantize)."""

    codes: np.ndarray  # int8 [rows, blocks * block]
    scales: np.ndarray  # float32 [rows, blocks]
    zero_terms: np.ndarray  # float32 [rows, blocks]: 2^(bits-1) s_x sum q
    bits: int
    block: int

    def __post_init__(self) -> None:
        rows, width = self.codes.shape if self.codes.ndim == 2 else (0, -1)
        blocks = width // self.block if self.block > 0 and width % self.block == 0 else -1
        arrays = (("codes", self.codes, np.int8, (rows, width)), ("scales", self.scales, np.float32, (rows, blocks)),
                  ("zero_terms", self.zero_terms, np.float32, (rows, blocks)))
        for name, array, dtype, shape in arrays:
            if blocks < 0 or array.dtype != dtype or array.shape != shape or not array.flags.c_contiguous:
                raise ValueError(f"quantized rows the kernel cannot read: {name} {array.dtype} {list(array.shape)}, "
                                 f"not C-contiguous {np.dtype(dtype).name} {list(shape)} in blocks of {self.block}")

    @property
    def rows(self) -> int:
        return self.codes.shape[0]


class LinearScratch:
    """Room for up to MAX_ROWS rows of activations quantized for the given weights (their inputs padded to whole
    blocks), its addresses taken once: what `BlockGemv.linear` quantizes into. One per caller; used under the
    pool's lock."""

    def __init__(self, *weights: BlockWeight) -> None:
        self.k = max(w.blocks * w.block for w in weights)
        self.codes = np.empty(MAX_ROWS * self.k, np.int8)
        most_blocks = MAX_ROWS * self.k // min(BLOCK_MULTIPLE.values())
        self.scales, self.zero_terms = np.empty(most_blocks, np.float32), np.empty(most_blocks, np.float32)
        self.addresses = (self.codes.ctypes.data, self.scales.ctypes.data, self.zero_terms.ctypes.data)


class WorkerPool:
    """Worker threads kept between kernel calls (thread_pool.h), made by this library and lent to the decode
    attention kernel too (runtime/kernels/attention.py): one call at a time (`lock`), threads joined when the
    pool is collected."""

    def __init__(self, library: ctypes.CDLL, threads: int) -> None:
        self.threads = threads
        self.handle = library.pe_pool_create(threads)
        if not self.handle:
            raise MemoryError(f"the CPU kernels could not start {threads} worker threads")
        self.lock = threading.Lock()
        weakref.finalize(self, library.pe_pool_destroy, self.handle)


@dataclass(frozen=True)
class BlockGemv:
    """The compiled kernel, with a pool of worker threads per thread count asked for (started on first use, kept
    while this object lives)."""

    library: ctypes.CDLL
    path: Path
    pools: dict[int, WorkerPool] = field(default_factory=dict, compare=False, repr=False)
    making: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    @classmethod
    def load(cls, cache: Path | None = None) -> BlockGemv:
        build.require_cpu(CPU_FEATURES, "the AVX-512 VNNI quantized linear layer")
        path = build.build(build.SOURCE_DIR / SOURCE, ISA_FLAGS, cache)
        library = build.load(path)
        library.pe_block_quantize.argtypes = (_P, _I, _I, _I, _I, _P, _P, _P)
        library.pe_block_quantize.restype = _I
        library.pe_block_gemv.argtypes = (_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I)
        library.pe_block_gemv.restype = _I
        library.pe_block_linear.argtypes = (_P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I)
        library.pe_block_linear.restype = _I
        library.pe_pool_create.argtypes = (_I,)
        library.pe_pool_create.restype = _P
        library.pe_pool_destroy.argtypes = (_P,)
        library.pe_pool_destroy.restype = None
        gemv = cls(library, path)
        gemv.self_test()
        return gemv

    def self_test(self) -> None:
        """Against the twin at both widths, the models' block of 128 and an odd one, a K that ends inside a block,
        and several rows: a compiler or CPU that makes the library compute something else is refused here."""
        rng = np.random.default_rng(11)
        worst = 0.0
        for bits, block, k, n, rows in ((4, 128, 512, 48, 1), (8, 128, 300, 40, 1), (4, 256, 640, 33, 3),
                                        (8, 64, 200, 17, 4)):
            weight = random_weight(rng, k, n, bits, block)
            x = rng.standard_normal((rows, k)).astype(np.float32)
            try:
                got = self(self.quantize(x, weight), weight, threads=2)
                fused = self.linear(x, weight, threads=2, scratch=LinearScratch(weight))
            except MemoryError as e:
                raise KernelUnavailable(f"the quantized linear kernel could not run its self-test ({e})") from e
            want = reference(x, weight)
            error = float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))
            worst = max(worst, error if np.isfinite(error) and np.array_equal(fused, got) else float("inf"))
        if worst > SELF_TEST_TOL:
            raise KernelUnavailable(f"the quantized linear kernel built here ({self.path.name}) disagrees with its "
                                    f"twin (relative error {worst:.2g}, allowed {SELF_TEST_TOL}); report it, with the "
                                    "compiler's version: ONNX Runtime's own kernels run instead")

    def pool(self, threads: int) -> WorkerPool:
        """The pool of `threads` threads (made on first use, once: under a lock)."""
        with self.making:
            if threads not in self.pools:
                self.pools[threads] = WorkerPool(self.library, threads)
            return self.pools[threads]

    def quantize(self, x: np.ndarray, weight: BlockWeight, out: QuantizedRows | None = None) -> QuantizedRows:
        """x [rows, K] float32 -> its int8 blocks for `weight`'s bits and block (into `out` where given); the C
        code refuses (before writing) a width and block outside those it lays out."""
        if x.ndim != 2 or x.shape[1] != weight.k or x.dtype != np.float32 or not x.flags.c_contiguous:
            raise ValueError(f"x must be C-contiguous float32 [rows, {weight.k}], got {x.dtype} {list(x.shape)}")
        rows, blocks = x.shape[0], weight.blocks
        if out is None:
            out = QuantizedRows(np.empty((rows, blocks * weight.block), np.int8),
                                np.empty((rows, blocks), np.float32), np.empty((rows, blocks), np.float32),
                                weight.bits, weight.block)
        elif (out.rows, out.codes.shape[1], out.bits, out.block) != (rows, blocks * weight.block, weight.bits,
                                                                     weight.block):
            raise ValueError("the quantized rows' buffers do not fit this input and weight")
        status = self.library.pe_block_quantize(x.ctypes.data, rows, weight.k, weight.bits, weight.block,
                                                out.codes.ctypes.data, out.scales.ctypes.data,
                                                out.zero_terms.ctypes.data)
        if status != 0:  # the layouts were checked before (BlockWeight when made): a caller's bug
            raise ValueError("the quantized linear kernel refused its arguments")
        return out

    def linear(self, x: np.ndarray, weight: BlockWeight, *, threads: int, scratch: LinearScratch) -> np.ndarray:
        """y [rows, N] float32 = x @ W, x [rows, K] quantized into `scratch` and multiplied in one call: the decode
        step's path (the same result as `self(self.quantize(x, weight), weight)`, bit for bit)."""
        rows = x.shape[0]
        if x.dtype != np.float32 or not x.flags.c_contiguous or x.shape != (rows, weight.k):
            raise ValueError(f"x must be C-contiguous float32 [rows, {weight.k}], got {x.dtype} {list(x.shape)}")
        if not 1 <= rows <= MAX_ROWS or weight.blocks * weight.block > scratch.k:
            raise ValueError(f"{rows} rows of {weight.blocks * weight.block} (whole blocks): the kernel takes 1 to "
                             f"{MAX_ROWS}, the scratch {scratch.k} wide")
        out = np.empty((rows, weight.n), np.float32)
        pool = self.pool(max(1, threads))
        with pool.lock:
            status = self.library.pe_block_linear(pool.handle, *weight.addresses, x.ctypes.data, *scratch.addresses,
                                                  out.ctypes.data, rows, weight.n, weight.k, weight.bits, weight.block)
        if status != 0:  # the layouts were checked before (BlockWeight when made): a caller's bug
            raise ValueError("the quantized linear kernel refused its arguments")
        return out

    def __call__(self, x: QuantizedRows, weight: BlockWeight, *, threads: int,
                 out: np.ndarray | None = None) -> np.ndarray:
        """y [rows, N] float32 = x @ W, into `out` where given."""
        if (x.bits, x.block) != (weight.bits, weight.block) or x.codes.shape[1] != weight.blocks * weight.block:
            raise ValueError("the rows were quantized for another weight's blocks")
        if not 1 <= x.rows <= MAX_ROWS:
            raise ValueError(f"{x.rows} rows: the kernel takes 1 to {MAX_ROWS} at a time")
        if out is None:
            out = np.empty((x.rows, weight.n), np.float32)
        elif out.shape != (x.rows, weight.n) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 [{x.rows}, {weight.n}]")
        pool = self.pool(max(1, threads))
        with pool.lock:
            status = self.library.pe_block_gemv(
                pool.handle, weight.codes.ctypes.data, weight.scales.ctypes.data, x.codes.ctypes.data,
                x.scales.ctypes.data, x.zero_terms.ctypes.data, out.ctypes.data, x.rows, weight.n, weight.k,
                weight.bits, weight.block)
        if status != 0:  # the layouts were checked before (BlockWeight when made): a caller's bug
            raise ValueError("the quantized linear kernel refused its arguments")
        return out


def unpack_codes(weight: BlockWeight) -> np.ndarray:
    """The weight's codes minus the zero point, int16 [N, blocks * block] (K's padding included)."""
    codes = weight.codes.reshape(weight.n, -1)
    if weight.bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(weight.n, -1)
    return codes.astype(np.int16) - (1 << (weight.bits - 1))


def activation_blocks(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """x [..., K] float32 as MLAS quantizes it at accuracy level 4 (and pe_block_quantize does): codes
    [..., blocks, block] (round half to even of x * (127 / max), integers held in float32) and scales max / 127
    [..., blocks, 1]; K padded with zeros, which never raise a block's max. Also export/validate/emulate.py's
    emulation of MatMulNBits' activations."""
    *lead, k = x.shape
    padded = np.pad(x, [(0, 0)] * len(lead) + [(0, -k % block)])
    blocks = padded.reshape(*lead, -1, block)
    amax = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = amax / np.float32(INT8_MAX)
    with np.errstate(divide="ignore"):
        inverse = np.where(amax > 0, np.float32(INT8_MAX) / amax, np.float32(0.0))  # 127 / amax in one op
    return np.rint(blocks * inverse), scale


def reference(x: np.ndarray, weight: BlockWeight) -> np.ndarray:
    """x [rows, K] -> [rows, N] by the function of block_gemv.c's head comment, in numpy."""
    q, x_scale = activation_blocks(x, weight.block)  # [rows, blocks, block], [rows, blocks, 1]
    w = unpack_codes(weight).reshape(weight.n, weight.blocks, weight.block).astype(np.float64)
    dots = np.einsum("rbk,nbk->rnb", q.astype(np.float64), w)  # [rows, N, blocks], exact integers
    w_scale = weight.scales.reshape(weight.n, weight.blocks).astype(np.float64)
    return np.einsum("rnb,nb,rb->rn", dots, w_scale, x_scale[..., 0].astype(np.float64)).astype(np.float32)


def random_weight(rng: np.random.Generator, k: int, n: int, bits: int, block: int) -> BlockWeight:
    """Random codes and scales in the layout (self-test, tests and studies)."""
    blocks = -(-k // block)
    codes = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, n * blocks).astype(np.float32)
    return BlockWeight(codes, scales, k, n, bits, block)
