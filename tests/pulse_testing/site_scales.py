"""Random SmoothQuant/AWQ-style input scales for every decoder site, for tests of the folds."""

from __future__ import annotations

import numpy as np


def random_site_scales(shape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Log-normal input scales [K] for qkv, o, gate_up and down of every layer of a DecoderShape."""
    sizes = {"qkv": shape.hidden, "o": shape.heads * shape.head_dim, "gate_up": shape.hidden,
             "down": shape.intermediate}
    return {f"layers.{i}.{part}": np.exp(rng.normal(size=n)).astype(np.float32)
            for i in range(shape.layers) for part, n in sizes.items()}
