"""Contracts of the quantization recipes that the graph and its emulated reference share, so that parity cannot
see them broken (both sides read the same value): each held to its own arithmetic here. From the fourth mutation
round, whose survivors these kill."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pulse_edge.calibration.kv import kv_name, kv_scales
from pulse_edge.calibration.quant_math import _best_key, quantize_blockwise
from pulse_edge.calibration.recipes import check_keep, make_recipe
from pulse_edge.errors import ConfigError
from pulse_edge.export.graphs.prefill import KV_HEADROOM
from pulse_edge.export.validate.tolerances import TOLERANCES
from pulse_edge.export.validate.vision import compare_features
from pulse_edge.runtime.bundle.manifest import native_validated


def test_kv_scales_are_each_parts_own_absmax_with_the_headroom() -> None:
    absmax = {kv_name(i, part): np.full((2, 4), value * (i + 1), np.float32)
              for i in range(2) for part, value in (("key", 10.0), ("value", 3.0))}
    absmax[kv_name(1, "value")][0, 0] = 0.0  # a channel that never moved
    keys, values = kv_scales(absmax, 2, headroom=KV_HEADROOM)
    assert KV_HEADROOM == 1.25  # 25% above the calibrated range, docs/quantization.md
    np.testing.assert_allclose(keys[1], 20.0 * 1.25 / 127, rtol=1e-6)
    np.testing.assert_allclose(values[0], 3.0 * 1.25 / 127, rtol=1e-6)
    assert values[1][0, 0] == np.float32(1e-8) and values[1][0, 1] == pytest.approx(6.0 * 1.25 / 127)


def test_the_recipe_takes_the_int8_decoder_mode_asked_and_keeps_by_whole_names() -> None:
    assert make_recipe("int8", int8_decoder="w8a8").decoder == "w8a8"
    assert make_recipe("int8").decoder != "w8a8"
    recipe = make_recipe("int4", keep=("layers.1",))
    assert recipe.scheme("layers.1.qkv") == "fp" and recipe.scheme("layers.10.qkv") != "fp"
    sites = ["layers.0.qkv", "layers.10.qkv", "lm_head"]
    check_keep(("layers.10", "lm_head", "decoder"), sites)
    for typo in ("layer", "lm", "layers.1"):  # a prefix of a name, not of its dotted parts: keeps nothing
        with pytest.raises(ConfigError, match=f"--keep '{typo}' names no layer"):
            check_keep((typo,), sites)


def test_a_vision_graph_wrong_for_one_tile_of_five_fails() -> None:
    ref = np.random.default_rng(0).standard_normal((5, 8, 16)).astype(np.float32)
    got = ref.copy()
    got[3] = -got[3]  # one tile's features wrong: the mean cosine over tiles is still 0.6
    verdict = compare_features(ref, got, TOLERANCES["fp32"])
    assert not verdict["pass"] and verdict["cosine"] == pytest.approx(-1.0)


def test_a_native_step_the_export_dropped_is_not_served() -> None:
    def manifest(record: dict) -> object:
        from types import SimpleNamespace
        return SimpleNamespace(validation={"decoder": {"native_decode": record}})

    assert native_validated(manifest({"pass": True, "kept": True}))
    assert not native_validated(manifest({"pass": True, "kept": False}))
    assert not native_validated(manifest({"pass": False}))


def test_block_quantization_pads_k_with_zeros_and_searches_every_ratio() -> None:
    w = 0.01 * np.random.default_rng(3).standard_normal((100, 8)).astype(np.float32)  # K = 100: the last block 4
    bq = quantize_blockwise(w, 4, 32, scale_search=False)
    last = np.abs(w[96:]).max(axis=0) / 7  # padding must not raise the last block's scale (|w| < 1 here)
    np.testing.assert_allclose(bq.scales.reshape(8, 4)[:, 3], last, rtol=1e-6)
    # a block on the grid of 0.95 but for its largest weight (7 = 7.37 steps of 0.95: clipped by 0.35, squared
    # error 0.1225, where absmax's grid errs 1.125 and 0.9's 1.615): ratio 0.95 strictly best; one on absmax's grid
    steps = [6, 5, -4, 3, -2, 1, 0, -6, 5, 4, -3, 2, -1, 6, -5, 4, 3, -2, 1, 0, -6, 5, -4, 3, 2, -1, 6, -5, 4, 3, 0]
    block = np.stack([np.array([7.0, *(0.95 * k for k in steps)], np.float32),
                      np.array([7.0, *(float(k) for k in steps)], np.float32)], axis=1)  # [32, 2]
    scales = quantize_blockwise(block, 4, 32, scale_search=True).scales
    assert scales[0] == pytest.approx(0.95) and scales[1] == pytest.approx(1.0)


def test_a_search_never_picks_a_candidate_whose_error_is_not_a_number() -> None:
    assert _best_key({0.0: math.nan, 0.5: 0.1, 0.9: 0.2}) == 0.5


@pytest.mark.parametrize("level", [0, 1, 4])
def test_the_matmulnbits_node_carries_the_accuracy_level_asked(level: int) -> None:
    """Validation runs without prepacking, where the level changes nothing: only the node says what ORT will run."""
    import onnx

    from pulse_edge.export.graphs.quant_ops import MatMulSpec, emit_matmul

    weight = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    node = emit_matmul("w4", MatMulSpec("s", "x", "y", weight, block_size=32, accuracy_level=level)).nodes[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == level


def test_entropy_calibration_by_hand_on_four_bins() -> None:
    """counts [4, 2, 0, 1] of width 0.975, a 2-bit grid (2 levels): KL(P || Q) per candidate of i bins
      i = 2: P [4, 3] (the outlier clipped in), Q [4, 2]: 4/7 ln((4/7)/(4/6)) + 3/7 ln((3/7)/(2/6)) = 0.019617
      i = 3: Q's second level holds no mass while P's last bin does: large (Q floored)
      i = 4: P [4, 2, 0, 1], Q [3, 3, 0, 1] (the empty bin gets none of its level's mass): 0.048536
    so the clip is the top of bin 2: 1.95."""
    from pulse_edge.calibration.histogram import AbsHistogram, _threshold_divergence

    hist = AbsHistogram(num_bins=4)
    hist.update(np.array([0.1, 0.2, 0.3, 0.4, 1.0, 1.5, 3.9], np.float32))
    assert hist.counts.tolist() == [4, 2, 0, 1] and hist.bin_width == pytest.approx(0.975)
    counts = hist.counts.astype(np.float64)
    assert _threshold_divergence(counts, 2, 2) == pytest.approx(
        4 / 7 * math.log((4 / 7) / (4 / 6)) + 3 / 7 * math.log((3 / 7) / (2 / 6)))
    assert _threshold_divergence(counts, 4, 2) == pytest.approx(
        4 / 7 * math.log(4 / 3) + 2 / 7 * math.log(2 / 3))
    assert _threshold_divergence(counts, 3, 2) > 1  # bounded only by the floor on Q
    assert hist.amax("entropy", num_bits=2) == pytest.approx(1.95)


@pytest.mark.parametrize(("level", "refused", "kept"), [
    ("fp32", 5e-4, 5e-5),  # summation order only: 1.1e-6 measured at the real shape
    ("site", 5e-4, 5e-5),
    ("int8", 5e-2, 5e-3),  # quantized graph against its emulated recipe
])
def test_each_parity_bound_refuses_an_error_a_few_times_its_own(level: str, refused: float, kept: float) -> None:
    """Every break the tests plant is orders of magnitude over its bound, so a bound loosened 10x went unseen:
    these hold each bound between an error it must refuse and one it must keep."""
    from pulse_edge.export.validate.parity import _passes, compare_logits
    from pulse_edge.export.validate.tolerances import SITE_TOLERANCE

    tolerance = SITE_TOLERANCE if level == "site" else TOLERANCES[level]
    ref = np.random.default_rng(1).standard_normal(4096)
    bump = np.zeros_like(ref)
    bump[7] = np.abs(ref).max()  # one logit off by `error` of the reference's scale
    assert not _passes(compare_logits(ref + refused * bump, ref), tolerance)
    assert _passes(compare_logits(ref + kept * bump, ref), tolerance)
