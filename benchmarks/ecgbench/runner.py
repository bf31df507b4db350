"""Run a model over ECGBench with the paper's settings, resumably.

Each answer is appended to `OUT/<subset>.jsonl` and flushed to disk as soon as
it exists; a rerun reads what is there, cuts off a line torn by a crash, and
asks only for the ids still missing. `OUT/run.json` records the model and
settings; a rerun with another model or other settings into the same folder
is refused, so one file never mixes two models' answers.

The runner takes any object with the pipeline's `generate(image, question, *,
max_new_tokens, sampling, on_text)` (and, for the multi-turn arena, its
`chat()` conversation when it has one), and the model is opened only when some
sample is left to answer, so tests use a fake pipeline and a finished run
rescored needs no model at all.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from pulse_edge.benchmarks.common.machine import machine_info
from pulse_edge.benchmarks.common.progress import Progress
from pulse_edge.benchmarks.ecgbench.predictions import (
    PredictionFile,
    append_record,
    prepare_for_append,
    read_predictions,
)
from pulse_edge.calibration.datasets.ecgbench.readers import (
    Sample,
    SubsetSource,
    discover,
    iter_samples,
    load_samples,
    missing_image_fix,
)
from pulse_edge.calibration.datasets.ecgbench.subsets import SubsetSpec, resolve_subset
from pulse_edge.errors import ConfigError, InputError, PromptError
from pulse_edge.staging import staged_file

PAPER_MAX_NEW_TOKENS = 1024
RUN_FILE = "run.json"
RUN_FORMAT = "pulse-edge-ecgbench-run"
SAMPLING = ("greedy",)
# Settings that change the answers: a resumed run must keep them.
_PINNED = ("model", "precision", "backend", "dtype", "device", "max_new_tokens", "sampling")


@dataclass(frozen=True)
class RunSettings:
    """What produced a run's answers (written to run.json)."""

    model: str
    precision: str
    backend: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    sampling: str = "greedy"

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLING:
            raise ConfigError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSettings:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"run settings: unknown keys {sorted(unknown)}; allowed: {', '.join(_PINNED)}")
        return cls(**d)


@dataclass(frozen=True)
class SubsetPlan:
    """One subset of a run: its reference samples, the ids still to answer, where answers go."""

    spec: SubsetSpec
    source: SubsetSource
    reference: tuple[Sample, ...]
    todo: tuple[str, ...]
    out_file: Path
    existing: PredictionFile


@dataclass(frozen=True)
class RunStats:
    subset: str
    answered: int
    errors: int
    already_done: int
    seconds: float


def plan_run(data_dir: str | Path, subsets: Sequence[str], out_dir: str | Path,
             limit: int | None = None) -> list[SubsetPlan]:
    """Plans for the named subsets (all those present when none are named); fails before any model is loaded."""
    found = discover(data_dir)
    names = list(dict.fromkeys(resolve_subset(s).name for s in subsets)) or list(found)
    if not names:
        raise InputError(f"{data_dir}: no ECGBench subset found (expected <subset>/test-*.parquet or <subset>.json)")
    missing = [n for n in names if n not in found]
    if missing:
        raise InputError(f"{data_dir}: subsets {', '.join(missing)} not found; present: {', '.join(found) or 'none'}")
    plans = []
    for name in names:
        whole = load_samples(found[name])  # ids checked over the whole file: the run matches answers across it
        reference = tuple(whole[:limit] if limit is not None else whole)
        repeated = len(whole) - len({s.id for s in whole})
        if repeated:
            raise InputError(f"{found[name].describe()}: {repeated} repeated sample ids; answers are kept and "
                             "resumed by id, so ids must be unique")
        out_file = Path(out_dir) / f"{name}.jsonl"
        existing = read_predictions(out_file, missing_ok=True)
        done = {p.id for p in existing.predictions}
        todo = tuple(s.id for s in reference if s.id not in done)
        plans.append(SubsetPlan(resolve_subset(name), found[name], reference, todo, out_file, existing))
    return plans


def check_images(plans: Sequence[SubsetPlan]) -> None:
    """JSON layouts keep images apart: make sure every image still to be read is there, before loading a model."""
    for plan in plans:
        todo = set(plan.todo)
        absent = [s for s in iter_samples(plan.source, with_images=True, ids=todo)
                  if s.image_bytes is None and (s.image_file is None or not s.image_file.is_file())]
        if absent:
            raise InputError(f"{plan.spec.name}: {len(absent)} of {len(todo)} images not found (first: "
                             f"{absent[0].image_name!r}); {missing_image_fix(absent[0])}")


def pin_settings(out_dir: str | Path, settings: RunSettings) -> None:
    """Write run.json, or check that an existing one names the same model and settings."""
    path = Path(out_dir) / RUN_FILE
    record = {"format": RUN_FORMAT, "version": 1, **asdict(settings)}
    if path.is_file():
        old = _read_run(path)
        changed = [k for k in _PINNED if old.get(k) != record[k]]
        if changed:
            detail = ", ".join(f"{k} {old.get(k)!r} -> {record[k]!r}" for k in changed)
            raise InputError(f"{out_dir} holds answers made with other settings ({detail}); "
                             "use another --out, or the same settings to resume")
        record["created"] = old.get("created")
    record["created"] = record.get("created") or _now()
    record.update(updated=_now(), machine=machine_info())
    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as work:  # whole or not at all: a kill mid-write must not leave a run.json to trip on
        work.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _read_run(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        record = e
    if not isinstance(record, dict):
        raise InputError(f"{path} is damaged (not the run's settings as JSON); delete it to resume with the answers "
                         "kept (the settings are pinned again), or use another --out")
    return record


def run_plans(plans: Sequence[SubsetPlan], open_model: Callable[[], Any], *,
              max_new_tokens: int = PAPER_MAX_NEW_TOKENS, stream: TextIO | None = None,
              clock: Callable[[], float] = time.monotonic) -> list[RunStats]:
    """Answer every id still to do; the model is opened only if there is one."""
    pipeline = open_model() if any(p.todo for p in plans) else None
    return [run_subset(pipeline, plan, max_new_tokens=max_new_tokens, stream=stream, clock=clock) for plan in plans]


def run_subset(pipeline: Any, plan: SubsetPlan, *, max_new_tokens: int = PAPER_MAX_NEW_TOKENS,
               stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic) -> RunStats:
    already = len(plan.reference) - len(plan.todo)
    start = clock()
    if not plan.todo:
        return RunStats(plan.spec.name, 0, 0, already, 0.0)
    from pulse_edge.runtime.generation.sampling import SamplingParams

    sampling = SamplingParams()  # temperature 0: greedy, the paper's evaluation setting
    prepare_for_append(plan.existing)
    progress = Progress(len(plan.todo), plan.spec.name, stream=stream, clock=clock)
    answered = errors = 0
    plan.out_file.parent.mkdir(parents=True, exist_ok=True)
    with open(plan.out_file, "a", encoding="utf-8") as handle:
        for sample in iter_samples(plan.source, with_images=True, ids=set(plan.todo)):
            record = answer_sample(pipeline, sample, max_new_tokens=max_new_tokens, sampling=sampling, clock=clock)
            append_record(handle, record)
            answered += 1
            errors += "error" in record
            progress.advance()
    progress.close()
    return RunStats(plan.spec.name, answered, errors, already, round(clock() - start, 3))


def answer_sample(pipeline: Any, sample: Sample, *, max_new_tokens: int, sampling: Any,
                  clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """One prediction record. An unreadable image or a prompt too long for the context is recorded as
    an error (scored as an empty answer) and the run goes on; anything else stops it."""
    record: dict[str, Any] = {"id": sample.id, "prompt": sample.question}
    start = clock()
    try:
        image = sample.load_image()
        if len(sample.turns) > 1 and hasattr(pipeline, "chat"):
            record.update(_conversation(pipeline.chat(), sample, image, max_new_tokens, sampling))
        else:
            result = pipeline.generate(image, sample.question, max_new_tokens=max_new_tokens, sampling=sampling)
            record.update(_result_fields(result))
            if len(sample.turns) > 1:  # a pipeline without chat(): the first turn (the one judged) only
                record.update(turns_run=1, turns_not_run=len(sample.turns) - 1)
    # This sample's fault: recorded, and the run goes on. Non-finite logits (ModelOutputError) stop the run
    # instead: an item with an error counts as done, so a damaged bundle's run of empty answers would never be
    # redone once the bundle is fixed; stopped, a rerun resumes where it stopped.
    except (InputError, PromptError) as e:
        record.update(text="", error=str(e))
        return record
    record["seconds"] = round(clock() - start, 3)
    return record


def _conversation(chat: Any, sample: Sample, image: Any, max_new_tokens: int, sampling: Any) -> dict[str, Any]:
    """Every turn of a multi-turn item, each follow-up after the model's own previous answer. `text` is
    the first answer (the one judged); a follow-up that no longer fits the context ends the conversation."""
    first = chat.ask(sample.question, image, max_new_tokens=max_new_tokens, sampling=sampling)
    turns = [{"question": sample.question, **_result_fields(first)}]
    fields: dict[str, Any] = {}
    for turn in sample.turns[1:]:
        try:
            result = chat.ask(turn.question, max_new_tokens=max_new_tokens, sampling=sampling)
        except PromptError as e:
            fields["turns_error"] = str(e)
            break
        turns.append({"question": turn.question, **_result_fields(result)})
    return {**_result_fields(first), "turns": turns, "turns_run": len(turns),
            "turns_not_run": len(sample.turns) - len(turns), **fields}


def _result_fields(result: Any) -> dict[str, Any]:
    return {"text": result.text, "generated_tokens": result.generated_tokens, "stop_reason": result.stop_reason}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
