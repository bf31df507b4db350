"""The int8 KV cache's scales (calibration/kv.py): the largest of every sample seen, with the headroom above it."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pulse_edge.calibration.kv import KVObserver, kv_name, kv_scales  # noqa: E402


def test_the_range_is_the_largest_over_every_sample_not_the_last() -> None:
    """From the last sample only, a sample with larger keys or values saturated the cache: wrong answers, silently."""
    observer = KVObserver(head_dim=2)
    large = torch.tensor([[[3.0, -8.0, 0.5, 0.0]]])  # [B, S, kv_heads x D]: two heads of two
    small = torch.tensor([[[1.0, 1.0, 0.25, -0.25]]])
    for sample in (large, small):
        observer.update(0, "value", sample)
        observer.update(0, "key", sample)
    np.testing.assert_array_equal(observer.absmax[kv_name(0, "value")], [[3.0, 8.0], [0.5, 0.25]])
    # keys by the length of each rotary pair (half-split): rotation moves a key within its pair's circle
    np.testing.assert_allclose(observer.absmax[kv_name(0, "key")], [[np.hypot(3, 8)] * 2, [0.5, 0.5]])


def test_the_scale_leaves_the_headroom_above_the_range() -> None:
    absmax = {kv_name(0, "key"): np.array([[127.0]]), kv_name(0, "value"): np.array([[254.0]])}
    keys, values = kv_scales(absmax, 1, headroom=1.25)
    assert keys[0].item() == pytest.approx(1.25) and values[0].item() == pytest.approx(2.5)
