"""The KV caches of the emulated reference: the torch model storing keys and values as a bundle's graph does.

Inside `with int8_kv_cache(...)` or `with fp16_kv_cache(...)`, every cache the reference makes
(export/model/torch_backend.new_cache) rounds what it stores the way the bundle's cache does, so a
graph with a smaller cache is checked against a reference with the same cache (parity), and the
fidelity report measures what the rounding costs against the float32 model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.model.torch_backend import CACHE_FACTORY_ATTR

INT8_RANGE = (-128, 127)  # QuantizeLinear saturates to the whole int8 range
KV_QMAX = 127  # the int8 KV cache's grid (export/graphs/kv_cache.py clips to +-127)


class Int8KVCache(DynamicCache):
    """The decoder graphs' int8 KV cache (export/graphs/kv_cache.py): keys (after the rotary embedding) and
    values stored as round(x / scale), one static scale per (kv head, channel).

    `quantized_self` says which graph writes the cache. The decode graph (ORT's GroupQueryAttention): a chunk
    attends to its own keys and values as cached, clipped to [-128, 127]. The prefill graph: a chunk attends
    to its own in float32 and stores them clipped to +-127. (Each measured exact, rel err <= 1e-6, against ORT
    1.32 on the tiny model at 5- and 64-position prefills; clipping to +-127 in the decode graph's rule left
    1.7e-3 where keys saturate.) The prefill graph's segments (export/graphs/segments.py) store as the prefill
    graph does (+-127) and the kernel then attends to the chunk as cached: `quantized_self` and `symmetric`.
    `symmetric` None: the clip of the graph `quantized_self` names."""

    def __init__(self, config: Any, kv: KVScales, *, quantized_self: bool, symmetric: bool | None = None) -> None:
        super().__init__(config=config)
        self.kv_scales, self.quantized_self = kv, quantized_self
        self.symmetric = not quantized_self if symmetric is None else symmetric

    def _round_trip(self, x: torch.Tensor, scale: np.ndarray) -> torch.Tensor:
        s = torch.from_numpy(np.asarray(scale, np.float32))[None, :, None, :].to(x.device)  # [1, heads, 1, D]
        low = -KV_QMAX if self.symmetric else INT8_RANGE[0]
        return (torch.clamp(torch.round(x.float() / s), low, KV_QMAX) * s).to(x.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        k = self._round_trip(key_states, self.kv_scales.key[layer_idx])  # [B, heads, S, D]
        v = self._round_trip(value_states, self.kv_scales.value[layer_idx])
        keys, values = super().update(k, v, layer_idx, *args, **kwargs)
        if self.quantized_self:
            return keys, values
        new = key_states.shape[-2]
        return (torch.cat([keys[..., :-new, :], key_states], dim=-2),
                torch.cat([values[..., :-new, :], value_states], dim=-2))


def _half(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16, in its own dtype."""
    return x.to(torch.float16).to(x.dtype)


class Fp16KVCache(DynamicCache):
    """An fp16 cache in a float32 graph (export/graphs/kv_cache.py, attention_over_fp16_cache): keys (after
    the rotary embedding) and values rounded to fp16 as stored, the new chunk's included (attention reads
    them from the fp16 buffer)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return super().update(_half(key_states), _half(value_states), layer_idx, *args, **kwargs)


@contextmanager
def _cache_factory(lm: nn.Module, factory: Callable[[], DynamicCache]) -> Iterator[None]:
    """`lm` builds its caches with `factory` (export/model/torch_backend.new_cache) until the block ends."""
    setattr(lm, CACHE_FACTORY_ATTR, factory)
    try:
        yield
    finally:
        delattr(lm, CACHE_FACTORY_ATTR)


def int8_kv_cache(lm: nn.Module, kv: KVScales, *, quantized_self: bool, symmetric: bool | None = None) -> Any:
    """A context in which `lm` caches as the int8 cache of a decode graph (`quantized_self`), a prefill graph, or
    the prefill graph's segments (`quantized_self`, `symmetric`): Int8KVCache."""
    return _cache_factory(lm, lambda: Int8KVCache(lm.config, kv, quantized_self=quantized_self, symmetric=symmetric))


@contextmanager
def fp16_kv_cache(lm: nn.Module) -> Iterator[None]:
    """`lm` attends as an fp32 graph over an fp16 cache does, until the block ends: q, k and v rounded to fp16
    before the rotary embedding (the graph's Cast), the rotary tables in fp16, the rotated keys and values
    rounded as cached (Fp16KVCache), the attention output rounded (GroupQueryAttention's fp16 output).
    Left out: the rotated query's own rounding (inside attention, where no hook reaches). Measured, graph vs
    reference, max rel err of the logits after 5-position prefills (the worst case): tiny model 5.0e-4 against
    the plain float32 reference, 3.1e-4 against this one, 9e-5 with the query rounded too (tried through a
    registered attention function; not kept: that registry is global state in transformers)."""
    def round_output(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        return tuple(_half(t) for t in output) if isinstance(output, tuple) else _half(output)

    def round_input(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(_half(t) for t in inputs)

    hooks = []
    try:  # a model that fails half-way through the registration keeps none of them
        hooks.append(lm.model.rotary_emb.register_forward_hook(round_output))
        for layer in lm.model.layers:
            attn = layer.self_attn
            hooks += [proj.register_forward_hook(round_output) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)]
            hooks.append(attn.o_proj.register_forward_pre_hook(round_input))
        with _cache_factory(lm, lambda: Fp16KVCache(config=lm.config)):
            yield
    finally:
        for hook in hooks:
            hook.remove()
