"""The arrays a bundle holds beside its graphs, read and checked against the manifest."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pulse_edge.runtime.bundle.manifest import BundleError, Manifest


def read_newline(bundle: Path, manifest: Manifest) -> np.ndarray | None:
    """spatial_unpad's image_newline vector [H] float32 (None for the flat merge), checked once, at load."""
    if manifest.image_newline is None:
        return None
    return _read_newline(bundle / manifest.image_newline, manifest.text.hidden_size)


def _read_newline(path: Path, hidden: int) -> np.ndarray:
    try:
        vector = np.load(path)  # no pickles: a plain .npy or an error
    except (OSError, ValueError) as e:
        raise BundleError(f"{path} cannot be read as a .npy array ({e}); re-export the bundle") from e
    if vector.shape != (hidden,) or vector.dtype.kind != "f":
        raise BundleError(f"{path} holds {vector.dtype} {list(vector.shape)}, not the image_newline vector "
                          f"(float [{hidden}]); re-export the bundle")
    return vector.astype(np.float32, copy=False)
