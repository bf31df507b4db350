"""Image-feature merges in numpy: the runtime's twin of `export.reference.PulseReference.merge`.

    vision graph [1 + N, P, H]   base view first, then the N tiles row by row
      -> flat           [(1 + N) * P, H]            PULSE: every tile's tokens as they are
      -> spatial_unpad  [P + h' * (w' + 1), H]      LLaVA-1.6's default (transformers' llava_next):
                                                    the tiles stitched into one feature map, the rows or
                                                    columns of black padding cropped, `image_newline`
                                                    after each row, the base tokens first

Each merge repeats the torch reference step for step, cropping with the same
`preprocess.unpad_crop`, so its length is always `preprocess.image_token_count`
and its values are copies of the graph's (bit-equal to the reference's).

Lean runtime: numpy only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from pulse_edge.runtime.image.preprocess import ImageLayout, select_best_resolution, unpad_crop

# (features [1 + N, P, H], image (width, height), layout, image_newline [H] or None) -> [T, H]
MergeFn = Callable[[np.ndarray, tuple[int, int], ImageLayout, np.ndarray | None], np.ndarray]


def flat_merge(features: np.ndarray, image_size: tuple[int, int], layout: ImageLayout,
               image_newline: np.ndarray | None = None) -> np.ndarray:
    """[K, P, H] -> [K * P, H]: base image first, then the tiles row-major (PULSE's layout)."""
    return features.reshape(-1, features.shape[-1])


def unpad_merge(features: np.ndarray, image_size: tuple[int, int], layout: ImageLayout,
                image_newline: np.ndarray | None = None) -> np.ndarray:
    """LLaVA-1.6 `spatial_unpad`, as `export.reference.unpad_merge` does it."""
    if image_newline is None:
        raise ValueError("the spatial_unpad merge needs the image_newline vector")
    side = layout.tile_size // layout.patch_size
    width, height = select_best_resolution(image_size, layout.grid_pinpoints)
    cols, rows = width // layout.tile_size, height // layout.tile_size
    hidden = features.shape[-1]
    if features.shape[:2] != (1 + rows * cols, side * side):
        raise ValueError(f"a {image_size[0]}x{image_size[1]} image needs features [{1 + rows * cols}, "
                         f"{side * side}, H] ({cols}x{rows} tiles + base), got {list(features.shape)}")
    base, tiles = features[0], features[1:]  # [P, H], [rows*cols, P, H]
    # Feature-map position (r*side + y, c*side + x) is patch (y, x) of tile (r, c); channels stay last
    # here (the reference keeps them first), which gives the same token order without a transpose back.
    grid = tiles.reshape(rows, cols, side, side, hidden).transpose(0, 2, 1, 3, 4)
    kept_rows, kept_cols = unpad_crop(image_size, cols * side, rows * side, layout.unpad)
    grid = grid.reshape(rows * side, cols * side, hidden)[kept_rows, kept_cols]  # [h', w', H]
    newline = np.broadcast_to(image_newline.astype(grid.dtype, copy=False), (grid.shape[0], 1, hidden))
    grid = np.concatenate([grid, newline], axis=1)  # [h', w' + 1, H]
    return np.concatenate([base, grid.reshape(-1, hidden)])  # [P + h'(w' + 1), H]


# Read-only: the table is shared by every engine in the process.
MERGE_FUNCTIONS: Mapping[str, MergeFn] = MappingProxyType({"flat": flat_merge, "spatial_unpad": unpad_merge})


@dataclass(frozen=True, eq=False)  # eq=False: comparing an ndarray field has no single truth value
class ImageMerge:
    """A bundle's merge rule with what it needs: the layout, and `image_newline` for spatial_unpad."""

    layout: ImageLayout
    image_newline: np.ndarray | None = field(default=None, repr=False)  # [H] float32

    def __post_init__(self) -> None:
        if self.layout.merge not in MERGE_FUNCTIONS:
            raise ValueError(f"no merge named {self.layout.merge!r}; known: {', '.join(MERGE_FUNCTIONS)}")

    def __call__(self, features: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Vision-graph features [1 + N, P, H] of an image of `image_size` (width, height) -> [T, H]."""
        return MERGE_FUNCTIONS[self.layout.merge](features, image_size, self.layout, self.image_newline)
