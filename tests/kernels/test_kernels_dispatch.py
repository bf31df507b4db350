"""pulse_edge.kernels without Triton: dispatch decisions, the twins' semantics, quantization, fusing a model.

Nothing here needs triton or a GPU; test_kernels.py runs the kernels themselves.
"""

from __future__ import annotations

import copy
import logging
import os

import pytest
import torch
from torch import nn

from pulse_edge.errors import ConfigError
from pulse_edge.export.model.torch_backend import TorchPipeline, _projector
from pulse_edge.kernels import dispatch, quant, reference
from pulse_edge.kernels.fused_module import FusedProjector, fuse_projector, projector_choice, unfuse_projector
from pulse_edge.kernels.projector import mlp2x_gelu

CUDA = torch.device("cuda")
CPU = torch.device("cpu")
# Twin vs nn.Sequential in float64 on the same (rounded) inputs: the twin rounds h and y once each.
TWIN_BOUND = {torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}
FP8_TWIN_BOUND = 0.1  # e4m3 keeps 4 significant bits (u = 2^-4) for x, h and both weights


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch):
    """A CUDA GPU of a chosen capability with triton installed, as far as dispatch can tell."""
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")

    def set_capability(capability: tuple[int, int]) -> None:
        monkeypatch.setattr(dispatch, "cuda_capability", lambda device: capability)

    return set_capability


def test_cpu_gets_the_reference_with_the_reason() -> None:
    choice = dispatch.choose("auto", CPU, torch.float16)
    assert not choice.fused and "CUDA GPU" in choice.reason and "cpu" in choice.reason


def test_fp32_on_a_gpu_gets_the_reference(fake_gpu) -> None:
    fake_gpu((9, 0))
    choice = dispatch.choose("auto", CUDA, torch.float32)
    assert choice.impl == "reference" and "fp16 or bf16" in choice.reason


def test_missing_triton_is_the_reason_on_a_gpu(fake_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpu((9, 0))
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.choose("auto", CUDA, torch.bfloat16).reason == "triton not installed: pip install -e .[kernels]"
    with pytest.raises(ConfigError, match="triton not installed"):
        dispatch.choose("interpret", CPU, torch.float16)


@pytest.mark.parametrize(("capability", "precision", "dtype", "fused"), [
    ((9, 0), "native", torch.bfloat16, True), ((9, 0), "fp8", torch.bfloat16, True),
    ((8, 9), "fp8", torch.float16, True), ((8, 7), "fp8", torch.float16, False),
    ((8, 7), "int8", torch.bfloat16, True), ((7, 5), "native", torch.bfloat16, False),
    ((7, 5), "native", torch.float16, True),
])
def test_capability_thresholds(fake_gpu, capability, precision, dtype, fused) -> None:
    fake_gpu(capability)
    choice = dispatch.choose("auto", CUDA, dtype, precision)
    assert choice.fused == fused
    if not fused:
        assert "compute capability" in choice.reason


def test_asking_for_triton_where_it_cannot_run_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"cannot run the Triton kernels: .*CUDA GPU"):
        dispatch.choose("triton", CPU, torch.float16)
    with pytest.raises(ConfigError, match="impl 'fast'"):
        dispatch.choose("fast", CPU, torch.float16)


def test_auto_on_cpu_runs_the_twin_and_warns_once(caplog: pytest.LogCaptureFixture, gen) -> None:
    dispatch.warn_fallback.cache_clear()
    x, w1, b1 = torch.randn(5, 8, generator=gen).half(), torch.randn(12, 8, generator=gen).half(), torch.zeros(12)
    w2, b2 = torch.randn(12, 12, generator=gen).half(), torch.zeros(12).half()
    with caplog.at_level(logging.WARNING, logger="pulse_edge.kernels.dispatch"):
        first = mlp2x_gelu(x, w1, b1.half(), w2, b2)
        second = mlp2x_gelu(x, w1, b1.half(), w2, b2)
    warnings = [r for r in caplog.records if "reference instead of the Triton kernels" in r.getMessage()]
    assert len(warnings) == 1 and "CUDA GPU" in warnings[0].getMessage()
    assert torch.equal(first, second)
    assert torch.equal(first, reference.mlp2x_gelu_ref(x, w1, b1.half(), w2, b2))


def _weights(gen: torch.Generator, k: int, h: int, dtype: torch.dtype) -> list[torch.Tensor]:
    return [(torch.randn(h, k, generator=gen) * k**-0.5).to(dtype), (torch.randn(h, generator=gen) * 0.1).to(dtype),
            (torch.randn(h, h, generator=gen) * h**-0.5).to(dtype), (torch.randn(h, generator=gen) * 0.1).to(dtype)]


def _sequential64(w1, b1, w2, b2) -> nn.Sequential:
    """nn.Sequential(Linear, GELU, Linear) in float64 holding these weights (the module PULSE runs)."""
    fc1, fc2 = nn.Linear(w1.shape[1], w1.shape[0]).double(), nn.Linear(w2.shape[1], w2.shape[0]).double()
    with torch.no_grad():
        for fc, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
            fc.weight.copy_(w.double())
            fc.bias.copy_(b.double())
    return nn.Sequential(fc1, nn.GELU(), fc2)


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_twins_compute_what_the_module_computes(dtype, gen) -> None:
    w1, b1, w2, b2 = _weights(gen, 64, 96, dtype)
    x = torch.randn(40, 64, generator=gen).to(dtype)
    exact = _sequential64(w1, b1, w2, b2)(x.double()).detach()
    assert _rel(reference.mlp2x_gelu_ref(x, w1, b1, w2, b2), exact) <= TWIN_BOUND[dtype]

    fc1, fc2 = _sequential64(w1, b1, w2, b2)[0].to(dtype), _sequential64(w1, b1, w2, b2)[2].to(dtype)
    q = quant.quantize_projector_int8(fc1, fc2)
    dequantized = _sequential64(quant.dequantize(q.w1, q.s1), b1, quant.dequantize(q.w2, q.s2), b2)
    int8 = reference.mlp2x_gelu_int8_ref(x, q.w1, q.s1, q.b1, q.w2, q.s2, q.b2)
    assert _rel(int8, dequantized(x.double()).detach()) <= TWIN_BOUND[dtype]

    f8 = quant.quantize_projector_fp8(fc1, fc2, x)
    fp8 = reference.mlp2x_gelu_fp8_ref(x, f8.x_scale, f8.w1, f8.s1, f8.b1, f8.h_scale, f8.w2, f8.s2, f8.b2)
    assert _rel(fp8, exact) <= FP8_TWIN_BOUND, f"seed {gen.initial_seed()}"


def test_int8_quantization_is_within_half_a_step(gen) -> None:
    w = torch.randn(32, 48, generator=gen)
    w[3] = 0.0  # a dead channel must not divide by zero
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= quant.INT8_MAX and torch.isfinite(s).all()
    assert ((quant.dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()


def test_fp8_casts_saturate_instead_of_making_nan() -> None:
    out = quant.to_fp8(torch.tensor([1e6, -1e6, 448.0, 0.5]))
    assert out.float().tolist() == [448.0, -448.0, 448.0, 0.5]


def _tiny_copy(tiny_pipeline: TorchPipeline) -> nn.Module:
    return copy.deepcopy(tiny_pipeline.model)  # the session fixture's model stays untouched


def test_fusing_keeps_weights_keys_and_output(tiny_pipeline: TorchPipeline, gen) -> None:
    model = _tiny_copy(tiny_pipeline)
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    pixels = torch.randn(2, 3, 336, 336, generator=gen)
    with torch.no_grad():
        expected = model.vision_features(pixels)
        fused = fuse_projector(model)
        assert model.mm_projector is fused and isinstance(fused, FusedProjector)
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
        assert model.dtype == torch.float32  # PulseReference reads mm_projector[0].weight
        torch.testing.assert_close(model.vision_features(pixels), expected, rtol=1e-5, atol=1e-5)
        plain = unfuse_projector(model)
    assert type(plain) is nn.Sequential and plain[0] is fused[0] and plain[2] is fused[2]
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before


def test_quantized_fusing_adds_no_state_dict_keys(tiny_pipeline: TorchPipeline, gen) -> None:
    model = _tiny_copy(tiny_pipeline)
    keys = set(model.state_dict())
    fuse_projector(model, precision="int8")
    assert set(model.state_dict()) == keys
    features = torch.randn(7, model.cfg.mm_hidden_size, generator=gen)
    fused = fuse_projector(model, precision="fp8", calibration=features)  # re-fusing replaces the first
    assert fused.precision == "fp8" and type(fused[0]) is nn.Linear
    assert model.mm_projector(features).shape == (7, model.cfg.text.hidden_size)


def test_fusing_refuses_what_it_cannot_do(tiny_pipeline: TorchPipeline) -> None:
    model = _tiny_copy(tiny_pipeline)
    with pytest.raises(ConfigError, match="calibration"):
        fuse_projector(model, precision="fp8")
    with pytest.raises(ConfigError, match="precision 'int4'"):
        fuse_projector(model, precision="int4")
    model.mm_projector = nn.Sequential(nn.Linear(48, 64), nn.GELU(approximate="tanh"), nn.Linear(64, 64))
    with pytest.raises(ConfigError, match="not mlp2x_gelu"):
        fuse_projector(model)


def test_torch_backend_keeps_the_plain_projector_on_cpu(tiny_pipeline: TorchPipeline) -> None:
    assert tiny_pipeline.projector is not None and not tiny_pipeline.projector.fused
    assert "CUDA GPU" in tiny_pipeline.projector.reason
    assert type(tiny_pipeline.model.mm_projector) is nn.Sequential
    assert not projector_choice(CPU, torch.float16).fused
    assert _projector(_tiny_copy(tiny_pipeline), wanted=False).reason == "not asked for"


def test_importing_the_kernels_does_not_import_triton() -> None:
    """triton is optional: pulse_edge.kernels imports it only when a kernel is about to run. (torch's own
    dynamo imports it where it is installed, so the torch backend is not checked here.)"""
    import subprocess
    import sys

    code = ("import sys, pulse_edge.kernels.projector, pulse_edge.kernels.preprocess; "
            "assert 'triton' not in sys.modules, 'triton was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_weights_of_the_wrong_type_are_refused(gen) -> None:
    from pulse_edge.kernels.projector import mlp2x_gelu_int8

    w1, b1, w2, b2 = _weights(gen, 8, 12, torch.float16)
    with pytest.raises(ValueError, match=r"weights are torch\.float32"):
        mlp2x_gelu(torch.randn(3, 8).half(), w1.float(), b1, w2.float(), b2)
    with pytest.raises(ValueError, match=r"takes torch\.int8"):
        mlp2x_gelu_int8(torch.randn(3, 8).half(), w1, torch.ones(12), b1, w2, torch.ones(12), b2)
    with pytest.raises(ConfigError, match="fp16 or bf16"):
        dispatch.choose("interpret", CPU, torch.float32)
