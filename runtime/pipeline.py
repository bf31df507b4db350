"""`Pipeline.from_bundle(dir)`: PULSE served from a bundle by the lean runtime (numpy, pillow, tokenizers, ORT).

    image -> preprocess -> engine (vision graph, merge, embeddings, decoder with its KV cache) -> sample -> text

The engine is a `BundleEngine` (runtime/engines/bundle_engine.py) whose graphs run in ONNX Runtime, or whose
TensorRT engines (`pulse-edge build-engines`) run on an NVIDIA GPU (runtime/engines/trt.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

from pulse_edge.choices import BUNDLE_BACKENDS
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle.integrity import HashProgress, check_bundle
from pulse_edge.runtime.bundle.manifest import Manifest, read_manifest
from pulse_edge.runtime.engines.bundle_engine import AUTO_CHUNK, BundleEngine, has_prefill_graph
from pulse_edge.runtime.engines.ort import SessionConfig, open_ort_engine
from pulse_edge.runtime.engines.sessions import ort_settings_given
from pulse_edge.runtime.generation.conversation import Conversation
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.generation.interpretation import Interpretation, Source, interpret
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION, check_text
from pulse_edge.runtime.text.tokenizer import Tokenizer


@dataclass(eq=False, repr=False)  # one pipeline is one loaded model: hashable by identity, a short repr
class Pipeline:
    """A bundle loaded into ONNX Runtime or TensorRT, answering questions about ECG images."""

    bundle: Path
    manifest: Manifest
    tokenizer: Tokenizer
    engine: BundleEngine

    backend: str = "ort"

    @classmethod
    def from_bundle(cls, bundle: str | Path, *, session: SessionConfig | None = None,
                    prefill_chunk: int | str | None = AUTO_CHUNK, backend: str = "ort",
                    engines: str | Path | None = None, verify: bool = False,
                    progress: HashProgress | None = None) -> Pipeline:
        """backend "ort" runs the bundle's ONNX graphs (session: how); "trt" its TensorRT engines, from
        `engines` (default: the bundle's one `engines-*` folder, made by `pulse-edge build-engines`).

        Every load checks the manifest, the files' sizes and sampled checksums and the embedding table
        before any engine is built; `verify` also hashes every byte (runtime/bundle/integrity.py)."""
        root = Path(bundle)
        if session is not None and not isinstance(session, SessionConfig):
            raise ConfigError(f"session must be a SessionConfig, got {type(session).__name__}")
        if backend not in BUNDLE_BACKENDS:
            raise ConfigError(f"a bundle is served by {' or '.join(BUNDLE_BACKENDS)}, not {backend!r}")
        if backend != "trt" and engines is not None:
            raise ConfigError("--engines names TensorRT engines: it goes with --backend trt")
        manifest = read_manifest(root)
        check_bundle(root, manifest, verify=verify, progress=progress)
        tokenizer = Tokenizer.from_file(root / manifest.tokenizer)
        if (tokenizer.bos_id, tokenizer.eos_id) != (manifest.text.bos_id, manifest.text.eos_id):
            raise ConfigError(f"{root}: the tokenizer's <s>/</s> ids differ from the manifest's; re-export the bundle")
        if backend == "trt":
            from pulse_edge.runtime.engines.trt import open_trt_engine

            if given := ort_settings_given(session):  # asked for, and TensorRT has no such choice: never ignored
                raise ConfigError(f"{', '.join(given)}: ONNX Runtime settings; the trt backend runs TensorRT engines "
                                  "and has none of them: leave them out, or use --backend ort")

            engine = open_trt_engine(root, manifest, engines_dir=Path(engines) if engines else None,
                                     prefill_chunk=prefill_chunk, verify=verify, progress=progress)
        else:
            engine = open_ort_engine(root, manifest, session or SessionConfig(), prefill_chunk=prefill_chunk)
        return cls(bundle=root, manifest=manifest, tokenizer=tokenizer, engine=engine, backend=backend)

    def __repr__(self) -> str:
        return f"Pipeline(bundle={str(self.bundle)!r}, backend={self.backend!r}, precision={self.manifest.precision!r})"

    def close(self, wait: float | None = None) -> None:
        """Free the bundle's engines now (a TensorRT engine's GPU memory, ONNX Runtime's sessions), as a cart that
        switches bundles needs; `with Pipeline.from_bundle(...) as pipeline:` does it at the block's end. Later
        use is refused in one line. An answer another thread is computing stops at its next step with that line,
        and the memory goes as its question ends; `wait` (seconds) waits for that, refusing in one line if it
        has not happened by then.

        Thread-safe: one question at a time per pipeline (another thread's waits); each generate and interpret is
        its own conversation, so a chat() that another thread's call started anew refuses its follow-ups."""
        self.engine.close(wait)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def prefilled_by(self) -> str:
        """Which graph runs long prompts: a CPU bundle's prefill graph where it was loaded
        (runtime/engines/memory.py), in segments with the attention kernel where that runs (named: which variant
        ran says which rounding and speed to expect), else the decoder graph."""
        self.engine.check_open()
        segmented = getattr(self.engine.decoder, "segmented", None)
        if segmented is not None:
            kind = getattr(segmented.kernel, "kind", None)  # a checked or twin kernel (export's checks) has none
            return f"prefill graph segments + {kind.what if kind else 'attention kernel'}"
        return "prefill graph" if has_prefill_graph(self.engine.decoder) else "decoder graph"

    @property
    def decoded_by(self) -> str:
        """Who runs decode steps: pulse-edge's own kernels over the decode graph's weights, or the decode graph in
        segments with the decode kernel where that runs, or whole."""
        self.engine.check_open()
        if getattr(self.engine.decoder, "native", None) is not None:
            return "native decode step (block GEMV + decode kernel)"
        if getattr(self.engine.decoder, "decode_segments", None) is not None:
            return "decoder graph segments + decode kernel"
        return "decoder graph"

    def chat(self, *, system: str | None = None) -> Conversation:
        """A multi-turn conversation (ECG Arena style); the cache is kept between its turns.

        `system` replaces the bundle's system prompt (the one PULSE was trained with) for this conversation.
        """
        if system is not None:
            check_text(system, "system prompt")  # not text: one PromptError here, not an AttributeError at the ask
        template = self.manifest.prompt if system is None else replace(self.manifest.prompt, system=system)
        return Conversation(self.engine, self.tokenizer, self.manifest.image, backend=self.backend, template=template)

    def generate(self, image: Image.Image, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                 sampling: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
                 should_stop: StopCheck | None = None) -> GenerationResult:
        with self.engine.lock:  # a new conversation's reset and its question as one: no thread's reset between
            return self.chat().ask(question, image, max_new_tokens=max_new_tokens, sampling=sampling,
                                   on_text=on_text, should_stop=should_stop)

    def interpret(self, source: Source, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
                  sampling: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
                  should_stop: StopCheck | None = None, name: str | None = None, fs: float | None = None,
                  leads: tuple[str, ...] | None = None, unit: str | None = None,
                  layout: str | None = None) -> Interpretation:
        """Any accepted ECG input (path, bytes, PIL image, image or signal array) -> an `Interpretation`: what
        `infer --json` prints. fs, leads, unit and layout are for CSV, NPY and arrays (runtime/inputs/load.py);
        `should_stop` is checked before every decode step (a server cancels a disconnected client's answer)."""
        return interpret(self, source, question, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text,
                         should_stop=should_stop, name=name, fs=fs, leads=leads, unit=unit, layout=layout)
