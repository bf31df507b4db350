"""The torch reference: vision features, the splice, and generation with the KV cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from pulse_edge.export.fixtures.tiny import TOWER_DIR
from pulse_edge.export.model.torch_backend import TorchPipeline, decode_one_token, prefill
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.image.preprocess import preprocess
from pulse_edge.runtime.inputs.images import load_image
from pulse_edge.runtime.text.prompt import IMAGE_SLOT, Turn, prompt_ids


def _checkpoint_tensor(root: Path, key: str) -> torch.Tensor:
    for shard in root.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        if key in tensors:
            return tensors[key]
    raise KeyError(key)


def test_vision_features_are_the_second_to_last_layer_patch_tokens(tiny_checkpoint: Path,
                                                                    tiny_pipeline: TorchPipeline) -> None:
    """Independent path: the full CLIP tower from its own directory, hidden_states[-2], CLS dropped,
    then the projector written out with torch.nn.functional."""
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tiny_checkpoint / TOWER_DIR).eval()
    pixels = torch.randn(3, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    w1, b1, w2, b2 = (_checkpoint_tensor(tiny_checkpoint, f"model.mm_projector.{k}")
                      for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    with torch.inference_mode():
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        expected = F.linear(F.gelu(F.linear(hidden, w1, b1)), w2, b2)
        got = tiny_pipeline.model.vision_features(pixels)
    assert got.shape == (3, 576, tiny_pipeline.loaded.config.text.hidden_size)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_splice_puts_image_features_exactly_at_the_slot(tiny_pipeline: TorchPipeline) -> None:
    model = tiny_pipeline.model
    ids = prompt_ids([Turn("What is the rhythm?")], tiny_pipeline.tokenizer)
    slot = ids.index(IMAGE_SLOT)
    features = torch.randn(7, model.cfg.text.hidden_size)
    with torch.inference_mode():
        embeds = model.embed(ids, features)[0]
        table = model.language_model.get_input_embeddings().weight
    assert embeds.shape[0] == len(ids) - 1 + 7
    torch.testing.assert_close(embeds[:slot], table[ids[:slot]])
    torch.testing.assert_close(embeds[slot:slot + 7], features)
    torch.testing.assert_close(embeds[slot + 7:], table[ids[slot + 1:]])


def _prompt_embeds(pipeline: TorchPipeline, image: Image.Image, question: str) -> torch.Tensor:
    model = pipeline.model
    pre = preprocess(image, model.cfg.image)
    with torch.inference_mode():
        features = model.merge(model.vision_features(torch.from_numpy(pre.pixel_values)), pre.image_size)
        return model.embed(prompt_ids([Turn(question)], pipeline.tokenizer), features)


def _greedy_without_cache(pipeline: TorchPipeline, embeds: torch.Tensor, steps: int) -> list[int]:
    """Recompute the whole sequence at every step: no KV cache at all."""
    lm = pipeline.model.language_model
    table = lm.get_input_embeddings()
    tokens: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = lm(inputs_embeds=embeds, use_cache=False).logits[0, -1]
            token = int(torch.argmax(logits))
            tokens.append(token)
            embeds = torch.cat([embeds, table(torch.tensor([[token]]))], dim=1)
    return tokens


@pytest.mark.parametrize("question", ["What is the rhythm?", "Is there ST elevation in V2?"])
def test_greedy_generation_equals_stepwise_decoding(tiny_pipeline: TorchPipeline, ecg_png: Path,
                                                   question: str) -> None:
    image = load_image(ecg_png)
    result = tiny_pipeline.generate(image, question, max_new_tokens=12)
    embeds = _prompt_embeds(tiny_pipeline, image, question)
    expected = _greedy_without_cache(tiny_pipeline, embeds, len(result.token_ids))
    assert result.token_ids == expected
    # and transformers' own generate() with its own cache agrees too
    with torch.inference_mode():
        hf = tiny_pipeline.model.language_model.generate(
            inputs_embeds=embeds, max_new_tokens=len(result.token_ids), do_sample=False,
            eos_token_id=None, pad_token_id=0)
    assert hf[0, -len(result.token_ids):].tolist() == result.token_ids


def test_cache_steps_match_full_recompute_logits(tiny_pipeline: TorchPipeline, ecg_png: Path) -> None:
    lm = tiny_pipeline.model.language_model
    embeds = _prompt_embeds(tiny_pipeline, load_image(ecg_png), "Rate?")
    with torch.inference_mode():
        first, cache = prefill(lm, embeds)
        second = decode_one_token(lm, 17, cache)
        full = lm(inputs_embeds=torch.cat([embeds, lm.get_input_embeddings()(torch.tensor([[17]]))], 1)).logits
    torch.testing.assert_close(first, full[0, -2], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(second, full[0, -1], rtol=1e-4, atol=1e-4)


def test_generation_result_counts_and_stops(tiny_pipeline: TorchPipeline, ecg_png: Path) -> None:
    result = tiny_pipeline.generate(load_image(ecg_png), "Describe.", max_new_tokens=5)
    assert result.image_tokens == 2880  # 2200x1700 -> 672x672 grid: 4 tiles + base
    ids = prompt_ids([Turn("Describe.")], tiny_pipeline.tokenizer)
    assert result.prompt_tokens == len(ids) - 1 + 2880
    assert result.generated_tokens == len(result.token_ids) <= 5
    assert result.stop_reason in ("eos", "max_new_tokens")
    assert result.timings.vision_ms > 0 and result.timings.prefill_ms > 0


def test_streamed_text_equals_final_text(tiny_pipeline: TorchPipeline, ecg_png: Path) -> None:
    pieces: list[str] = []
    result = tiny_pipeline.generate(load_image(ecg_png), "Report.", max_new_tokens=20, on_text=pieces.append)
    assert "".join(pieces) == result.text


def test_sampling_is_reproducible_by_seed(tiny_pipeline: TorchPipeline, ecg_png: Path) -> None:
    image = load_image(ecg_png)
    runs = [tiny_pipeline.generate(image, "Rate?", max_new_tokens=10,
                                   sampling=SamplingParams(temperature=1.5, seed=s)).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_low_precision_tracks_fp32(tiny_checkpoint: Path, ecg_png: Path) -> None:
    image = load_image(ecg_png)
    logits = {}
    for dtype in ("fp32", "bf16"):
        pipe = TorchPipeline.from_checkpoint(tiny_checkpoint, dtype=dtype, device="cpu")
        with torch.inference_mode():
            first, _ = prefill(pipe.model.language_model, _prompt_embeds(pipe, image, "Rate?"))
        logits[dtype] = first.float().numpy()
    a, b = logits["fp32"], logits["bf16"]
    cosine = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    assert cosine > 0.99
