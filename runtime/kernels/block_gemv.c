/* A few rows through a weight-only quantized linear layer: ONNX Runtime's MatMulNBits (4 or 8 bits, block-wise
 * scales along K, no zero points) at accuracy level 4, on AVX-512 VNNI.
 *
 * The function, exactly as MLAS computes it at level 4 (docs/quantization.md): each row of x is quantized per
 * block of `block` values along K, s_x = max|x| / 127, q_x = round-half-even(x * (127 / max|x|)); the weight
 * codes c in [0, 2^bits) carry the implied zero point z = 2^(bits - 1); per output n,
 *
 *     y[m, n] = sum_b  s_w[n, b] * s_x[m, b] * sum_{k in b} q_x[m, k] * (c[n, k] - z)
 *             = sum_b  s_w[n, b] * ( s_x[m, b] * sum_k q_x c  -  z s_x[m, b] sum_k q_x )
 *
 * The inner sum is exact in int32 (vpdpbusd: u8 codes x s8 activations, four products a lane); the second
 * term is one float per (row, block), computed with the activations (`xc`). Only the float order of the
 * outer sum differs from MLAS's, so the result is ONNX Runtime's to float32 rounding.
 *
 * Why it exists: a decode step is a stream over the weights. The weights are read in their ONNX layout,
 * W [N, blocks, block * bits / 8], one output's K contiguous, so each thread streams one contiguous range of
 * outputs front to back (one stream per core: four outputs' rows side by side, 2 KiB apart, measured 1.6x
 * slower on the 2-core VM).
 *
 * 4-bit codes: byte j of a block holds k = 2j (low nibble) and 2j + 1 (high nibble). The activations are
 * stored per 128 values as 64 even-k then 64 odd-k bytes, so one 64-byte load of codes meets two 64-byte
 * activation vectors: (codes & 15) against the even ones, (codes >> 4) against the odd ones.
 */
#include <immintrin.h>
#include <stdint.h>

#include "thread_pool.h"

#define MAX_ROWS 4  /* rows of x sharing one pass over the weights */
#define MAX_THREADS 64

/* No software prefetch: each thread reads one contiguous stream, which the hardware prefetchers follow. Measured on
 * the 2-core VM of docs/performance.md (AMD EPYC, 2 threads, 12 projections of the 7B's shapes): 28.6 GB/s
 * without, 24.6-26.3 with prefetcht0 1-4 KiB ahead (decode_attention.c's rows are short and far apart; there it
 * helps). */

/* 16 lanes of x (the first `live`; zeros after) as codes: x * inverse rounded half to even (the default MXCSR
 * mode, as MLAS's _mm512_cvtps_epi32). */
static inline __m512i lane_codes(const float *x, int live, __m512 inverse) {
    __mmask16 m = live >= 16 ? (__mmask16)0xffff : live <= 0 ? 0 : (__mmask16)((1u << live) - 1);
    return _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x), inverse));
}

/* x [rows, k] -> per row and block: codes (4-bit layout above, or in order for 8 bits), s_x, z s_x sum q.
 * Returns 0, or -1 (nothing written) for a width or block the layout has no place for. */
int pe_block_quantize(const float *x, int rows, int k, int bits, int block, int8_t *xq, float *xs, float *xc) {
    if ((bits != 4 && bits != 8) || block < 1 || block % (bits == 4 ? 128 : 64) || rows < 0 || k < 1) return -1;
    const int blocks = (k + block - 1) / block, zero = 1 << (bits - 1);
    /* 16 codes k..k+15 -> evens in the low 8 lanes, odds in the high 8 (the 4-bit layout's order) */
    const __m512i split = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int m = 0; m < rows; m++) {
        for (int b = 0; b < blocks; b++) {
            const float *src = x + (size_t)m * k + (size_t)b * block;
            const int live = k - b * block < block ? k - b * block : block;
            __m512 top = _mm512_setzero_ps();
            __mmask16 nan = 0;
            for (int i = 0; i < live; i += 16) {
                __mmask16 mask = live - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (live - i)) - 1);
                __m512 v = _mm512_maskz_loadu_ps(mask, src + i);
                nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                top = _mm512_max_ps(top, _mm512_abs_ps(v));
            }
            /* a NaN activation makes the block's scale NaN, so every output of its row is NaN (vmaxps alone drops
             * it, and its code, INT_MIN, would have skewed the zero-point term into huge finite garbage) */
            const float amax = nan ? __builtin_nanf("") : _mm512_reduce_max_ps(top);
            const __m512 inverse = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            int8_t *dst = xq + ((size_t)m * blocks + b) * block;
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < block; i += 16) {
                __m512i q = lane_codes(src + i, live - i, inverse);
                sum = _mm512_add_epi32(sum, q);
                if (bits == 4) {  /* evens to (i mod 128) / 2, odds 64 bytes after them */
                    __m128i bytes = _mm512_cvtepi32_epi8(_mm512_permutexvar_epi32(split, q));
                    int8_t *at = dst + (i & ~127) + ((i & 127) >> 1);
                    _mm_storel_epi64((__m128i *)at, bytes);
                    _mm_storel_epi64((__m128i *)(at + 64), _mm_unpackhi_epi64(bytes, bytes));
                } else {
                    _mm_storeu_si128((__m128i *)(dst + i), _mm512_cvtepi32_epi8(q));
                }
            }
            xs[(size_t)m * blocks + b] = amax / 127.0f;
            xc[(size_t)m * blocks + b] = (float)zero * (amax / 127.0f) * (float)_mm512_reduce_add_epi32(sum);
        }
    }
    return 0;
}

typedef struct {
    const uint8_t *w; const float *ws; const int8_t *xq; const float *xs, *xc; float *y;
    int rows, n, k, bits, block, first, last;
} job;

/* sum_k q_x c over one block of one output (the codes at `codes`), for `rows` rows of activations. */
static inline __attribute__((always_inline)) void block_dots(const uint8_t *codes, const int8_t *xq, size_t x_stride,
                                                             int rows, int bits, int block, __m512i *dot) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int m = 0; m < rows; m++) dot[m] = _mm512_setzero_si512();
    const int step = bits == 4 ? 128 : 64;  /* values per 64-byte load */
    for (int i = 0; i < block; i += step) {
        const uint8_t *at = codes + (size_t)i * bits / 8;
        __m512i c = _mm512_loadu_si512(at);
        if (bits == 4) {
            __m512i even = _mm512_and_si512(c, low), odd = _mm512_and_si512(_mm512_srli_epi16(c, 4), low);
            for (int m = 0; m < rows; m++) {
                const int8_t *x = xq + m * x_stride + i;
                dot[m] = _mm512_dpbusd_epi32(dot[m], even, _mm512_loadu_si512(x));
                dot[m] = _mm512_dpbusd_epi32(dot[m], odd, _mm512_loadu_si512(x + 64));
            }
        } else {
            for (int m = 0; m < rows; m++)
                dot[m] = _mm512_dpbusd_epi32(dot[m], c, _mm512_loadu_si512(xq + m * x_stride + i));
        }
    }
}

/* Outputs [first, last) for `rows` rows; constant bits, block and rows where inlined: the loops unroll. */
static inline __attribute__((always_inline)) void outputs(const job *j, int rows, int bits, int block) {
    const int blocks = (j->k + block - 1) / block;
    const size_t row_bytes = (size_t)blocks * block * bits / 8, x_stride = (size_t)blocks * block;
    for (int n = j->first; n < j->last; n++) {
        const uint8_t *codes = j->w + (size_t)n * row_bytes;
        const float *ws = j->ws + (size_t)n * blocks;
        __m512 acc[MAX_ROWS];
        float corr[MAX_ROWS];
        for (int m = 0; m < rows; m++) { acc[m] = _mm512_setzero_ps(); corr[m] = 0.0f; }
        for (int b = 0; b < blocks; b++) {
            __m512i dot[MAX_ROWS];
            block_dots(codes + (size_t)b * block * bits / 8, j->xq + (size_t)b * block, x_stride, rows, bits, block,
                       dot);
            for (int m = 0; m < rows; m++) {
                const float xs = j->xs[(size_t)m * blocks + b];
                acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), _mm512_set1_ps(ws[b] * xs), acc[m]);
                corr[m] += ws[b] * j->xc[(size_t)m * blocks + b];
            }
        }
        for (int m = 0; m < rows; m++) j->y[(size_t)m * j->n + n] = _mm512_reduce_add_ps(acc[m]) - corr[m];
    }
}

/* The shapes the models use compiled apart (constants: unrolled loops); any other takes the general loop. */
static void outputs_any(const job *j) {
    if (j->bits == 4 && j->block == 128 && j->rows == 1) outputs(j, 1, 4, 128);
    else if (j->bits == 8 && j->block == 128 && j->rows == 1) outputs(j, 1, 8, 128);
    else if (j->bits == 4) outputs(j, j->rows, 4, j->block);
    else outputs(j, j->rows, 8, j->block);
}

static void run_part(void *context, int part, int parts) {
    job j = *(const job *)context;
    const int n = j.last;  /* the whole range; this part takes its share, at least 16 outputs a part */
    int used = parts < n / 16 ? parts : n / 16 > 0 ? n / 16 : 1;
    if (part >= used) return;
    j.first = (int)((long)n * part / used);
    j.last = (int)((long)n * (part + 1) / used);
    outputs_any(&j);
}

/* A pool of `threads` - 1 workers for pe_block_gemv and pe_decode_attention_int8kv_pooled (thread_pool.h);
 * NULL where a thread could not start. */
void *pe_pool_create(int threads) {
    return pool_create(threads > MAX_THREADS ? MAX_THREADS : threads);
}

void pe_pool_destroy(void *p) {
    pool_destroy(p);
}

/* y [rows, n] = x @ W for x quantized by pe_block_quantize; rows <= MAX_ROWS, block a multiple of 128 (4 bits)
 * or 64 (8 bits), the work shared by the pool's threads. Returns 0, or -1 for arguments outside those. */
int pe_block_gemv(void *threads, const uint8_t *w, const float *ws, const int8_t *xq, const float *xs,
                  const float *xc, float *y, int rows, int n, int k, int bits, int block) {
    if (!threads || rows < 1 || rows > MAX_ROWS || n < 1 || k < 1 || (bits != 4 && bits != 8)) return -1;
    if (block < 1 || block % (bits == 4 ? 128 : 64)) return -1;
    job j = {w, ws, xq, xs, xc, y, rows, n, k, bits, block, 0, n};
    pool_run(threads, run_part, &j);
    return 0;
}

/* pe_block_quantize then pe_block_gemv, in one call: the decode step makes ~130 projections a step, and each
 * call from Python costs more than a small projection's arithmetic (measured ~40 us for the two calls and their
 * checks, against ~3 us for the bare kernel call). xq, xs, xc: the caller's scratch for `rows` quantized rows. */
int pe_block_linear(void *threads, const uint8_t *w, const float *ws, const float *x, int8_t *xq, float *xs,
                    float *xc, float *y, int rows, int n, int k, int bits, int block) {
    if (rows < 1 || rows > MAX_ROWS) return -1;
    if (pe_block_quantize(x, rows, k, bits, block, xq, xs, xc) != 0) return -1;
    return pe_block_gemv(threads, w, ws, xq, xs, xc, y, rows, n, k, bits, block);
}
