"""Quantization math and calibration statistics against independent computations.

Oracles: hand-computed values; ONNX Runtime (MatMulNBits, QuantizeLinear/DequantizeLinear);
torch's fake-quant ops; ml_dtypes' own cast; numpy on the full data the streaming code never keeps.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from pulse_edge.calibration.histogram import METHODS, AbsHistogram, ChannelStats, RowReservoir, mse_curve
from pulse_edge.calibration.quant_math import (
    E4M3_MAX,
    BlockQuantized,
    awq_scales,
    dequantize_blockwise,
    dequantize_int8_per_channel,
    fake_quant_blockwise,
    fake_quant_fp8,
    fake_quant_int8,
    quantize_blockwise,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
    search_awq_scales,
    search_smooth_alpha,
    smooth_scales,
    to_float8_e4m3,
    w8a8_error,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

# ----------------------------------------------------------------------------- ONNX Runtime oracles


def _session(nodes, inputs, outputs, initializers, opset: int = 21):
    graph = helper.make_graph(nodes, "oracle", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)], ir_version=10
    )
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _ort_matmul_nbits(bq: BlockQuantized, x: np.ndarray) -> np.ndarray:
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=bq.k, N=bq.n, bits=bq.bits, block_size=bq.block_size)
    sess = _session([node], [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, bq.k])],
                    [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, bq.n])],
                    [numpy_helper.from_array(bq.packed, "B"), numpy_helper.from_array(bq.scales, "scales")])
    return sess.run(None, {"A": x})[0]


def _ort_qdq(x: np.ndarray, scale: np.ndarray, zero_point: onnx.TensorProto, axis: int | None = None) -> tuple:
    """QuantizeLinear then DequantizeLinear; returns (quantized, dequantized)."""
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["Q"], **attrs),
             helper.make_node("DequantizeLinear", ["Q", "s", "zp"], ["Y"], **attrs)]
    outputs = [helper.make_tensor_value_info("Q", zero_point.data_type, list(x.shape)),
               helper.make_tensor_value_info("Y", TensorProto.FLOAT, list(x.shape))]
    sess = _session(nodes, [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x.shape))], outputs,
                    [numpy_helper.from_array(np.asarray(scale, np.float32), "s"), zero_point])
    return tuple(sess.run(None, {"X": x.astype(np.float32)}))


def _fp8_zero_point() -> onnx.TensorProto:
    return helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])


# ----------------------------------------------------------------------------- INT8 per channel


def test_int8_per_channel_hand_values() -> None:
    w = np.array([[1.0, 0.0, -3.0], [0.5, 0.0, 4.0], [-1.27, 0.0, 1.0]], dtype=np.float32)
    q, scale = quantize_int8_per_channel(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32
    # column 0: 1.27/127 = 0.01; column 1 all zero -> scale 1; column 2: 4/127 -> -95.25, 127, 31.75
    np.testing.assert_allclose(scale, [0.01, 1.0, 4.0 / 127], rtol=1e-6)
    np.testing.assert_array_equal(q, [[100, 0, -95], [50, 0, 127], [-127, 0, 32]])
    deq = dequantize_int8_per_channel(q, scale)
    np.testing.assert_allclose(deq[:, 2], [-95 * 4 / 127, 4.0, 32 * 4 / 127], rtol=1e-6)


def test_int8_per_channel_matches_onnxruntime_and_error_bound() -> None:
    rng = np.random.default_rng(11)
    w = (rng.standard_normal((96, 40)) * rng.uniform(0.01, 3.0, 40)).astype(np.float32)
    w[:, 7] = 0.0
    q, scale = quantize_int8_per_channel(w)
    q_ort, deq_ort = _ort_qdq(w, scale, numpy_helper.from_array(np.zeros(40, np.int8), "zp"), axis=1)
    np.testing.assert_array_equal(q, q_ort)
    np.testing.assert_array_equal(dequantize_int8_per_channel(q, scale), deq_ort)
    assert np.all(np.abs(w - deq_ort) <= scale / 2 * (1 + 1e-6))
    assert np.abs(q).max() == 127 and q.min() >= -127
    assert np.all(np.abs(q).max(axis=0)[np.arange(40) != 7] == 127) and not q[:, 7].any()


# ----------------------------------------------------------------------------- block-wise


def test_blockwise_packing_hand_example() -> None:
    # absmax 7 -> scale 1, so the signed codes are the values and the stored codes value + 8
    column = np.array([0, 1, 2, 3, 4, 5, 6, 7, -1, -2, -3, -4, -5, -6, -7, -7], dtype=np.float32)
    bq = quantize_blockwise(column[:, None], bits=4, block_size=16)
    assert bq.packed.shape == (1, 1, 8) and bq.packed.dtype == np.uint8
    # low nibble = element 2j, high nibble = element 2j+1
    assert bq.packed[0, 0].tolist() == [0x98, 0xBA, 0xDC, 0xFE, 0x67, 0x45, 0x23, 0x11]
    np.testing.assert_array_equal(bq.scales, [1.0])
    bq8 = quantize_blockwise(column[:, None] * (127 / 7), bits=8, block_size=16)
    assert bq8.packed[0, 0].tolist() == [128 + round(v * 127 / 7) for v in column]
    np.testing.assert_array_equal(dequantize_blockwise(bq)[:, 0], column)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "n", "block_size"), [(100, 24, 32), (256, 64, 16), (300, 17, 128), (64, 8, 64)])
@pytest.mark.parametrize("scale_search", [False, True])
def test_blockwise_matches_onnxruntime_matmulnbits(bits: int, k: int, n: int, block_size: int,
                                                   scale_search: bool) -> None:
    rng = np.random.default_rng(k * 7 + n + bits)
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    w[:block_size, 5] = 0.0  # an all-zero block
    bq = quantize_blockwise(w, bits, block_size, scale_search=scale_search)
    n_blocks = -(-k // block_size)
    assert bq.packed.shape == (n, n_blocks, block_size * bits // 8)
    assert bq.scales.shape == (n * n_blocks,) and bq.scales.dtype == np.float32
    x = rng.standard_normal((5, k)).astype(np.float32)
    got = _ort_matmul_nbits(bq, x)
    want = x.astype(np.float64) @ dequantize_blockwise(bq).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert np.all(got[:, 3] == 0)
    # the pack-free path the searches use reconstructs the very same weight
    np.testing.assert_array_equal(fake_quant_blockwise(w, bits, block_size, scale_search=scale_search),
                                  dequantize_blockwise(bq))


@pytest.mark.parametrize("bits", [4, 8])
def test_blockwise_rtn_error_bound(bits: int) -> None:
    rng = np.random.default_rng(5)
    k, n, block_size = 200, 12, 32
    w = rng.standard_normal((k, n)).astype(np.float32)
    bq = quantize_blockwise(w, bits, block_size, scale_search=False)  # plain rounding to nearest
    err = np.abs(dequantize_blockwise(bq) - w)
    padded = np.zeros((7 * block_size, n), np.float32)
    padded[:k] = w
    absmax = np.abs(padded.reshape(7, block_size, n)).max(axis=1)  # [n_blocks, N], computed independently
    step = absmax / (2 ** (bits - 1) - 1)
    np.testing.assert_allclose(bq.scales.reshape(n, 7), step.T, rtol=1e-6)
    bound = np.repeat(step, block_size, axis=0)[:k] / 2
    assert np.all(err <= bound * (1 + 1e-5))


def _block_errors(w: np.ndarray, bq: BlockQuantized) -> np.ndarray:
    d = (dequantize_blockwise(bq) - w).astype(np.float64) ** 2
    k, n = w.shape
    padded = np.zeros((bq.n_blocks * bq.block_size, n))
    padded[:k] = d
    return padded.reshape(bq.n_blocks, bq.block_size, n).sum(axis=1)


def test_scale_search_never_worse_per_block_and_lowers_the_total() -> None:
    rng = np.random.default_rng(21)
    w = rng.standard_normal((256, 32)).astype(np.float32)
    w[rng.integers(0, 256, 20), rng.integers(0, 32, 20)] *= 6.0  # rare large weights
    plain = quantize_blockwise(w, 4, 32, scale_search=False)
    searched = quantize_blockwise(w, 4, 32, scale_search=True)
    assert np.array_equal(quantize_blockwise(w, 4, 32).scales, searched.scales)  # int4's default
    assert np.array_equal(quantize_blockwise(w, 8, 32).scales, quantize_blockwise(w, 8, 32, scale_search=False).scales)
    np.testing.assert_array_equal(fake_quant_blockwise(w, 4, 32), dequantize_blockwise(searched))
    e_plain, e_search = _block_errors(w, plain), _block_errors(w, searched)
    assert np.all(e_search <= e_plain * (1 + 1e-6))
    # measured: the total squared error falls by 16% here (19% on plain Gaussian weights)
    assert e_search.sum() < 0.9 * e_plain.sum()
    codes = np.stack([searched.packed & 0xF, searched.packed >> 4]).astype(int) - 8
    assert codes.min() >= -8 and codes.max() <= 7


@pytest.mark.parametrize(("bits", "block_size"), [(3, 32), (2, 32), (4, 8), (4, 48), (8, 0)])
def test_blockwise_rejects_bad_arguments(bits: int, block_size: int) -> None:
    with pytest.raises(ValueError, match=r"bits|block_size"):
        quantize_blockwise(np.ones((32, 2), np.float32), bits, block_size)


def test_weights_are_validated() -> None:
    for quantize in (quantize_int8_per_channel, quantize_fp8_per_channel, lambda w: quantize_blockwise(w, 4, 32)):
        with pytest.raises(ValueError, match=r"\[K, N\]"):
            quantize(np.ones(64, np.float32))
        with pytest.raises(ValueError, match="NaN or infinite"):
            quantize(np.full((64, 2), np.nan, np.float32))


# ----------------------------------------------------------------------------- FP8


def test_fp8_hand_values() -> None:
    values = [448.0, 449.0, 464.0, 500.0, 1e6, -1e6, np.inf, -np.inf, 0.0625, 1.0625, 1.1875, 2.0**-9,
              2.0**-10, 3 * 2.0**-10, 0.3]
    # 1.0625 and 1.1875 are ties -> even mantissa; 2^-9 is the smallest subnormal, 2^-10 a tie to 0,
    # 3*2^-10 a tie between 1 and 2 steps of 2^-9 -> 2 steps; 0.3 -> 0.3125 (step 2^-5 in [0.25, 0.5))
    expected = [448, 448, 448, 448, 448, -448, 448, -448, 0.0625, 1.0, 1.25, 2.0**-9, 0.0, 2.0**-8, 0.3125]
    got = to_float8_e4m3(np.array(values, dtype=np.float32))
    assert got.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(got.astype(np.float64), expected)
    assert np.isnan(to_float8_e4m3(np.array([np.nan])).astype(np.float32)).all()


def test_fp8_float64_input_rounds_once() -> None:
    # just above the 1.0/1.125 midpoint: via float32 it would become the tie and round down to 1.0
    x = np.array([1 + 2.0**-4 + 2.0**-40, -(1 + 2.0**-4 + 2.0**-40)], dtype=np.float64)
    np.testing.assert_array_equal(to_float8_e4m3(x).astype(np.float64), [1.125, -1.125])


def test_fp8_matches_onnxruntime_and_ml_dtypes() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(200_000) * np.exp2(rng.uniform(-14, 10, 200_000))).astype(np.float32)
    x[:4] = [np.inf, -np.inf, 465.0, -1e30]
    q_ort, deq_ort = _ort_qdq(x, np.float32(1.0), _fp8_zero_point())
    ours = to_float8_e4m3(x)
    np.testing.assert_array_equal(ours.view(np.uint8), np.asarray(q_ort).view(np.uint8))
    np.testing.assert_array_equal(ours.astype(np.float32), deq_ort)
    direct = np.clip(x, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)  # ml_dtypes' own float32 cast
    np.testing.assert_array_equal(ours.view(np.uint8), direct.view(np.uint8))


def test_quantize_fp8_per_channel() -> None:
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((64, 10)) * rng.uniform(1e-3, 10, 10)).astype(np.float32)
    w[:, 2] = 0.0
    q, scale = quantize_fp8_per_channel(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and q.shape == w.shape and scale.dtype == np.float32
    expected_scale = np.abs(w).max(axis=0) / 448.0
    expected_scale[2] = 1.0
    np.testing.assert_allclose(scale, expected_scale, rtol=1e-6)
    qf = q.astype(np.float32)
    assert np.all(np.abs(qf).max(axis=0)[np.arange(10) != 2] == 448.0) and not qf[:, 2].any()
    _, deq_ort = _ort_qdq(w / scale, np.float32(1.0), _fp8_zero_point())
    np.testing.assert_array_equal(qf, deq_ort)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values
    normal = np.abs(w / scale) >= 2.0**-6
    np.testing.assert_array_less(np.abs(qf * scale - w)[normal], np.abs(w)[normal] * 2.0**-4 * (1 + 1e-6))


def test_fake_quant_hand_values() -> None:
    x = np.array([0.4, 0.5, 0.6, 1.5, 2.5, -2.5, 200.0, -300.0], dtype=np.float32)
    np.testing.assert_array_equal(fake_quant_int8(x, 127.0), [0, 0, 1, 2, 2, -2, 127, -127])
    np.testing.assert_array_equal(fake_quant_int8(x, 0.0), np.zeros(8))
    y = np.array([1.0, 1.0625, 500.0, -1000.0, 0.0625], dtype=np.float32)
    np.testing.assert_array_equal(fake_quant_fp8(y, 448.0), [1.0, 1.0, 448.0, -448.0, 0.0625])
    np.testing.assert_allclose(fake_quant_fp8(y * 2, 896.0), [2.0, 2.0, 896.0, -896.0, 0.125])
    for bad in (-1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="amax"):
            fake_quant_int8(x, bad)


def test_fake_quant_int8_matches_torch() -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((64, 300)).astype(np.float32) * 3
    amax = 5.0
    scale = float(np.float32(amax / 127))
    want = torch.fake_quantize_per_tensor_affine(torch.from_numpy(x), scale, 0, -127, 127).numpy()
    got = fake_quant_int8(x, amax)
    # torch multiplies by 1/scale where we divide: the two may round a value off an exact tie differently
    diff = np.abs(got - want)
    assert diff.max() <= scale * 1.0001 and np.mean(diff > 0) < 1e-3


# ----------------------------------------------------------------------------- SmoothQuant


def test_smooth_scales_hand_values() -> None:
    w = np.array([[1.0, -0.5], [4.0, 1.0], [2.0, 0.0], [0.0, 0.0]], dtype=np.float32)  # row absmax 1, 4, 2, 0
    act = np.array([4.0, 1.0, 0.0, 3.0])
    # alpha 0.5: sqrt(4)/sqrt(1) = 2, sqrt(1)/sqrt(4) = 0.5; an inactive channel and a zero row keep 1
    np.testing.assert_allclose(smooth_scales(act, w, 0.5), [2.0, 0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(smooth_scales(act, w, 1.0), [4.0, 1.0, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(smooth_scales(act, w, 0.0), [1.0, 0.25, 1.0, 1.0], rtol=1e-6)
    assert smooth_scales(np.array([1e12, 1.0, 1.0, 1.0]), w, 1.0)[0] == pytest.approx(1e4)  # clipped


def _outlier_layer(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((2048, 256)).astype(np.float32)
    calib[:, rng.choice(256, 4, replace=False)] *= 50.0  # a few 50x outlier channels, as in LLM activations
    w = (rng.standard_normal((256, 128)) * 0.02).astype(np.float32)
    return calib, w, np.abs(calib).max(axis=0)


def _torch_w8a8_error(x: np.ndarray, w: np.ndarray, act_absmax: np.ndarray, s: np.ndarray) -> float:
    """A second implementation with torch's fake-quant ops (per-tensor activations, per-channel weights)."""
    xs = torch.from_numpy(x / s)
    ws = torch.from_numpy(w * s[:, None])
    a_scale = float(np.max(act_absmax / s)) / 127
    x_q = torch.fake_quantize_per_tensor_affine(xs, a_scale, 0, -127, 127)
    w_scale = (ws.abs().amax(dim=0) / 127).float()
    w_q = torch.fake_quantize_per_channel_affine(ws, w_scale, torch.zeros(ws.shape[1], dtype=torch.int32), 1, -127, 127)
    ref = torch.from_numpy(x).double() @ torch.from_numpy(w).double()
    return float(((x_q.double() @ w_q.double() - ref) ** 2).sum() / (ref**2).sum())


def test_smoothing_keeps_the_float_product() -> None:
    calib, w, act = _outlier_layer(0)
    s = smooth_scales(act, w, 0.5)
    np.testing.assert_allclose((calib[:64] / s) @ (w * s[:, None]), calib[:64] @ w, rtol=1e-4, atol=1e-4)


def test_w8a8_error_matches_torch() -> None:
    calib, w, act = _outlier_layer(1)
    for alpha in (0.0, 0.5, 0.8):
        s = smooth_scales(act, w, alpha)
        assert w8a8_error(calib[:256], w, act, s) == pytest.approx(_torch_w8a8_error(calib[:256], w, act, s), rel=2e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_smoothquant_beats_plain_w8a8_on_outlier_channels(seed: int) -> None:
    calib, w, act = _outlier_layer(seed)
    result = search_smooth_alpha(calib[:256], w, act)
    assert set(result.errors) == {i / 10 for i in range(11)}
    assert result.error == min(result.errors.values())
    np.testing.assert_array_equal(result.scales, smooth_scales(act, w, result.alpha))
    plain = _torch_w8a8_error(calib[:256], w, act, np.ones(256, np.float32))
    assert result.baseline_error == pytest.approx(plain, rel=2e-3)
    # measured over seeds 0-3: alpha 0.6 wins, 28-39x lower than plain W8A8 and 32-43x lower than alpha 0
    assert result.error * 10 < result.baseline_error
    assert result.error * 10 < result.errors[0.0]
    assert 0.3 <= result.alpha <= 0.8


def test_a_search_on_sampled_columns_scores_the_scales_the_whole_weight_gives() -> None:
    """calibrate judges alpha on a column sample of W; the exported scales come from the whole W. Each alpha's
    error must be that of the exported scales (it was of scales from the sample's smaller max|W_j|)."""
    calib, w, act = _outlier_layer(2)
    w = w.copy()  # [256, 128]
    w[np.arange(256), 96 + np.arange(256) % 32] *= 8.0  # every row's largest weight outside the sample
    sample = w[:, :64]
    result = search_smooth_alpha(calib[:256], sample, act, scales_from=w)
    np.testing.assert_array_equal(result.scales, smooth_scales(act, w, result.alpha))
    for alpha, error in result.errors.items():
        assert error == pytest.approx(w8a8_error(calib[:256], sample, act, smooth_scales(act, w, alpha)), rel=1e-6)
    assert result.errors != search_smooth_alpha(calib[:256], sample, act).errors  # the sample's own differ
    with pytest.raises(ValueError, match="scales_from has 255 rows, the weight 256"):
        search_smooth_alpha(calib[:256], sample, act, scales_from=w[:255])


# ----------------------------------------------------------------------------- AWQ


def _rtn_error(x: np.ndarray, w: np.ndarray, bits: int, block_size: int) -> float:
    """Block-wise error with no AWQ scaling (int4: its per-block clip search, the default), computed with ONNX
    Runtime's MatMulNBits."""
    got = _ort_matmul_nbits(quantize_blockwise(w, bits, block_size), x).astype(np.float64)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    return float(((got - ref) ** 2).sum() / (ref**2).sum())


def test_awq_scales_definition() -> None:
    m = np.array([0.5, 2.0, 8.0, 0.0])
    np.testing.assert_array_equal(awq_scales(m, 0.0), np.ones(4))
    s = awq_scales(m, 0.5)
    raw = np.sqrt(np.maximum(m, 1e-4))
    np.testing.assert_allclose(s, raw / np.sqrt(raw.max() * raw.min()), rtol=1e-6)
    assert s.max() * s.min() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize(("seed", "bits", "block_size"), [(0, 4, 32), (1, 4, 64), (2, 8, 32), (3, 4, 16)])
def test_awq_never_worse_than_rtn(seed: int, bits: int, block_size: int) -> None:
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((1024, 192)).astype(np.float32)
    w = rng.standard_normal((192, 48)).astype(np.float32)
    rows = calib[:128]
    result = search_awq_scales(rows, w, np.abs(calib).mean(axis=0), bits, block_size, grid=10)
    rtn = _rtn_error(rows, w, bits, block_size)
    assert set(result.errors) == {i / 10 for i in range(10)}
    assert result.errors[0.0] == pytest.approx(rtn, rel=1e-3)
    assert result.baseline_error == result.errors[0.0]
    assert result.error <= rtn * (1 + 1e-3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_awq_helps_salient_channels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    calib = rng.standard_normal((2048, 256)).astype(np.float32)
    calib[:, rng.choice(256, 8, replace=False)] *= 10.0  # a few salient input channels
    w = rng.standard_normal((256, 128)).astype(np.float32)
    rows = calib[:256]
    result = search_awq_scales(rows, w, np.abs(calib).mean(axis=0), 4, 32)
    rtn = _rtn_error(rows, w, 4, 32)
    # independent check of the chosen scales' error: fold 1/s into x, quantize W*s, run MatMulNBits
    s = result.scales
    got = _ort_matmul_nbits(quantize_blockwise(w * s[:, None], 4, 32), rows / s).astype(np.float64)
    ref = rows.astype(np.float64) @ w.astype(np.float64)
    assert result.error == pytest.approx(float(((got - ref) ** 2).sum() / (ref**2).sum()), rel=1e-3)
    # measured over seeds 0-3: alpha 0.2-0.3, 1.42-1.69x lower error than no scaling (both with int4's clip
    # search; against plain rounding it was 2.08-2.28x, the search taking part of AWQ's gain)
    assert result.error * 1.3 < rtn
    assert result.alpha > 0


# ----------------------------------------------------------------------------- histogram


def _growing_batches(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((32, 500)) * scale for scale in (0.5, 1.0, 3.7, 3.0, 11.0, 2.0)]


def test_histogram_counts_stay_exact_when_the_range_grows() -> None:
    batches = _growing_batches(0)
    hist = AbsHistogram(num_bins=512)
    for b in batches:
        hist.update(b)
    values = np.abs(np.concatenate([b.ravel() for b in batches]))
    want, _ = np.histogram(values, bins=512, range=(0.0, 512 * hist.bin_width))
    got = hist.counts
    assert got.sum() == values.size
    assert np.abs(got - want).sum() <= 4  # only values on a bin edge may land on the other side
    assert hist.max == values.max()
    assert hist.bin_width * 512 >= values.max()


@pytest.mark.parametrize("q", [50.0, 90.0, 99.0, 99.9, 99.99])
def test_minmax_and_percentile_match_numpy(q: float) -> None:
    batches = _growing_batches(1)
    hist = AbsHistogram()
    for b in batches:
        hist.update(b)
    values = np.abs(np.concatenate([b.ravel() for b in batches]))
    assert hist.amax("minmax") == values.max()
    # inverted_cdf: the smallest value with at least q% of the data at or below it, which lies in the
    # bin the histogram picks. (Numpy's default interpolates between order statistics; in a sparse
    # tail two neighbours can be bins apart, so it is no sharper reference.)
    want = np.percentile(values, q, method="inverted_cdf")
    assert abs(hist.amax("percentile", percentile=q) - want) <= hist.bin_width
    assert hist.amax("percentile", percentile=100.0) == hist.max  # never beyond the largest value seen


def test_entropy_and_mse_on_known_distributions() -> None:
    rng = np.random.default_rng(2)
    uniform, outliers = AbsHistogram(), AbsHistogram()
    for _ in range(4):
        uniform.update(rng.uniform(-2, 2, (64, 1024)))
        outliers.update(rng.standard_normal((64, 1024)))
    outliers.update(rng.choice([-1.0, 1.0], 3) * rng.uniform(40, 60, 3))  # 3 outliers in 262k values
    for method in METHODS:
        assert uniform.amax(method) >= 0.98 * uniform.max  # measured: 0.995 (mse) to 1.0
    # measured (seeds 0-3): entropy 4.0-4.6 (~8% of the max), percentile 99.99 3.9; mse keeps 56-63% as the
    # outliers' clip error outweighs rounding at this rarity
    assert 3.0 < outliers.amax("entropy") < 0.15 * outliers.max
    assert 3.0 < outliers.amax("percentile") < 0.15 * outliers.max
    assert outliers.amax("mse") < 0.8 * outliers.max
    gaussian = AbsHistogram()
    gaussian.update(rng.standard_normal(300_000))
    # measured on N(0, 1): 8-bit entropy ~4.3-4.6, mse ~3.9; 4-bit clips harder (~3.5 and ~2.5)
    assert 3.0 < gaussian.amax("mse") < gaussian.amax("minmax")
    assert gaussian.amax("entropy", num_bits=4) < gaussian.amax("entropy")
    assert gaussian.amax("mse", num_bits=4) < gaussian.amax("mse")


@pytest.mark.parametrize(("target", "fake_quant"), [("int8", fake_quant_int8), ("fp8", fake_quant_fp8)])
@pytest.mark.parametrize("kind", ["gauss_outliers", "laplace"])
def test_mse_amax_minimises_brute_force_error(target: str, fake_quant, kind: str) -> None:
    rng = np.random.default_rng(9)
    x = rng.laplace(size=100_000)
    if kind == "gauss_outliers":
        x = np.concatenate([rng.standard_normal(100_000), rng.standard_normal(5) * 40])
    hist = AbsHistogram(num_bins=512)
    hist.update(x)
    amax = hist.amax("mse", target=target)
    # 1) the histogram objective (values spread evenly in each bin), integrated numerically instead:
    #    64 evenly spaced points per bin through the quant_math fake-quant ops
    edges = np.arange(1, 513) * hist.bin_width
    candidates = np.append(edges[edges < hist.max], hist.max)
    sub = (np.arange(512)[:, None] + (np.arange(64) + 0.5) / 64) * hist.bin_width
    points = np.minimum(sub, hist.max).ravel()
    weights = np.repeat(hist.counts / hist.counts.sum() / 64, 64)
    some = candidates[::16]
    dense = [float(weights @ (fake_quant(points, c) - points) ** 2) for c in some]
    np.testing.assert_allclose(mse_curve(hist, some, target=target), dense, rtol=0.02)
    curve = mse_curve(hist, candidates, target=target)
    assert amax == candidates[int(np.argmin(curve))]
    # 2) the real data: no clip value of a fine grid does better than ours by more than 0.2%
    grid = np.linspace(hist.max / 100, hist.max, 300)
    data_err = lambda c: float(np.mean((fake_quant(x, c) - x) ** 2))  # noqa: E731
    assert data_err(amax) <= 1.002 * min(data_err(c) for c in grid)


def test_histogram_errors_and_edge_cases() -> None:
    hist = AbsHistogram()
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        hist.amax("kl")
    with pytest.raises(ValueError, match="int8, fp8"):
        hist.amax("mse", target="int4")
    with pytest.raises(ValueError, match="percentile"):
        hist.amax("percentile", percentile=101.0)
    assert hist.amax("entropy") == 0.0  # nothing seen yet
    hist.update(np.zeros((3, 4)))
    assert hist.amax("percentile") == 0.0 and hist.counts[0] == 12
    hist.update(np.array([0.5, -1.0]))
    assert hist.counts.sum() == 14 and hist.counts[0] == 12 and hist.max == 1.0
    with pytest.raises(ValueError, match="use method 'mse'"):
        hist.amax("entropy", target="fp8")
    with pytest.raises(ValueError, match="NaN or infinite"):
        hist.update(np.array([1.0, np.inf]))
    # growth by 2 puts the new max exactly on a bin's lower edge: that bin has zero width
    edge = AbsHistogram(num_bins=4)
    edge.update(np.array([1.0]))
    edge.update(np.array([1.5]))
    assert edge.bin_width == 0.5 and edge.counts.tolist() == [0, 1, 0, 1]
    curve = mse_curve(edge, np.array([0.5, 1.0, 1.5]))
    assert np.all(np.isfinite(curve)) and curve[2] < curve[1] < curve[0]
    assert edge.amax("mse") == 1.5 and edge.amax("entropy") == 1.5


def test_histogram_npz_round_trip(tmp_path) -> None:
    hist = AbsHistogram(num_bins=256)
    for b in _growing_batches(3):
        hist.update(b)
    np.savez(tmp_path / "h.npz", **hist.to_arrays())
    with np.load(tmp_path / "h.npz") as data:
        back = AbsHistogram.from_arrays(dict(data))
    for method in METHODS:
        assert back.amax(method) == hist.amax(method)
    back.update(np.array([100.0]))  # keeps streaming after a reload
    assert back.counts.sum() == hist.counts.sum() + 1


# ----------------------------------------------------------------------------- channel statistics and reservoir


def test_channel_stats_match_numpy(tmp_path) -> None:
    rng = np.random.default_rng(6)
    batches = [rng.standard_normal((2, 7, 16)) * 3, rng.standard_normal((5, 16)), rng.standard_normal((1, 1, 1, 16))]
    stats = ChannelStats()
    for b in batches:
        stats.update(b.astype(np.float32))
    rows = np.concatenate([b.reshape(-1, 16).astype(np.float32) for b in batches])
    assert stats.rows == 20
    np.testing.assert_array_equal(stats.absmax, np.abs(rows).max(axis=0))
    np.testing.assert_allclose(stats.mean_abs, np.abs(rows.astype(np.float64)).mean(axis=0), rtol=1e-12)
    np.savez(tmp_path / "c.npz", **stats.to_arrays())
    with np.load(tmp_path / "c.npz") as data:
        back = ChannelStats.from_arrays(dict(data))
    np.testing.assert_array_equal(back.mean_abs, stats.mean_abs)
    assert back.rows == 20
    with pytest.raises(ValueError, match="channels"):
        stats.update(np.ones((2, 8)))


def test_reservoir_keeps_everything_below_capacity() -> None:
    res = RowReservoir(capacity=50, seed=1)
    stream = np.arange(40 * 3, dtype=np.float64).reshape(2, 20, 3)
    res.update(stream)
    sample = res.sample()
    assert sample.dtype == np.float32 and res.seen == 40
    np.testing.assert_array_equal(sample, stream.reshape(-1, 3))


def test_reservoir_is_uniform_and_seeded() -> None:
    n_rows, capacity, trials = 600, 60, 400
    stream = np.arange(n_rows, dtype=np.float32)[:, None]
    hits = np.zeros(n_rows)
    for seed in range(trials):
        res = RowReservoir(capacity=capacity, seed=seed)
        for start in range(0, n_rows, 77):  # uneven batches; some replace the same slot twice
            res.update(stream[start : start + 77])
        sample = res.sample()[:, 0].astype(int)
        assert len(sample) == capacity and len(set(sample)) == capacity
        hits[sample] += 1
    # each row is kept with probability 0.1: 40 of 400 trials expected, sd 6
    assert np.all(np.abs(hits.reshape(10, 60).sum(axis=1) - 2400) < 4 * np.sqrt(2400 * 0.9))
    assert hits[:60].mean() == pytest.approx(40, abs=3) and hits[-60:].mean() == pytest.approx(40, abs=3)
    a, b = RowReservoir(10, seed=5), RowReservoir(10, seed=5)
    for r in (a, b):
        r.update(stream[:300])
        r.update(stream[300:])
    np.testing.assert_array_equal(a.sample(), b.sample())


def test_reservoir_keeps_a_later_row_no_more_often_than_an_earlier_one() -> None:
    """Row t replaces a kept one with probability capacity / (t + 1): with capacity 1 and two rows, each is kept
    half the time. Drawing the slot from [0, t) instead kept the second row always (the loose test above passed)."""
    kept_first = 0
    for seed in range(400):
        res = RowReservoir(capacity=1, seed=seed)
        res.update(np.array([[0.0]], np.float32))
        res.update(np.array([[1.0]], np.float32))
        kept_first += int(res.sample()[0, 0] == 0.0)
    assert 160 < kept_first < 240  # 200 expected, sd 10


def _entropy_by_hand(counts: np.ndarray, width: float, largest: float, num_bits: int) -> float:
    """Migacz's entropy calibration written out loop by loop: the reference for the vectorised one."""
    from pulse_edge.calibration.histogram import _KL_FLOOR

    levels, best, least = 2 ** (num_bits - 1), None, math.inf
    for i in range(levels, len(counts) + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(counts[i:].sum())  # the outliers clipped into the last kept bin
        q = [0.0] * i
        for level in range(levels):
            members = [j for j in range(i) if j * levels // i == level]
            spread = [j for j in members if p[j] > 0]
            for j in spread:
                q[j] = sum(float(counts[j]) for j in members) / len(spread)
        if sum(q) == 0:
            continue
        kl = sum(p[j] / sum(p) * math.log(p[j] / sum(p) / max(q[j] / sum(q), _KL_FLOOR)) for j in range(i) if p[j])
        if kl < least:
            best, least = i, kl
    return min(best * width, largest)


@pytest.mark.parametrize("num_bits", [2, 3])
def test_entropy_clip_is_migaczs_exactly(num_bits: int) -> None:
    """The clip a hand-written loop gives, to the last bit: a grid of 2**b levels or a clip one bin off moved the
    clip by 0.5-1.3% with every tolerance-based test still passing."""
    hist = AbsHistogram(num_bins=12)
    per_bin = [40, 25, 14, 9, 6, 3, 0, 2, 1, 0, 0, 1]
    hist.update(np.concatenate([np.full(n, k + 0.5) for k, n in enumerate(per_bin)] + [[12.0]]))
    assert hist.bin_width == 1.0
    want = _entropy_by_hand(hist.counts, hist.bin_width, hist.max, num_bits)
    assert hist.amax("entropy", num_bits=num_bits) == want


def test_the_integer_grid_has_the_symmetric_levels_only() -> None:
    """0 .. 127 for 8 bits: the mse search on a grid reaching 128 clipped at a level int8 does not have."""
    from pulse_edge.calibration.histogram import _int_levels

    np.testing.assert_array_equal(_int_levels(8), np.arange(128))
    np.testing.assert_array_equal(_int_levels(4), np.arange(8))
