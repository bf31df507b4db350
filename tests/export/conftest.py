"""Fixtures shared by the TensorRT-ready graph and engine tests: scales and the fp16 bundle."""

from __future__ import annotations

from pathlib import Path

import pytest

from pulse_edge.calibration.calibrate import CalibrationOptions, calibrate
from pulse_edge.export.build.bundle import ExportOptions, export_bundle
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
