/* Attention of a few new positions (a decode step has one) over the int8 KV cache, in float32 on AVX-512.
 *
 * The same function as causal_attention.c (see its head comment): per head h (kv head g) and row i at
 * position past + i,
 *
 *     out[i, h, :] = vs[g, :] * sum_{t <= past + i} softmax_t( scale * sum_d q[i, h, d] ks[g, d] kq[g, t, d] ) vq[g, t, :]
 *
 * Why a second kernel: a decode step reads every cached byte once and multiplies it once; it is a stream,
 * bound by memory bandwidth. The AMX kernel works 16 query rows at a time (15 of them wasted here) and
 * first repacks the whole cache per call; ONNX Runtime's GroupQueryAttention reads the int8 cache at about
 * 40% of the read bandwidth on the 2-core VM of docs/performance.md (compute-bound: twice the threads, half
 * the time). Here each key row goes from int8 to float32 in registers and into fused multiply-adds; the
 * codes are exact in float32, so the result is the float32 reference's to rounding (2^x below: ~1e-7).
 * Needs only AVX-512F/BW/VL (Skylake-SP, Ice Lake, Zen 4 and later), no AMX.
 *
 * Per head and row, two passes over the cache, T = past + i + 1 keys:
 *
 *     q' = q * ks * scale * log2(e)                          [D]    in registers
 *     s[t] = q' . kq[g, t]                 t < T             [T]    pass 1: the key codes, one row per t
 *     p[t] = 2^(s[t] - max s),  l = sum p                    [T]
 *     out = vs / l * sum_t p[t] vq[g, t]                     [D]    pass 2: the value codes, accumulators in registers
 *
 * Heads are shared among threads: started per call between ONNX Runtime runs (see causal_attention.c: no
 * spinning pool beside ORT's), or, for the native decode step, the workers of the GEMV's pool
 * (pe_decode_attention_int8kv_pooled below), which runs no ORT beside it.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "thread_pool.h"
#include "vector_math.h"

#define MAX_D 256  /* the accumulators of one row: 16 vectors */

/* Each key and value row asks for the row 4 KiB ahead (software prefetch into L1): the loop's few instructions
 * per byte otherwise leave too few misses in flight for DRAM (the hardware prefetchers alone). Measured on the
 * 2-core VM of docs/performance.md, 32 layers x 32 heads x 3040 positions x 128, 2 threads: 14.5-15.5 GB/s
 * without, 22-24 with 2-4 KiB, 14-21 with 8-16 KiB (L1 overrun); the read probe 27-31 GB/s. */
#define PREFETCH_BYTES 4096

/* The row PREFETCH_BYTES ahead, line by line. always_inline: GCC 12 emitted no prefetch at all from this helper
 * when it was a plain static inline (checked in the assembly). */
static inline __attribute__((always_inline)) void prefetch_row(const int8_t *row, int d_head) {
    for (int b = 0; b < d_head; b += 64) _mm_prefetch((const char *)row + PREFETCH_BYTES + b, _MM_HINT_T0);
}

static inline __m512 row_codes(const int8_t *c) {  /* 16 int8 codes as float32 (exact) */
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)c)));
}

/* s[t] = q' . k[t] for t < keys; returns max s. Two accumulators per key hide the FMA latency. */
static inline __attribute__((always_inline)) float key_scores(const float *qs, const int8_t *k, int keys, int d_head,
                                                              float *s) {
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int t0 = 0; t0 < keys; t0 += 16) {
        float block[16] __attribute__((aligned(64)));
        int n = keys - t0 < 16 ? keys - t0 : 16;
        for (int t = 0; t < n; t++) {
            const int8_t *row = k + (size_t)(t0 + t) * d_head;
            prefetch_row(row, d_head);
            __m512 a = _mm512_setzero_ps(), b = _mm512_setzero_ps();
#pragma GCC unroll 16
            for (int d = 0; d < d_head; d += 32) {
                a = _mm512_fmadd_ps(_mm512_load_ps(qs + d), row_codes(row + d), a);
                if (d + 16 < d_head) b = _mm512_fmadd_ps(_mm512_load_ps(qs + d + 16), row_codes(row + d + 16), b);
            }
            block[t] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
        __m512 got = _mm512_mask_load_ps(_mm512_set1_ps(-INFINITY), first(n), block);
        _mm512_mask_storeu_ps(s + t0, first(n), got);
        top = _mm512_max_ps(top, got);
    }
    return _mm512_reduce_max_ps(top);
}

/* s[t] <- 2^(s[t] - top); returns their sum. */
static float weights(float *s, int keys, float top) {
    __m512 sum = _mm512_setzero_ps(), m = _mm512_set1_ps(top);
    for (int t = 0; t < keys; t += 16) {
        __mmask16 live = first(keys - t);
        __m512 p = _mm512_maskz_mov_ps(live, exp2_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m)));
        _mm512_mask_storeu_ps(s + t, live, p);
        sum = _mm512_add_ps(sum, p);
    }
    return _mm512_reduce_add_ps(sum);
}

/* out = vs / l * sum_t p[t] v[t]: one pass over the value rows, D / 16 accumulators. */
static inline __attribute__((always_inline)) void weighted_values(const float *p, const int8_t *v, int keys,
                                                                  int d_head, const float *vs, float l, float *out) {
    __m512 acc[MAX_D / 16];
#pragma GCC unroll 16
    for (int j = 0; j < d_head / 16; j++) acc[j] = _mm512_setzero_ps();
    for (int t = 0; t < keys; t++) {
        const int8_t *row = v + (size_t)t * d_head;
        prefetch_row(row, d_head);
        __m512 w = _mm512_set1_ps(p[t]);
#pragma GCC unroll 16
        for (int j = 0; j < d_head / 16; j++) acc[j] = _mm512_fmadd_ps(w, row_codes(row + 16 * j), acc[j]);
    }
    __m512 inv = _mm512_set1_ps(1.0f / l);
#pragma GCC unroll 16
    for (int j = 0; j < d_head / 16; j++)
        _mm512_storeu_ps(out + 16 * j, _mm512_mul_ps(_mm512_mul_ps(acc[j], inv), _mm512_loadu_ps(vs + 16 * j)));
}

typedef struct {
    const float *q; const int8_t *kq, *vq; const float *ks, *vs; float *out;
    int rows, past, heads, kv_heads, capacity, d_head, first, threads;
    float scale;
} job;

/* Every `threads`-th head from `first`, each of its rows in turn. d_head is a constant where inlined below,
 * so the loops over channels unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) int heads_of(const job *j, int d_head) {
    const int group = j->heads / j->kv_heads;
    float *s = aligned_alloc(64, sizeof(float) * (size_t)((j->past + j->rows + 15) / 16 * 16));
    if (!s) return -1;
    float qs[MAX_D] __attribute__((aligned(64)));
    for (int h = j->first; h < j->heads; h += j->threads) {
        const int g = h / group;
        const size_t base = (size_t)g * j->capacity * d_head;
        const float *ks = j->ks + (size_t)g * d_head, *vs = j->vs + (size_t)g * d_head;
        for (int i = 0; i < j->rows; i++) {
            const int keys = j->past + i + 1;
            const float *q = j->q + ((size_t)i * j->heads + h) * d_head;
            for (int d = 0; d < d_head; d += 16)
                _mm512_store_ps(qs + d, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(ks + d)),
                                                      _mm512_set1_ps(j->scale * 1.4426950408889634f)));
            float top = key_scores(qs, j->kq + base, keys, d_head, s);
            float l = weights(s, keys, top);
            weighted_values(s, j->vq + base, keys, d_head, vs, l, j->out + ((size_t)i * j->heads + h) * d_head);
        }
    }
    free(s);
    return 0;
}

static int heads_64(const job *j) { return heads_of(j, 64); }
static int heads_128(const job *j) { return heads_of(j, 128); }
static int heads_any(const job *j) { return heads_of(j, j->d_head); }

static void *run_job(void *arg) {
    const job *j = arg;
    int status = j->d_head == 128 ? heads_128(j) : j->d_head == 64 ? heads_64(j) : heads_any(j);
    return status == 0 ? NULL : (void *)1;
}

/* The entry point; layouts as pe_causal_attention_int8kv's (causal_attention.c), d_head a multiple of 16 and
 * at most MAX_D. Returns 0, -1 where memory or a thread was refused, or PE_BAD_ARGUMENTS. */
int pe_decode_attention_int8kv(const float *q, const int8_t *kq, const int8_t *vq, const float *ks, const float *vs,
                               float *out, int rows, int past, int heads, int kv_heads, int capacity, int d_head,
                               float scale, int threads) {
    if (!attention_args_ok(rows, past, heads, kv_heads, capacity, d_head, MAX_D)) return PE_BAD_ARGUMENTS;
    if (threads > heads) threads = heads;
    if (threads < 1) threads = 1;
    job *jobs = calloc((size_t)threads, sizeof(job));
    pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
    int status = jobs && ids ? 0 : -1, started = 0;
    for (int t = 0; status == 0 && t < threads; t++) {
        jobs[t] = (job){q, kq, vq, ks, vs, out, rows, past, heads, kv_heads, capacity, d_head, t, threads, scale};
        if (t > 0) {
            if (pthread_create(&ids[t], NULL, run_job, &jobs[t]) != 0) status = -1;
            else started = t;
        }
    }
    if (status == 0 && run_job(&jobs[0]) != NULL) status = -1;
    for (int t = 1; t <= started; t++) {
        void *result = NULL;
        pthread_join(ids[t], &result);
        if (result != NULL) status = -1;
    }
    free(jobs); free(ids);
    return status;
}

typedef struct { job base; atomic_int failed; } pooled_job;

static void run_part(void *context, int part, int parts) {
    pooled_job *pj = context;
    job j = pj->base;
    j.first = part;
    j.threads = parts;
    if (run_job(&j) != NULL) atomic_store(&pj->failed, 1);
}

/* The same on a pool of worker threads kept between calls (thread_pool.h; made by pe_pool_create in
 * block_gemv.c), for the native decode step, which calls it once a layer between its quantized projections on
 * the same pool: no thread is started per call, and no second pool spins beside the first. */
int pe_decode_attention_int8kv_pooled(void *threads, const float *q, const int8_t *kq, const int8_t *vq,
                                      const float *ks, const float *vs, float *out, int rows, int past, int heads,
                                      int kv_heads, int capacity, int d_head, float scale) {
    if (!threads) return -1;
    if (!attention_args_ok(rows, past, heads, kv_heads, capacity, d_head, MAX_D)) return PE_BAD_ARGUMENTS;
    pooled_job pj = {{q, kq, vq, ks, vs, out, rows, past, heads, kv_heads, capacity, d_head, 0, 1, scale}, 0};
    pool_run(threads, run_part, &pj);
    return atomic_load(&pj.failed) ? -1 : 0;
}
