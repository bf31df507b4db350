"""Many ECGs through one model into a JSON-lines file, resumably: `pulse-edge infer DIR... --output FILE`.

Each line is one input's `Interpretation.to_dict()` (which carries its `source`), or `{"source", "error"}`
for an input that could not be read or asked about; lines are appended and pushed to disk one by one
(pulse_edge/jsonl.py), so a crash loses at most the input in flight. A rerun into the same file skips the
sources that already have an answer, retries those that failed (a source's last line is its current
result), and cuts off a line torn by a crash. The model is opened only when some input is left to do.

Every answer's line also records the `settings` it was asked with (the question, the token limit, sampling,
the model, how the inputs were read): a rerun with other settings into the same file is refused, since it would
skip the inputs answered before and leave answers to two different requests in one file, unmarked.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from pulse_edge.errors import ConfigError, InputError, ModelOutputError, PromptError
from pulse_edge.jsonl import JsonLines, append_record, prepare_for_append, read_json_lines
from pulse_edge.runtime.generation.decode import check_token_limit
from pulse_edge.runtime.generation.interpretation import Generator, interpret
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.inputs import RECORDING_KINDS, load_input
from pulse_edge.runtime.inputs.load import DEFAULT_UNIT
from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

# What one bad input may raise without stopping the others: an unusable file, a prompt that does not fit.
# recorded on the input's line and the batch goes on: its file, its prompt, or logits this input made non-finite
# (a resumed batch would otherwise stop on the same input every time)
PER_INPUT_ERRORS = (InputError, PromptError, ModelOutputError)


@dataclass(frozen=True)
class BatchPlan:
    """The sources still to do, and the output file as it was read."""

    sources: tuple[str, ...]
    todo: tuple[str, ...]
    existing: JsonLines[Mapping[str, Any]]

    @property
    def already_done(self) -> int:
        return len(self.sources) - len(self.todo)


@dataclass(frozen=True)
class BatchOptions:
    """How every input of a batch is read and asked about."""

    question: str = DEFAULT_QUESTION
    max_new_tokens: int = 1024
    sampling: Any = None  # SamplingParams; None: greedy
    input_options: Mapping[str, Any] = field(default_factory=dict)  # load_input's fs, leads, unit, layout
    save_render_dir: Path | None = None  # the rendered print of every recording goes here as PNG
    fail_fast: bool = False
    # the model the answers come from, with what else decides them (pulse_edge.backends.model_identity): required,
    # since a rerun into the same file checks it, and answers of two models left side by side are scored as one
    model: str = ""

    def __post_init__(self) -> None:
        check_token_limit(self.max_new_tokens)  # before the model loads, not after it
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("BatchOptions needs model: what the answers come from (pulse_edge.backends."
                              "model_identity), so that a rerun into the same file with another model is refused")

    def settings(self) -> dict[str, Any]:
        """What decides an answer besides its input, as its line records it (JSON's own types), in the form it
        acts: greedy decoding is greedy whatever its top_p and seed; a unit not given is millivolts."""
        sampling = self.sampling or SamplingParams()
        reading = {"unit": DEFAULT_UNIT, **{k: v for k, v in self.input_options.items() if v is not None}}
        return json.loads(json.dumps({
            "question": self.question, "max_new_tokens": self.max_new_tokens, "model": self.model,
            "sampling": asdict(sampling) if sampling.temperature > 0 else {"temperature": 0.0},
            "input_options": reading}))


@dataclass(frozen=True)
class BatchStats:
    total: int
    already_done: int
    answered: int
    failed: int
    seconds: float


def plan_batch(sources: Sequence[str], output: str | Path, settings: Mapping[str, Any] | None = None) -> BatchPlan:
    """Read the output file (if any) and list the sources without an answer in it; `settings`
    (BatchOptions.settings) must be those its answers were asked with."""
    existing = read_json_lines(output, _output_record, missing_ok=True)
    answers = [r for r in existing.records if "error" not in r]
    if settings is not None:
        for record in answers:
            _check_same_settings(record, settings, existing.path)
    answered = {r["source"] for r in answers}
    return BatchPlan(tuple(sources), tuple(s for s in sources if s not in answered), existing)


def _check_same_settings(record: Mapping[str, Any], settings: Mapping[str, Any], path: Path) -> None:
    # a line written before settings were recorded holds its question only
    recorded = record.get("settings") or {"question": record.get("question")}
    for key, value in recorded.items():
        if key in settings and settings[key] != value:
            raise ConfigError(f"{path} holds answers asked with another {key} ({value!r}; this run: "
                              f"{settings[key]!r}), which a rerun would leave beside this run's unmarked: write to "
                              f"another --output file, or delete {path} to answer everything again")


def run_batch(plan: BatchPlan, open_model: Callable[[], Generator], options: BatchOptions, *,
              on_record: Callable[[Mapping[str, Any]], None] | None = None) -> BatchStats:
    """Answer every source still to do, appending one line each; `on_record` sees each line as written."""
    start = time.monotonic()
    if not plan.todo:
        return BatchStats(len(plan.sources), plan.already_done, 0, 0, 0.0)
    model = open_model()
    prepare_for_append(plan.existing)
    answered = failed = 0
    plan.existing.path.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.existing.path, "a", encoding="utf-8") as handle:
        for source in plan.todo:
            record, error = _one(model, source, options)
            append_record(handle, record)
            answered, failed = answered + (error is None), failed + (error is not None)
            if on_record is not None:
                on_record(record)
            if error is not None and options.fail_fast:
                raise error
    return BatchStats(len(plan.sources), plan.already_done, answered, failed, round(time.monotonic() - start, 3))


def _one(model: Generator, source: str, options: BatchOptions) -> tuple[dict[str, Any], Exception | None]:
    saved: dict[str, str] = {}
    try:
        ecg = load_input(source, name=source, **options.input_options)
        if options.save_render_dir is not None and ecg.kind in RECORDING_KINDS:
            save_image(ecg.image, options.save_render_dir / render_name(source))
            saved["render"] = render_name(source)
        result = interpret(model, ecg, options.question, max_new_tokens=options.max_new_tokens,
                           sampling=options.sampling)
    except PER_INPUT_ERRORS as error:
        return {"source": source, **saved, "error": str(error)}, error
    return {**result.to_dict(), **saved, "settings": options.settings()}, None


RENDER_NAME_BYTES = 150


def render_name(source: str) -> str:
    """The file name a source's rendered print is saved under: its path with separators as `__`, then `~` and
    the start of the source's sha256, + .png. The path alone is read easily but not one-to-one ("a/b.csv" and
    "a__b.csv", "../x.csv" and "/x.csv" flatten alike): two recordings' prints shared a name, the later one
    written over the earlier, and the print kept for a recording showed another patient's."""
    flat = source.replace("\\", "/").strip("/").replace("../", "").replace("/", "__")
    # its end (the file's own name) within RENDER_NAME_BYTES: with the hash and save_image's temporary name around
    # it, a deep path's name passed the file system's 255 bytes and the batch stopped with a traceback
    tail = flat.encode("utf-8", "surrogateescape")[-RENDER_NAME_BYTES:]
    # not from inside a character: its cut bytes decoded as lone surrogates, which the JSON line cannot hold
    flat = tail.lstrip(bytes(range(0x80, 0xC0))).decode("utf-8", "surrogateescape")
    digest = hashlib.sha256(source.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return f"{flat.lstrip('.') or 'input'}~{digest}.png"


def save_image(image: Image.Image, path: str | Path) -> None:
    """Write an image (format from the suffix) so that it appears whole or not at all."""
    path = Path(path)
    if Image.registered_extensions().get(path.suffix.lower()) is None:
        raise ConfigError(f"{path}: unknown image suffix {path.suffix!r}; name it .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(temp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; a saved print is the user's like any file
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _output_record(record: Mapping[str, Any], path: Path, number: int) -> Mapping[str, Any]:
    if not isinstance(record.get("source"), str):
        raise InputError(f"{path}: line {number} has no source; is it a `pulse-edge infer --output` file?")
    return record
