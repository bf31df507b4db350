"""One way to open a model, whatever serves it.

A directory with a `manifest.json` is a pulse-edge bundle (served by the lean
ONNX Runtime path, issue 3); a directory with a `config.json` is a checkpoint
(served by the torch reference). Both answer `generate(...)` with the same
`GenerationResult`, so the CLI, the ECGBench runner and the benchmarks do not
care which one they hold.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pulse_edge.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from pulse_edge.runtime.result import GenerationResult
    from pulse_edge.runtime.sampling import SamplingParams


class Pipeline(Protocol):
    """What every backend offers: one image, one question, one answer."""

    def generate(self, image: Image.Image, question: str = ..., *, max_new_tokens: int = ...,
                 sampling: SamplingParams | None = ...,
                 on_text: Callable[[str], None] | None = ...) -> GenerationResult: ...


def open_pipeline(model: str | Path, *, backend: str = "auto", vision_tower: str | Path | None = None,
                  dtype: str = "auto", device: str = "auto") -> Pipeline:
    """Open a checkpoint (torch backend). Heavy imports happen here, not at module import."""
    root = Path(model)
    if backend not in ("auto", "torch"):
        raise ConfigError(f"backend {backend!r} is not one of auto, torch")
    if (root / "manifest.json").is_file():
        raise ConfigError(f"{root} is a pulse-edge bundle; serving bundles needs the ort backend, "
                          "which this version does not have yet: pass the checkpoint directory instead")
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.export.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(root, vision_tower=vision_tower, dtype=dtype, device=device)
