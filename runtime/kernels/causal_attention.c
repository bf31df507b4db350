/* Causal attention of a prompt chunk over an int8 KV cache in bf16: on AMX-BF16 tiles (Sapphire Rapids and
 * later), or, built with -DPE_NO_AMX, on AVX-512 BF16 dot products (Zen 4 and later, Cooper Lake).
 *
 * What it computes, per head h (kv head g = h / (heads / kv_heads)) and query row i of the chunk, whose
 * absolute position is past + i:
 *
 *     out[i, h, :] = vs[g, :] * sum_{t <= past + i} softmax_t( scale * sum_d q[i, h, d] ks[g, d] kq[g, t, d] ) vq[g, t, :]
 *
 * with kq / vq the int8 codes in the cache and ks / vs their per-(kv head, channel) scales: the cache the
 * decoder graphs keep (export/graphs/kv_cache.py). The chunk's own keys and values are already in it.
 *
 * Why the codes go to the tiles as they are: an int8 code (|c| <= 127, 7 bits) is exact in bfloat16 (8
 * significant bits), so the key scale is folded into q and the value scale applied once at the end; the
 * cache is never dequantized. Only q (times its scales) and the softmax weights are rounded to bf16.
 *
 * The loop, one head on one thread, a block of 16 query rows at a time (flash attention: the scores of
 * one row are never held whole, a running max and sum rescale what is accumulated):
 *
 *     q rows [16, D] ─ x ks x scale x log2(e) ─ bf16 ─┐
 *                                                     ├─ AMX: S [16, 64] = Q K^T    (tiles 0-3, 4 steps of 32 d)
 *     key codes, packed once per head ── bf16 ────────┘
 *     S ─ causal mask ─ running max m, p = 2^(S - m), running sum l ─ P bf16 [16, 64]
 *     P ─┬─ AMX: P V [16, 64 d] twice (tiles 0-3, 2 steps of 32 keys) ─ O = O * 2^(m_old - m) + P V
 *     value codes, packed once per head ─┘
 *     ... next 64 keys, up to the last row's position ...
 *     out = O / l * vs
 *
 * Tile shapes (all 16 rows x 64 bytes): tiles 0-3 accumulate fp32 [16, 16]; tile 4 holds A (16 rows x 32
 * bf16); tile 5 holds B in the pairwise ("VNNI") layout dpbf16ps reads: row k holds, for each of 16
 * columns n, the pair (B[2k, n], B[2k + 1, n]). Keys pack as Kp[d / 2][t][2] (a B row is 16 keys' pair of
 * channels), values as Vp[t / 2][d][2] (16 channels' pair of keys).
 *
 * Without AMX the same two block products run on vdpbf16ps over the same packed layouts (Kp's rows one cache line
 * longer: KEY_PAD, see pack_head): a B row's 64 columns are four zmm registers of pairs, each of 4 A rows' pair
 * broadcast into them, 16 accumulators in registers (block_4x64). P V accumulates straight into O there, each row
 * rescaled as it is loaded into the registers. The rounding is the same (bf16 products summed in fp32); only the
 * order of the fp32 sums differs.
 */
#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vector_math.h"

#define BQ 16          /* query rows per block: one tile's rows */
#define BK 64          /* keys per block: four accumulator tiles of 16 columns */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define LOG2E 1.4426950408889634f
#ifdef PE_NO_AMX
#define KEY_PAD 16     /* keys of padding per row of Kp, so its rows do not fall on the same cache sets (see pack_head) */
#else
#define KEY_PAD 0
#endif

#ifndef PE_NO_AMX
/* The tile configuration's memory format (Intel SDM, LDTILECFG). */
typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands out AMX state only to a process that asks for it. 0 where granted, else -errno. */
int pe_request_amx(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 0 : -errno;
}

static void configure_tiles(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int i = 0; i < 6; i++) {
        cfg.rows[i] = 16;
        cfg.colsb[i] = 64;
    }
    _tile_loadconfig(&cfg);
}
#define TILES_BEGIN() configure_tiles()  /* tile state is per thread */
#define TILES_END() _tile_release()
#else
int pe_request_amx(void) { return 0; }  /* nothing to ask for */
#define TILES_BEGIN() ((void)0)
#define TILES_END() ((void)0)
#endif

/* Kp[dp / 2][t][2] and Vp[t / 2][dp][2] for t < rows; zeros up to `padded` positions (a multiple of BK) and `dp`
 * channels (d_head rounded up to 64: the tiles' width); Kp's rows `kstride` keys apart. The codes are exact in bf16,
 * so this is a reordering, vectorised: a key row's channel pairs scatter to the rows of Kp (one 32-bit pair each);
 * two value rows interleave into one row of Vp.
 *
 * Why kstride = padded + KEY_PAD: a block of scores reads 64 rows of Kp, 256 bytes each, padded x 4 bytes apart. At
 * 2048 or 3072 positions (a prompt's first chunk, and its whole length) that distance is a multiple of 4 KiB, so
 * every row falls on the same four sets of the 8-way L1 and the four row groups of block_4x64 re-read them from L2.
 * One cache line more per row spreads them over every set. The AMX build keeps padded (not measured there). */
static void pack_head(const int8_t *k, const int8_t *v, int rows, int padded, int kstride, int d_head, int dp,
                      int row_stride, uint16_t *kp, uint16_t *vp) {
    memset(kp, 0, sizeof(uint16_t) * (size_t)kstride * dp);
    memset(vp, 0, sizeof(uint16_t) * (size_t)padded * dp);
    const __m512i pair_rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32(kstride));
    for (int t = 0; t < rows; t++) {
        const int8_t *kr = k + (size_t)t * row_stride;
        for (int d = 0; d < d_head; d += 32) {
            __m512i pairs = (__m512i)_mm512_cvtne2ps_pbh(codes_ps(kr + d + 16, d_head - d - 16),
                                                         codes_ps(kr + d, d_head - d));
            _mm512_mask_i32scatter_epi32((int *)kp + (size_t)(d / 2) * kstride + t, first((d_head - d + 1) / 2),
                                         pair_rows, pairs, 4);
        }
    }
    for (int t = 0; t < rows; t += 2) {
        const int8_t *even = v + (size_t)t * row_stride, *odd = even + row_stride;
        uint32_t *dst = (uint32_t *)vp + (size_t)(t / 2) * dp;
        for (int d = 0; d < d_head; d += 16) {
            __m512i lo = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(codes_ps(even + d, d_head - d)));
            __m512i hi = t + 1 < rows ? _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(codes_ps(odd + d, d_head - d)))
                                      : _mm512_setzero_si512();
            _mm512_mask_storeu_epi32(dst + d, first(d_head - d), _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

#ifndef PE_NO_AMX
/* S [16, 64] = Q [16, dp] x K[key0 : key0 + 64]^T, into s (fp32, row stride BK). */
static void scores_block(const uint16_t *qb, const uint16_t *kp, int kstride, int dp, int key0, float *s) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int j = 0; j < dp / 32; j++) {
        const uint16_t *b = kp + ((size_t)16 * j * kstride + key0) * 2;
        const long b_stride = (long)kstride * 4;
        _tile_loadd(4, qb + 32 * j, dp * 2);
        _tile_loadd(5, b, b_stride);      _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(5, b + 32, b_stride); _tile_dpbf16ps(1, 4, 5);
        _tile_loadd(5, b + 64, b_stride); _tile_dpbf16ps(2, 4, 5);
        _tile_loadd(5, b + 96, b_stride); _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, s, BK * 4); _tile_stored(1, s + 16, BK * 4);
    _tile_stored(2, s + 32, BK * 4); _tile_stored(3, s + 48, BK * 4);
}

/* PV [16, dp] = P [16, 64] x V[key0 : key0 + 64], into pv (fp32, row stride dp), 64 channels at a time. */
static void values_block(const uint16_t *pb, const uint16_t *vp, int dp, int key0, float *pv) {
    const long b_stride = (long)dp * 4;
    for (int d0 = 0; d0 < dp; d0 += 64) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int ks = 0; ks < 2; ks++) {
            const uint16_t *b = vp + ((size_t)(key0 / 2 + 16 * ks) * dp + d0) * 2;
            _tile_loadd(4, pb + 32 * ks, BK * 2);
            _tile_loadd(5, b, b_stride);      _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(5, b + 32, b_stride); _tile_dpbf16ps(1, 4, 5);
            _tile_loadd(5, b + 64, b_stride); _tile_dpbf16ps(2, 4, 5);
            _tile_loadd(5, b + 96, b_stride); _tile_dpbf16ps(3, 4, 5);
        }
        _tile_stored(0, pv + d0, dp * 4); _tile_stored(1, pv + d0 + 16, dp * 4);
        _tile_stored(2, pv + d0 + 32, dp * 4); _tile_stored(3, pv + d0 + 48, dp * 4);
    }
}

/* acc [16, dp] = acc x alpha (each row its own) + P [16, 64] x V[key0 : key0 + 64]: the product into pv, then added. */
static void accumulate_values(const uint16_t *pb, const uint16_t *vp, int dp, int key0, const float *alpha, float *acc,
                              float *pv) {
    values_block(pb, vp, dp, key0, pv);
    for (int r = 0; r < BQ; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
        for (int d = 0; d < dp; d += 16) {
            __m512 o = _mm512_loadu_ps(acc + r * dp + d);
            _mm512_storeu_ps(acc + r * dp + d, _mm512_fmadd_ps(o, a, _mm512_loadu_ps(pv + r * dp + d)));
        }
    }
}
#else
/* C [4, 64] = C x alpha + A [4, 2 pairs] x B [pairs, 64] in fp32 (alpha NULL: C = A B), B in the pairwise layout: A row
 * r's pair k is one 32-bit word at a + r * a_stride + 2k, B's row k the 64 columns' pairs at b + k * b_stride (uint16
 * units); alpha[r] scales C's row r. */
static void block_4x64(const uint16_t *a, int a_stride, const uint16_t *b, long b_stride, int pairs, float *c,
                       int c_stride, const float *alpha) {
    __m512 acc[4][4];
    for (int r = 0; r < 4; r++)
        for (int n = 0; n < 4; n++)
            acc[r][n] = alpha ? _mm512_mul_ps(_mm512_loadu_ps(c + (size_t)r * c_stride + 16 * n), _mm512_set1_ps(alpha[r]))
                              : _mm512_setzero_ps();
    for (int k = 0; k < pairs; k++) {
        const uint16_t *row = b + k * b_stride;
        __m512bh col[4];
        for (int n = 0; n < 4; n++) col[n] = (__m512bh)_mm512_loadu_si512((const void *)(row + 32 * n));
        for (int r = 0; r < 4; r++) {
            uint32_t pair;
            memcpy(&pair, a + (size_t)r * a_stride + 2 * k, 4);
            __m512bh ar = (__m512bh)_mm512_set1_epi32((int)pair);
            for (int n = 0; n < 4; n++) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], ar, col[n]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int n = 0; n < 4; n++) _mm512_storeu_ps(c + (size_t)r * c_stride + 16 * n, acc[r][n]);
}

/* The block products of the AMX path above, four query rows at a time. Here P V accumulates straight into acc, its
 * rows scaled by alpha as they are loaded (the registers hold them anyway): no second pass over acc, and the pv
 * scratch the AMX path needs goes unused. */
static void scores_block(const uint16_t *qb, const uint16_t *kp, int kstride, int dp, int key0, float *s) {
    for (int r0 = 0; r0 < BQ; r0 += 4)
        block_4x64(qb + (size_t)r0 * dp, dp, kp + (size_t)key0 * 2, (long)kstride * 2, dp / 2, s + r0 * BK, BK, NULL);
}

static void accumulate_values(const uint16_t *pb, const uint16_t *vp, int dp, int key0, const float *alpha, float *acc,
                              float *pv) {
    (void)pv;
    for (int d0 = 0; d0 < dp; d0 += 64)
        for (int r0 = 0; r0 < BQ; r0 += 4)
            block_4x64(pb + r0 * BK, BK, vp + ((size_t)(key0 / 2) * dp + d0) * 2, (long)dp * 2, BK / 2,
                       acc + (size_t)r0 * dp + d0, dp, alpha + r0);
}
#endif

/* qb [16, dp] bf16: the block's n query rows x ks x scale x log2(e), multiplied in that order in fp32 and rounded to
 * nearest even (vcvtneps2bf16: a subnormal product, below 1.2e-38, becomes 0); zeros past n rows and d_head channels
 * (d_head a multiple of 16). */
static void query_block(const float *q, int q_stride, const float *ks, int n, int d_head, int dp, float scale,
                        uint16_t *qb) {
    memset(qb, 0, sizeof(uint16_t) * BQ * dp);
    const __m512 s = _mm512_set1_ps(scale), e = _mm512_set1_ps(LOG2E);
    for (int r = 0; r < n; r++)
        for (int d = 0; d < d_head; d += 16) {
            __m512 x = _mm512_mul_ps(_mm512_loadu_ps(q + (size_t)r * q_stride + d), _mm512_loadu_ps(ks + d));
            x = _mm512_mul_ps(_mm512_mul_ps(x, s), e);
            _mm256_storeu_si256((__m256i *)(qb + (size_t)r * dp + d), (__m256i)_mm512_cvtneps_pbh(x));
        }
}

/* One row's online softmax over a block: mask keys past `last` (inclusive bound), update m and l, write the
 * row's weights as bf16 and return the factor the row's accumulator is rescaled by. */
static float softmax_row(float *s, int key0, int last, float *m, float *l, uint16_t *p) {
    __m512 v[BK / 16];
    __mmask16 keep[BK / 16];
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c < BK / 16; c++) {
        int valid = last - (key0 + 16 * c) + 1;  /* keys of this 16 at or before `last` */
        keep[c] = valid >= 16 ? 0xffff : valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1);
        v[c] = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), keep[c], s + 16 * c);
        mx = _mm512_max_ps(mx, v[c]);
    }
    float m_new = fmaxf(*m, _mm512_reduce_max_ps(mx));
    float alpha = *m == -INFINITY ? 0.0f : *m == m_new ? 1.0f : exp2f(*m - m_new);  /* exp2f(0) is 1: no call */
    __m512 sum = _mm512_setzero_ps(), mv = _mm512_set1_ps(m_new);
    for (int c = 0; c < BK / 16; c += 2) {
        /* a masked key's weight is exactly 0 (exp2_ps alone would give 2^-126) */
        __m512 a = _mm512_maskz_mov_ps(keep[c], exp2_ps(_mm512_sub_ps(v[c], mv)));
        __m512 b = _mm512_maskz_mov_ps(keep[c + 1], exp2_ps(_mm512_sub_ps(v[c + 1], mv)));
        sum = _mm512_add_ps(sum, _mm512_add_ps(a, b));
        _mm512_storeu_si512((void *)(p + 16 * c), (__m512i)_mm512_cvtne2ps_pbh(b, a));
    }
    *l = *l * alpha + _mm512_reduce_add_ps(sum);
    *m = m_new;
    return alpha;
}

/* One head: every block of 16 query rows against the keys its rows may see. q, ks, vs and out hold d_head
 * channels; the tiles and the working rows dp (zeros beyond d_head). */
static void attend_head(const float *q, int q_stride, const float *ks, const float *vs, const uint16_t *kp,
                        const uint16_t *vp, int kstride, int rows, int past, int total, int d_head, int dp, float scale,
                        float *out, int out_stride, void *scratch) {
    uint16_t *qb = scratch;                       /* [16, dp] bf16 */
    uint16_t *pb = qb + BQ * dp;                  /* [16, 64] bf16 */
    float *s = (float *)(pb + BQ * BK);           /* [16, 64] */
    float *pv = s + BQ * BK;                      /* [16, dp] */
    float *acc = pv + BQ * dp;                    /* [16, dp] */
    float m[BQ], l[BQ];
    for (int i0 = 0; i0 < rows; i0 += BQ) {
        int n = rows - i0 < BQ ? rows - i0 : BQ;
        query_block(q + (size_t)i0 * q_stride, q_stride, ks, n, d_head, dp, scale, qb);
        memset(acc, 0, sizeof(float) * BQ * dp);
        for (int r = 0; r < BQ; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
        int last_key = past + i0 + n - 1;         /* the block's last row sees keys [0, last_key] */
        for (int key0 = 0; key0 <= last_key; key0 += BK) {
            scores_block(qb, kp, kstride, dp, key0, s);
            float alpha[BQ];
            for (int r = 0; r < BQ; r++) {
                int last = r < n ? past + i0 + r : 0;   /* padding rows see key 0 only */
                if (last > total - 1) last = total - 1;
                alpha[r] = softmax_row(s + r * BK, key0, last, &m[r], &l[r], pb + r * BK);
            }
            accumulate_values(pb, vp, dp, key0, alpha, acc, pv);
        }
        for (int r = 0; r < n; r++) {
            __m512 inv = _mm512_set1_ps(1.0f / l[r]);
            for (int d = 0; d < d_head; d += 16)
                _mm512_storeu_ps(out + (size_t)(i0 + r) * out_stride + d,
                                 _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(acc + r * dp + d), inv),
                                               _mm512_loadu_ps(vs + d)));
        }
    }
}

/* What one thread does: every `threads`-th kv head from `first`, with its own scratch. */
typedef struct {
    const float *q; const int8_t *kq, *vq; const float *ks, *vs; float *out;
    int rows, past, heads, kv_heads, capacity, d_head, dp, first, threads;
    float scale;
    char *scratch;
} job;

static void *run_job(void *arg) {
    const job *j = arg;
    const int total = j->past + j->rows, padded = (total + BK - 1) / BK * BK, group = j->heads / j->kv_heads;
    const int kstride = padded + KEY_PAD;
    const size_t pack = (size_t)kstride * j->dp;
    uint16_t *kp = (uint16_t *)j->scratch, *vp = kp + pack;
    TILES_BEGIN();
    for (int g = j->first; g < j->kv_heads; g += j->threads) {
        const size_t base = (size_t)g * j->capacity * j->d_head;
        pack_head(j->kq + base, j->vq + base, total, padded, kstride, j->d_head, j->dp, j->d_head, kp, vp);
        for (int h = g * group; h < (g + 1) * group; h++)
            attend_head(j->q + (size_t)h * j->d_head, j->heads * j->d_head, j->ks + (size_t)g * j->d_head,
                        j->vs + (size_t)g * j->d_head, kp, vp, kstride, j->rows, j->past, total, j->d_head, j->dp,
                        j->scale,
                        j->out + (size_t)h * j->d_head, j->heads * j->d_head, vp + pack);
    }
    TILES_END();
    return NULL;
}

/* The entry point (see the head comment). Layouts, all C order:
 *   q      [rows, heads, d_head] fp32: the chunk's queries, rotary applied
 *   kq, vq [kv_heads, capacity, d_head] int8: the cache buffer, positions [0, past + rows) filled
 *   ks, vs [kv_heads, d_head] fp32
 *   out    [rows, heads, d_head] fp32
 * d_head must be a multiple of 16 (the tiles work on it rounded up to 64, zeros beyond). Threads are started
 * per call and joined before it returns: no pool that
 * spins between calls and competes with ONNX Runtime's own threads on a small CPU (an OpenMP build's spinning
 * pool made calls between ORT runs up to 10x slower). Returns 0, -1 where memory or a thread was refused, or
 * PE_BAD_ARGUMENTS. */
int pe_causal_attention_int8kv(const float *q, const int8_t *kq, const int8_t *vq, const float *ks, const float *vs,
                               float *out, int rows, int past, int heads, int kv_heads, int capacity, int d_head,
                               float scale, int threads) {
    if (!attention_args_ok(rows, past, heads, kv_heads, capacity, d_head, 0)) return PE_BAD_ARGUMENTS;
    const int total = past + rows, padded = (total + BK - 1) / BK * BK, dp = (d_head + 63) / 64 * 64;
    const size_t pack = (size_t)(padded + KEY_PAD) * dp;
    const size_t work = sizeof(uint16_t) * (BQ * dp + BQ * BK) + sizeof(float) * (BQ * BK + 2 * BQ * dp);
    const size_t per_thread = (sizeof(uint16_t) * 2 * pack + work + 63) / 64 * 64;
    if (threads > kv_heads) threads = kv_heads;
    if (threads < 1) threads = 1;
    char *arena = aligned_alloc(64, per_thread * (size_t)threads);
    job *jobs = calloc((size_t)threads, sizeof(job));
    pthread_t *ids = calloc((size_t)threads, sizeof(pthread_t));
    int status = arena && jobs && ids ? 0 : -1, started = 0;
    for (int t = 0; status == 0 && t < threads; t++) {
        jobs[t] = (job){q, kq, vq, ks, vs, out, rows, past, heads, kv_heads, capacity, d_head, dp, t, threads, scale,
                        arena + per_thread * (size_t)t};
        if (t > 0) {
            if (pthread_create(&ids[t], NULL, run_job, &jobs[t]) != 0) status = -1;
            else started = t;
        }
    }
    if (status == 0) run_job(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(ids[t], NULL);
    free(arena); free(jobs); free(ids);
    return status;
}
