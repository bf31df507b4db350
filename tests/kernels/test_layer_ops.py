"""The native decode step's elementwise kernels (runtime/kernels/layer_ops.c) against their numpy twins.

Skips (tests/conftest.py kernel_or_skip) on a machine without AVX-512 or a C compiler; fails where the kernel is
broken.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels import layer_ops
from pulse_edge.runtime.kernels.layer_ops import LayerOps


@pytest.fixture(scope="module")
def ops(kernel_or_skip: Callable[..., LayerOps], tmp_path_factory: pytest.TempPathFactory) -> LayerOps:
    return kernel_or_skip(lambda: LayerOps.load(cache=tmp_path_factory.mktemp("kernels")))


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(("rows", "n"), [(1, 4096), (3, 200), (4, 17)])
def test_add_rms_norm_adds_in_place_and_normalizes(ops: LayerOps, rows: int, n: int) -> None:
    rng = np.random.default_rng(n)
    hidden, delta = (rng.standard_normal((rows, n)).astype(np.float32) * 3 for _ in range(2))
    weight = rng.standard_normal(n).astype(np.float32)
    want_hidden = hidden + delta
    normed = ops.add_rms_norm(hidden, delta, weight, 1e-5, np.empty_like(hidden))
    np.testing.assert_array_equal(hidden, want_hidden)  # one float32 addition, as numpy's
    assert _relative(normed, layer_ops.rms_norm(want_hidden, weight, 1e-5)) < 1e-6
    alone = ops.add_rms_norm(want_hidden.copy(), None, weight, 1e-5, np.empty_like(hidden))  # no residual to add
    np.testing.assert_array_equal(alone, normed)


@pytest.mark.parametrize(("rows", "heads", "kv_heads", "d", "past"), [
    (1, 32, 32, 128, 3039), (4, 8, 2, 64, 10), (3, 4, 4, 16, 0), (2, 6, 3, 40, 7)])
def test_rotary_store_is_numpys_bit_for_bit(ops: LayerOps, rows: int, heads: int, kv_heads: int, d: int,
                                            past: int) -> None:
    """The same float32 operations (products and a difference, a division, round half to even): equal bits, and
    the cache written at exactly [past, past + rows)."""
    rng = np.random.default_rng(d)
    capacity = past + rows + 3
    qkv = (rng.standard_normal((rows, (heads + 2 * kv_heads) * d)) * 2).astype(np.float32)
    cos, sin = (rng.uniform(-1, 1, (capacity, d // 2)).astype(np.float32) for _ in range(2))
    k_scale, v_scale = (rng.uniform(0.004, 0.03, (kv_heads, d)).astype(np.float32) for _ in range(2))
    caches = [rng.integers(-127, 128, (kv_heads, capacity, d), dtype=np.int8) for _ in range(2)]
    twins = [c.copy() for c in caches]
    q = ops.rotary_store(qkv, cos, sin, k_scale, v_scale, *caches, past, heads, np.empty((rows, heads, d), np.float32))
    want = layer_ops.rotary_store(qkv, cos, sin, k_scale, v_scale, *twins, past, heads)
    np.testing.assert_array_equal(q, want)
    for got, twin in zip(caches, twins, strict=True):
        np.testing.assert_array_equal(got, twin)
    assert (np.abs(caches[1][:, past:past + rows]) == 127).any()  # values beyond the grid: clipped, not wrapped


def test_rotary_store_refuses_positions_outside_the_cache(ops: LayerOps) -> None:
    qkv = np.zeros((2, 3 * 16), np.float32)
    cache = np.zeros((1, 8, 16), np.int8)
    tables, scale = np.zeros((10, 8), np.float32), np.ones((1, 16), np.float32)
    with pytest.raises(ValueError, match="exceed the cache"):
        ops.rotary_store(qkv, tables, tables, scale, scale, cache, cache.copy(), 7, 1, np.empty((2, 1, 16), np.float32))


@pytest.mark.parametrize(("rows", "inter"), [(1, 11008), (4, 37)])
def test_silu_mul_matches_numpy_over_the_whole_range(ops: LayerOps, rows: int, inter: int) -> None:
    """Gates from -100 to 100 (sigmoid 0 and 1, no overflow either side) and near 0."""
    rng = np.random.default_rng(inter)
    gate_up = (rng.standard_normal((rows, 2 * inter)) * 10).astype(np.float32)
    gate_up[0, :4] = [-100.0, 100.0, 0.0, -1e-8]
    out = ops.silu_mul(gate_up, np.empty((rows, inter), np.float32))
    want = layer_ops.silu_mul(gate_up)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-30)


def test_a_wrong_layout_is_refused_before_the_c_code_sees_it(ops: LayerOps) -> None:
    hidden = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="weight must be C-contiguous float32 \\[8\\]"):
        ops.add_rms_norm(hidden, None, np.ones(7, np.float32), 1e-5, np.empty_like(hidden))
    with pytest.raises(ValueError, match="gate_up must be"):
        ops.silu_mul(np.zeros((2, 8), np.float64), np.empty((2, 4), np.float32))


def test_a_library_that_disagrees_with_its_twins_is_never_used(ops: LayerOps, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = LayerOps.silu_mul
    monkeypatch.setattr(LayerOps, "silu_mul", lambda self, g, out: real(self, g, out) * 1.001)
    with pytest.raises(KernelUnavailable, match="disagree with their twins"):
        LayerOps.load(cache=tmp_path / "cache")
