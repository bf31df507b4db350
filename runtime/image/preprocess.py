"""LLaVA-1.6 "anyres" image preprocessing, exactly as PULSE-7B runs it, in numpy and Pillow.

PULSE feeds its CLIP ViT-L/14-336 vision tower a squashed 336x336 view of the whole
image plus 336x336 tiles of a higher-resolution copy. Which copy is chosen, how it is
padded and the order of the tiles decide what the language model sees, so every step
below reproduces LLaVA's `mm_utils.process_anyres_image` (and Pillow's BICUBIC
resampling it relies on) rather than approximating it:

1. pick the grid pinpoint that keeps the most of the image's resolution;
2. resize to fit it, keeping the aspect ratio, and centre on a black canvas;
3. cut that canvas into tiles row by row; prepend the squashed whole image;
4. scale to [0, 1] and normalise with CLIP's mean and std, channels first.

Lean runtime: numpy and Pillow only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from types import MappingProxyType
from typing import Any

import numpy as np
from PIL import Image

from pulse_edge.errors import ConfigError

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
# PULSE's `image_grid_pinpoints`, as (width, height); order matters for tie-breaks.
PULSE_PINPOINTS: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# "flat": PULSE concatenates the tokens of every tile as they are.
# "spatial_unpad": LLaVA-1.6's default (and transformers' llava_next): stitch the tiles'
# feature maps, crop the padding away, and end each feature row with a newline token.
MERGES: tuple[str, ...] = ("flat", "spatial_unpad")
# How spatial_unpad sizes the cropped map, as the checkpoint's own code does: LLaVA's unpad_image truncates
# (`int(x)`), transformers' llava_next rounds to 7 decimals first. A 176x198 image on the 24x48 map: 198 * 24 / 176
# is 26.999999999999996, 26 rows in LLaVA, 27 in transformers (then 28 kept after the even padding split): another
# token count and other rows.
UNPAD_RULES: Mapping[str, Callable[[float], int]] = MappingProxyType(
    {"llava": int, "transformers": lambda x: int(round(x, 7))})

STD_RANGE = (0.01, 10.0)  # what image_std may hold per channel

# LLaVA resizes with Image.resize's default, which is BICUBIC for RGB images.
_RESAMPLE = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class ImageLayout:
    """How an image becomes vision-tower input: tile geometry, pinpoints, normalisation, merge."""

    tile_size: int = 336
    patch_size: int = 14
    grid_pinpoints: tuple[tuple[int, int], ...] = PULSE_PINPOINTS
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    merge: str = "flat"
    unpad: str = "transformers"  # UNPAD_RULES (spatial_unpad only); bundles from before it were made so

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ConfigError(
                f"image merge {self.merge!r} is not supported; allowed values: {', '.join(MERGES)}"
            )
        if self.unpad not in UNPAD_RULES:
            raise ConfigError(f"image unpad rule {self.unpad!r} is not supported; allowed: {', '.join(UNPAD_RULES)}")
        # pixels are in [0, 1] when normalised: a mean outside it or a std far from any tower's (CLIP 0.27, SigLIP
        # 0.5) is a damaged layout, whose tiles overflowed to inf with numpy's warnings before a later refusal
        if not all(math.isfinite(m) and 0.0 <= m <= 1.0 for m in self.image_mean) or not all(
                math.isfinite(v) and STD_RANGE[0] <= v <= STD_RANGE[1] for v in self.image_std):
            raise ConfigError(f"image_mean {list(self.image_mean)} / image_std {list(self.image_std)} are not a "
                              f"normalisation (means within 0-1, deviations within {STD_RANGE[0]:g}-{STD_RANGE[1]:g})")
        if self.tile_size <= 0 or self.patch_size <= 0 or self.tile_size % self.patch_size:
            raise ConfigError(
                f"tile_size {self.tile_size} must be a positive multiple of patch_size {self.patch_size}"
            )
        if not self.grid_pinpoints:
            raise ConfigError("grid_pinpoints is empty; give at least one (width, height)")
        for width, height in self.grid_pinpoints:
            if width <= 0 or height <= 0 or width % self.tile_size or height % self.tile_size:
                raise ConfigError(
                    f"grid pinpoint {width}x{height} is not a positive multiple of tile_size {self.tile_size}"
                )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageLayout:
        """Build from a JSON-style mapping (lists allowed); missing keys keep PULSE's defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"unknown image layout keys {unknown}; allowed keys: {', '.join(sorted(known))}"
            )
        values = dict(d)
        for key in values:
            try:
                values[key] = _FIELD_CONVERTERS[key](values[key])
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"image layout {key}={values[key]!r} is malformed ({exc})") from exc
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (tuples become lists) that `from_dict` reads back; `unpad` only where the merge
        unpads (a flat bundle's manifest stays as runtimes before the field read it)."""
        return {key: _to_lists(value) for key, value in asdict(self).items()
                if key != "unpad" or self.merge == "spatial_unpad"}

    @property
    def tokens_per_tile(self) -> int:
        """Vision tokens one tile yields: one per patch (24 x 24 = 576 for PULSE)."""
        return (self.tile_size // self.patch_size) ** 2


def _float3(value: Any) -> tuple[float, float, float]:
    a, b, c = value
    return float(a), float(b), float(c)


def _pinpoints(value: Any) -> tuple[tuple[int, int], ...]:
    return tuple((int(width), int(height)) for width, height in value)


def _to_lists(value: Any) -> Any:
    return [_to_lists(item) for item in value] if isinstance(value, tuple) else value


_FIELD_CONVERTERS = {
    "tile_size": int,
    "patch_size": int,
    "grid_pinpoints": _pinpoints,
    "image_mean": _float3,
    "image_std": _float3,
    "merge": str,
    "unpad": str,
}


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields has no single truth value
class Preprocessed:
    """Vision-tower input for one image and what the prompt must reserve for it."""

    pixel_values: np.ndarray = field(repr=False)  # [1 + N, 3, tile, tile] float32; base first, then tiles
    image_size: tuple[int, int]  # original (width, height)
    grid: tuple[int, int]  # (columns, rows) of tiles
    num_image_tokens: int


def select_best_resolution(size: tuple[int, int], pinpoints: Any) -> tuple[int, int]:
    """The (width, height) pinpoint that keeps the most of the image's pixels, wasting the least canvas.

    Effective resolution is what survives an aspect-preserving fit, never more than
    the original (upscaling adds none). Only a strictly smaller waste breaks a tie,
    so among exact ties the first pinpoint wins, as in LLaVA.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    best: tuple[int, int] | None = None
    best_effective, best_wasted = 0, math.inf
    for pin_w, pin_h in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_w, pin_h), effective, wasted
    if best is None:
        raise ValueError("no grid pinpoints to choose from")
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Fit `image` into `target` keeping its aspect ratio (BICUBIC), centred on a black canvas."""
    width, height = image.size
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    # The limiting side fills the target exactly; the other is rounded up, then clamped.
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), _RESAMPLE), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def anyres_tiles(image: Image.Image, layout: ImageLayout) -> list[Image.Image]:
    """The squashed whole image, then the tiles of the padded high-resolution copy, row-major."""
    tile = layout.tile_size
    padded = resize_and_pad(image, select_best_resolution(image.size, layout.grid_pinpoints))
    tiles = [
        padded.crop((left, top, left + tile, top + tile))
        for top in range(0, padded.height, tile)
        for left in range(0, padded.width, tile)
    ]
    # The base view ignores the aspect ratio on purpose: LLaVA squashes it to one tile.
    base = image.resize((tile, tile), _RESAMPLE)
    return [base, *tiles]


def normalize(tiles: list[Image.Image], layout: ImageLayout) -> np.ndarray:
    """[K, 3, tile, tile] float32: uint8 / 255, minus mean, over std, per channel, channels first."""
    stacked = np.stack([np.asarray(tile.convert("RGB"), dtype=np.uint8) for tile in tiles])  # [K, H, W, 3]
    # float32 throughout, in the same order of operations as CLIPImageProcessor's
    # rescale + normalize, so the two agree to float32 rounding.
    mean = np.asarray(layout.image_mean, dtype=np.float32)
    std = np.asarray(layout.image_std, dtype=np.float32)
    scaled = stacked.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray(((scaled - mean) / std).transpose(0, 3, 1, 2))


def image_token_count(image_size: tuple[int, int], layout: ImageLayout) -> int:
    """How many vision tokens an image of `image_size` (width, height) takes in the prompt."""
    columns, rows = _grid(image_size, layout)
    return _TOKEN_COUNTERS[layout.merge](image_size, columns, rows, layout)


PROMPT_MARGIN = 256  # KV positions for the question and the answer beside the image


def min_context(layout: ImageLayout) -> int:
    """The fewest KV positions a conversation needs: the smallest image the layout makes, and PROMPT_MARGIN. A
    bundle (export --max-context) or an engine set (build-engines --max-context) holding fewer answers nothing."""
    return min(image_token_count((w, h), layout) for w, h in layout.grid_pinpoints) + PROMPT_MARGIN


def tile_count(image_size: tuple[int, int], layout: ImageLayout) -> int:
    """How many tiles the vision tower runs for an image of `image_size`: the base view and the grid's tiles (both
    merges run them all; spatial_unpad only drops some of their tokens)."""
    columns, rows = _grid(image_size, layout)
    return 1 + columns * rows


def preprocess(image: Image.Image, layout: ImageLayout) -> Preprocessed:
    """Everything the vision tower and the prompt builder need for one image."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return Preprocessed(
        pixel_values=normalize(anyres_tiles(rgb, layout), layout),
        image_size=rgb.size,
        grid=_grid(rgb.size, layout),
        num_image_tokens=image_token_count(rgb.size, layout),
    )


def _grid(image_size: tuple[int, int], layout: ImageLayout) -> tuple[int, int]:
    width, height = select_best_resolution(image_size, layout.grid_pinpoints)
    return width // layout.tile_size, height // layout.tile_size


def _flat_tokens(image_size: tuple[int, int], columns: int, rows: int, layout: ImageLayout) -> int:
    return layout.tokens_per_tile * (1 + columns * rows)


def _spatial_unpad_tokens(image_size: tuple[int, int], columns: int, rows: int, layout: ImageLayout) -> int:
    """Base tile, plus the stitched feature map with LLaVA's `unpad_image` crop, plus a newline per row."""
    side = layout.tile_size // layout.patch_size
    kept_rows, kept_cols = unpad_crop(image_size, columns * side, rows * side, layout.unpad)
    feat_h, feat_w = kept_rows.stop - kept_rows.start, kept_cols.stop - kept_cols.start
    return layout.tokens_per_tile + feat_h * (feat_w + 1)


def unpad_crop(image_size: tuple[int, int], width: int, height: int, rule: str) -> tuple[slice, slice]:
    """The rows and columns of a [height, width] feature map that hold the image, not the black padding around
    it (unpad_image, by the checkpoint code's UNPAD_RULES): the merges and the token count all cut with this."""
    orig_w, orig_h = image_size
    size = UNPAD_RULES[rule]
    if orig_w / orig_h > width / height:  # the same float expressions as unpad_image
        pad = (height - size(orig_h * (width / orig_w))) // 2
        return slice(pad, height - pad), slice(0, width)
    pad = (width - size(orig_w * (height / orig_h))) // 2
    return slice(0, height), slice(pad, width - pad)


_TOKEN_COUNTERS = {"flat": _flat_tokens, "spatial_unpad": _spatial_unpad_tokens}
