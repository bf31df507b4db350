/* The native decode step's elementwise work between its kernels, on AVX-512F: one call each where numpy took 5-10
 * operations on [rows, hidden] vectors (runtime/engines/native.py).
 *
 *     hidden ─ += delta ─ RMSNorm x w ─ normed                     pe_add_rms_norm   (before qkv and gate_up)
 *     qkv ─ rotary by halves (q, k) ─ q out; k, v ─ int8 codes ─ cache   pe_rotary_store
 *     gate_up ─ SiLU(gate) x up ─ out                              pe_silu_mul        (before down)
 *
 * Why: a 7B decode step spent 12-16 ms of its ~171 outside the kernels on the 2-core VM of docs/performance.md,
 * most of it numpy's per-operation cost on vectors of 4096 values (10-15 us each, ~25 a layer).
 *
 * Each computes what the numpy code it replaces computed, in the same float32 operations (a product and a
 * difference, not a fused multiply-add; a division where numpy divides), so the rotary and the stored codes are
 * numpy's bit for bit; the norm's sum of squares and SiLU's exponential differ from numpy's by float32 rounding
 * (another order of the sum; 2^x to ~1e-7). The numpy twins are in runtime/kernels/layer_ops.py.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "vector_math.h"

#define LOG2E 1.4426950408889634f

/* hidden [rows, n] += delta (where delta is not NULL), then normed = hidden / sqrt(mean(hidden^2) + eps) * w. */
int pe_add_rms_norm(float *hidden, const float *delta, const float *w, float *normed, int rows, int n, float eps) {
    if (rows < 1 || n < 1) return -1;
    for (int m = 0; m < rows; m++) {
        float *h = hidden + (size_t)m * n;
        const float *dl = delta ? delta + (size_t)m * n : NULL;
        __m512 squares = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            __mmask16 live = first(n - i);
            __m512 x = _mm512_maskz_loadu_ps(live, h + i);
            if (dl) {
                x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(live, dl + i));
                _mm512_mask_storeu_ps(h + i, live, x);
            }
            squares = _mm512_fmadd_ps(x, x, squares);
        }
        const __m512 root = _mm512_set1_ps(sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
        for (int i = 0; i < n; i += 16) {
            __mmask16 live = first(n - i);
            __m512 x = _mm512_div_ps(_mm512_maskz_loadu_ps(live, h + i), root);
            _mm512_mask_storeu_ps(normed + (size_t)m * n + i, live, _mm512_mul_ps(x, _mm512_maskz_loadu_ps(live, w + i)));
        }
    }
    return 0;
}

/* x [d] rotated by halves at one position: x1 cos - x2 sin | x2 cos + x1 sin (cos, sin [d / 2]). */
static void rotate(const float *x, const float *cos, const float *sin, int half, float *out) {
    for (int i = 0; i < half; i += 16) {
        __mmask16 live = first(half - i);
        __m512 a = _mm512_maskz_loadu_ps(live, x + i), b = _mm512_maskz_loadu_ps(live, x + half + i);
        __m512 c = _mm512_maskz_loadu_ps(live, cos + i), s = _mm512_maskz_loadu_ps(live, sin + i);
        _mm512_mask_storeu_ps(out + i, live, _mm512_sub_ps(_mm512_mul_ps(a, c), _mm512_mul_ps(b, s)));
        _mm512_mask_storeu_ps(out + half + i, live, _mm512_add_ps(_mm512_mul_ps(b, c), _mm512_mul_ps(a, s)));
    }
}

/* x [d] / scale [d] rounded half to even, clipped to +-127, as int8 codes at dst. */
static void store_codes(const float *x, const float *scale, int d, int8_t *dst) {
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    for (int i = 0; i < d; i += 16) {
        __mmask16 live = first(d - i);
        __m512 grid = _mm512_div_ps(_mm512_maskz_loadu_ps(live, x + i), _mm512_mask_loadu_ps(hi, live, scale + i));
        grid = _mm512_min_ps(_mm512_max_ps(grid, lo), hi);  /* clipped before the conversion: no overflow */
        __m512i codes = _mm512_cvt_roundps_epi32(grid, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);  /* as rint */
        _mm_mask_storeu_epi8(dst + i, live, _mm512_cvtepi32_epi8(codes));
    }
}

/* qkv [rows, (heads + 2 kv_heads) d] of positions past.. -> q [rows, heads, d] rotated; the rotated keys and the
 * values stored as codes at [kv head, past + r, :] of k_cache, v_cache [kv_heads, capacity, d]. cos, sin: the
 * rotary tables [positions, d / 2]. Returns 0, or -1 for sizes outside the cache. */
int pe_rotary_store(const float *qkv, int rows, int heads, int kv_heads, int d, const float *cos, const float *sin,
                    const float *k_scale, const float *v_scale, int8_t *k_cache, int8_t *v_cache, int capacity, int past,
                    float *q, float *scratch) {
    if (rows < 1 || d < 2 || d % 2 || past < 0 || past + rows > capacity || heads < 1 || kv_heads < 1) return -1;
    const int half = d / 2, width = (heads + 2 * kv_heads) * d;
    for (int r = 0; r < rows; r++) {
        const float *row = qkv + (size_t)r * width;
        const float *c = cos + (size_t)(past + r) * half, *s = sin + (size_t)(past + r) * half;
        for (int h = 0; h < heads; h++) rotate(row + (size_t)h * d, c, s, half, q + ((size_t)r * heads + h) * d);
        for (int g = 0; g < kv_heads; g++) {
            const size_t at = ((size_t)g * capacity + past + r) * d;
            rotate(row + (size_t)(heads + g) * d, c, s, half, scratch);
            store_codes(scratch, k_scale + (size_t)g * d, d, k_cache + at);
            store_codes(row + (size_t)(heads + kv_heads + g) * d, v_scale + (size_t)g * d, d, v_cache + at);
        }
    }
    return 0;
}

/* 1 / (1 + e^-g), to ~1e-7 relative for g >= -87, from exp2_ps of a value <= 0 only. Below, exp2_ps stops at 2^-126:
 * sigmoid comes out ~1e-38 where it is smaller still, so SiLU (g x sigmoid) is under 1e-35 either way. */
static inline __m512 sigmoid_ps(__m512 g) {
    /* t = e^-|g| <= 1; sigmoid = 1 / (1 + t) for g >= 0, t / (1 + t) below: no overflow either side */
    __m512 t = exp2_ps(_mm512_mul_ps(_mm512_abs_ps(g), _mm512_set1_ps(-LOG2E)));
    __m512 one = _mm512_set1_ps(1.0f), denominator = _mm512_add_ps(one, t);
    __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    return _mm512_div_ps(_mm512_mask_blend_ps(negative, one, t), denominator);
}

/* gate_up [rows, 2 inter] (gate, then up) -> out [rows, inter] = gate x sigmoid(gate) x up. */
int pe_silu_mul(const float *gate_up, float *out, int rows, int inter) {
    if (rows < 1 || inter < 1) return -1;
    for (int m = 0; m < rows; m++) {
        const float *gate = gate_up + (size_t)m * 2 * inter, *up = gate + inter;
        for (int i = 0; i < inter; i += 16) {
            __mmask16 live = first(inter - i);
            __m512 g = _mm512_maskz_loadu_ps(live, gate + i);
            __m512 y = _mm512_mul_ps(_mm512_mul_ps(g, sigmoid_ps(g)), _mm512_maskz_loadu_ps(live, up + i));
            _mm512_mask_storeu_ps(out + (size_t)m * inter + i, live, y);
        }
    }
    return 0;
}
