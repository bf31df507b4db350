"""The calibration sample: one ECG image (a file, bytes, or a synthetic print) and its conversation.

Every reader in this package (`ecginstruct`, `ecgbench_samples`, `synthetic`) builds these,
and `calibration.samples` selects and prepares them, so the type lives apart from all of them.

Task classification (`classify_task`, for stratified selection) is a keyword table on
the first question, first match wins, in this order: multiple_choice (options "A. ...
B. ..." or "Options:"), report ("report"), rhythm ("rhythm"), diagnosis ("diagnos",
"abnormal", "interpret", "finding", "classif"); anything else is "other".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.ecg.synthetic import EcgRecord, synthesize_ecg
from pulse_edge.runtime.inputs import load_input

if TYPE_CHECKING:
    from PIL import Image

TASKS: tuple[str, ...] = ("diagnosis", "rhythm", "report", "multiple_choice", "other")
SOURCES: tuple[str, ...] = ("ecginstruct", "ecgbench", "synthetic")

# (task, pattern) in priority order; the first pattern found in the first question decides.
# Multiple choice comes first because option lists often name rhythms and diagnoses.
_TASK_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("multiple_choice", re.compile(r"\bA[.)]\s.*\bB[.)]\s", re.DOTALL)),
    ("multiple_choice", re.compile(r"\boptions?\s*:", re.IGNORECASE)),
    ("report", re.compile(r"\breport\b", re.IGNORECASE)),
    ("rhythm", re.compile(r"\brhythm", re.IGNORECASE)),
    ("diagnosis", re.compile(r"diagnos|abnormal|interpret|\bfindings?\b|classif", re.IGNORECASE)),
)


def classify_task(question: str) -> str:
    """The task of a question by the keyword table above; "other" when no rule matches."""
    return next((task for task, pattern in _TASK_RULES if pattern.search(question)), "other")


@dataclass(frozen=True)
class SyntheticEcg:
    """Everything needed to re-render a synthetic print deterministically."""

    rhythm: str
    seed: int
    heart_rate_bpm: int  # whole bpm, so the answers' rate is the signal's rate exactly
    width_px: int
    height_px: int

    def record(self) -> EcgRecord:
        return synthesize_ecg(self.rhythm, seed=self.seed, heart_rate_bpm=float(self.heart_rate_bpm))

    def render(self) -> Image.Image:
        from pulse_edge.runtime.ecg.render import render_ecg  # lazy: only synthetic samples draw

        return render_ecg(self.record(), width_px=self.width_px, height_px=self.height_px)


class DeferredImage(Protocol):
    """An image left in its data file until its sample is chosen: ECGBench's parquet files hold gigabytes of
    prints, and a pool of every sample's bytes would not fit a cart's memory (`ecgbench_samples.fetch_images`
    reads the chosen ones in one pass)."""

    def load(self) -> Image.Image: ...


@dataclass(frozen=True)
class CalibrationSample:
    """One image and its conversation; exactly one of image_path / image_bytes / synthetic / deferred is set."""

    id: str
    source: str
    task: str
    turns: tuple[tuple[str, str], ...]  # (question without "<image>\n", answer)
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    synthetic: SyntheticEcg | None = None
    deferred: DeferredImage | None = field(default=None, repr=False)
    # the dataset inside the source whose prints these are (ECGInstruct's image folder: ptb-xl, mimic-ecg, code15,
    # ...; ECGBench's subset): selection is stratified by it too, as print styles differ between them
    origin: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"sample {self.id}: source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.task not in TASKS:
            raise ConfigError(f"sample {self.id}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.turns:
            raise ConfigError(f"sample {self.id}: needs at least one (question, answer) turn")
        if sum(x is not None for x in (self.image_path, self.image_bytes, self.synthetic, self.deferred)) != 1:
            raise ConfigError(f"sample {self.id}: set exactly one of image_path, image_bytes, synthetic, deferred")

    def load_image(self) -> Image.Image:
        """The RGB image, decoded by the runtime's own decoder (or rendered, for synthetic samples); a sample
        whose "image" is a recording (DICOM, WFDB .hea, HL7 aECG) gets its standard print, as `infer` does."""
        if self.synthetic is not None:
            return self.synthetic.render()
        if self.deferred is not None:  # one sample's read: a whole chosen list goes through fetch_images
            return self.deferred.load()
        if self.image_bytes is not None:
            return load_input(self.image_bytes, name=self.id).image
        return load_input(self.image_path).image
