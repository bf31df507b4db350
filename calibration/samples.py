"""Calibration samples: ECG images with ECG questions and answers, from ECGInstruct, ECGBench or synthesis.

Quantization scales are only as good as the activations they were measured on,
and text-only calibration is a known cause of accuracy loss in multimodal models:
every sample here carries an image and its conversation, and there is no
text-only fallback. Every sample reaches the model through the runtime's own
decoder (`runtime.inputs`), anyres preprocessing (`runtime.preprocess`) and
prompt builder (`runtime.prompt`), so calibration sees exactly what serving sees.

Sources (`load_samples`):
- `synthetic[:N]`: rendered 12-lead prints of known rhythms with true answers (no data needed);
- an ECGInstruct `.json` (PULSE's training data): `[{id, image, conversations}]`;
- an ECGBench `.parquet` file or data folder (either released layout). ECGBench is a test
  set: calibrating on the subsets you then score leaks them; prefer ECGInstruct.

Task classification (`classify_task`, for stratified selection) is a keyword table on
the first question, first match wins, in this order: multiple_choice (options "A. ...
B. ..." or "Options:"), report ("report"), rhythm ("rhythm"), diagnosis ("diagnos",
"abnormal", "interpret", "finding", "classif"); anything else is "other".

No torch or transformers here: numpy, Pillow, and pyarrow only when parquet is read.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from pulse_edge.calibration.datasets.ecgbench import readers as ecgbench_data
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS, resolve_subset
from pulse_edge.errors import ConfigError, InputError, PromptError
from pulse_edge.runtime.ecg.synthetic import RHYTHMS, EcgRecord, synthesize_ecg
from pulse_edge.runtime.image.preprocess import ImageLayout, image_token_count, preprocess
from pulse_edge.runtime.inputs import load_input
from pulse_edge.runtime.text.prompt import (
    IMAGE_MARKER,
    LLAVA_V1,
    PromptTemplate,
    TextEncoder,
    Turn,
    prompt_ids,
    spliced_length,
)

if TYPE_CHECKING:
    from PIL import Image

TASKS: tuple[str, ...] = ("diagnosis", "rhythm", "report", "multiple_choice", "other")
SOURCES: tuple[str, ...] = ("ecginstruct", "ecgbench", "synthetic")
SYNTHETIC = "synthetic"
DEFAULT_SYNTHETIC_COUNT = 256

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


@dataclass(frozen=True)
class CalibrationSample:
    """One image and its conversation; exactly one of image_path / image_bytes / synthetic is set."""

    id: str
    source: str
    task: str
    turns: tuple[tuple[str, str], ...]  # (question without "<image>\n", answer)
    image_path: Path | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    synthetic: SyntheticEcg | None = None

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"sample {self.id}: source {self.source!r} is not one of {', '.join(SOURCES)}")
        if self.task not in TASKS:
            raise ConfigError(f"sample {self.id}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if not self.turns:
            raise ConfigError(f"sample {self.id}: needs at least one (question, answer) turn")
        if sum(x is not None for x in (self.image_path, self.image_bytes, self.synthetic)) != 1:
            raise ConfigError(f"sample {self.id}: set exactly one of image_path, image_bytes, synthetic")

    def load_image(self) -> Image.Image:
        """The RGB image, decoded by the runtime's own decoder (or rendered, for synthetic samples); a sample
        whose "image" is a recording (DICOM, WFDB .hea, HL7 aECG) gets its standard print, as `infer` does."""
        if self.synthetic is not None:
            return self.synthetic.render()
        if self.image_bytes is not None:
            return load_input(self.image_bytes, name=self.id).image
        return load_input(self.image_path).image


# --- ECGInstruct ---------------------------------------------------------------------------------------------


def load_ecginstruct(json_path: str | Path, image_root: str | Path | None = None) -> list[CalibrationSample]:
    """Read and validate an ECGInstruct JSON list; images are relative to `image_root` (default: the JSON's folder).

    Every problem is one `InputError` line naming the item (index and id) and what is wrong.
    """
    path = Path(json_path)
    root = Path(image_root) if image_root is not None else path.parent
    items = _read_json_list(path)
    return [_ecginstruct_sample(item, i, path, root) for i, item in enumerate(items)]


def _read_json_list(path: Path) -> list[Any]:
    if not path.is_file():
        raise InputError(f"{path}: ECGInstruct file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of {{id, image, conversations}} items "
                         f"(ECGInstruct format), got a {type(data).__name__}")
    return data


def _ecginstruct_sample(item: Any, index: int, path: Path, root: Path) -> CalibrationSample:
    where = f"{path}: item {index}"
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: expected an object {{id, image, conversations}}, got a {type(item).__name__}")
    where = f"{where} (id {item.get('id', '?')})"
    missing = [key for key in ("id", "image", "conversations") if key not in item]
    if missing:
        raise InputError(f"{where}: missing key(s) {', '.join(missing)}")
    turns = _conversation_turns(item["conversations"], where)
    image = root / str(item["image"])
    if not image.is_file():
        raise InputError(f"{where}: image {item['image']!r} not found under {root}; "
                         "pass the folder the image paths are relative to as image_root (--image-root)")
    return CalibrationSample(id=str(item["id"]), source="ecginstruct", task=classify_task(turns[0][0]),
                             turns=turns, image_path=image)


def _conversation_turns(conversations: Any, where: str) -> tuple[tuple[str, str], ...]:
    """(question, answer) pairs from alternating human/gpt messages; `<image>` only opens the first question."""
    if not isinstance(conversations, list) or not conversations:
        raise InputError(f"{where}: conversations must be a non-empty list of {{from, value}} messages")
    for j, message in enumerate(conversations):
        expected = ("human",) if j % 2 == 0 else ("gpt", "assistant")
        if not isinstance(message, Mapping) or not isinstance(message.get("value"), str):
            raise InputError(f"{where}: conversation message {j} must be {{from, value}} with a text value")
        if message.get("from") not in expected:
            raise InputError(f"{where}: conversation message {j} is from {message.get('from')!r}, expected "
                             f"{expected[0]!r} (messages must alternate human/gpt, starting with human)")
    if len(conversations) % 2:
        raise InputError(f"{where}: the conversation ends with a human message that has no gpt answer")
    values = [str(message["value"]) for message in conversations]
    if IMAGE_MARKER not in values[0]:
        raise InputError(f"{where}: the first human message does not carry the image (expected it to start "
                         f"with '{IMAGE_MARKER}\\n')")
    if any(IMAGE_MARKER in value for value in values[2::2]):
        raise InputError(f"{where}: '{IMAGE_MARKER}' appears in a later human message; PULSE takes one image")
    return tuple((ecgbench_data.question_text(q), a) for q, a in zip(values[0::2], values[1::2], strict=True))


# --- ECGBench ------------------------------------------------------------------------------------------------


def load_ecgbench(path: str | Path, subset: str | None = None) -> list[CalibrationSample]:
    """Items of an ECGBench parquet file, or of every subset (or `subset`) in a data folder, with their images."""
    p = Path(path)
    if p.is_file() and p.suffix == ".parquet":
        name = subset or (p.parent.name if p.parent.name in SUBSETS else p.stem)
        sources = [ecgbench_data.SubsetSource(name, ecgbench_data.PARQUET, (p,))]
    elif p.is_dir():
        sources = _folder_sources(p, subset)
    else:
        raise InputError(f"{p}: {'not an' if p.exists() else 'no such'} ECGBench .parquet file or data folder")
    return [_ecgbench_sample(sample) for source in sources
            for sample in ecgbench_data.iter_samples(source, with_images=True)]


def _folder_sources(folder: Path, subset: str | None) -> list[ecgbench_data.SubsetSource]:
    if subset is not None:
        return [ecgbench_data.find_subset(folder, resolve_subset(subset).name)]
    found = list(ecgbench_data.discover(folder).values())
    if not found:
        raise InputError(f"{folder}: no ECGBench subsets found (expected <subset>/test-*.parquet "
                         "or <subset>.json with images/)")
    return found


def _ecgbench_sample(sample: ecgbench_data.Sample) -> CalibrationSample:
    sample_id = f"{sample.subset}/{sample.id}"
    if sample.image_bytes is None and (sample.image_file is None or not sample.image_file.is_file()):
        raise InputError(f"ECGBench {sample_id}: image {sample.image_name!r} not found; unpack the image "
                         "archives into images/ beside the JSON file")
    turns = tuple((t.question, t.answer if isinstance(t.answer, str) else ", ".join(t.answer))
                  for t in sample.turns)
    return CalibrationSample(id=sample_id, source="ecgbench", task=classify_task(turns[0][0]), turns=turns,
                             image_path=sample.image_file if sample.image_bytes is None else None,
                             image_bytes=sample.image_bytes)


# --- synthetic -----------------------------------------------------------------------------------------------

# Whole-bpm rates well inside each rhythm's definition (never near the 60 / 100 bpm
# borders), so the answer's rhythm name is unambiguous to anyone reading the print.
_SYNTHETIC_RATES: Mapping[str, tuple[int, int]] = MappingProxyType({
    "sinus": (62, 95), "tachycardia": (106, 145), "bradycardia": (42, 56),
    "afib": (60, 140), "first_degree_av_block": (62, 95),
})
_RHYTHM_TEXT: Mapping[str, str] = MappingProxyType({
    "sinus": "sinus rhythm, regular", "tachycardia": "sinus tachycardia, regular",
    "bradycardia": "sinus bradycardia, regular", "afib": "atrial fibrillation, irregularly irregular",
    "first_degree_av_block": "sinus rhythm, regular",
})
# The diagnosis sentence for each statement-code set the synthesizer labels a record with.
_DIAGNOSES: Mapping[tuple[str, ...], str] = MappingProxyType({
    ("NORM", "SR"): "Normal ECG: sinus rhythm.", ("STACH",): "Sinus tachycardia.",
    ("SBRAD",): "Sinus bradycardia.", ("AFIB",): "Atrial fibrillation.",
    ("SR", "1AVB"): "Sinus rhythm with first-degree AV block.",
})
# PR wording per label set: true by definition (1AVB means PR > 200 ms, AF has no P waves)
# and by the synthesizer's PR ranges for the sinus rhythms (120-200 ms).
_PR_TEXT: Mapping[tuple[str, ...], str] = MappingProxyType({
    ("NORM", "SR"): "PR interval normal.", ("STACH",): "PR interval normal.", ("SBRAD",): "PR interval normal.",
    ("AFIB",): "No P waves; irregularly irregular RR intervals.", ("SR", "1AVB"): "PR interval prolonged (>200 ms).",
})
# Page sizes (width, height) and the anyres grid each lands on: letter at 200 and 100 dpi
# (2x2 tiles), and the print centred on wide 2:1 and 3:1 pages, as screen captures and
# scans with margins are (2x1 and 3x1 tiles), so the tile count varies as in real inputs.
PRINT_SIZES: tuple[tuple[int, int], ...] = ((2200, 1700), (1100, 850), (1600, 800), (2400, 800))
_QUESTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "diagnosis": ("What is the diagnosis of this ECG?",
                  "Interpret this 12-lead ECG and give the most likely diagnosis.",
                  "Is this ECG normal or abnormal? State the diagnosis."),
    "rhythm": ("What is the rhythm of this ECG?", "Identify the cardiac rhythm and the heart rate shown here."),
    "report": ("Write a brief report for this ECG.", "Generate a structured report of this 12-lead ECG."),
    "multiple_choice": ("Which of the following best describes this ECG?",
                        "Choose the correct interpretation of this ECG."),
})
_SYNTHETIC_TASKS: tuple[str, ...] = ("diagnosis", "rhythm", "report", "multiple_choice")
_LETTERS = "ABCD"


def synthetic_samples(n: int, seed: int) -> list[CalibrationSample]:
    """`n` synthetic samples; rhythms and tasks cycle so every (rhythm, task) pair appears, images render lazily."""
    if n < 1:
        raise ConfigError(f"the number of synthetic samples must be >= 1, got {n}")
    # The answers name the synthesizer's own statement codes, read once per rhythm from a short record.
    labels = {rhythm: _labels_of(rhythm) for rhythm in RHYTHMS}
    return [_synthetic_sample(i, seed, labels) for i in range(n)]


def _synthetic_sample(index: int, seed: int, all_labels: Mapping[str, tuple[str, ...]]) -> CalibrationSample:
    rng = np.random.default_rng([seed, index])  # per sample, so sample i never depends on n
    rhythm = RHYTHMS[index % len(RHYTHMS)]
    task = _SYNTHETIC_TASKS[(index // len(RHYTHMS)) % len(_SYNTHETIC_TASKS)]
    low, high = _SYNTHETIC_RATES[rhythm]
    width, height = PRINT_SIZES[int(rng.integers(len(PRINT_SIZES)))]
    ecg = SyntheticEcg(rhythm, int(rng.integers(2**31)), int(rng.integers(low, high + 1)), width, height)
    facts = _Facts(rhythm, all_labels[rhythm], ecg.heart_rate_bpm)
    question, answer = _SYNTHETIC_ANSWERS[task](str(rng.choice(_QUESTIONS[task])), facts, rng)
    return CalibrationSample(id=f"synthetic/{seed}/{index:06d}", source="synthetic", task=task,
                             turns=((question, answer),), synthetic=ecg)


def _labels_of(rhythm: str) -> tuple[str, ...]:
    rate = float(_SYNTHETIC_RATES[rhythm][0])
    return synthesize_ecg(rhythm, seed=0, duration_s=5.0, fs=100, heart_rate_bpm=rate).labels


@dataclass(frozen=True)
class _Facts:
    """What is true of one synthetic record; every answer is built from these alone."""

    rhythm: str
    labels: tuple[str, ...]
    rate: int

    @property
    def diagnosis(self) -> str:
        return _DIAGNOSES[self.labels]


def _diagnosis(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    return question, facts.diagnosis


def _rhythm(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    return question, f"The rhythm is {_RHYTHM_TEXT[facts.rhythm]}, at {facts.rate} bpm."


def _report(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    text = _RHYTHM_TEXT[facts.rhythm]
    return question, (f"Rhythm: {text[0].upper()}{text[1:]}. Heart rate: {facts.rate} bpm. "
                      f"{_PR_TEXT[facts.labels]} Conclusion: {facts.diagnosis}")


def _multiple_choice(question: str, facts: _Facts, rng: np.random.Generator) -> tuple[str, str]:
    """Four options: the true diagnosis and three others, in a seeded order."""
    others = [text for text in _DIAGNOSES.values() if text != facts.diagnosis]
    options = [facts.diagnosis, *(others[i] for i in rng.choice(len(others), size=3, replace=False))]
    options = [options[i] for i in rng.permutation(len(options))]
    listed = " ".join(f"{letter}. {text}" for letter, text in zip(_LETTERS, options, strict=True))
    letter = _LETTERS[options.index(facts.diagnosis)]
    return f"{question}\nOptions: {listed}", f"The correct option is {letter}. {facts.diagnosis}"


_SYNTHETIC_ANSWERS = MappingProxyType({"diagnosis": _diagnosis, "rhythm": _rhythm, "report": _report,
                                        "multiple_choice": _multiple_choice})


# --- choosing a source ---------------------------------------------------------------------------------------


def load_samples(data: str | Path, *, image_root: str | Path | None = None) -> list[CalibrationSample]:
    """`synthetic[:N]` (N defaults to DEFAULT_SYNTHETIC_COUNT, seed 0), an ECGInstruct .json, or ECGBench parquet."""
    text = str(data)
    if text == SYNTHETIC or text.startswith(SYNTHETIC + ":"):
        count = text.removeprefix(SYNTHETIC).removeprefix(":") or str(DEFAULT_SYNTHETIC_COUNT)
        if not count.isdigit():
            raise ConfigError(f"calibration data {text!r}: the sample count after 'synthetic:' must be a number")
        return synthetic_samples(int(count), seed=0)
    path = Path(data)
    if path.suffix == ".json":
        return load_ecginstruct(path, image_root)
    if path.suffix == ".parquet" or path.is_dir():
        return load_ecgbench(path)
    raise InputError(f"{data}: not a calibration source; pass 'synthetic[:N]', an ECGInstruct .json file, "
                     "or an ECGBench .parquet file or data folder")


# --- stratified selection ------------------------------------------------------------------------------------


def select_samples(samples: Sequence[CalibrationSample], n: int, seed: int) -> list[CalibrationSample]:
    """`n` samples stratified by (source, task), in input order; the same seed gives the same list.

    Each stratum gets its proportional share, at least one while `n` allows (when `n` is
    below the number of strata, the largest strata get one each), rounded by largest
    remainder. Which members of a stratum are taken depends only on the seed and that stratum.
    """
    return [samples[i] for i in _select_indices(samples, n, seed)]


def split_held_out(samples: Sequence[CalibrationSample], held_out: int, seed: int
                   ) -> tuple[list[CalibrationSample], list[CalibrationSample]]:
    """(calibration, held-out): disjoint, both in input order; the held-out part is stratified like `select_samples`."""
    if not 0 <= held_out < len(samples):
        raise ConfigError(f"held_out must be between 0 and {len(samples) - 1} (there are {len(samples)} samples, "
                          f"and calibration needs at least one), got {held_out}")
    chosen = set(_select_indices(samples, held_out, seed))
    return ([s for i, s in enumerate(samples) if i not in chosen], [samples[i] for i in sorted(chosen)])


def _select_indices(samples: Sequence[CalibrationSample], n: int, seed: int) -> list[int]:
    if n < 0:
        raise ConfigError(f"the number of samples to select must be >= 0, got {n}")
    strata: dict[tuple[str, str], list[int]] = {}
    for i, sample in enumerate(samples):
        strata.setdefault((sample.source, sample.task), []).append(i)
    keys = sorted(strata, key=lambda k: (SOURCES.index(k[0]), TASKS.index(k[1])))
    counts = _allocate([len(strata[k]) for k in keys], min(n, len(samples)))
    chosen: list[int] = []
    for key, count in zip(keys, counts, strict=True):
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms.
        rng = random.Random(f"{seed}/{key[0]}/{key[1]}")
        chosen += rng.sample(strata[key], count)
    return sorted(chosen)


def _allocate(sizes: list[int], n: int) -> list[int]:
    """Largest-remainder shares of `n` over strata of `sizes`, at least one each while n allows."""
    total = sum(sizes)
    if n < len(sizes):  # not enough for one each: the largest strata first, ties by order
        largest = sorted(range(len(sizes)), key=lambda k: -sizes[k])[:n]
        return [int(k in largest) for k in range(len(sizes))]
    quotas = [n * size / total for size in sizes]
    counts = [min(size, max(1, int(q))) for size, q in zip(sizes, quotas, strict=True)]
    while sum(counts) < n:  # grow where the share was rounded down the most
        k = max((k for k in range(len(sizes)) if counts[k] < sizes[k]), key=lambda k: quotas[k] - counts[k])
        counts[k] += 1
    while sum(counts) > n:  # the one-each floor overshot: shrink where the share was exceeded the most
        k = min((k for k in range(len(sizes)) if counts[k] > 1), key=lambda k: quotas[k] - counts[k])
        counts[k] -= 1
    return counts


# --- model inputs --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)  # eq=False: comparing ndarray fields has no single truth value
class PreparedSample:
    """One sample as the runtime would feed it: tiles, ids with the image slot, and the image's token count."""

    id: str
    source: str
    task: str
    pixel_values: np.ndarray = field(repr=False)  # [1 + N, 3, tile, tile] float32
    image_size: tuple[int, int]
    input_ids: list[int] = field(repr=False)  # the whole conversation incl. answers; one IMAGE_SLOT
    image_tokens: int
    truncated: bool = False  # later turns dropped or the first answer cut to fit max_length


def prepare_sample(sample: CalibrationSample, layout: ImageLayout, tokenizer: TextEncoder,
                   template: PromptTemplate = LLAVA_V1, max_length: int | None = None) -> PreparedSample:
    """Decode, preprocess and tokenize `sample` exactly as the runtime does.

    When the spliced length (image tokens + text) exceeds `max_length`, later turns are
    dropped whole, last first; if the first turn alone is still too long, its answer is
    cut to the tokens that fit (a causal decoder's activations on the kept prefix are
    those of the full sequence). The image and the first question are never dropped: if
    they alone do not fit, that is a `PromptError`.
    """
    pre = preprocess(sample.load_image(), layout)
    turns = [Turn(question, answer) for question, answer in sample.turns]
    ids = prompt_ids(turns, tokenizer, template)
    truncated = False
    if max_length is not None:
        ids, truncated = _fit(sample, turns, ids, pre.num_image_tokens, tokenizer, template, max_length)
    return PreparedSample(id=sample.id, source=sample.source, task=sample.task, pixel_values=pre.pixel_values,
                          image_size=pre.image_size, input_ids=ids,
                          image_tokens=image_token_count(pre.image_size, layout), truncated=truncated)


def _fit(sample: CalibrationSample, turns: list[Turn], ids: list[int], image_tokens: int, tokenizer: TextEncoder,
         template: PromptTemplate, max_length: int) -> tuple[list[int], bool]:
    """`ids` shortened to `max_length` spliced positions, and whether anything was cut."""
    if spliced_length(ids, image_tokens) <= max_length:
        return ids, False
    question_only = prompt_ids([Turn(turns[0].question)], tokenizer, template)
    if spliced_length(question_only, image_tokens) > max_length:
        raise PromptError(f"sample {sample.id}: the image ({image_tokens} tokens) and the first question need "
                          f"{spliced_length(question_only, image_tokens)} positions, more than max_length "
                          f"{max_length}")
    while len(turns) > 1 and spliced_length(ids, image_tokens) > max_length:
        turns = turns[:-1]
        ids = prompt_ids(turns, tokenizer, template)
    keep = max_length - image_tokens + 1  # the image slot stands for image_tokens positions
    return ids[:keep], True
