"""Fixtures shared by the export tests: scales, the TensorRT-ready fp16 bundle, the CPU int8 bundle."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
from pulse_edge.calibration.recipes import make_recipe
from pulse_edge.export.build.bundle import ExportOptions, export_bundle
from pulse_edge.export.quant.context import QuantSettings
from pulse_edge.export.validate.parity import ValidationPlan


@pytest.fixture(scope="session")
def tiny_scales(tiny_pipeline):
    """Calibration on two synthetic ECGs: enough for every site's ranges, AWQ and SmoothQuant scales."""
    return calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=2))


@pytest.fixture(scope="session")
def trt_fp16_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with --target tensorrt, fp16, validated (quick plan)."""
    options = ExportOptions(precision="fp16", target="tensorrt", plan=ValidationPlan.quick())
    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("trt") / "fp16", options)


@pytest.fixture(scope="session")
def cpu_int8_bundle(tiny_pipeline, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's int8 CPU bundle (quick plan): the prefill graph, and where this machine's CPU kernels run,
    the graphs cut for them (test_segments.py) and the decode index (test_native_decode.py)."""
    root = tmp_path_factory.mktemp("cpu-int8")
    scales = calibrate(tiny_pipeline.loaded, tiny_pipeline.tokenizer, CalibrationOptions(samples=6))
    settings = QuantSettings(make_recipe("int8"), scales=scales.save(root / "scales.npz"), held_out=2)
    return export_bundle(tiny_checkpoint, root / "int8", ExportOptions(precision="int8", plan=ValidationPlan.quick(),
                                                                      quant=settings))


@pytest.fixture(scope="session")
def reexport_int8(cpu_int8_bundle: Path, tiny_checkpoint: Path) -> Callable[[Path], Path]:
    """`reexport_int8(out)`: the tiny model's int8 CPU bundle exported again to `out` with the same scales (quick
    plan, one held-out sample), for tests that change what the export meets."""
    def reexport(out: Path) -> Path:
        settings = QuantSettings(make_recipe("int8"), scales=cpu_int8_bundle.parent / "scales.npz", held_out=1)
        return export_bundle(tiny_checkpoint, out, ExportOptions(precision="int8", quant=settings,
                                                                 plan=ValidationPlan.quick()))
    return reexport
