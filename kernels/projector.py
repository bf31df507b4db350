"""The fused vision projector: y = W2 gelu(W1 x + b1) + b2 (LLaVA's `mlp2x_gelu`; docs/architecture.md).

x [..., 1024], w1 [4096, 1024], w2 [4096, 4096] in nn.Linear layout ([out, in]); PULSE runs it on
576 x (1 + tiles) tokens: 2880 for a typical 12-lead print.

Two kernel launches, each a GEMM with its epilogue fused: the first adds b1 and applies the exact
GELU before it stores h, the second adds b2. One launch holding h on chip was the alternative and is
not the default: W2 contracts over all 4096 columns of h, so a block of rows needs its whole h row
block (128 rows x 4096 x 2 bytes = 1 MiB) before it can produce any output column, five times an
H100/H200 SM's 228 KiB of shared memory. The rows per block would have to drop to ~16, and then every
16 rows stream all of W2 again (T/16 x 32 MiB ~ 5.8 GB for T = 2880, against 47 MB for h's round trip
through memory, which at T = 2880 even fits in the 50 MB L2). The round trip costs ~11 us at 4.3 TB/s
against a ~150 us compute floor (121 GFLOP at ~790 TFLOP/s). What fusion does buy is in: bias and GELU
in the epilogue save the two extra passes over h that eager torch makes. Unmeasured: no GPU was lent to
the task that wrote this; `pulse-edge bench projector` measures it.

Every function takes `impl` (dispatch.IMPLS). On "auto" it runs the compiled kernels on a CUDA GPU
and the reference twin elsewhere, with one log warning per reason.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

import torch

from pulse_edge.kernels import launch, reference
from pulse_edge.kernels.dispatch import kernel_source, resolve
from pulse_edge.kernels.quant import FP8_DTYPE, Fp8Weights, Int8Weights


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, weight_dtype: torch.dtype | None = None,
           scales: tuple[torch.Tensor, ...] = (), per_tensor: tuple[torch.Tensor, ...] = ()) -> None:
    """Shapes that chain, weights stored as the variant expects (x's dtype when weight_dtype is None), and their
    scales one per output channel (`scales`: s1, s2), the activations' one number each: checked before the twin
    or the kernel is chosen, so both refuse alike (the twin would broadcast a per-tensor weight scale, the
    kernel reads one per channel)."""
    for s, w, name in zip(scales, (w1, w2), ("s1", "s2"), strict=False):
        if s.shape != (w.shape[0],):
            raise ValueError(f"mlp2x_gelu: {name} {tuple(s.shape)} is not one scale per output channel "
                             f"[{w.shape[0]}]")
    if any(s.numel() != 1 for s in per_tensor):
        raise ValueError("mlp2x_gelu: x_scale and h_scale are one number each (per tensor)")
    if x.shape[-1] != w1.shape[1] or w1.shape[0] != w2.shape[1]:
        raise ValueError(f"mlp2x_gelu: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)} do not chain "
                         "as [..., K] -> [H, K] -> [N, H]")
    expected = x.dtype if weight_dtype is None else weight_dtype
    if w1.dtype != expected or w2.dtype != expected:
        raise ValueError(f"mlp2x_gelu: weights are {w1.dtype} / {w2.dtype}; this variant takes {expected}")


def _run(x: torch.Tensor, impl: str, precision: str, twin: Callable[[], torch.Tensor],
         kernels: Callable[[ModuleType, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The twin, or the kernels on x flattened to [T, K] (a copy only where x's rows are not evenly strided)."""
    choice = resolve(impl, x, precision)
    if not choice.fused:
        return twin()
    flat = x.reshape(-1, x.shape[-1])
    y = kernels(kernel_source(choice.impl == "interpret"), flat)  # [T, N]
    return y.reshape(*x.shape[:-1], y.shape[-1])  # not -1: a reshape cannot infer it from 0 rows


def mlp2x_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, *,
               impl: str = "auto") -> torch.Tensor:
    """fp16 / bf16: weights in x's dtype; h stored in x's dtype between the two GEMMs."""
    _check(x, w1, w2)

    def kernels(src: ModuleType, flat: torch.Tensor) -> torch.Tensor:
        h = launch.linear(src, flat, w1, b1, out_dtype=x.dtype, gelu=True)
        return launch.linear(src, h, w2, b2, out_dtype=x.dtype)

    return _run(x, impl, "native", lambda: reference.mlp2x_gelu_ref(x, w1, b1, w2, b2), kernels)


def mlp2x_gelu_int8(x: torch.Tensor, w1_q: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor, w2_q: torch.Tensor,
                    s2: torch.Tensor, b2: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Weight-only int8 (W8A16): int8 weights cast to x's dtype in the kernel, per-channel scales in the epilogue."""
    _check(x, w1_q, w2_q, torch.int8, (s1, s2))

    def kernels(src: ModuleType, flat: torch.Tensor) -> torch.Tensor:
        h = launch.linear(src, flat, w1_q, b1, out_dtype=x.dtype, w_scale=s1, gelu=True)
        return launch.linear(src, h, w2_q, b2, out_dtype=x.dtype, w_scale=s2)

    return _run(x, impl, "int8", lambda: reference.mlp2x_gelu_int8_ref(x, w1_q, s1, b1, w2_q, s2, b2), kernels)


def mlp2x_gelu_fp8(x: torch.Tensor, x_scale: torch.Tensor, w1_q: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor,
                   h_scale: torch.Tensor, w2_q: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor, *,
                   impl: str = "auto") -> torch.Tensor:
    """fp8 E4M3 on compute capability >= 8.9: x quantized by x_scale as it is loaded, h stored as fp8 by
    h_scale (half the bytes of the round trip), weights by per-channel scales; output in x's dtype."""
    _check(x, w1_q, w2_q, FP8_DTYPE, (s1, s2), (x_scale, h_scale))

    def kernels(src: ModuleType, flat: torch.Tensor) -> torch.Tensor:
        h = launch.linear(src, flat, w1_q, b1, out_dtype=FP8_DTYPE, w_scale=s1, a_scale=x_scale, quant_a=True,
                          out_scale=h_scale, gelu=True)
        return launch.linear(src, h, w2_q, b2, out_dtype=x.dtype, w_scale=s2, a_scale=h_scale)

    return _run(x, impl, "fp8",
                lambda: reference.mlp2x_gelu_fp8_ref(x, x_scale, w1_q, s1, b1, h_scale, w2_q, s2, b2), kernels)


def run_int8(x: torch.Tensor, weights: Int8Weights, *, impl: str = "auto") -> torch.Tensor:
    """`mlp2x_gelu_int8` with the output of quant.quantize_projector_int8."""
    w = weights
    return mlp2x_gelu_int8(x, w.w1, w.s1, w.b1, w.w2, w.s2, w.b2, impl=impl)


def run_fp8(x: torch.Tensor, weights: Fp8Weights, *, impl: str = "auto") -> torch.Tensor:
    """`mlp2x_gelu_fp8` with the output of quant.quantize_projector_fp8."""
    w = weights
    return mlp2x_gelu_fp8(x, w.x_scale, w.w1, w.s1, w.b1, w.h_scale, w.w2, w.s2, w.b2, impl=impl)
