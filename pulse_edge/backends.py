"""One way to open a model, whatever serves it.

A directory with a `manifest.json` is a pulse-edge bundle (served by the lean
ONNX Runtime path); a directory with a `config.json` is a checkpoint (served by
the torch reference). Both answer `generate(...)` with the same
`GenerationResult`, so the CLI, the ECGBench runner and the benchmarks do not
care which one they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pulse_edge.choices import BACKENDS
from pulse_edge.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.generation.result import GenerationResult
    from pulse_edge.runtime.generation.sampling import SamplingParams


class Backend(Protocol):
    """What every backend offers: one image, one question, one answer."""

    def generate(self, image: Image.Image, question: str = ..., *, max_new_tokens: int = ...,
                 sampling: SamplingParams | None = ...,
                 on_text: Callable[[str], None] | None = ...) -> GenerationResult: ...




def open_backend(model: str | Path, *, backend: str = "auto", vision_tower: str | Path | None = None,
                  dtype: str = "auto", device: str = "auto", session: SessionConfig | None = None,
                  prefill_chunk: int | None = None, engines: str | Path | None = None) -> Backend:
    """A bundle opens with the lean ort backend (or trt: its TensorRT engines); a checkpoint with torch.
    Heavy imports happen here only.

    prefill_chunk: None keeps the runtime's default, 0 prefills in one pass.
    """
    root = Path(model)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_bundle = (root / "manifest.json").is_file()
    chosen = backend if backend != "auto" else ("ort" if is_bundle else "torch")
    if chosen in ("ort", "trt"):
        if not is_bundle:
            raise ConfigError(f"{root} is not a pulse-edge bundle (no manifest.json): make one with "
                              "`pulse-edge export`, or use --backend torch on a checkpoint")
        from pulse_edge.runtime.pipeline import Pipeline

        chunking = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk or None}
        return Pipeline.from_bundle(root, session=session, backend=chosen, engines=engines, **chunking)
    if engines is not None:
        raise ConfigError("--engines names TensorRT engines: it goes with --backend trt and a bundle")
    if is_bundle:
        raise ConfigError(f"{root} is a bundle; the torch backend serves checkpoints: use --backend ort (or trt)")
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.export.model.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(root, vision_tower=vision_tower, dtype=dtype, device=device)
