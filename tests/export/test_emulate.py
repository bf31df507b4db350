"""The emulated reference against ONNX Runtime, one quantized MatMul at a time, and its folds on the tiny decoder.

Each scheme's node, written by the project's emitter (export/graphs/quant_ops.py), runs in ORT's CPU EP and
in EmulatedLinear on the same input: they must agree to float accumulation order (~1e-7 here). Inputs carry
outlier channels and values beyond the calibrated clip, so a wrong activation rule (no activation
quantization, a per-tensor instead of a per-block scale, -127 instead of -128 as the lower bound) is off by
1e-3 to 1e-1: each test also checks that the neighbouring rule is that far off, so it can fail.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from pulse_testing.site_scales import random_site_scales

from pulse_edge.export.graphs.quant_ops import FP8_MIN_OPSET, MatMulSpec, emit_matmul
from pulse_edge.export.validate.emulate import EmulatedLinear, QDQForm, SiteRecipe, decoder_swaps, swapped

K, N = 200, 96  # K not a multiple of the block: the last block is zero padded on both sides
AMAX = 3.0
EXACT = 1e-5  # float accumulation order: measured <= 5e-7 on every case below


def _inputs(m: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, K)).astype(np.float32)
    x[:, rng.choice(K, 3, replace=False)] *= 40.0  # outlier channels: they set their block's scale
    return x


def _ort(scheme: str, weight: np.ndarray, x: np.ndarray, *, prepack: bool = True, level: str = "all",
         block_size: int = 32) -> np.ndarray:
    emitted = emit_matmul(scheme, MatMulSpec(site="s", x="x", y="y", weight=weight, act_amax=AMAX,
                                             block_size=block_size, opset=FP8_MIN_OPSET))
    inits = [numpy_helper.from_array(a, n) for n, a in {**emitted.arrays, **emitted.raw}.items()]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    graph = helper.make_graph(emitted.nodes, "g", *io, initializer=inits)
    opsets = [helper.make_opsetid("", FP8_MIN_OPSET), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    options.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _emulated(site: SiteRecipe, weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    linear = torch.nn.Linear(K, N, bias=False)
    with torch.inference_mode():
        return EmulatedLinear(weight, linear, site).product(torch.from_numpy(x)).numpy()


def _rel(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def weight() -> np.ndarray:
    return (np.random.default_rng(1).normal(size=(K, N)) / np.sqrt(K)).astype(np.float32)


@pytest.mark.parametrize("scheme", ["w8", "w4"])
@pytest.mark.parametrize("m", [1, 7])
def test_matmulnbits_quantizes_activations_per_block_only_on_prepacked_weights(scheme: str, m: int,
                                                                               weight: np.ndarray) -> None:
    """Accuracy level 4: int8 activation blocks (MLAS's rule) with prepacking; float activations without."""
    x = _inputs(m)
    site = SiteRecipe(scheme, block_size=32, accuracy_level=4, prepacked=True)
    packed, mapped = _ort(scheme, weight, x, prepack=True), _ort(scheme, weight, x, prepack=False)
    assert _rel(_emulated(site, weight, x), packed) <= EXACT
    assert _rel(_emulated(replace(site, prepacked=False), weight, x), mapped) <= EXACT
    assert _rel(_emulated(replace(site, prepacked=False), weight, x), packed) > 1e-3  # the rule matters


@pytest.mark.parametrize("level", ["basic", "all"])
def test_w8a8_is_quantize_linear_with_the_whole_int8_range(level: str, weight: np.ndarray) -> None:
    """Per-tensor scale amax / 127, zero point 0, saturating to [-128, 127] (x beyond the clip included);
    at level "all" ORT fuses the pattern into MatMulIntegerToFloat: the same values."""
    x = _inputs(5)
    site = SiteRecipe("w8a8", act_amax=AMAX)
    graph = _ort("w8a8", weight, x, level=level)
    assert _rel(_emulated(site, weight, x), graph) <= EXACT
    symmetric = np.clip(x, -AMAX, AMAX)  # as if the lower bound were -127 steps: negatives clip one step early
    assert _rel(_emulated(site, weight, symmetric), graph) > 1e-3


@pytest.mark.parametrize("level", ["basic", "all"])
def test_w8a8u8_is_w8a8s_codes_around_128(level: str, weight: np.ndarray) -> None:
    """The vision graph's form: QuantizeLinear at zero point 128 (uint8) into MatMulIntegerToFloat. The same
    values as w8a8, its lower bound included (code 0 = -128 steps); one step less on either side shows."""
    x = _inputs(5)
    site = SiteRecipe("w8a8u8", act_amax=AMAX)
    graph = _ort("w8a8u8", weight, x, level=level)
    assert _rel(_emulated(site, weight, x), graph) <= EXACT
    assert _rel(_emulated(site, weight, np.clip(x, -AMAX, AMAX)), graph) > 1e-3


@pytest.mark.parametrize("m", [1, 6])
def test_w8a8dyn_quantizes_each_row_by_its_own_largest_magnitude(m: int, weight: np.ndarray) -> None:
    """The prefill graph's form: one scale per row (token), max(max x, -min x) / 127, symmetric codes stored at
    zero point 128. One scale for every row (the neighbouring rule) is off."""
    x = _inputs(m) * np.linspace(0.1, 3.0, m, dtype=np.float32)[:, None]  # rows of very different ranges
    site = SiteRecipe("w8a8dyn")
    graph = _ort("w8a8dyn", weight, x)
    assert _rel(_emulated(site, weight, x), graph) <= EXACT
    if m > 1:
        per_tensor = _emulated(SiteRecipe("w8a8", act_amax=float(np.abs(x).max())), weight, x)
        assert _rel(per_tensor, graph) > 1e-3


def test_fp8_is_saturating_e4m3(weight: np.ndarray) -> None:
    x = _inputs(5)
    site = SiteRecipe("fp8", act_amax=AMAX)
    graph = _ort("fp8", weight, x, level="basic")  # ORT's level "all" rejects float8 Q/DQ (quant_ops.py)
    assert _rel(_emulated(site, weight, x), graph) <= EXACT
    assert _rel(_emulated(replace(site, act_amax=AMAX * 1.01), weight, x), graph) > 1e-4  # a 1% scale shows


def test_swapped_modules_come_back(tiny_pipeline) -> None:
    lm = tiny_pipeline.model.language_model
    before = lm.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError), swapped(lm, {"model.layers.0.self_attn.q_proj": torch.nn.Identity()}):
        assert isinstance(lm.model.layers[0].self_attn.q_proj, torch.nn.Identity)
        raise RuntimeError("the block fails: the original must come back anyway")
    assert lm.model.layers[0].self_attn.q_proj is before


def test_folds_without_quantization_leave_the_decoder_unchanged(tiny_pipeline) -> None:
    """Random input scales on every site, schemes left at fp: the emulated folds must cancel; and they did fold
    (the swapped norm holds gamma / s)."""
    from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
    from pulse_edge.export.model.torch_backend import prefill

    lm = tiny_pipeline.model.language_model
    shape = DecoderShape.from_config(tiny_pipeline.loaded.config, max_length=256)
    rng = np.random.default_rng(0)
    scales = random_site_scales(shape, rng)
    embeds = torch.from_numpy(rng.normal(size=(1, 7, shape.hidden)).astype(np.float32))
    with torch.inference_mode():
        plain = prefill(lm, embeds)[0].numpy()
        with swapped(lm, decoder_swaps(lm, LinearPlan(input_scales=scales), prepacked=True)):
            folded = prefill(lm, embeds)[0].numpy()
            gamma = lm.model.layers[0].input_layernorm.weight.detach().numpy()
    assert _rel(folded, plain) <= 1e-4
    original = lm.model.layers[0].input_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(gamma, original / scales["layers.0.qkv"], rtol=1e-6)


def _ort_fp16(scheme: str, weight: np.ndarray, x: np.ndarray, opset: int) -> np.ndarray:
    """The TensorRT-ready form (export/graphs/qdq_ops.py): fp16 activations, weights and scales, int4 packed."""
    from pulse_edge.export.graphs.qdq_ops import emit_qdq_matmul, int4_initializer

    emitted = emit_qdq_matmul(scheme, MatMulSpec(site="s", x="x", y="y", weight=weight, act_amax=AMAX,
                                                 block_size=32), np.float16)
    inits = [numpy_helper.from_array(a, n) for n, a in emitted.raw.items()]
    inits += [numpy_helper.from_array(a.astype(np.float16), n) for n, a in emitted.floats.items()]
    inits += [int4_initializer(n, w) for n, w in emitted.int4.items()]
    io = ([helper.make_tensor_value_info("x", TensorProto.FLOAT16, list(x.shape))],
          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)])
    graph = helper.make_graph(emitted.nodes, "g", *io, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=11)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float16)})[0].astype(np.float32)


# The fp16 output's rounding: measured 3.4e-4 to 4.6e-4 here; the other quotient 3e-3 (int8) to 1.6e-2 (fp8).
FP16_OUTPUT = 1e-3


@pytest.mark.parametrize("opset", [21, 24])  # the explicit TensorRT-ready decoder's int4 opset, the native one's
@pytest.mark.parametrize("scheme", ["w8a8", "fp8", "w4"])
def test_fp16_qdq_quantizes_as_its_opset_says(scheme: str, opset: int, weight: np.ndarray) -> None:
    """TensorRT-ready sites: fp16 scales; QuantizeLinear divides x / scale in fp32 up to opset 21 and in fp16
    from 23 (QDQForm.fp16); int4 blocks keep float activations. The other quotient is off by whole codes."""
    x = _inputs(64).astype(np.float16).astype(np.float32)  # what the fp16 graph holds
    site = SiteRecipe(scheme, act_amax=AMAX, block_size=32, prepacked=False, qdq=QDQForm.fp16(opset))
    graph = _ort_fp16(scheme, weight, x, opset)
    assert _rel(_emulated(site, weight, x), graph) <= FP16_OUTPUT
    if scheme != "w4":
        other = np.float32 if site.qdq.quotient == np.float16 else np.float16
        wrong = replace(site, qdq=QDQForm(np.float16, other))
        assert _rel(_emulated(wrong, weight, x), graph) > 2 * FP16_OUTPUT
