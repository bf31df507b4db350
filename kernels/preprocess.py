"""Tile normalisation on the GPU: uint8 HWC tiles [N, 336, 336, 3] -> normalised CHW [N, 3, 336, 336].

The lean runtime does this in numpy (runtime.preprocess.normalize); this kernel is for a torch/GPU
pipeline that has the tiles as a uint8 tensor on the device already: it moves one byte per value
over the bus instead of four, and does the divide, subtract, divide and transpose in one pass
(one multiply-add per value, the constants folded on the host).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pulse_edge.kernels import launch, reference
from pulse_edge.kernels.dispatch import choose, kernel_source, warn_fallback
from pulse_edge.runtime.image.preprocess import CLIP_MEAN, CLIP_STD

OUTPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def normalize_tiles(tiles: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                    dtype: torch.dtype = torch.float16, *, impl: str = "auto") -> torch.Tensor:
    """uint8 [N, H, W, 3] -> dtype [N, 3, H, W]: x / 255, minus mean, over std, per channel (CLIP's by default)."""
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"normalize_tiles writes fp16, bf16 or fp32, not {dtype}")
    if len(mean) != 3 or len(std) != 3:
        raise ValueError("normalize_tiles wants three means and three standard deviations (R, G, B)")
    # The precision rule does not apply (no dot products): any CUDA GPU Triton runs on will do,
    # so the choice is made on an fp16 stand-in for the uint8 input.
    choice = choose(impl, tiles.device, torch.float16)
    if not choice.fused:
        if impl == "auto":
            warn_fallback(choice.reason)
        return reference.normalize_tiles_ref(tiles, mean, std, dtype)
    return launch.normalize_tiles(kernel_source(choice.impl == "interpret"), tiles, mean, std, dtype)
