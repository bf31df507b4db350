"""CPU kernels of pulse-edge's own, in C, compiled on the machine that runs them (runtime/kernels/build.py).

    causal_attention.c   a prompt chunk's causal attention over the int8 KV cache on AMX-BF16 tiles
    attention.py         its Python face (ctypes, numpy arrays in and out) and its numpy twin, the test oracle
"""
