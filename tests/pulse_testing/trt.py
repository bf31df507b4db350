"""Bundles with TensorRT-ready quantized graphs, assembled from the fp16 one without export's validation.

With real scales (calibration) the graphs are what export writes; without, activation ranges of 1 and no
folded SmoothQuant/AWQ scales stand in: the same nodes, types and shapes (what the engine tests check), not
the same accuracy.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from pulse_edge.calibration.recipes import Recipe, decoder_sites, make_recipe
from pulse_edge.export.build import tensorrt as trt_build
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
from pulse_edge.export.graphs.vision import describe_vision_graph
from pulse_edge.export.quant.apply import quantize_vision_graph
from pulse_edge.export.quant.context import SCHEME_LABELS, QuantContext, QuantSettings
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.integrity import bundle_file_records
from pulse_edge.runtime.bundle.manifest import GraphSpec, read_manifest

TRT_RECIPES = {"int4": {}, "int8": {"int8_decoder": "w8a8"}, "fp8": {}}


class _UnitRanges:
    def amax(self, site: str, fp8: bool = False) -> float:
        return 1.0


class UncalibratedQuant:
    """QuantContext's two graph methods with stand-in ranges (no calibration: seconds instead of minutes)."""

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    def decoder_plan(self, loaded: Any, shape: DecoderShape) -> LinearPlan:
        schemes = {site: self.recipe.scheme(site) for site in decoder_sites(shape.layers)}
        return LinearPlan(schemes=schemes, act_amax=dict.fromkeys(schemes, 1.0), block_size=self.recipe.block_size)

    def quantize_vision(self, loaded: Any, work: Path, spec: GraphSpec, **emitter: Any) -> GraphSpec:
        counts = quantize_vision_graph(work / spec.file, loaded.model, self.recipe, _UnitRanges(), **emitter)
        return replace(describe_vision_graph(work / spec.file), precision=SCHEME_LABELS[self.recipe.vision],
                       matmul_schemes=counts)


def quantized_trt_bundle(fp16_bundle: Path, out: Path, precision: str, loaded: Any, scales: Any = None,
                         ops: str = "native") -> Path:
    """The fp16 bundle with its graphs rewritten by `precision`'s TensorRT recipe (calibrated when `scales`)."""
    shutil.copytree(fp16_bundle, out)
    manifest = read_manifest(out)
    recipe = make_recipe(precision, **TRT_RECIPES[precision], target="tensorrt")
    quant = QuantContext(QuantSettings(recipe), scales, "test") if scales is not None else UncalibratedQuant(recipe)
    decoder = manifest.graphs[names.DECODER]
    for file in (decoder.file, decoder.external_data):
        (out / file).unlink()
    vision = trt_build.quantize_vision(loaded, out, manifest.graphs[names.VISION], quant)
    shape = DecoderShape.from_config(loaded.config, max_length=manifest.kv.max_length)
    decoder, _ = trt_build.write_decoder(loaded, out, shape, quant, label=precision, ops=ops)
    # the files' sizes and checksums as export records them: build-engines checks them before it builds
    replace(manifest, precision=precision, graphs={names.VISION: vision, names.DECODER: decoder},
            files=bundle_file_records(out)).write(out)
    return out


@contextmanager
def trt_emulation(loaded: Any, bundle: Path, precision: str, scales: Any = None) -> Iterator[None]:
    """`loaded.model` computing `precision`'s TensorRT recipe as quantized_trt_bundle wrote it (the same plan and
    ranges, fp16 scales): the emulated reference its graphs are judged against."""
    from pulse_edge.export.validate.emulate import emulated_reference

    recipe = make_recipe(precision, **TRT_RECIPES[precision])
    quant = QuantContext(QuantSettings(recipe), scales, "test") if scales is not None else UncalibratedQuant(recipe)
    manifest = read_manifest(bundle)
    shape = DecoderShape.from_config(loaded.config, max_length=manifest.kv.max_length)
    ranges = scales if scales is not None else _UnitRanges()
    plan = quant.decoder_plan(loaded, shape)
    forms = {f"{graph}_qdq": trt_build.qdq_form(bundle / manifest.graphs[graph].file)
             for graph in (names.VISION, names.DECODER)}
    with emulated_reference(loaded.model, recipe, ranges, plan, prepacked=trt_build.VALIDATION_SESSION.prepack,
                            **forms):
        yield
