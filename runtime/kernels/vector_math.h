/* What the CPU kernels share (AVX-512F/BW/VL): 2^x for softmax weights, lane masks, int8 codes as float32, the
 * attention entry points' argument check.
 * Included by causal_attention.c, decode_attention.c and layer_ops.c; runtime/kernels/build.py hashes it with each
 * source. */
#ifndef PULSE_EDGE_VECTOR_MATH_H
#define PULSE_EDGE_VECTOR_MATH_H

#include <immintrin.h>
#include <stdint.h>

/* 2^x for x <= 0, to ~1e-7 relative: 2^round(x) by scalef, 2^f on [-0.5, 0.5] by its Taylor series in
 * f ln2 (degree 6). x is clamped at -126 first: a masked score (-inf) must give 0, not NaN. x goes second: vmaxps
 * returns its second operand when either is NaN, so a NaN score stays NaN (with x first it became 2^-126, and a
 * NaN query gave every key the same weight: a plausible, finite, wrong attention output). */
static inline __m512 exp2_ps(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
    __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 first(int n) {  /* the first n of 16 lanes (n may be <= 0 or >= 16) */
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

static inline __m512 codes_ps(const int8_t *c, int n) {  /* the first n of 16 int8 codes as fp32 (exact), 0 after */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(first(n), c)));
}

/* What an attention entry point returns for arguments its loops cannot take (runtime/kernels/attention.py checks
 * them first; this keeps a caller that did not from writing past a buffer); -1 stays memory or a thread refused. */
#define PE_BAD_ARGUMENTS (-2)

static inline int attention_args_ok(int rows, int past, int heads, int kv_heads, int capacity, int d_head, int max_d) {
    return rows >= 1 && past >= 0 && heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0 && d_head >= 16 &&
           d_head % 16 == 0 && (max_d <= 0 || d_head <= max_d) && past <= capacity - rows;
}

#endif
