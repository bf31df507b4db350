"""The torch backend on CUDA against the CPU reference, and the fused projector inside it (`gpu` marker).

The tiny checkpoint's logits are decisive (export/fixtures/tiny.py scales its weights so that greedy choices are
not near-ties): on a CPU its bf16 and fp16 runs give exactly the fp32 greedy tokens, 24 per print on these three
prints, so the CUDA runs must too, in every dtype, with the fused Triton projector where it runs (fp16, bf16).
TF32 is switched off for the fp32 run (cuDNN allows it for convolutions by default: CLIP's patch embedding).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pulse_edge.export.model.torch_backend import TorchEngine, TorchPipeline
from pulse_edge.runtime.ecg.render import render_ecg
from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
from pulse_edge.runtime.image.preprocess import preprocess

pytestmark = pytest.mark.gpu

QUESTION = "What is the rhythm?"
# Fused vs plain torch projector inside the backend: kernel vs cuBLAS rounding (h rounded after the GELU, not
# before it), a few units of roundoff u; a wrong weight, layout or mask is off by O(1).
FEATURE_BOUND = {"fp16": 16 * 2.0**-11, "bf16": 16 * 2.0**-8}


@pytest.fixture(scope="module")
def prints() -> list[Image.Image]:
    return [render_ecg(synthesize_ecg(r, seed=s), width_px=w, height_px=h)
            for r, s, (w, h) in (("sinus", 11, (2200, 1700)), ("afib", 12, (3300, 2550)),
                                 ("bradycardia", 13, (1700, 2200)))]


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_cuda_greedy_tokens_equal_the_cpu_reference(tiny_checkpoint, tiny_pipeline, prints, dtype, no_tf32) -> None:
    pipe = TorchPipeline.from_checkpoint(tiny_checkpoint, dtype=dtype, device="cuda")
    assert pipe.model.device.type == "cuda"
    for image in prints:
        ours = pipe.generate(image, QUESTION, max_new_tokens=24)
        ref = tiny_pipeline.generate(image, QUESTION, max_new_tokens=24)
        assert ours.token_ids == ref.token_ids, f"{dtype} on CUDA ({pipe.projector})"
        assert (ours.image_tokens, ours.prompt_tokens, ours.text) == (ref.image_tokens, ref.prompt_tokens, ref.text)


def test_cuda_multi_turn_chat_equals_the_cpu_reference(tiny_checkpoint, tiny_pipeline, prints) -> None:
    pipe = TorchPipeline.from_checkpoint(tiny_checkpoint, dtype="fp16", device="cuda")
    ours, ref = pipe.chat(), tiny_pipeline.chat()
    for question, kwargs in ((QUESTION, {"image": prints[0]}), ("And the rate?", {}), ("Axis?", {})):
        assert ours.ask(question, max_new_tokens=6, **kwargs).token_ids == \
            ref.ask(question, max_new_tokens=6, **kwargs).token_ids


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_fused_projector_inside_the_backend_matches_plain_torch(tiny_checkpoint, prints, dtype) -> None:
    pytest.importorskip("triton", reason="triton not installed: pip install -e .[kernels]")
    from pulse_edge.kernels.fused_module import FusedProjector, unfuse_projector

    pipe = TorchPipeline.from_checkpoint(tiny_checkpoint, dtype=dtype, device="cuda")
    assert pipe.projector is not None and pipe.projector.impl == "triton", pipe.projector
    assert isinstance(pipe.model.mm_projector, FusedProjector)
    engine = TorchEngine(pipe.model)
    pre = preprocess(prints[0], pipe.loaded.config.image)
    fused = engine.image_features(pre)  # [2880, H]
    unfuse_projector(pipe.model)
    plain = engine.image_features(pre)
    assert fused.shape == plain.shape == (pre.num_image_tokens, pipe.model.cfg.text.hidden_size)
    assert torch.isfinite(fused.float()).all()
    err = ((fused.float() - plain.float()).norm() / plain.float().norm()).item()
    assert err <= FEATURE_BOUND[dtype], f"{dtype}: fused vs plain projector rel err {err:.2e}"
