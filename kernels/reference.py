"""Plain-torch twins of the Triton kernels: the test oracle, and what runs where the kernels cannot.

Each twin computes the kernel's function with the kernel's rounding points and nothing else: products
summed in fp32, scales and bias applied to the fp32 sum, GELU (exact erf) in fp32, one rounding to the
stored dtype. Between the two GEMMs the intermediate h is rounded to the activation dtype (fp16 / bf16),
or to fp8 by its scale in the fp8 variant, exactly as the kernels store it. What remains between a
kernel and its twin is the order of the fp32 sums and the two erf implementations: a flip of the last
stored bit, and a few ulp in GELU's far negative tail (pre-activation near -4, where 1 + erf cancels;
3 fp16 ulp seen), inside the tests' norm bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pulse_edge.kernels.quant import FP8_DTYPE, to_fp8

RGB_MAX = 255.0


def _cast(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return to_fp8(values) if dtype == FP8_DTYPE else values.to(dtype)


def linear_ref(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, out_dtype: torch.dtype,
               w_scale: torch.Tensor | None = None, a_scale: torch.Tensor | None = None, quant_a: bool = False,
               out_scale: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """Twin of `linear_kernel`: [M, K] x [N, K] -> [M, N] with the same prologue and epilogue."""
    a32 = a.float()
    if quant_a:
        a32 = to_fp8(a32 * (1.0 / a_scale.float())).float()
    acc = a32 @ w.float().T
    if w_scale is not None:
        acc = acc * w_scale.float()
    if a_scale is not None:
        acc = acc * a_scale.float()
    acc = acc + bias.float()
    if gelu:
        acc = F.gelu(acc)
    if out_scale is not None:
        acc = acc * (1.0 / out_scale.float())
    return _cast(acc, out_dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def mlp2x_gelu_ref(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                   b2: torch.Tensor) -> torch.Tensor:
    """y = W2 gelu(W1 x + b1) + b2 in x's dtype, h rounded to x's dtype in between."""
    h = linear_ref(_flat(x), w1, b1, out_dtype=x.dtype, gelu=True)
    return linear_ref(h, w2, b2, out_dtype=x.dtype).reshape(*x.shape[:-1], w2.shape[0])  # -1 fails on 0 rows


def mlp2x_gelu_int8_ref(x: torch.Tensor, w1_q: torch.Tensor, s1: torch.Tensor, b1: torch.Tensor,
                        w2_q: torch.Tensor, s2: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """Weight-only int8: the same with W = q * s per output channel."""
    h = linear_ref(_flat(x), w1_q, b1, out_dtype=x.dtype, w_scale=s1, gelu=True)
    return linear_ref(h, w2_q, b2, out_dtype=x.dtype, w_scale=s2).reshape(*x.shape[:-1], w2_q.shape[0])


def mlp2x_gelu_fp8_ref(x: torch.Tensor, x_scale: torch.Tensor, w1_q: torch.Tensor, s1: torch.Tensor,
                       b1: torch.Tensor, h_scale: torch.Tensor, w2_q: torch.Tensor, s2: torch.Tensor,
                       b2: torch.Tensor) -> torch.Tensor:
    """fp8 E4M3: x and h quantized by their per-tensor scales, weights by per-channel scales."""
    h = linear_ref(_flat(x), w1_q, b1, out_dtype=FP8_DTYPE, w_scale=s1, a_scale=x_scale, quant_a=True,
                   out_scale=h_scale, gelu=True)
    y = linear_ref(h, w2_q, b2, out_dtype=x.dtype, w_scale=s2, a_scale=h_scale)
    return y.reshape(*x.shape[:-1], w2_q.shape[0])


def normalize_tiles_ref(tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                        dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W]: / 255, minus mean, over std, per channel (runtime.preprocess's order)."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=tiles.device)
    std_t = torch.tensor(std, dtype=torch.float32, device=tiles.device)
    scaled = tiles.float() / RGB_MAX
    return ((scaled - mean_t) / std_t).permute(0, 3, 1, 2).contiguous().to(dtype)
