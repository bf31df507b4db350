"""The served model, and the three places where the server meets the runtime's API.

`open_model` opens the bundle, `decode_input` turns an upload or a file into the ECG image the model reads,
`answer_json` answers one ECG-native request with the object `pulse-edge infer --json` prints. Every other
part of the server goes through these, so a change of the runtime's entry points is a change here only.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from pulse_edge.errors import BundleError, InputError
from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.inputs import EcgInput, load_input
from pulse_edge.runtime.pipeline import Pipeline


@dataclass(frozen=True)
class ServedModel:
    pipeline: Pipeline
    model_id: str  # what /v1/models lists and requests name: the bundle directory's name
    bundle_id: str  # sha256 of manifest.json: it records every graph's size, precision and validation
    provider: str  # the ONNX Runtime execution provider

    def health(self) -> dict[str, Any]:
        """What /health says; "status" is "error" (and "error" its line) once a bundle file was written over since
        the load (runtime/bundle/loaded.py): no answer is given until the server is restarted."""
        manifest = self.pipeline.manifest
        try:
            self.pipeline.engine.files.check()
            problem = {}
        except BundleError as e:
            problem = {"status": "error", "error": str(e)}
        return {"status": "ok", **problem, "model_loaded": True, "model": self.model_id, "backend": "ort",
                "provider": self.provider,
                "precision": manifest.precision, "bundle_id": self.bundle_id,
                "source_sha256": manifest.source.sha256 or None, "max_context": self.pipeline.engine.max_length}


def open_model(bundle: Path, session: SessionConfig) -> ServedModel:
    """Load the bundle once for the server's lifetime and hash every byte of it against the manifest
    (a damaged or swapped file is refused at start, not answered from)."""
    pipeline = Pipeline.from_bundle(bundle, session=session, verify=True)
    bundle_id = hashlib.sha256((bundle / MANIFEST_FILE).read_bytes()).hexdigest()
    return ServedModel(pipeline=pipeline, model_id=bundle.resolve().name, bundle_id=bundle_id,
                       provider=session.provider)


class Upload(NamedTuple):
    name: str  # the client's file name: only its suffix and stem are used
    data: bytes


def decode_input(source: bytes | Path | tuple[Upload, ...], *, name: str, **reading: Any) -> EcgInput:
    """An uploaded file's bytes, a WFDB record's two uploaded files, or a checked path under --allow-dir, as
    the ECG the model reads (an image or PDF, or a recording rendered as the standard print); InputError if
    unusable. `reading`: load_input's fs, leads and unit, for CSV and NPY recordings."""
    if isinstance(source, tuple):
        return _decode_record(source, name=name, **reading)
    return load_input(source, name=name, **reading)


def _decode_record(parts: tuple[Upload, ...], *, name: str, **reading: Any) -> EcgInput:
    """A WFDB record uploaded as NAME.hea + NAME.dat: the wfdb reader opens files by name (the header names its
    signal file), so both are written to a private temporary folder under one stem and read from there."""
    suffixes = sorted(Path(p.name).suffix.lower() for p in parts)
    stems = {Path(p.name).stem for p in parts}
    if suffixes != [".dat", ".hea"] or len(stems) != 1:
        raise InputError(f"{name}: two files are read as one WFDB record, NAME.hea and NAME.dat with the same "
                         "NAME; send any other ECG as one file")
    stem = stems.pop()
    if not stem or stem in (".", "..") or any(c in stem for c in "/\\\0"):
        raise InputError(f"{name}: the record name {stem!r} cannot be a file name; rename the files")
    with tempfile.TemporaryDirectory(prefix="pulse-edge-wfdb-") as folder:
        for part in parts:
            (Path(folder) / (stem + Path(part.name).suffix.lower())).write_bytes(part.data)
        return load_input(Path(folder) / f"{stem}.hea", name=name, **reading)  # what it does not read is noted


def answer_json(pipeline: Pipeline, ecg: EcgInput, question: str, *, max_new_tokens: int,
                sampling: SamplingParams, should_stop: StopCheck,
                on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One ECG-native answer as `pulse-edge infer --json` prints it (findings included); on the model thread."""
    result = pipeline.interpret(ecg, question, max_new_tokens=max_new_tokens, sampling=sampling,
                                on_text=on_text, should_stop=should_stop)
    return result.to_dict()
