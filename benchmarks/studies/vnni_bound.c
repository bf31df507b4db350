/* The int8 instruction bound of one core: AVX-512 VNNI's vpdpbusd on zmm registers, back to back.
 *
 * Ten independent accumulators (more than the instruction's latency times its throughput), so nothing waits on a
 * result; the operands stay in registers, so nothing waits on memory. Each vpdpbusd is 64 u8 x s8 products
 * summed into 16 int32 lanes: 128 ops (a multiply and an add each). The asm keeps the compiler from folding the
 * constant operands away (it did: gcc -O2 emitted no vpdpbusd for the intrinsics). Called from several threads
 * at once (ctypes releases the GIL) for the machine's bound at that thread count. */
#include <immintrin.h>
#include <stdint.h>

#define PE_VNNI_CHAINS 10

/* Runs `iters` rounds of PE_VNNI_CHAINS vpdpbusd; returns a lane of the sum, so the work is observable. */
int32_t pe_vnni_spin(int64_t iters) {
    __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0, c8 = c0,
            c9 = c0;
    for (int64_t i = 0; i < iters; i++) {
        __asm__ volatile(
            "vpdpbusd %[a], %[b], %[c0]\n\tvpdpbusd %[a], %[b], %[c1]\n\tvpdpbusd %[a], %[b], %[c2]\n\t"
            "vpdpbusd %[a], %[b], %[c3]\n\tvpdpbusd %[a], %[b], %[c4]\n\tvpdpbusd %[a], %[b], %[c5]\n\t"
            "vpdpbusd %[a], %[b], %[c6]\n\tvpdpbusd %[a], %[b], %[c7]\n\tvpdpbusd %[a], %[b], %[c8]\n\t"
            "vpdpbusd %[a], %[b], %[c9]"
            : [c0] "+v"(c0), [c1] "+v"(c1), [c2] "+v"(c2), [c3] "+v"(c3), [c4] "+v"(c4), [c5] "+v"(c5),
              [c6] "+v"(c6), [c7] "+v"(c7), [c8] "+v"(c8), [c9] "+v"(c9)
            : [a] "v"(a), [b] "v"(b));
    }
    __m512i sum = _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3)),
                                   _mm512_add_epi32(_mm512_add_epi32(c4, c5), _mm512_add_epi32(c6, c7)));
    sum = _mm512_add_epi32(sum, _mm512_add_epi32(c8, c9));
    return _mm512_cvtsi512_si32(sum);
}
