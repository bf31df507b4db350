"""Shared fixtures (tiny checkpoints, ECG images) and the marker rules.

Markers: `slow` runs only with --run-slow; `gpu` needs CUDA; `tensorrt` needs
the tensorrt package; `real_weights` needs $PULSE_EDGE_WEIGHTS. Each skip says
why, so a skipped check is never mistaken for a passed one.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rules = {
        "slow": (not config.getoption("--run-slow"), "slow test: run with --run-slow"),
        "gpu": (not _cuda_available(), "needs a CUDA GPU; none is visible"),
        "tensorrt": (importlib.util.find_spec("tensorrt") is None, "needs TensorRT; it is not installed here"),
        "real_weights": (not os.environ.get("PULSE_EDGE_WEIGHTS"),
                         "needs the real PULSE-7B checkpoint: set PULSE_EDGE_WEIGHTS=DIR"),
    }
    for item in items:
        for marker, (skip, reason) in rules.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny PULSE checkpoint: original layout, flat merge, tower inside."""
    from pulse_edge.export.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    from pulse_edge.export.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def ecg_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered 12-lead sinus-rhythm print, 2200x1700 (US letter at 200 dpi)."""
    from pulse_edge.calibration.ecg_render import render_ecg
    from pulse_edge.calibration.ecg_signals import synthesize_ecg

    path = tmp_path_factory.mktemp("img") / "ecg.png"
    render_ecg(synthesize_ecg("sinus", seed=1), width_px=2200, height_px=1700).save(path)
    return path
