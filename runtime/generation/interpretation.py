"""`interpret`: one ECG input (any accepted form) through any model, with findings and notes.

The result is an `Interpretation`: a `GenerationResult` (text, token ids, counts, stop reason, timings,
backend) plus where the input came from, what was done to it, the question, and the statements of the
answer mapped to the findings vocabulary. `Interpretation.to_dict()` is exactly what `pulse-edge infer
--json` prints and what each line of `infer --output` holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image

from pulse_edge.errors import InputError
from pulse_edge.runtime.findings import Finding, extract_findings
from pulse_edge.runtime.findings.extract import finished_sentences
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.inputs import EcgInput, load_input
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

if TYPE_CHECKING:
    from pulse_edge.runtime.generation.sampling import SamplingParams

Source = str | os.PathLike | bytes | np.ndarray | Image.Image | EcgInput


class Generator(Protocol):
    """What interpret needs of a model: the pipeline's (or the torch reference's) generate()."""

    def generate(self, image: Image.Image, question: str = ..., *, max_new_tokens: int = ...,
                 sampling: SamplingParams | None = ...,
                 on_text: Callable[[str], None] | None = ...) -> GenerationResult: ...


@dataclass(frozen=True)
class Interpretation(GenerationResult):
    """One answer about one ECG, as `infer --json` prints it."""

    source: str  # the path or name of the input
    input_kind: str  # runtime/inputs/load.py INPUT_KINDS: image, pdf, dicom, wfdb, hl7-aecg, csv, npy, array
    question: str
    # what was done to a recording on its way to the print, and an answer the context cut short; one line each
    notes: tuple[str, ...]
    findings: tuple[Finding, ...]  # the answer's statements (runtime/findings), none that it denies
    input_ms: float  # reading (and for a recording, checking and rendering) the input

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["notes"] = list(self.notes)
        record["findings"] = [f.to_dict() for f in self.findings]
        return record

    @classmethod
    def of(cls, result: GenerationResult, ecg: EcgInput, question: str, input_ms: float) -> Interpretation:
        inherited = {f.name: getattr(result, f.name) for f in fields(GenerationResult)}
        # an answer cut short (max_new_tokens, a cancel, a full context) may stop before the words that deny or
        # hedge its last statement ("Atrial fibrillation is| absent"): only its finished sentences give findings
        said = result.text if result.stop_reason == "eos" else finished_sentences(result.text)
        notes = ecg.notes + ((context_full_note(result),) if result.stop_reason == "context_full" else ())
        return cls(**inherited, source=ecg.source, input_kind=ecg.kind, question=question, notes=notes,
                   findings=tuple(extract_findings(said)), input_ms=round(input_ms, 3))


def context_full_note(result: GenerationResult) -> str:
    """Said, not only coded in stop_reason: a bundle built for the shortest context that holds a print (3072
    positions) leaves ~100 tokens for the answer."""
    return (f"the answer stopped at the end of the model's context, after {result.generated_tokens} tokens "
            f"({result.prompt_tokens} positions went to the prompt): for a full answer use a bundle exported (or "
            "TensorRT engines built) with a longer --max-context")


def interpret(model: Generator, source: Source, question: str = DEFAULT_QUESTION, *, max_new_tokens: int = 1024,
              sampling: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
              should_stop: StopCheck | None = None, name: str | None = None, fs: float | None = None,
              leads: tuple[str, ...] | None = None, unit: str | None = None,
              layout: str | None = None) -> Interpretation:
    """Load `source` (load_input's forms, or an EcgInput already loaded), ask `question`, map the findings.

    A bad input raises its one-line InputError before the model runs. `should_stop` (checked before every
    decode step) is passed only when given: not every model's generate takes it.
    """
    start = time.perf_counter()
    reading = {"name": name, "fs": fs, "leads": leads, "unit": unit, "layout": layout}
    if isinstance(source, EcgInput) and (given := [n for n, v in reading.items() if v is not None]):
        raise InputError(f"{', '.join(given)}: how to read an input, but this one was read already (an EcgInput); "
                         "pass them to load_input, or pass the file instead")
    ecg = source if isinstance(source, EcgInput) else load_input(
        Path(source) if isinstance(source, os.PathLike) else source, name=name, fs=fs, leads=leads, unit=unit,
        layout=layout)
    input_ms = 1e3 * (time.perf_counter() - start)
    cancel = {} if should_stop is None else {"should_stop": should_stop}
    result = model.generate(ecg.image, question, max_new_tokens=max_new_tokens, sampling=sampling, on_text=on_text,
                            **cancel)
    return Interpretation.of(result, ecg, question, input_ms)
