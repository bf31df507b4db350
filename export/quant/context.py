"""The quantized side of `pulse-edge export --precision int8|int4|fp8`: scales in, graphs rewritten, report out.

    --scales FILE (checked against the checkpoint's sha256)  or  calibrate now on synthetic ECGs (said in the log)
      -> calibration.npz in the bundle
      -> vision graph rewritten site by site; decoder built with a LinearPlan
      -> held-out samples (export/validate/held_out.py) -> fidelity report
      -> --accuracy-gate: refuse the bundle when the report falls below it
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate, fp8_method
from pulse_edge.calibration.fidelity import AccuracyGate, json_safe
from pulse_edge.calibration.observe import site_modules
from pulse_edge.calibration.recipes import Recipe, check_keep
from pulse_edge.calibration.scales import Scales
from pulse_edge.errors import PulseEdgeError
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
from pulse_edge.export.model.checkpoint import LoadedCheckpoint
from pulse_edge.export.quant.apply import check_scales, decoder_plan, quantize_vision_graph
from pulse_edge.runtime.bundle.manifest import CalibrationSpec, GraphSpec
from pulse_edge.runtime.bundle.names import SCALES_FILE
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


QUANTIZED_FIX = "keep more layers at fp (--keep), try another method, or calibrate on more samples"


def check_gate(gate: AccuracyGate | None, fidelity: dict[str, Any], *, what: str = "the quantized bundle",
               fix: str = QUANTIZED_FIX) -> None:
    if gate is None:
        return
    failures = gate.check(fidelity["summary"])
    if failures:
        raise AccuracyGateError(f"{what} falls below --accuracy-gate ({'; '.join(failures)}); nothing was written: "
                                f"{fix}")
