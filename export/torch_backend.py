"""The `torch` backend: the reference model serving one ECG image and question.

    image -> preprocess (runtime) -> vision_features -> merge -> embed + splice
          -> prefill (KV cache) -> decode_one_token ... (runtime.decode_loop)

Preprocessing, prompt, sampling and the stop rules are the lean runtime's own,
so this backend and the ONNX runtime differ only in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, LlamaForCausalLM

from pulse_edge.errors import ConfigError, PromptError
from pulse_edge.export.checkpoint import LoadedCheckpoint, load_checkpoint
from pulse_edge.export.tokenizer_convert import convert_sentencepiece
from pulse_edge.runtime.generation import decode_loop
from pulse_edge.runtime.preprocess import preprocess
from pulse_edge.runtime.prompt import DEFAULT_QUESTION, Turn, prompt_ids, spliced_length
from pulse_edge.runtime.result import GenerationResult, Timings, decode_rate
from pulse_edge.runtime.sampling import Sampler, SamplingParams
from pulse_edge.runtime.tokenizer import StreamDecoder, Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on a GPU (the paper's setting) and fp32 on a CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


@torch.inference_mode()
def prefill(lm: LlamaForCausalLM, embeds: torch.Tensor) -> tuple[torch.Tensor, DynamicCache]:
    """Run the whole prompt once; returns the last position's logits [V] and the filled cache."""
    cache = DynamicCache(config=lm.config)
    out = lm(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)  # [1, 1, V]
    return out.logits[0, -1], out.past_key_values


@torch.inference_mode()
def decode_one_token(lm: LlamaForCausalLM, token: int, cache: DynamicCache) -> torch.Tensor:
    """Feed one token at the next position; returns the logits [V] for the position after it."""
    ids = torch.tensor([[token]], device=lm.device)
    out = lm(input_ids=ids, past_key_values=cache, use_cache=True)
    return out.logits[0, -1]


def _logits_to_numpy(logits: torch.Tensor) -> np.ndarray:
    return logits.float().cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TorchPipeline:
    """A loaded checkpoint ready to answer questions about ECG images."""

    loaded: LoadedCheckpoint
    tokenizer: Tokenizer

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, vision_tower: str | Path | None = None, dtype: str = "auto",
                        device: str = "auto") -> TorchPipeline:
        dev = resolve_device(device)
        loaded = load_checkpoint(path, vision_tower=vision_tower, dtype=resolve_dtype(dtype, dev), device=dev)
        tok = Tokenizer.from_tokenizers(convert_sentencepiece(loaded.tokenizer_model),
                                        bos_id=loaded.config.text.bos_id, eos_id=loaded.config.text.eos_id)
        return cls(loaded=loaded, tokenizer=tok)

    @property
    def model(self):
        return self.loaded.model

    def generate(self, image: Image.Image, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Answer one question about one image; `on_text` receives text as it is generated."""
        cfg, model = self.loaded.config, self.loaded.model
        device = model.device
        t0 = time.perf_counter()
        pre = preprocess(image, cfg.image)
        ids = prompt_ids([Turn(question)], self.tokenizer)
        length = spliced_length(ids, pre.num_image_tokens)
        room = cfg.text.max_position_embeddings - length
        if room < 1:
            raise PromptError(f"the prompt takes {length} positions ({pre.num_image_tokens} for the image) but the "
                              f"context holds {cfg.text.max_position_embeddings}; shorten the question")
        t1 = time.perf_counter()
        with torch.inference_mode():
            features = model.merge(model.vision_features(torch.from_numpy(pre.pixel_values)), pre.image_size)
            _sync(device)
        if features.shape[0] != pre.num_image_tokens:
            raise RuntimeError(f"merge produced {features.shape[0]} image tokens, preprocessing "
                               f"counted {pre.num_image_tokens}")
        t2 = time.perf_counter()
        with torch.inference_mode():
            logits, cache = prefill(model.language_model, model.embed(ids, features))
            first = _logits_to_numpy(logits)
        t3 = time.perf_counter()
        stream = StreamDecoder(self.tokenizer)

        def emit(token: int) -> None:
            if on_text is not None and token != self.tokenizer.eos_id:
                piece = stream.push(token)
                if piece:
                    on_text(piece)

        def step(token: int) -> np.ndarray:
            return _logits_to_numpy(decode_one_token(model.language_model, token, cache))

        outcome = decode_loop(first, step, sampler=Sampler(sampling or SamplingParams()),
                              eos_id=self.tokenizer.eos_id, max_new_tokens=max_new_tokens, room=room, on_token=emit)
        if on_text is not None:
            tail = stream.flush()
            if tail:
                on_text(tail)
        generated = outcome.token_ids
        timings = Timings(
            preprocess_ms=(t1 - t0) * 1e3, vision_ms=(t2 - t1) * 1e3, prefill_ms=(t3 - t2) * 1e3,
            decode_ms=outcome.decode_ms, decode_tokens_per_s=decode_rate(len(generated) - 1, outcome.decode_ms),
            time_to_first_token_ms=(t3 - t0) * 1e3,
        )
        return GenerationResult(
            text=self.tokenizer.decode([t for t in generated if t != self.tokenizer.eos_id]),
            token_ids=generated, image_tokens=pre.num_image_tokens, prompt_tokens=length,
            generated_tokens=len(generated), stop_reason=outcome.stop_reason, timings=timings, backend="torch",
        )
