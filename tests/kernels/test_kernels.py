"""The Triton kernels against their plain-torch twins (kernels/reference.py).

Two backends run the same checks: `interpret` (Triton's CPU interpreter, tiny shapes, everywhere
triton is installed) and `triton` (the compiled kernels at PULSE's shapes, `gpu` marker). The
interpreted kernels are a separate module object built by dispatch.kernel_source(interpret=True),
so nothing here sets TRITON_INTERPRET for the rest of the session.

Inputs are fresh random draws on every run; each failure message carries the seed. Bounds are on
||out - ref|| / ||ref|| against the twin, per stored dtype, with u its unit roundoff (fp16 2^-11,
bf16 2^-8, e4m3 2^-4). Kernel and twin differ only in the order of fp32 sums, which can flip the last
bit of a stored value: 4u covers that with a wide margin. Checked separately: each twin computes what
nn.Sequential(Linear, GELU, Linear) computes, in float64 (test_kernels_dispatch.py).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton", reason="triton not installed: pip install -e .[kernels]")

import torch
from PIL import Image

from pulse_edge.kernels import launch, quant, reference
from pulse_edge.kernels.dispatch import cuda_capability, kernel_source
from pulse_edge.kernels.preprocess import normalize_tiles
from pulse_edge.kernels.projector import mlp2x_gelu, run_fp8, run_int8
from pulse_edge.runtime.image.preprocess import CLIP_MEAN, CLIP_STD, ImageLayout, normalize

BOUND = {torch.float16: 4 * 2.0**-11, torch.bfloat16: 4 * 2.0**-8}
FP8_BOUND = 2.0**-5  # h is stored in e4m3 (u = 2^-4): a flipped h value moves y by far less than this
FP8_MIN_CAPABILITY = (8, 9)

# (tokens, in, hidden): block multiples for the interpreter's 16 x 32 x 32 blocks, then masked on every side
INTERPRETED_SHAPES = [(48, 64, 96), (37, 72, 100)]
PULSE_SHAPES = [(576, 1024, 4096), (2880, 1024, 4096)]

BACKENDS = [
    pytest.param(("interpret", "cpu", INTERPRETED_SHAPES), id="interpret"),
    pytest.param(("triton", "cuda", PULSE_SHAPES), id="gpu", marks=pytest.mark.gpu),
]
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> tuple[str, str, list[tuple[int, int, int]]]:
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh seed per test (printed by rel_error's message on failure)."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype, device: str, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out.float()).all(), "non-finite output: an element was not written, or overflowed"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def projector_weights(gen: torch.Generator, k: int, h: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """w1, b1, w2, b2 scaled like trained Linear layers (unit-variance outputs for unit-variance inputs)."""
    return [randn(gen, h, k, dtype=dtype, device=device, scale=k**-0.5),
            randn(gen, h, dtype=dtype, device=device, scale=0.1),
            randn(gen, h, h, dtype=dtype, device=device, scale=h**-0.5),
            randn(gen, h, dtype=dtype, device=device, scale=0.1)]


def linears(w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor) -> tuple[torch.nn.Linear, ...]:
    fc1, fc2 = torch.nn.Linear(w1.shape[1], w1.shape[0]), torch.nn.Linear(w2.shape[1], w2.shape[0])
    with torch.no_grad():
        for fc, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
            fc.to(device=w.device, dtype=w.dtype)
            fc.weight.copy_(w)
            fc.bias.copy_(b)
    return fc1, fc2


def _source(impl: str):
    return kernel_source(impl == "interpret")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "plain"])
def test_linear_writes_every_element_and_matches_the_twin(backend, dtype, gelu, gen) -> None:
    impl, device, shapes = backend
    for m, k, n in shapes:
        a = randn(gen, m, k, dtype=dtype, device=device)
        w, bias = randn(gen, n, k, dtype=dtype, device=device, scale=k**-0.5), randn(gen, n, dtype=dtype,
                                                                                      device=device)
        poisoned = torch.full((m, n), float("nan"), dtype=dtype, device=device)
        out = launch.linear(_source(impl), a, w, bias, out_dtype=dtype, gelu=gelu, out=poisoned)
        err = rel_error(out, reference.linear_ref(a, w, bias, out_dtype=dtype, gelu=gelu))
        assert err <= BOUND[dtype], f"{(m, k, n)} error {err:.2e} > {BOUND[dtype]:.2e} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp2x_gelu_matches_the_twin_on_batched_strided_input(backend, dtype, gen) -> None:
    impl, device, shapes = backend
    for tokens, k, h in shapes:
        # [tiles, 1 + patches, K] with the CLS row sliced off, as PulseReference.vision_features does
        hidden = randn(gen, 2, tokens // 2 + 1, k, dtype=dtype, device=device)[:, 1:]
        weights = projector_weights(gen, k, h, dtype, device)
        out = mlp2x_gelu(hidden, *weights, impl=impl)
        assert out.shape == (*hidden.shape[:-1], h)
        err = rel_error(out, reference.mlp2x_gelu_ref(hidden, *weights))
        assert err <= BOUND[dtype], f"{(tokens, k, h)} error {err:.2e} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_weight_only_matches_the_twin(backend, dtype, gen) -> None:
    impl, device, shapes = backend
    for tokens, k, h in shapes:
        x = randn(gen, tokens, k, dtype=dtype, device=device)
        weights = quant.quantize_projector_int8(*linears(*projector_weights(gen, k, h, dtype, device)))
        err = rel_error(run_int8(x, weights, impl=impl), run_int8(x, weights, impl="reference"))
        assert err <= BOUND[dtype], f"{(tokens, k, h)} error {err:.2e} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("impl", ["reference", "interpret"])
def test_a_per_tensor_weight_scale_is_refused_by_the_twin_and_the_kernel_alike(impl: str, gen) -> None:
    """The kernel reads one weight scale per output channel (masked by N only): a [1] scale would be read past its
    end there while the twin broadcast it as per-tensor. Both refuse it, as they refuse per-channel x / h scales."""
    from dataclasses import replace

    x = randn(gen, 5, 16, dtype=torch.float16, device="cpu")
    weights = quant.quantize_projector_int8(*linears(*projector_weights(gen, 16, 12, torch.float16, "cpu")))
    with pytest.raises(ValueError, match=r"s1 \(1,\) is not one scale per output channel \[12\]"):
        run_int8(x, replace(weights, s1=weights.s1[:1].contiguous()), impl=impl)
    flat = x.reshape(-1, 16)
    with pytest.raises(ValueError, match=r"the weight scale \(1,\) is not one per output channel"):
        launch.linear(kernel_source(True), flat, weights.w1, weights.b1, out_dtype=torch.float16,
                      w_scale=weights.s1[:1].contiguous())
    with pytest.raises(ValueError, match="the activation and output scales are one number each"):
        launch.linear(kernel_source(True), flat, weights.w1, weights.b1, out_dtype=torch.float16,
                      w_scale=weights.s1, a_scale=torch.ones(12))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_matches_the_twin(backend, dtype, gen) -> None:
    impl, device, shapes = backend
    if device == "cuda" and cuda_capability(torch.device("cuda")) < FP8_MIN_CAPABILITY:
        pytest.skip("fp8 E4M3 dots need compute capability 8.9 (Ada, Hopper)")
    for tokens, k, h in shapes:
        x = randn(gen, tokens, k, dtype=dtype, device=device)
        weights = quant.quantize_projector_fp8(*linears(*projector_weights(gen, k, h, dtype, device)), x)
        err = rel_error(run_fp8(x, weights, impl=impl), run_fp8(x, weights, impl="reference"))
        assert err <= FP8_BOUND, f"{(tokens, k, h)} error {err:.2e} (seed {gen.initial_seed()})"


def _identity_gemm(impl: str, device: str, values: torch.Tensor, out_dtype: torch.dtype,
                   out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """values [M, 64] through a GEMM with the identity: the kernel's store rounding alone is left."""
    width = values.shape[1]
    eye = torch.eye(width, dtype=values.dtype, device=device)
    zero = torch.zeros(width, dtype=values.dtype, device=device)
    return launch.linear(_source(impl), values.to(device), eye, zero, out_dtype=out_dtype, out_scale=out_scale)


def _rows_of_64(values: torch.Tensor) -> torch.Tensor:
    pad = (-values.numel()) % 64
    return torch.cat([values, values[:pad]]).reshape(-1, 64)


def test_fp8_store_rounds_to_nearest_even_and_saturates_like_torch(backend) -> None:
    impl, device, _ = backend
    if device == "cuda" and cuda_capability(torch.device("cuda")) < FP8_MIN_CAPABILITY:
        pytest.skip("fp8 E4M3 needs compute capability 8.9 (Ada, Hopper)")
    grid = torch.arange(0, 127, dtype=torch.uint8).view(quant.FP8_DTYPE).float()  # every finite e4m3 >= 0
    mids = (grid[1:] + grid[:-1]) / 2  # the ties: exact in fp16
    near = torch.cat([mids * (1 - 2.0**-10), mids * (1 + 2.0**-10)])  # fp16 neighbours of the ties
    values = torch.cat([grid, mids, near, torch.tensor([460.0, 1000.0, 2.0**-10])])  # saturate; tie with 0
    values = _rows_of_64(torch.cat([values, -values]).half())
    out = _identity_gemm(impl, device, values, quant.FP8_DTYPE, out_scale=torch.ones((), device=device))
    expected = quant.to_fp8(values.float() + 0.0)  # a sum turns -0 into +0: so does the GEMM
    assert torch.equal(out.cpu().view(torch.uint8), expected.view(torch.uint8))


def test_bf16_store_rounds_to_nearest_even_like_torch(backend, gen) -> None:
    impl, device, _ = backend
    values = _rows_of_64(torch.randn(4096, generator=gen).half())  # 11-bit significands: 1 in 8 is a bf16 tie
    out = _identity_gemm(impl, device, values, torch.bfloat16)
    assert torch.equal(out.cpu(), values.float().to(torch.bfloat16)), f"seed {gen.initial_seed()}"


TILE_BOUND = {torch.float16: 2.0**-9, torch.bfloat16: 2.0**-6, torch.float32: 1e-5}  # 1 ulp at |v| < 2.7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_normalize_tiles_matches_the_twin_and_the_lean_runtime(backend, dtype, gen) -> None:
    impl, device, _ = backend
    for shape in ((1, 336, 336, 3), (3, 20, 23, 3)):  # a real tile; an odd size for the masks
        tiles = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        out = normalize_tiles(tiles.to(device), dtype=dtype, impl=impl).cpu()
        twin = reference.normalize_tiles_ref(tiles, CLIP_MEAN, CLIP_STD, dtype)
        lean = normalize([Image.fromarray(t.numpy()) for t in tiles], ImageLayout())
        assert out.shape == (shape[0], 3, shape[1], shape[2])
        assert (out.float() - twin.float()).abs().max() <= TILE_BOUND[dtype], f"seed {gen.initial_seed()}"
        assert (out.float() - torch.from_numpy(lean)).abs().max() <= TILE_BOUND[dtype]


@pytest.mark.parametrize("precision", ["native", "int8", "fp8"])
def test_fused_projector_module_runs_the_kernels(backend, precision, gen) -> None:
    from pulse_edge.kernels.fused_module import fuse_projector, unfuse_projector

    impl, device, shapes = backend
    if precision == "fp8" and device == "cuda" and cuda_capability(torch.device("cuda")) < FP8_MIN_CAPABILITY:
        pytest.skip("fp8 E4M3 dots need compute capability 8.9 (Ada, Hopper)")
    tokens, k, h = shapes[-1]
    model = torch.nn.Module()
    model.mm_projector = torch.nn.Sequential(*linears(*projector_weights(gen, k, h, torch.float16, device)))
    model.mm_projector.insert(1, torch.nn.GELU())
    x = randn(gen, 2, tokens, k, dtype=torch.float16, device=device)
    fused = fuse_projector(model, precision=precision, impl=impl, calibration=x)
    out = model.mm_projector(x)
    fused.impl = "reference"
    bound = FP8_BOUND if precision == "fp8" else BOUND[torch.float16]
    assert rel_error(out, model.mm_projector(x)) <= bound, f"seed {gen.initial_seed()}"
    assert type(unfuse_projector(model)) is torch.nn.Sequential


def test_the_interpreter_variable_does_not_leak(backend) -> None:
    impl, device, _ = backend
    before = os.environ.get("TRITON_INTERPRET")
    kernel_source(impl == "interpret")
    normalize_tiles(torch.zeros(1, 4, 4, 3, dtype=torch.uint8, device=device), impl=impl)
    assert os.environ.get("TRITON_INTERPRET") == before
    assert launch.is_interpreted(kernel_source(True)) and not launch.is_interpreted(kernel_source(False))


@pytest.mark.gpu
def test_torch_backend_fuses_the_projector_on_a_gpu(tiny_checkpoint, ecg_png) -> None:
    from pulse_edge.export.model.torch_backend import TorchPipeline
    from pulse_edge.kernels.fused_module import FusedProjector
    from pulse_edge.runtime.inputs.images import load_image

    pipe = TorchPipeline.from_checkpoint(tiny_checkpoint, dtype="fp16", device="cuda")
    assert pipe.projector is not None and pipe.projector.fused, pipe.projector
    assert isinstance(pipe.model.mm_projector, FusedProjector)
    assert pipe.generate(load_image(ecg_png), "Rate?", max_new_tokens=4).token_ids
