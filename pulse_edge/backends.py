"""One way to open a model, whatever serves it.

A directory with a `manifest.json` is a pulse-edge bundle (served by the lean
ONNX Runtime path); a directory with a `config.json` is a checkpoint (served by
the torch reference). Both answer `generate(...)` with the same
`GenerationResult`, so the CLI, the ECGBench runner and the benchmarks do not
care which one they hold.
"""

from __future__ import annotations

import hashlib
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


def model_identity(model: str | Path, backend: str, *, provider: str = "cpu", engines: str | Path | None = None,
                   dtype: str = "auto", device: str = "auto", vision_tower: str | Path | None = None) -> str:
    """What a run's answers record as their model, with what else decides them (a batch, an ECGBench run).

    A bundle by the sha256 of its manifest (which records every file's checksum), so a re-export at the same path
    is told apart and a moved copy is not, with its runner: ONNX Runtime and its provider, or TensorRT and its
    engine set (engines.json's sha256). A checkpoint by its resolved path and its files' names, sizes and
    modification times (hashing 14 GB on every run would cost minutes; a checkpoint made again in place changes
    them), with torch's dtype and device."""
    if serves_bundle(model, backend):
        from pulse_edge.runtime.bundle.engines import ENGINES_FILE, find_engine_dir, manifest_sha256

        bundle = f"bundle sha256:{manifest_sha256(Path(model))}"
        if backend != "trt":
            return f"{bundle} on onnxruntime {provider}"
        listing = (Path(engines) if engines is not None else find_engine_dir(Path(model))) / ENGINES_FILE
        engine_set = hashlib.sha256(listing.read_bytes()).hexdigest() if listing.is_file() else "none"
        return f"{bundle} on tensorrt engines sha256:{engine_set}"
    files = [Path(model), *([Path(vision_tower)] if vision_tower is not None else [])]
    return f"checkpoint {Path(model).resolve()} files:{_stat_digest(files)} dtype {dtype} device {device}"


def _stat_digest(folders: list[Path]) -> str:
    """sha256 (16 hex) over the name, size and mtime of every file in `folders` (not their subfolders)."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []:
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


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
