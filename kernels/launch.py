"""Launch the Triton kernels: shapes, strides, the grid, and the block configuration.

`source` is the kernel module from dispatch.kernel_source(): compiled kernels autotune over
triton_src.TUNING_CONFIGS; the interpreter gets one fixed small configuration (tuning under the
interpreter would only multiply CPU time, and timing there means nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch

from pulse_edge.kernels.dispatch import interpreter_environment
from pulse_edge.kernels.quant import FP8_DTYPE

# Under the interpreter: small blocks keep the numpy work per program small, and tests use shapes
# that are not multiples of them, so the masks run too.
INTERPRETER_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}
NORMALIZE_BLOCK_P = 1024  # pixels per program: 3 KiB in, 3 x 2 KiB out in fp16
NORMALIZE_BLOCK_P_INTERPRETED = 256
_RGB_MAX = 255.0


def is_interpreted(source: ModuleType) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(source.linear_kernel, InterpretedFunction)


def _mode(w: torch.Tensor) -> str:
    """Which autotuning table: by the weights' storage type."""
    return {torch.int8: "int8", FP8_DTYPE: "fp8"}.get(w.dtype, "fp")


def _m_bucket(m: int) -> int:
    return 1 << max(m - 1, 0).bit_length()  # next power of two: one tuning per size class of M


def _check_linear(a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *scales: torch.Tensor | None) -> None:
    """Shapes the kernel indexes as it does: the weight scale per output channel ([N]: the kernel reads
    b_scale[rn] masked by N only, so a per-tensor [1] would be read past its end, where the twin broadcasts it),
    the activation and output scales one number each."""
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"linear: a {tuple(a.shape)} and w {tuple(w.shape)} do not chain as [M, K] x [N, K]")
    if bias.shape != (w.shape[0],):
        raise ValueError(f"linear: bias {tuple(bias.shape)} is not [{w.shape[0]}]")
    w_scale, *per_tensor = scales
    if w_scale is not None and w_scale.shape != (w.shape[0],):
        raise ValueError(f"linear: the weight scale {tuple(w_scale.shape)} is not one per output channel "
                         f"[{w.shape[0]}]")
    if any(s is not None and s.numel() != 1 for s in per_tensor):
        raise ValueError("linear: the activation and output scales are one number each (per tensor)")
    devices = {t.device for t in (a, w, bias, *(s for s in scales if s is not None))}
    if len(devices) != 1:
        raise ValueError(f"linear: tensors on several devices: {sorted(map(str, devices))}")


def linear(source: ModuleType, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor, *, out_dtype: torch.dtype,
           w_scale: torch.Tensor | None = None, a_scale: torch.Tensor | None = None, quant_a: bool = False,
           out_scale: torch.Tensor | None = None, gelu: bool = False,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """epilogue(a @ w^T) by `linear_kernel`; the arguments mean what they mean in reference.linear_ref.

    `out` may be given (tests poison it to prove that every element is written).
    """
    _check_linear(a, w, bias, w_scale, a_scale, out_scale)
    m, n, k = a.shape[0], w.shape[0], a.shape[1]
    out = torch.empty((m, n), device=a.device, dtype=out_dtype) if out is None else out
    if out.shape != (m, n) or out.dtype != out_dtype:
        raise ValueError(f"linear: out must be {out_dtype} [{m}, {n}], got {out.dtype} {tuple(out.shape)}")
    placeholder = bias  # never read: the matching flag is off (Triton still wants a pointer)
    args: list[Any] = [a, w, bias, _or(w_scale, placeholder), _or(a_scale, placeholder), _or(out_scale, placeholder),
                       m, n, k, *a.stride(), *w.stride(), *out.stride(), _m_bucket(m), out]
    interpreted = is_interpreted(source)
    flags = {"QUANT_A": quant_a, "HAS_B_SCALE": w_scale is not None, "HAS_A_SCALE": a_scale is not None,
             "GELU": gelu, "HAS_OUT_SCALE": out_scale is not None, "INTERPRET": interpreted}
    if interpreted:
        grid = (_tiles(m, n, INTERPRETER_CONFIG),)
        with interpreter_environment(True):
            source.linear_kernel[grid](*args, **flags, **INTERPRETER_CONFIG)
    else:
        source.TUNED_LINEAR[_mode(w)][lambda meta: (_tiles(m, n, meta),)](*args, **flags)
    return out


def _or(tensor: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    return placeholder if tensor is None else tensor


def _tiles(m: int, n: int, meta: dict[str, Any]) -> int:
    return -(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"])


def normalize_tiles(source: ModuleType, tiles: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                    dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> [N, 3, H, W] by `normalize_tiles_kernel`."""
    if tiles.dtype != torch.uint8 or tiles.dim() != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"normalize_tiles wants uint8 [N, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    tiles = tiles.contiguous()
    count, height, width, _ = tiles.shape
    shape = (count, 3, height, width)
    out = torch.empty(shape, device=tiles.device, dtype=dtype) if out is None else out
    if out.shape != shape or not out.is_contiguous():
        raise ValueError(f"normalize_tiles: out must be a contiguous {shape}, got {tuple(out.shape)}")
    # (x / 255 - mean) / std as one multiply-add per value, the constants folded in float64 on the host
    scales = [1.0 / (_RGB_MAX * s) for s in std]
    shifts = [-m / s for m, s in zip(mean, std, strict=True)]
    interpreted = is_interpreted(source)
    block = NORMALIZE_BLOCK_P_INTERPRETED if interpreted else NORMALIZE_BLOCK_P
    pixels = height * width
    grid = (-(-pixels // block), count)
    with interpreter_environment(interpreted):
        source.normalize_tiles_kernel[grid](tiles, out, pixels, *scales, *shifts, INTERPRET=interpreted,
                                            BLOCK_P=block)
    return out
