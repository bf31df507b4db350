"""An fp16 bundle on ONNX Runtime's CUDA and TensorRT providers against the same bundle on the CPU provider.

They need onnxruntime-gpu (`gpu` marker; TensorRT also the `tensorrt` marker): each test skips with its reason
where this onnxruntime lacks the provider (the CPU build has neither). The tiny model's logits are decisive
(tests/export/test_torch_cuda.py), so greedy tokens must be equal, not merely close.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from pulse_edge.export.build.bundle import ExportOptions, export_bundle
from pulse_edge.runtime.ecg.render import render_ecg
from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
from pulse_edge.runtime.engines.ort import ORT_PROVIDERS, SessionConfig
from pulse_edge.runtime.pipeline import Pipeline

ort = pytest.importorskip("onnxruntime")


def _lacks(provider: str) -> pytest.MarkDecorator:
    name = ORT_PROVIDERS[provider]
    return pytest.mark.skipif(name not in ort.get_available_providers(),
                              reason=f"onnxruntime {ort.__version__} has no {name} (available: "
                                     f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu")


@pytest.fixture(scope="module")
def fp16_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "fp16", ExportOptions(precision="fp16"))


def _prints() -> list[Image.Image]:
    return [render_ecg(synthesize_ecg(r, seed=s), width_px=w, height_px=h)
            for r, s, (w, h) in (("sinus", 11, (2200, 1700)), ("afib", 12, (3300, 2550)))]


def _greedy_tokens_equal_cpu(bundle: Path, provider: str) -> None:
    gpu = Pipeline.from_bundle(bundle, session=SessionConfig(provider=provider))
    for runner in (gpu.engine.vision, gpu.engine.decoder):
        assert runner.session.get_providers()[0] == ORT_PROVIDERS[provider], runner.session.get_providers()
    cpu = Pipeline.from_bundle(bundle)
    for image in _prints():
        ours = gpu.generate(image, "What is the rhythm?", max_new_tokens=16)
        ref = cpu.generate(image, "What is the rhythm?", max_new_tokens=16)
        assert ours.token_ids == ref.token_ids, provider
        assert (ours.image_tokens, ours.prompt_tokens) == (ref.image_tokens, ref.prompt_tokens)


@pytest.mark.gpu
@_lacks("cuda")
def test_cuda_provider_greedy_tokens_equal_the_cpu_provider(fp16_bundle: Path) -> None:
    _greedy_tokens_equal_cpu(fp16_bundle, "cuda")


@pytest.mark.gpu
@pytest.mark.tensorrt
@_lacks("tensorrt")
def test_tensorrt_provider_greedy_tokens_equal_the_cpu_provider(fp16_bundle: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # engines built for this test stay in its folder
    _greedy_tokens_equal_cpu(fp16_bundle, "tensorrt")
