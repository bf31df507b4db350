"""Calibration samples: choosing a source, stratified selection, and runtime-exact model inputs.

Quantization scales are only as good as the activations they were measured on,
and text-only calibration is a known cause of accuracy loss in multimodal models:
every sample here carries an image and its conversation, and there is no
text-only fallback. Every sample reaches the model through the runtime's own
decoder (`runtime.inputs`), anyres preprocessing (`runtime.preprocess`) and
prompt builder (`runtime.prompt`), so calibration sees exactly what serving sees.

Sources (`load_samples`), read by the modules of `calibration.datasets`:
- `synthetic[:N]`: rendered 12-lead prints of known rhythms with true answers (no data needed; `synthetic`);
- an ECGInstruct `.json` (PULSE's training data): `[{id, image, conversations}]` (`ecginstruct`);
- an ECGBench `.parquet` file or data folder (either released layout; `ecgbench_samples`). ECGBench is a test
  set: calibrating on the subsets you then score leaks them; prefer ECGInstruct.

The sample type and its task classification live in `calibration.datasets.calibration_sample`.

No torch or transformers here: numpy, Pillow, and pyarrow only when parquet is read.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pulse_edge.calibration.datasets.calibration_sample import SOURCES, TASKS, CalibrationSample
from pulse_edge.calibration.datasets.ecgbench.subsets import SUBSETS
from pulse_edge.calibration.datasets.ecgbench_samples import fetch_images, load_ecgbench
from pulse_edge.calibration.datasets.ecginstruct import load_ecginstruct
from pulse_edge.calibration.datasets.synthetic import synthetic_samples
from pulse_edge.errors import ConfigError, InputError, PromptError
from pulse_edge.runtime.image.preprocess import ImageLayout, image_token_count, preprocess
from pulse_edge.runtime.text.prompt import LLAVA_V1, PromptTemplate, TextEncoder, Turn, prompt_ids, spliced_length

SYNTHETIC = "synthetic"
DEFAULT_SYNTHETIC_COUNT = 256


# --- choosing a source ---------------------------------------------------------------------------------------


def load_samples(data: str | Path, *, image_root: str | Path | None = None) -> list[CalibrationSample]:
    """`synthetic[:N]` (N defaults to DEFAULT_SYNTHETIC_COUNT, seed 0), an ECGInstruct .json, or ECGBench parquet."""
    text = str(data)
    if image_root is not None and (text == SYNTHETIC or text.startswith(SYNTHETIC + ":")):
        raise ConfigError(f"--image-root {image_root}: where an ECGInstruct .json file's images lie; synthetic "
                          "samples are drawn: leave it out")
    if text == SYNTHETIC or text.startswith(SYNTHETIC + ":"):
        count = text.removeprefix(SYNTHETIC).removeprefix(":") or str(DEFAULT_SYNTHETIC_COUNT)
        if not count.isdigit():
            raise ConfigError(f"calibration data {text!r}: the sample count after 'synthetic:' must be a number")
        return synthetic_samples(int(count), seed=0)
    path = Path(data)
    subset = path.stem.replace("_", "-")
    bench = path.suffix == ".json" and subset in SUBSETS  # ECGBench's ptb-test.json: test data, not ECGInstruct
    if path.suffix == ".json" and not bench:
        return load_ecginstruct(path, image_root)
    if bench or path.suffix == ".parquet" or path.is_dir():
        if image_root is not None:  # ECGBench's parquet files hold their images: never ignored in silence
            raise ConfigError(f"--image-root {image_root}: where an ECGInstruct .json file's images lie; ECGBench "
                              "finds its own (in its parquet files, or its folder's images/): leave it out")
        return load_ecgbench(path, subset=subset) if bench else load_ecgbench(path)
    raise InputError(f"{data}: not a calibration source; pass 'synthetic[:N]', an ECGInstruct .json file, "
                     "or an ECGBench .parquet file or data folder")


# --- stratified selection ------------------------------------------------------------------------------------


def select_samples(samples: Sequence[CalibrationSample], n: int, seed: int) -> list[CalibrationSample]:
    """`n` samples stratified by (source, origin, task), in input order, their images read; the same seed gives the
    same list.

    Each stratum gets its proportional share, at least one while `n` allows (when `n` is
    below the number of strata, the largest strata get one each), rounded by largest
    remainder. Which members of a stratum are taken depends only on the seed and that stratum.
    """
    return fetch_images([samples[i] for i in _select_indices(samples, n, seed)])


def split_held_out(samples: Sequence[CalibrationSample], held_out: int, seed: int
                   ) -> tuple[list[CalibrationSample], list[CalibrationSample]]:
    """(calibration, held-out): disjoint, both in input order; the held-out part is stratified like
    `select_samples`, and its images are read."""
    if not 0 <= held_out < len(samples):
        raise ConfigError(f"held_out must be between 0 and {len(samples) - 1} (there are {len(samples)} samples, "
                          f"and calibration needs at least one), got {held_out}")
    chosen = set(_select_indices(samples, held_out, seed))
    # the held-out part's images read, as select_samples gives them; the rest keeps its deferred ones (all of
    # ECGBench's, read at once, would be ~13 GB): choose from it with select_samples
    return [s for i, s in enumerate(samples) if i not in chosen], fetch_images([samples[i] for i in sorted(chosen)])


def _select_indices(samples: Sequence[CalibrationSample], n: int, seed: int) -> list[int]:
    if n < 0:
        raise ConfigError(f"the number of samples to select must be >= 0, got {n}")
    strata: dict[tuple[str, str, str], list[int]] = {}
    for i, sample in enumerate(samples):
        strata.setdefault((sample.source, sample.origin, sample.task), []).append(i)
    keys = sorted(strata, key=lambda k: (SOURCES.index(k[0]), k[1], TASKS.index(k[2])))
    counts = _allocate([len(strata[k]) for k in keys], min(n, len(samples)))
    chosen: list[int] = []
    for (source, origin, task), count in zip(keys, counts, strict=True):
        # A string seed is hashed with SHA-512 by `random`, so this is stable across runs and platforms (a sample
        # with no origin keeps the seed it had before origins were strata)
        rng = random.Random(f"{seed}/{source}/{origin}/{task}" if origin else f"{seed}/{source}/{task}")
        chosen += rng.sample(strata[source, origin, task], count)
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
