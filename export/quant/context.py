"""The quantized side of `pulse-edge export --precision int8|int4|fp8`: scales in, graphs rewritten, report out.

    --scales FILE (checked against the checkpoint's sha256)  or  calibrate now on synthetic ECGs (said in the log)
      -> calibration.npz in the bundle
      -> vision graph rewritten site by site; decoder built with a LinearPlan
      -> held-out samples (the calibration data minus the calibration ids, else synthetic) -> fidelity report
      -> --accuracy-gate: refuse the bundle when the report falls below it
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate, choose_samples, fp8_method, prepare_all
from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample
from pulse_edge.calibration.datasets.synthetic import PRINT_SIZES
from pulse_edge.calibration.fidelity import AccuracyGate, json_safe
from pulse_edge.calibration.observe import site_modules
from pulse_edge.calibration.recipes import Recipe, check_keep
from pulse_edge.calibration.samples import PreparedSample
from pulse_edge.calibration.scales import Scales
from pulse_edge.errors import ConfigError, PromptError, PulseEdgeError
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.apply import check_scales, decoder_plan, quantize_vision_graph
from pulse_edge.export.validate.fidelity import GREEDY_TOKENS
from pulse_edge.runtime.bundle.manifest import CalibrationSpec, GraphSpec
from pulse_edge.runtime.bundle.names import SCALES_FILE
from pulse_edge.runtime.image.preprocess import image_token_count
from pulse_edge.runtime.text.tokenizer import Tokenizer

log = logging.getLogger(__name__)

SCHEME_LABELS = MappingProxyType({"w8a8": "int8", "w8a8dyn": "int8", "w8a8u8": "int8", "w8": "int8", "w4": "int4",
                                  "fp8": "fp8", "fp": "fp32"})
HELD_OUT_SEED = 1  # held-out samples are drawn apart from the calibration draw (seed 0 by default)


class AccuracyGateError(PulseEdgeError):
    """The quantized bundle's fidelity falls below the asked thresholds."""


@dataclass(frozen=True)
class QuantSettings:
    recipe: Recipe
    scales: Path | None = None
    calibration_samples: int = 16  # when no --scales: synthetic samples calibrated at export
    held_out: int = 4
    gate: AccuracyGate | None = None


@dataclass(frozen=True)
class QuantContext:
    settings: QuantSettings
    scales: Scales
    scales_source: str

    @property
    def recipe(self) -> Recipe:
        return self.settings.recipe

    def decoder_plan(self, loaded: LoadedCheckpoint, shape: DecoderShape) -> LinearPlan:
        return decoder_plan(loaded.model, self.recipe, self.scales, shape)

    def quantize_vision(self, loaded: LoadedCheckpoint, work: Path, spec: GraphSpec, **emitter: Any) -> GraphSpec:
        """`emitter`: quantize_vision_graph's emit and dtype, for graphs not written for ORT."""
        counts = quantize_vision_graph(work / spec.file, loaded.model, self.recipe, self.scales, **emitter)
        from pulse_edge.export.graphs.vision import describe_vision_graph

        new = describe_vision_graph(work / spec.file)
        return replace(new, precision=SCHEME_LABELS[self.recipe.vision] if set(counts) - {"fp"} else "fp32",
                       matmul_schemes=counts, opt_level_limit="basic" if "fp8" in counts else None)

    def manifest_entry(self, plan: LinearPlan, vision_schemes: Mapping[str, int],
                       fidelity: dict[str, Any] | None = None) -> CalibrationSpec:
        samples = self.scales.samples
        fp8 = "fp8" in plan.schemes.values() or vision_schemes.get("fp8", 0) > 0
        return CalibrationSpec(
            recipe=self.recipe.to_dict(), file=SCALES_FILE, scales_source=self.scales_source,
            method=self.scales.method, awq_block_size=self.scales.awq_block_size,
            samples={k: samples.get(k) for k in ("data", "image_root", "count", "seed", "by_source", "by_task",
                                                 "tokens")},
            decoder_schemes=dict(Counter(plan.schemes.values())),
            smoothed_or_scaled_sites=tuple(sorted(plan.input_scales)),
            requires_compute_capability=self.recipe.compute_capability if fp8 else None,
            fidelity=None if fidelity is None else json_safe(fidelity),  # +inf SQNR -> "inf": strict JSON
            # said, not left to `method`: E4M3 has no entropy clip, and such sites used mse (calibration/scales.py)
            fp8_method=fp8_method(self.scales.method) if fp8 else None)


def prepare_quantization(loaded: LoadedCheckpoint, tokenizer: Tokenizer, settings: QuantSettings,
                         work: Path) -> QuantContext:
    """Load (and check) or compute the scales, and keep a copy in the bundle."""
    if settings.scales is not None:
        scales = Scales.load(settings.scales)
        scales.check_model(loaded.sha256, settings.scales)
        source = str(settings.scales)
        shutil.copyfile(settings.scales, work / SCALES_FILE)
    else:
        log.warning("no --scales given: calibrating on %d synthetic ECG samples now (for real data run "
                    "pulse-edge calibrate MODEL --data ... first)", settings.calibration_samples)
        options = CalibrationOptions(data="synthetic", samples=settings.calibration_samples,
                                     block_size=settings.recipe.block_size)
        scales = calibrate(loaded, tokenizer, options)
        scales.save(work / SCALES_FILE)
        source = f"synthetic, {settings.calibration_samples} samples, at export"
    check_scales(settings.recipe, scales)
    check_keep(settings.recipe.keep, list(site_modules(loaded.model)))
    return QuantContext(settings=settings, scales=scales, scales_source=source)


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


QUANTIZED_FIX = "keep more layers at fp (--keep), try another method, or calibrate on more samples"


def check_gate(gate: AccuracyGate | None, fidelity: dict[str, Any], *, what: str = "the quantized bundle",
               fix: str = QUANTIZED_FIX) -> None:
    if gate is None:
        return
    failures = gate.check(fidelity["summary"])
    if failures:
        raise AccuracyGateError(f"{what} falls below --accuracy-gate ({'; '.join(failures)}); nothing was written: "
                                f"{fix}")
