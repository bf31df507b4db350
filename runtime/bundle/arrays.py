"""The arrays a bundle holds beside its graphs, read and checked against the manifest.

The embedding table is checked at every load: its .npy header (shape, dtype, the file's length against
what the header describes), and every value finite. A NaN row runs without an error and turns each
position that looks the token up into NaN logits. The finite check reads the exponent bits (all ones for
NaN and infinity) a block of rows at a time: on a 7B-shaped table (32000 x 4096 fp16, 262 MB, in the page
cache) it takes 36 ms against 165 ms for `np.isfinite(table).all()`, which also allocates a 131 MB mask
(docs/performance.md, load-time checks).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pulse_edge.runtime.bundle.manifest import BundleError, Manifest

_BLOCK_BYTES = 4 << 20  # rows checked at a time
# An IEEE float is NaN or infinite exactly when its exponent bits are all ones.
_EXPONENT_MASKS = {2: 0x7C00, 4: 0x7F800000, 8: 0x7FF0000000000000}
_FIX = "re-copy or re-export the bundle"


def read_newline(bundle: Path, manifest: Manifest) -> np.ndarray | None:
    """spatial_unpad's image_newline vector [H] float32 (None for the flat merge), checked once, at load."""
    if manifest.image_newline is None:
        return None
    return _read_newline(bundle / manifest.image_newline, manifest.text.hidden_size)


def _read_newline(path: Path, hidden: int) -> np.ndarray:
    try:
        vector = np.load(path)  # no pickles: a plain .npy or an error
    except (OSError, ValueError, EOFError) as e:
        raise BundleError(f"{path} cannot be read as a .npy array ({e}); re-export the bundle") from e
    if vector.shape != (hidden,) or vector.dtype.kind != "f":
        raise BundleError(f"{path} holds {vector.dtype} {list(vector.shape)}, not the image_newline vector "
                          f"(float [{hidden}]); re-export the bundle")
    _check_finite(vector[None], path)
    return vector.astype(np.float32, copy=False)


def check_embedding(bundle: Path, manifest: Manifest) -> None:
    """The table file: a whole .npy of the manifest's shape and dtype, every value finite."""
    spec = manifest.embedding
    path = bundle / spec.file
    table = open_npy(path)
    if table.dtype.name != spec.dtype or table.shape != tuple(spec.shape):
        raise BundleError(f"{path} holds {table.dtype.name} {list(table.shape)} but the manifest says {spec.dtype} "
                          f"{list(spec.shape)}; {_FIX}")
    _check_finite(table, path)


def open_npy(path: Path) -> np.ndarray:
    """A .npy file memory-mapped after checking that it is one, whole: a truncated file or junk of the same
    size is one line, not numpy's error from deep inside mmap."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = {(1, 0): np.lib.format.read_array_header_1_0,
                      (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if header is None:
                raise ValueError(f"unknown .npy format version {version}")
            shape, fortran, dtype = header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError, SyntaxError) as e:
        raise BundleError(f"{path} is not a readable .npy array ({e}); {_FIX}") from e
    if dtype.hasobject or fortran:
        raise BundleError(f"{path} holds a {'Fortran-ordered' if fortran else 'Python-object'} array, which a bundle "
                          f"never has; {_FIX}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise BundleError(f"{path} is {state} ({actual} bytes, its header describes {expected}); {_FIX}")
    return np.load(path, mmap_mode="r")


def _check_finite(array: np.ndarray, path: Path) -> None:
    """Refuse NaN and infinity anywhere in a 2-D float array (rows: [N, H])."""
    mask = _EXPONENT_MASKS.get(array.dtype.itemsize) if array.dtype.kind == "f" else None
    if mask is None:
        return
    bits = array.view(array.dtype.str.replace("f", "u"))  # [N, H], same bytes as unsigned integers
    rows = max(1, _BLOCK_BYTES // max(1, array.strides[0]))
    scratch = None
    for start in range(0, array.shape[0], rows):
        block = bits[start:start + rows]
        if scratch is None or scratch.shape != block.shape:
            scratch = np.empty(block.shape, block.dtype)
        np.bitwise_and(block, mask, out=scratch)
        if scratch.size and scratch.max() == mask:
            bad = start + int(np.flatnonzero(~np.isfinite(array[start:start + rows]).all(axis=1))[0])
            raise BundleError(f"{path} holds NaN or infinite values (row {bad} is the first): the file is damaged; "
                              f"{_FIX}")
