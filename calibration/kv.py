"""The decoder's key and value ranges, for an int8 KV cache with static per-channel scales.

ONNX Runtime's GroupQueryAttention stores an int8 cache with one fixed scale per
(kv head, channel) for the keys and one for the values (its PER_CHANNEL mode): the
scales must be known before the first token, so they come from calibration.

    k_proj output [.., kv_heads x D] --> per head, per rotary pair (i, i + D/2): max sqrt(k_i^2 + k_{i+D/2}^2)
    v_proj output [.., kv_heads x D] --> per head, per channel: max |v|

The cache holds keys after the rotary embedding, which turns each pair (i, i + D/2)
by a position's angle. A rotation keeps the pair's length, so the largest pair length
seen before the rotation bounds both channels of the pair at every position (an
exact bound, whatever positions the calibration prompts had); it is stored for both
channels. Values are cached as they are.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

KV_PARTS = ("key", "value")
_PROJECTIONS = {"k_proj": "key", "v_proj": "value"}
_LAYER = re.compile(r"language_model\.model\.layers\.(\d+)\.self_attn\.(k_proj|v_proj)")


def kv_name(layer: int, part: str) -> str:
    """The statistic's name in a scales file: kv/layers.{i}.{key|value}."""
    return f"layers.{layer}.{part}"


def pair_lengths(k: np.ndarray) -> np.ndarray:
    """k [R, heads, D] -> [R, heads, D]: each channel's rotary pair length sqrt(k_i^2 + k_{i+D/2}^2) (the
    half-split pairing of LLaMA's rotate_half, which GroupQueryAttention's rotary_interleaved=0 also uses)."""
    half = k.shape[-1] // 2
    length = np.sqrt(np.square(k[..., :half]) + np.square(k[..., half:]))
    return np.concatenate([length, length], axis=-1)


@dataclass
class KVObserver:
    """Per layer and part, the running max [kv_heads, D] of what the cache will hold (see the module doc)."""

    head_dim: int
    absmax: dict[str, np.ndarray] = field(default_factory=dict)

    def update(self, layer: int, part: str, out: torch.Tensor) -> None:
        rows = out.detach().reshape(-1, out.shape[-1]).float().cpu().numpy()  # [R, kv_heads x D]
        heads = rows.reshape(rows.shape[0], -1, self.head_dim)  # [R, kv_heads, D]
        if not np.isfinite(heads).all():
            raise ValueError(f"layer {layer} {part}s have NaN or infinite values")
        seen = (pair_lengths(heads) if part == "key" else np.abs(heads)).max(axis=0)  # [kv_heads, D]
        name = kv_name(layer, part)
        self.absmax[name] = seen if name not in self.absmax else np.maximum(self.absmax[name], seen)


def kv_modules(model: nn.Module) -> dict[tuple[int, str], nn.Linear]:
    """{(layer, "key"|"value"): the decoder's k_proj / v_proj}."""
    found = {}
    for name, module in model.named_modules():
        match = _LAYER.fullmatch(name)
        if match and isinstance(module, nn.Linear):
            found[(int(match.group(1)), _PROJECTIONS[match.group(2)])] = module
    return found


@contextmanager
def observing_kv(model: nn.Module, observer: KVObserver) -> Iterator[None]:
    """Output hooks on every decoder k_proj and v_proj for the block; removed on exit, even on error."""
    def hook(layer: int, part: str):  # a torch forward hook per (layer, part)
        def record(_module: nn.Module, _args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            observer.update(layer, part, out)
        return record

    handles = [module.register_forward_hook(hook(layer, part)) for (layer, part), module in kv_modules(model).items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def kv_scales(absmax: Mapping[str, np.ndarray], layers: int, *, headroom: float, qmax: float = 127.0,
              ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer, the key and the value scales [kv_heads, D] = absmax x headroom / qmax (floored: a channel
    that never moved still gets a usable scale)."""
    missing = [kv_name(i, p) for i in range(layers) for p in KV_PARTS if kv_name(i, p) not in absmax]
    if missing:
        raise KeyError(f"no KV statistics for {', '.join(missing[:2])}")
    def scale(name: str) -> np.ndarray:
        return np.maximum(np.asarray(absmax[name], np.float32) * headroom / qmax, np.float32(1e-8))
    return ([scale(kv_name(i, "key")) for i in range(layers)], [scale(kv_name(i, "value")) for i in range(layers)])
