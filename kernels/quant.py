"""Weight and activation quantization for the projector kernels, in plain torch.

    int8 (weight-only): per output channel, symmetric, round to nearest: w ~= q * s[n], q in [-127, 127]
    fp8 E4M3:          per output channel weight scales s[n] = amax_n / 448; activations by one per-tensor
                       scale each (the projector's input x and its intermediate h), calibrated from
                       sample inputs: scale = amax / 448, so the sample's largest value lands on 448
                       and larger values at run time saturate to +-448 (no inf, no NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

INT8_MAX = 127  # symmetric: -128 is left out so that the grid is the same on both sides
FP8_E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn
SCALE_DTYPE = torch.float32
_TINY = torch.finfo(torch.float32).tiny  # a channel of zeros gets a harmless scale, not a division by zero


def _channel_scale(weight: torch.Tensor, grid_max: float) -> torch.Tensor:
    amax = weight.detach().float().abs().amax(dim=1)
    return (amax / grid_max).clamp_min(_TINY).to(SCALE_DTYPE)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], fp32 scales [N]) with weight ~= q * scale[:, None]."""
    scale = _channel_scale(weight, INT8_MAX)
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8).contiguous(), scale


def to_fp8(values: torch.Tensor) -> torch.Tensor:
    """Saturating cast to E4M3 (torch's own cast turns out-of-range values into NaN)."""
    return values.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_DTYPE)


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (float8_e4m3fn [N, K], fp32 scales [N]) with weight ~= q * scale[:, None]."""
    scale = _channel_scale(weight, FP8_E4M3_MAX)
    return to_fp8(weight.detach().float() / scale[:, None]).contiguous(), scale


def activation_scale(sample: torch.Tensor) -> torch.Tensor:
    """The per-tensor fp8 scale of an activation sample: a 0-d fp32 tensor on the sample's device."""
    amax = sample.detach().float().abs().amax()
    return (amax / FP8_E4M3_MAX).clamp_min(_TINY).to(SCALE_DTYPE)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q * scale per output channel, in fp32 (what the quantized weights stand for)."""
    return q.float() * scale.float()[:, None]


@dataclass(frozen=True)
class Int8Weights:
    """Everything `mlp2x_gelu_int8` takes besides x."""

    w1: torch.Tensor
    s1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    b2: torch.Tensor


@dataclass(frozen=True)
class Fp8Weights:
    """Everything `mlp2x_gelu_fp8` takes besides x (the two activation scales included)."""

    x_scale: torch.Tensor
    w1: torch.Tensor
    s1: torch.Tensor
    b1: torch.Tensor
    h_scale: torch.Tensor
    w2: torch.Tensor
    s2: torch.Tensor
    b2: torch.Tensor


def quantize_projector_int8(fc1: torch.nn.Linear, fc2: torch.nn.Linear) -> Int8Weights:
    """Weight-only int8 copies of the projector's two Linear layers (the biases are shared, not copied)."""
    w1, s1 = quantize_int8(fc1.weight)
    w2, s2 = quantize_int8(fc2.weight)
    return Int8Weights(w1, s1, fc1.bias.detach(), w2, s2, fc2.bias.detach())


@torch.no_grad()
def quantize_projector_fp8(fc1: torch.nn.Linear, fc2: torch.nn.Linear, calibration: torch.Tensor) -> Fp8Weights:
    """fp8 copies of the two Linear layers and the activation scales measured on `calibration` [..., K]
    (vision-tower features of real ECG tiles: calibrating on anything else loses accuracy; see
    docs/architecture.md, precision recipes)."""
    x = calibration.reshape(-1, calibration.shape[-1]).to(fc1.weight.dtype)
    h = F.gelu(F.linear(x.float(), fc1.weight.float(), fc1.bias.float()))
    w1, s1 = quantize_fp8(fc1.weight)
    w2, s2 = quantize_fp8(fc2.weight)
    return Fp8Weights(activation_scale(x), w1, s1, fc1.bias.detach(), activation_scale(h), w2, s2,
                      fc2.bias.detach())
