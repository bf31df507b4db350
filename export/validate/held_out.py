"""The held-out samples of the fidelity report (fidelity.py): samples the calibration did not see, each of which
fits the bundle's context with room for the greedy comparison's answer.

    the calibration's own data minus its ids ─┬─ fits? ── kept (a later turn or a long answer cut, as calibration
    (else synthetic prints)                   │             cuts them)
                                              └─ no ───── left out and named; none fits: synthetic prints drawn
                                                          on the page taking the fewest image tokens
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pulse_edge.calibration.calibrate import CalibrationOptions, choose_samples, prepare_all
from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample
from pulse_edge.calibration.datasets.synthetic import PRINT_SIZES
from pulse_edge.calibration.samples import PreparedSample
from pulse_edge.errors import ConfigError, PromptError, PulseEdgeError
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.context import HELD_OUT_SEED, QuantContext
from pulse_edge.export.validate.fidelity import GREEDY_TOKENS
from pulse_edge.runtime.image.preprocess import image_token_count
from pulse_edge.runtime.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeldOut:
    """The fidelity report's samples, each prepared, and those left out: their image and question (with
    GREEDY_ROOM positions to answer in) do not fit the bundle's context ({"id", "why"} each)."""

    samples: list[CalibrationSample]
    prepared: list[PreparedSample]
    left_out: list[dict[str, str]]


# Positions kept free after a held-out prompt: the greedy comparison's answer and the step that would read past it.
GREEDY_ROOM = GREEDY_TOKENS + 1


def held_out_samples(ctx: QuantContext, loaded: LoadedCheckpoint, tokenizer: Tokenizer,
                     max_length: int) -> HeldOut:
    """Samples the calibration did not see: from its own data when that is still readable, else synthetic; those
    that do not fit a `max_length`-position context are left out, and where none does, synthetic ones are drawn."""
    used = list(ctx.scales.samples.get("ids", []))
    data = str(ctx.scales.samples.get("data") or "synthetic")
    root = ctx.scales.samples.get("image_root") if data.endswith(".json") else None  # only ECGInstruct reads it
    try:
        options = CalibrationOptions(data=data, samples=ctx.settings.held_out, seed=HELD_OUT_SEED,
                                     image_root=Path(root) if root else None)
        samples = choose_samples(options, exclude=used)
    except PulseEdgeError as e:
        log.warning("held-out samples from %s are not available (%s); using synthetic ones", data, e)
        return synthetic_held_out(ctx.settings.held_out, loaded, tokenizer, max_length, exclude=used)
    held = _fitting(samples, loaded, tokenizer, max_length)
    if held.samples:
        return held
    log.warning("none of the %d held-out samples of %s fits the %d-position context; using synthetic ones drawn to "
                "fit", len(samples), data, max_length)
    return synthetic_held_out(ctx.settings.held_out, loaded, tokenizer, max_length, exclude=used)


def synthetic_held_out(count: int, loaded: LoadedCheckpoint, tokenizer: Tokenizer, max_length: int, *,
                       exclude: Sequence[str] = ()) -> HeldOut:
    """`count` synthetic samples drawn as held_out_samples draws them (a bundle without calibration data); in a
    context too short for some of their prints, every record is drawn on the page taking the fewest image tokens
    (a 2:1 strip: what such a bundle can read at all)."""
    samples = choose_samples(CalibrationOptions(samples=count, seed=HELD_OUT_SEED), exclude=exclude)
    held = _fitting(samples, loaded, tokenizer, max_length)
    if not held.left_out:
        return held
    width, height = min(PRINT_SIZES, key=lambda size: image_token_count(size, loaded.config.image))
    log.info("the held-out synthetic prints are drawn %dx%d to fit the %d-position context", width, height,
             max_length)
    held = _fitting([replace(s, synthetic=replace(s.synthetic, width_px=width, height_px=height)) for s in samples],
                    loaded, tokenizer, max_length)
    if not held.samples:
        raise ConfigError(f"no held-out sample fits the {max_length}-position context with {GREEDY_ROOM} positions "
                          f"to answer in ({held.left_out[0]['why']}): give a larger --max-context")
    return held


def _fitting(samples: list[CalibrationSample], loaded: LoadedCheckpoint, tokenizer: Tokenizer,
             max_length: int) -> HeldOut:
    """`samples` prepared for a context of `max_length` less GREEDY_ROOM, and those whose image and first
    question alone need more (a later turn or a long answer is cut instead, as calibration cuts it)."""
    kept, prepared, left_out = [], [], []
    for sample in samples:
        try:
            prepared.append(prepare_all(loaded, tokenizer, [sample], max_length - GREEDY_ROOM)[0])
        except PromptError as e:
            left_out.append({"id": sample.id, "why": str(e)})
            continue
        kept.append(sample)
    if left_out:
        log.warning("%d held-out samples left out of the fidelity report: their image and question do not fit the "
                    "%d-position context with %d positions to answer in", len(left_out), max_length, GREEDY_ROOM)
    return HeldOut(kept, prepared, left_out)
