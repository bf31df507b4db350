"""The Triton kernels themselves: one GEMM with a fused epilogue (the projector runs it twice) and tile normalisation.

    linear_kernel:  C[M, N] = epilogue(A[M, K] @ B[N, K]^T)        B in nn.Linear layout [out, in]
        prologue    A -> fp8 E4M3 by a per-tensor scale (QUANT_A), B cast to A's type (int8 weights -> fp16/bf16)
        epilogue    x per-channel weight scale, x per-tensor activation scale, + bias, exact erf GELU,
                    optional fp8 output by a per-tensor scale; fp32 throughout until the store (on Hopper's
                    fp8 tensor cores, each K block's sum is promoted to it: max_num_imprecise_acc)

    normalize_tiles_kernel:  uint8 [N, H, W, 3] -> [N, 3, H, W] (x / 255 - mean) / std, as one multiply-add

Every kernel takes INTERPRET (constexpr). Triton's CPU interpreter (TRITON_INTERPRET=1, triton 3.9)
gets three things wrong that the GPU gets right, so under it the kernels take a detour:
  * tl.dot on bf16 multiplies the raw uint16 bit patterns (numpy has no bf16), and int8 -> bf16 casts
    reinterpret the integer as bf16 bits: dot operands go straight to fp32 instead;
  * fp32 -> bf16 truncates instead of rounding to nearest even: rounded by bit arithmetic first;
  * fp32 -> fp8 loses the carry when rounding overflows the mantissa (-7.84 -> -4.0) and does not
    saturate: rounded onto the E4M3 grid by float arithmetic first, so the cast itself is exact.
With those, the CPU tests check the same function the GPU computes. INTERPRET is a constexpr, so the
detours do not exist in the compiled GPU kernels.

Only triton.language builtins are used, none of its @triton.jit helpers (tl.cdiv, tl.zeros, ...):
those were decorated when triton was imported, compiled or interpreted by the variable at that time,
and a compiled one cannot be called from an interpreted kernel.

This module is executed twice at most: once as a normal import (compiled kernels), and once as a
separate module object built while TRITON_INTERPRET=1 (see dispatch.kernel_source).
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_E4M3_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
E4M3_MANTISSA_BITS = tl.constexpr(3)
E4M3_MIN_NORMAL = tl.constexpr(2.0**-6)  # below it, subnormals share this binade's step
INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _round_half_even(y):
    r = tl.floor(y + 0.5)  # exact: |y| < 16 here, so y + 0.5 needs no rounding in fp32
    tie = (r - y) == 0.5
    odd = (r * 0.5) != tl.floor(r * 0.5)
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _round_to_e4m3_grid(v):
    # A log2 that rounds up just below a power of two picks the coarser step, but then v is within
    # half a step of that power of two and both grids round it to the same value.
    binade = tl.floor(tl.log2(tl.maximum(tl.abs(v), E4M3_MIN_NORMAL)))
    step = tl.exp2(binade - E4M3_MANTISSA_BITS)
    rounded = _round_half_even(v / step) * step
    return tl.where(rounded == 0.0, v * 0.0, rounded)  # keeps the sign of a zero, as the hardware does


@triton.jit
def _round_to_bf16_bits(v):
    bits = v.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round to nearest, ties to even, on the dropped 16 bits
    bits = (bits >> 16) << 16
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_e4m3(v, INTERPRET: tl.constexpr):
    v = tl.minimum(tl.maximum(v, -FP8_E4M3_MAX), FP8_E4M3_MAX)  # saturate, as cvt.satfinite does
    if INTERPRET:
        v = _round_to_e4m3_grid(v)
    return v.to(tl.float8e4nv)


@triton.jit
def _cast_for_store(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    if dtype == tl.float8e4nv:
        out = _to_e4m3(v, INTERPRET)
    else:
        if INTERPRET and dtype == tl.bfloat16:
            v = _round_to_bf16_bits(v)
        out = v.to(dtype)
    return out


@triton.jit
def _tile_coords(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    # Walk the output tiles in bands of GROUP_M tile rows, column by column inside a band, so that
    # programs running together share A rows and B columns in L2 instead of streaming all of B per row.
    tiles_m = (M + BLOCK_M - 1) // BLOCK_M
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    band_size = GROUP_M * tiles_n
    band = pid // band_size
    first_row = band * GROUP_M
    rows_here = tl.minimum(tiles_m - first_row, GROUP_M)
    inside = pid % band_size
    return first_row + inside % rows_here, inside // rows_here


@triton.jit
def _prologue(a, b, inv_a_scale, QUANT_A: tl.constexpr, INTERPRET: tl.constexpr):
    if QUANT_A:
        a = _to_e4m3(a.to(tl.float32) * inv_a_scale, INTERPRET)
    if INTERPRET:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    else:
        b = b.to(a.dtype)  # int8 weights: exact in fp16/bf16 (|q| <= 127); the scale waits for the epilogue
    return a, b


@triton.jit
def _epilogue(acc, rn, N, bias_ptr, b_scale_ptr, a_scale_ptr, out_scale_ptr, HAS_B_SCALE: tl.constexpr,
              HAS_A_SCALE: tl.constexpr, GELU: tl.constexpr, HAS_OUT_SCALE: tl.constexpr):
    n_ok = rn < N
    if HAS_B_SCALE:  # per output channel: factors out of the K sum, so it is applied once here
        acc = acc * tl.load(b_scale_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_A_SCALE:
        acc = acc * tl.load(a_scale_ptr)
    acc = acc + tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * INV_SQRT2))
    if HAS_OUT_SCALE:
        acc = acc * (1.0 / tl.load(out_scale_ptr))
    return acc


@triton.jit
def linear_kernel(a_ptr, b_ptr, bias_ptr, b_scale_ptr, a_scale_ptr, out_scale_ptr, M, N, K,
                  stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, M_BUCKET, c_ptr,
                  QUANT_A: tl.constexpr, HAS_B_SCALE: tl.constexpr, HAS_A_SCALE: tl.constexpr,
                  GELU: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, INTERPRET: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # Argument order: tensor inputs, integers, the output: the order TensorRT's AOT plugins launch
    # with (kernels/trt_plugin.py). M_BUCKET is not read: it is the autotuner's key, so that every
    # token count does not re-tune.
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None] * stride_bk  # a [K, N] view of W^T
    inv_a_scale = 1.0
    if QUANT_A:
        inv_a_scale = 1.0 / tl.load(a_scale_ptr)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (rk + k0) < K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a, b = _prologue(a, b, inv_a_scale, QUANT_A, INTERPRET)
        # BLOCK_K: each K block's partial sum joins the fp32 accumulator. Triton's default for fp8 x fp8 on sm_90
        # (2**30) lets Hopper's fp8 tensor cores keep the running sum in their reduced-precision accumulator over
        # all of K (4096 in the second GEMM; DeepSeek-V3's report: ~14 bits kept); promoting every 64-128 products
        # is their remedy, and keeps wgmma (0 would fall back to mma.sync: HMMA, not QGMMA, in the AOT SASS).
        # Other GPUs and dtypes ignore it.
        acc = tl.dot(a, b, acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    acc = _epilogue(acc, rn, N, bias_ptr, b_scale_ptr, a_scale_ptr, out_scale_ptr, HAS_B_SCALE, HAS_A_SCALE,
                    GELU, HAS_OUT_SCALE)
    out = _cast_for_store(acc, c_ptr.dtype.element_ty, INTERPRET)
    c_ptrs = c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :] * stride_cn
    tl.store(c_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def normalize_tiles_kernel(src_ptr, dst_ptr, pixels, scale0, scale1, scale2, shift0, shift1, shift2,
                           INTERPRET: tl.constexpr, BLOCK_P: tl.constexpr):
    # One program: BLOCK_P pixels of one tile, all three channels. The HWC bytes are read as one
    # contiguous run (a [BLOCK_P, 4] tile, the fourth column masked) and written as three CHW runs.
    tile = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.arange(0, 4)
    ok = (p[:, None] < pixels) & (c[None, :] < 3)
    px = tl.load(src_ptr + tile * pixels * 3 + p[:, None] * 3 + c[None, :], mask=ok, other=0)
    scale = tl.where(c == 0, scale0, tl.where(c == 1, scale1, scale2))
    shift = tl.where(c == 0, shift0, tl.where(c == 1, shift1, shift2))
    v = px.to(tl.float32) * scale[None, :] + shift[None, :]
    out = _cast_for_store(v, dst_ptr.dtype.element_ty, INTERPRET)
    tl.store(dst_ptr + tile * pixels * 3 + c[None, :] * pixels + p[:, None], out, mask=ok)


def _config(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)


# GPU autotuning candidates per mode. Not timed here (no GPU was lent to the task that wrote them),
# but compiled ahead of time for sm_80/87/89/90 (kernels/aot.py, tests/kernels/test_kernels_aot.py): each
# target keeps at least one candidate that fits its shared memory without spilling registers. A
# candidate too big for a device fails there with OutOfResources and the autotuner skips it. fp8
# takes K blocks twice as deep (same bytes); its first GEMM stages x in bf16/fp16 before quantizing
# it, which is why only the two smallest fp8 candidates fit Ada's 99 KiB.
TUNING_CONFIGS: dict[str, list[triton.Config]] = {
    "fp": [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 4, 4), _config(128, 128, 64, 8, 3),
           _config(64, 128, 64, 4, 4), _config(64, 256, 64, 8, 3)],
    "int8": [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 4, 4), _config(64, 128, 64, 4, 4),
             _config(64, 256, 64, 8, 3)],
    "fp8": [_config(128, 256, 128, 8, 3), _config(128, 128, 128, 4, 4), _config(128, 128, 128, 8, 3),
            _config(64, 128, 128, 4, 4), _config(128, 128, 64, 8, 3), _config(64, 128, 128, 4, 3)],
}
TUNING_KEY = ["M_BUCKET", "N", "K", "GELU", "QUANT_A"]  # triton adds the tensors' dtypes itself

TUNED_LINEAR = {mode: triton.autotune(configs=configs, key=TUNING_KEY)(linear_kernel)
                for mode, configs in TUNING_CONFIGS.items()}
