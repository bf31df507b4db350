"""`Pipeline.from_bundle(dir)`: PULSE served from a bundle by the lean runtime (numpy, pillow, tokenizers, ORT).

    image -> preprocess -> engine (vision graph, merge, embeddings, decoder with its KV cache) -> sample -> text

The engine is a `BundleEngine` (runtime/engines/bundle_engine.py) whose graphs run in ONNX Runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle.integrity import HashProgress, check_bundle
from pulse_edge.runtime.bundle.manifest import Manifest, read_manifest
from pulse_edge.runtime.engines.bundle_engine import DEFAULT_PREFILL_CHUNK, BundleEngine
from pulse_edge.runtime.engines.ort import SessionConfig, open_ort_engine
from pulse_edge.runtime.generation.conversation import Conversation
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION
from pulse_edge.runtime.text.tokenizer import Tokenizer


@dataclass
class Pipeline:
    """A bundle loaded into ONNX Runtime, answering questions about ECG images."""

    bundle: Path
    manifest: Manifest
    tokenizer: Tokenizer
    engine: BundleEngine

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, session: SessionConfig | None = None,
                    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK, verify: bool = False,
                    progress: HashProgress | None = None) -> Pipeline:
        """Every load checks the manifest, the files' sizes and sampled checksums and the embedding table
        before any engine is built; `verify` also hashes every byte (runtime/bundle/integrity.py)."""
        root = Path(bundle)
        manifest = read_manifest(root)
        check_bundle(root, manifest, verify=verify, progress=progress)
        tokenizer = Tokenizer.from_file(root / manifest.tokenizer)
        if (tokenizer.bos_id, tokenizer.eos_id) != (manifest.text.bos_id, manifest.text.eos_id):
            raise ConfigError(f"{root}: the tokenizer's <s>/</s> ids differ from the manifest's; re-export the bundle")
        engine = open_ort_engine(root, manifest, session or SessionConfig(), prefill_chunk=prefill_chunk)
        return cls(bundle=root, manifest=manifest, tokenizer=tokenizer, engine=engine)

    def chat(self) -> Conversation:
        """A multi-turn conversation (ECG Arena style); the cache is kept between its turns."""
        return Conversation(self.engine, self.tokenizer, self.manifest.image, backend="ort",
                            template=self.manifest.prompt)

    def generate(self, image: Image.Image, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None,
                 on_text: Callable[[str], None] | None = None) -> GenerationResult:
        return self.chat().ask(question, image, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text)
