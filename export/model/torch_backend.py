"""The `torch` backend: the reference model serving one ECG image and question.

    image -> preprocess (runtime) -> vision_features -> merge -> embed + splice
          -> prefill (KV cache) -> decode_one_token ... (runtime.Conversation)

Preprocessing, prompt, sampling, the stop rules and the timings are the lean
runtime's own (`runtime.conversation`), so this backend and the ONNX runtime
differ only in the engine.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache, LlamaForCausalLM

from pulse_edge.choices import TORCH_DEVICES, is_torch_device
from pulse_edge.errors import ConfigError
from pulse_edge.export.model.checkpoint import LoadedCheckpoint, load_checkpoint
from pulse_edge.export.model.reference import PulseReference
from pulse_edge.export.model.tokenizer_convert import convert_sentencepiece
from pulse_edge.kernels.dispatch import Choice
from pulse_edge.kernels.fused_module import fuse_projector, projector_choice
from pulse_edge.runtime.generation.conversation import Conversation
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.image.preprocess import Preprocessed
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION
from pulse_edge.runtime.text.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# transformers 5.x renamed the decoder's `past_key_values` argument to `cache` (the old name warns); both
# versions take the cache under the name their forward declares.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if not is_torch_device(name):
        raise ConfigError(f"device {name!r} is not one of {', '.join(TORCH_DEVICES)} or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: torch sees {torch.cuda.device_count()} GPU(s) (cuda:0 is the first)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on a GPU (the paper's setting) and fp32 on a CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# A model may carry its own cache type here for a while: export/validate/emulate.py's int8 KV cache, which
# stores keys and values as a bundle's int8 cache does.
CACHE_FACTORY_ATTR = "pulse_edge_cache_factory"


def new_cache(lm: LlamaForCausalLM) -> DynamicCache:
    """An empty KV cache for `lm`: a DynamicCache, or the one the model was given under CACHE_FACTORY_ATTR."""
    factory = getattr(lm, CACHE_FACTORY_ATTR, None)
    return factory() if factory is not None else DynamicCache(config=lm.config)


@torch.inference_mode()
def prefill(lm: LlamaForCausalLM, embeds: torch.Tensor,
            cache: DynamicCache | None = None) -> tuple[torch.Tensor, DynamicCache]:
    """Append a whole chunk of embeddings to the cache (a new one if None); returns the last logits [V]."""
    cache = cache if cache is not None else new_cache(lm)
    out = lm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache})  # [1, 1, V]
    return out.logits[0, -1], cache  # DynamicCache grows in place


@torch.inference_mode()
def decode_one_token(lm: LlamaForCausalLM, token: int, cache: DynamicCache) -> torch.Tensor:
    """Feed one token at the next position; returns the logits [V] for the position after it."""
    ids = torch.tensor([[token]], device=lm.device)
    out = lm(input_ids=ids, use_cache=True, **{CACHE_ARG: cache})
    return out.logits[0, -1]


def _logits_to_numpy(logits: torch.Tensor) -> np.ndarray:
    return logits.float().cpu().numpy()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _projector(model: PulseReference, wanted: bool) -> Choice:
    """Swap the fused projector in where projector_choice allows it; the choice is logged and returned."""
    choice = projector_choice(model.device, model.dtype) if wanted else Choice("reference", "not asked for")
    if choice.fused:
        fuse_projector(model)
    logger.info("vision projector: %s", choice.reason if choice.fused else f"plain torch ({choice.reason})")
    return choice


class TorchEngine:
    """The reference model behind the runtime's `Engine` protocol (DynamicCache as the KV cache)."""

    def __init__(self, model: PulseReference) -> None:
        self.model = model
        self.max_length = model.cfg.text.max_position_embeddings
        self.length, self.epoch = 0, 0
        self._cache: DynamicCache | None = None
        self.lock = threading.RLock()  # one per conversation's engine (TorchPipeline.chat makes one each)
        self.answering = False  # a conversation's question is running (runtime/generation/conversation.py)

    def reset(self) -> None:
        self.length, self._cache, self.epoch = 0, None, self.epoch + 1

    @torch.inference_mode()
    def image_features(self, pre: Preprocessed) -> torch.Tensor:
        features = self.model.merge(self.model.vision_features(torch.from_numpy(pre.pixel_values)), pre.image_size)
        _sync(self.model.device)
        if features.shape[0] != pre.num_image_tokens:
            raise RuntimeError(f"merge produced {features.shape[0]} image tokens, preprocessing "
                               f"counted {pre.num_image_tokens}")
        return features

    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], image_features: torch.Tensor | None,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """One pass (the reference is not chunked): `should_stop` has no chunk boundary to be asked at."""
        embeds = self.model.embed(ids, image_features)
        logits, self._cache = prefill(self.model.language_model, embeds, self._cache)
        self.length += embeds.shape[1]
        return _logits_to_numpy(logits)

    def step(self, token: int) -> np.ndarray:
        logits = decode_one_token(self.model.language_model, token, self._cache)
        self.length += 1
        return _logits_to_numpy(logits)


@dataclass
class TorchPipeline:
    """A loaded checkpoint ready to answer questions about ECG images."""

    loaded: LoadedCheckpoint
    tokenizer: Tokenizer
    projector: Choice | None = None  # what runs the vision projector, and why (None: not decided here)

    @classmethod
    def from_checkpoint(cls, path: str | Path, *, vision_tower: str | Path | None = None, dtype: str = "auto",
                        device: str = "auto", fused_projector: bool = True) -> TorchPipeline:
        """`fused_projector`: the Triton projector (kernels/projector.py) where it can run: CUDA, triton, fp16/bf16."""
        dev = resolve_device(device)
        loaded = load_checkpoint(path, vision_tower=vision_tower, dtype=resolve_dtype(dtype, dev), device=dev)
        tok = Tokenizer.from_tokenizers(convert_sentencepiece(loaded.tokenizer_model),
                                        bos_id=loaded.config.text.bos_id, eos_id=loaded.config.text.eos_id)
        return cls(loaded=loaded, tokenizer=tok, projector=_projector(loaded.model, fused_projector))

    @property
    def model(self) -> PulseReference:
        return self.loaded.model

    def chat(self) -> Conversation:
        """A multi-turn conversation; its first `ask` takes the image."""
        return Conversation(TorchEngine(self.model), self.tokenizer, self.loaded.config.image, backend="torch",
                            template=self.loaded.template)

    def generate(self, image: Image.Image, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        """Answer one question about one image; `on_text` receives text as it is generated."""
        return self.chat().ask(question, image, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)
