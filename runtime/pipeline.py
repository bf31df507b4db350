"""`Pipeline.from_bundle(dir)`: PULSE served from a bundle by ONNX Runtime, lean (numpy, pillow, tokenizers).

    image -> preprocess -> vision graph [K, 576, H] -> merge (flat: [K*576, H]; spatial_unpad: + newlines)
          -> table[ids] around the image slot = inputs_embeds [1, L, H]
          -> decoder graph (KV cache in place) -> logits -> sample -> table[token] -> ...

The token embedding table is a .npy file mapped into memory: a lookup reads
only the rows it needs, and the 500 MB table of the 7B model is never copied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.conversation import Conversation
from pulse_edge.runtime.manifest import Manifest, read_manifest
from pulse_edge.runtime.merge import MERGE_FUNCTIONS, ImageMerge
from pulse_edge.runtime.ort_engine import DecoderEngine, SessionConfig, VisionEngine, require_provider
from pulse_edge.runtime.preprocess import Preprocessed
from pulse_edge.runtime.prompt import DEFAULT_QUESTION, image_slot_index
from pulse_edge.runtime.result import GenerationResult
from pulse_edge.runtime.sampling import SamplingParams
from pulse_edge.runtime.tokenizer import Tokenizer

MERGES_SERVED = tuple(MERGE_FUNCTIONS)  # PULSE's flat, and LLaVA-1.6's spatial_unpad
# Measured on the real-width 2-layer fp32 bundle (2 vCPU EPYC, ORT 1.31 CPU), 2950-position prefill:
# one pass 6.2 s and +1.83 GiB peak; chunks of 512: 5.8 s and +0.37 GiB (attention's
# probabilities are held per chunk). None = one pass.
DEFAULT_PREFILL_CHUNK = 512
# Bundles whose recipe has no fp16 base yet: what a GPU user can do instead.
GPU_FIX = {"fp8": "the fp8 recipe keeps an fp32 base today, so it cannot be served on a GPU until it gets an "
                  "fp16 one; use an fp16 bundle there"}


def prefetch(path: Path) -> threading.Thread:
    """Read a file through once in a background thread, so that its pages are in the page cache before
    they are needed; returns the (daemon) thread.

    The embedding table is memory-mapped and each decode step reads one row of it: a row still on disk
    costs a read inside the token loop (measured on the real-width bundle after dropping the page cache:
    2.5-3.0 ms per step, 7.5-9% of the decode loop, against 0.1 ms warm). posix_fadvise(WILLNEED) read
    only the first 8 MB of the 500 MB table here, hence the plain read; vision and prefill take seconds,
    so it is done long before the first decode step."""
    def read_through() -> None:
        buffer = bytearray(8 << 20)
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        except OSError:  # only a warm-up: the lookups fault the rows in themselves
            return

    thread = threading.Thread(target=read_through, name="pulse-edge-prefetch", daemon=True)
    thread.start()
    return thread


def check_device(manifest: Manifest, config: SessionConfig) -> None:
    """Refuse a bundle the chosen provider cannot run natively, before any session is made."""
    needs = (manifest.calibration or {}).get("requires_compute_capability")
    if needs and config.provider == "cpu" and not config.emulate:
        raise ConfigError(f"this {manifest.precision} bundle needs a GPU of compute capability >= {needs} (Ada, "
                          "Hopper) through TensorRT or CUDA; ONNX Runtime's CPU EP only emulates it, for "
                          "validation. Use an int8 or int4 bundle on this device")
    # ORT registers GroupQueryAttention for CUDA in fp16 and bf16 only: an fp32 decoder would run attention
    # on the CPU EP, with the whole KV cache copied between host and device in every layer of every step.
    if config.provider in ("cuda", "tensorrt") and manifest.kv.dtype == "float32":
        fix = GPU_FIX.get(manifest.precision, "export it with --precision fp16 for a GPU")
        raise ConfigError(f"this {manifest.precision} bundle computes attention in fp32, which ONNX Runtime's CUDA "
                          f"kernels do not run (GroupQueryAttention is fp16/bf16 there); {fix}")


class OrtEngine:
    """The bundle's two graphs and embedding table behind the `Engine` protocol."""

    def __init__(self, bundle: Path, manifest: Manifest, config: SessionConfig, *,
                 prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> None:
        if manifest.image.merge not in MERGES_SERVED:
            raise ConfigError(f"this runtime serves the {', '.join(MERGES_SERVED)} merges; the bundle "
                              f"uses {manifest.image.merge!r}")
        if prefill_chunk is not None and prefill_chunk < 1:
            raise ConfigError(f"prefill chunk must be >= 1 token, got {prefill_chunk}")
        require_provider(config)  # first: on a machine without the provider, that is the whole story
        check_device(manifest, config)
        self.vision = VisionEngine(bundle, manifest.graphs["vision"], config)
        self.decoder = DecoderEngine(bundle, manifest.graphs["decoder"], manifest.kv, manifest.text.vocab_size,
                                     config)
        prefetch(bundle / manifest.embedding.file)
        self.table = np.load(bundle / manifest.embedding.file, mmap_mode="r")  # [V, H]
        self.merge = ImageMerge.from_bundle(bundle, manifest)
        self.max_length = manifest.kv.max_length
        self.prefill_chunk = prefill_chunk

    @property
    def length(self) -> int:
        return self.decoder.length

    def reset(self) -> None:
        self.decoder.reset()

    def image_features(self, pre: Preprocessed) -> np.ndarray:
        merged = self.merge(self.vision.run(pre.pixel_values), pre.image_size)  # [K, P, H] -> [T, H]
        # The prompt reserved num_image_tokens positions: any other length would shift the whole cache.
        if merged.shape[0] != pre.num_image_tokens:
            raise RuntimeError(f"the {self.merge.layout.merge} merge produced {merged.shape[0]} image tokens, "
                               f"preprocessing counted {pre.num_image_tokens}")
        return merged

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)  # [S, H]

    def prefill(self, ids: Sequence[int], image_features: np.ndarray | None) -> np.ndarray:
        if image_features is None:
            embeds = self.embed(ids)
        else:
            slot = image_slot_index(ids)
            embeds = np.concatenate([self.embed(ids[:slot]), image_features, self.embed(ids[slot + 1:])])
        chunk = self.prefill_chunk or embeds.shape[0]
        logits = None
        for start in range(0, embeds.shape[0], chunk):
            logits = self.decoder.forward(embeds[None, start:start + chunk])
        return logits.copy()  # the decoder reuses its logits buffer on the next run

    def step(self, token: int) -> np.ndarray:
        return self.decoder.forward(self.embed([token])[None])


@dataclass
class Pipeline:
    """A bundle loaded into ONNX Runtime, answering questions about ECG images."""

    bundle: Path
    manifest: Manifest
    tokenizer: Tokenizer
    engine: OrtEngine

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, session: SessionConfig | None = None,
                    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> Pipeline:
        root = Path(bundle)
        manifest = read_manifest(root)
        tokenizer = Tokenizer.from_file(root / manifest.tokenizer)
        if (tokenizer.bos_id, tokenizer.eos_id) != (manifest.text.bos_id, manifest.text.eos_id):
            raise ConfigError(f"{root}: the tokenizer's <s>/</s> ids differ from the manifest's; re-export the bundle")
        engine = OrtEngine(root, manifest, session or SessionConfig(), prefill_chunk=prefill_chunk)
        return cls(bundle=root, manifest=manifest, tokenizer=tokenizer, engine=engine)

    def chat(self) -> Conversation:
        """A multi-turn conversation (ECG Arena style); the cache is kept between its turns."""
        return Conversation(self.engine, self.tokenizer, self.manifest.image, backend="ort",
                            template=self.manifest.prompt)

    def generate(self, image: Image.Image, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        return self.chat().ask(question, image, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)
