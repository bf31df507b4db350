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

from pulse_edge.choices import BACKENDS, BUNDLE_BACKENDS
from pulse_edge.errors import BundleError, CheckpointError, ConfigError
from pulse_edge.runtime.bundle import names

if TYPE_CHECKING:
    from PIL import Image

    from pulse_edge.runtime.bundle.integrity import HashProgress
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.generation.result import GenerationResult
    from pulse_edge.runtime.generation.sampling import SamplingParams


class Backend(Protocol):
    """What every backend offers: one image, one question, one answer."""

    def generate(self, image: Image.Image, question: str = ..., *, max_new_tokens: int = ...,
                 sampling: SamplingParams | None = ...,
                 on_text: Callable[[str], None] | None = ...) -> GenerationResult: ...


def serves_bundle(model: str | Path, backend: str) -> bool:
    """Whether `backend` (auto included) opens `model` as a bundle."""
    return backend != "torch" and (Path(model) / "manifest.json").is_file()


def model_identity(model: str | Path, backend: str) -> str:
    """What a batch's answers record as their model: a bundle by the sha256 of its manifest (which records every
    file's checksum), so a re-export at the same path is told apart and a moved copy is not; a checkpoint by its
    resolved path."""
    if serves_bundle(model, backend):
        from pulse_edge.runtime.bundle.engines import manifest_sha256

        return f"bundle sha256:{manifest_sha256(Path(model))}"
    return str(Path(model).resolve())


def refuse_torch_settings(*, vision_tower: str | Path | None, dtype: str, device: str) -> None:
    """A bundle's precision and tower are its own, its device the provider's: torch's settings given with one are
    refused, never ignored (called before anything is written, e.g. an ECGBench run's settings)."""
    given = [flag for flag, on in (("--vision-tower", vision_tower is not None), ("--dtype", dtype != "auto"),
                                   ("--device", device != "auto")) if on]
    if given:
        raise ConfigError(f"{', '.join(given)}: settings of the torch backend (a checkpoint); a bundle has its own "
                          "precision and vision tower and runs where --provider says: leave them out")


def open_backend(model: str | Path, *, backend: str = "auto", vision_tower: str | Path | None = None,
                  dtype: str = "auto", device: str = "auto", session: SessionConfig | None = None,
                  prefill_chunk: int | None = None, engines: str | Path | None = None, verify: bool = False,
                  progress: HashProgress | None = None) -> Backend:
    """A bundle opens with the lean ort backend (or trt: its TensorRT engines); a checkpoint with torch.
    Heavy imports happen here only.

    prefill_chunk: None keeps the runtime's default, 0 prefills in one pass. verify: hash every file of a
    bundle against its manifest before loading it (a checkpoint has no checksums to verify).
    """
    root = Path(model)
    if backend not in BACKENDS:
        raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    is_bundle = (root / "manifest.json").is_file()
    chosen = backend if backend != "auto" else ("ort" if is_bundle else "torch")
    if chosen in BUNDLE_BACKENDS:
        if not is_bundle:
            raise ConfigError(f"{root} is not a pulse-edge bundle (no manifest.json): make one with "
                              "`pulse-edge export`, or use --backend torch on a checkpoint")
        refuse_torch_settings(vision_tower=vision_tower, dtype=dtype, device=device)
        from pulse_edge.runtime.pipeline import Pipeline

        chunking = {} if prefill_chunk is None else {"prefill_chunk": prefill_chunk or None}
        return Pipeline.from_bundle(root, session=session, backend=chosen, engines=engines, verify=verify,
                                    progress=progress, **chunking)
    if engines is not None:
        raise ConfigError("--engines names TensorRT engines: it goes with --backend trt and a bundle")
    if is_bundle:
        raise ConfigError(f"{root} is a bundle; the torch backend serves checkpoints: use --backend ort (or trt)")
    check_checkpoint_dir(root)
    from pulse_edge.runtime.engines.sessions import ort_settings_given

    given = ort_settings_given(session) + (["--prefill-chunk"] if prefill_chunk is not None else [])
    if given:  # the torch reference prefills in one pass with its own kernels: never ignored in silence
        raise ConfigError(f"{', '.join(given)}: settings of the ort backend; the torch backend (a checkpoint) has "
                          "none of them (its device is --device): leave them out, or export a bundle and use it")
    if verify:
        raise ConfigError(f"--verify checks a bundle's files against its manifest; {root} is a checkpoint, which has "
                          "none")
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.export.model.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(root, vision_tower=vision_tower, dtype=dtype, device=device)


def check_checkpoint_dir(root: Path) -> None:
    """A directory that is neither a bundle nor a checkpoint is named for what it looks like."""
    if not root.is_dir():
        raise CheckpointError(f"{root} {'is not a directory' if root.exists() else 'does not exist'}: pass a bundle "
                              "directory (from `pulse-edge export`) or a checkpoint directory")
    if (root / "config.json").is_file():
        return
    graphs = sorted(p.name for p in root.glob("*.onnx"))
    if graphs or (root / names.EMBEDDING_FILE).is_file():
        raise BundleError(f"{root} looks like a pulse-edge bundle ({', '.join(graphs) or names.EMBEDDING_FILE}) but "
                          "has no manifest.json: it was copied incompletely or its export did not finish; re-copy "
                          "or re-export it")
    raise CheckpointError(f"{root} is neither a pulse-edge bundle (no manifest.json) nor a checkpoint (no "
                          "config.json); pass the directory `pulse-edge export` wrote, or a PULSE checkpoint")
