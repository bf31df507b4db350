"""CPU kernels of pulse-edge's own, in C, compiled on the machine that runs them (runtime/kernels/build.py).

    causal_attention.c   a prompt chunk's causal attention over the int8 KV cache in bf16: on AMX tiles, or
                         built with -DPE_NO_AMX on AVX-512 BF16 dot products (CPUs without AMX)
    decode_attention.c   the same for a decode step's one position (or a few), float32 on AVX-512
    vector_math.h        what they share: 2^x, lane masks, int8 codes as float32
    attention.py         their Python face (ctypes, numpy arrays in and out) and their numpy twin, the test oracle
    block_gemv.c         a few rows through a 4- or 8-bit block-quantized projection (MatMulNBits' function at
                         accuracy level 4) on AVX-512 VNNI: the native decode step's projections
    thread_pool.h        worker threads kept between calls, shared by block_gemv.c and the decode attention
    linear.py            block_gemv.c's Python face, its worker pools and its numpy twin
    layer_ops.c          the native decode step's elementwise work (RMSNorm + residual, rotary + cache store,
                         SiLU x up) on AVX-512; layer_ops.py: its Python face and numpy twins
"""
