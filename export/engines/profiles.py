"""The optimisation profiles of PULSE's engines, from the bundle's manifest and the build's limits.

    vision    pixel_values [K, 3, T, T]             K = 1 .. max_tiles (opt: the largest image's tile count)
    decoder   "decode":  S = 1 .. 2 (opt 1)         T = 1 .. max_context       (one new token per step)
              "prefill": S = 1 .. max_chunk          T = 1 .. max_context       (chunks; opt and default max: the
                                                                                  runtime's 512)

S is the positions fed in one run (inputs_embeds [1, S, H], position_ids [1, S]); T the positions held after
it (attention_mask [1, T]). The KV buffers have the static length max_context (TensorRT's KV-cache layer
demands a static length: "The KV cache tensor must have a static sequence length dimension"). Both decoder
profiles are dynamic: a profile fixed at S = 1 (min = opt = max) made TensorRT-RTX store every weight a second
time (+75 % engine at 7B layer widths, docs/tensorrt.md). The prefill profile stops at max_chunk: TensorRT
reserves a context's scratch memory for the largest shape its profiles admit, and the explicit form's attention
holds fp32 scores [1, heads, S, T] (1.2 GB at S = T = 3072 against 0.2 GB at S = 512), memory a Jetson shares
with its CPU; the runtime feeds 512 positions per run unless asked otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.engines import ProfileSpec
from pulse_edge.runtime.bundle.manifest import Manifest
from pulse_edge.runtime.engines.bundle_engine import DEFAULT_PREFILL_CHUNK
from pulse_edge.runtime.image.preprocess import ImageLayout, min_context

DECODE_MAX = 2  # a decode profile's S range 1..2: dynamic, so it shares the weights with the prefill profile


@dataclass(frozen=True)
class BuildLimits:
    max_context: int  # positions the KV cache holds (T at most)
    max_tiles: int  # tiles one vision run takes (larger images run in batches)
    max_chunk: int = DEFAULT_PREFILL_CHUNK  # positions one prefill run takes (S at most)


def layout_max_tiles(layout: ImageLayout) -> int:
    """The tiles of the largest pinpoint plus the base image (PULSE: 672x672 -> 4 + 1 = 5)."""
    return 1 + max((w // layout.tile_size) * (h // layout.tile_size) for w, h in layout.grid_pinpoints)


def resolve_limits(manifest: Manifest, max_context: int | None, max_tiles: int | None,
                   max_chunk: int | None = None) -> BuildLimits:
    """The asked limits, checked against what the bundle holds; defaults: the bundle's context, all tiles, the
    runtime's prefill chunk (never more than the context)."""
    held, least = manifest.kv.max_length, min_context(manifest.image)
    context = held if max_context is None else max_context
    if not least <= context <= held:  # fewer positions than the smallest image needs: engines that answer nothing
        raise ConfigError(f"--max-context must be between {least} (the smallest image's tokens and room for the "
                          f"exchange) and the bundle's {held} positions (its KV cache length, set at export), got "
                          f"{context}")
    most = layout_max_tiles(manifest.image)
    tiles = most if max_tiles is None else max_tiles
    if not 1 <= tiles <= most:  # more tiles than any image has only reserve device memory no run uses
        raise ConfigError(f"--max-tiles must be between 1 and {most} (the largest image's tiles), got {tiles}")
    chunk = min(DEFAULT_PREFILL_CHUNK, context) if max_chunk is None else max_chunk
    if not DECODE_MAX <= chunk <= context:
        raise ConfigError(f"--max-chunk must be between {DECODE_MAX} and the context's {context} positions, got "
                          f"{chunk}")
    return BuildLimits(max_context=context, max_tiles=tiles, max_chunk=chunk)


def vision_profiles(manifest: Manifest, limits: BuildLimits) -> tuple[ProfileSpec, ...]:
    tile = manifest.image.tile_size
    largest = min(layout_max_tiles(manifest.image), limits.max_tiles)
    shape = lambda k: (k, 3, tile, tile)  # noqa: E731 - one line per bound reads best
    return (ProfileSpec("tiles", {names.PIXEL_VALUES: (shape(1), shape(largest), shape(limits.max_tiles))}),)


def _decoder_profile(name: str, hidden: int, steps: tuple[int, int, int], total: tuple[int, int, int]) -> ProfileSpec:
    return ProfileSpec(name, {
        names.INPUTS_EMBEDS: tuple((1, s, hidden) for s in steps),
        names.POSITION_IDS: tuple((1, s) for s in steps),
        names.ATTENTION_MASK: tuple((1, t) for t in total),
    })


def decoder_profiles(manifest: Manifest, limits: BuildLimits) -> tuple[ProfileSpec, ...]:
    context, hidden = limits.max_context, manifest.text.hidden_size
    total = (1, max(1, context // 2), context)
    decode = _decoder_profile("decode", hidden, (1, 1, min(DECODE_MAX, context)), total)
    prefill = _decoder_profile("prefill", hidden, (1, min(DEFAULT_PREFILL_CHUNK, limits.max_chunk),
                                                   limits.max_chunk), total)
    return decode, prefill


PROFILES = {names.VISION: vision_profiles, names.DECODER: decoder_profiles}
