"""Shared fixtures (tiny checkpoints, ECG images) and the marker rules.

Markers: `slow` runs only with --run-slow; `gpu` needs CUDA; `tensorrt` needs
tensorrt_rtx or tensorrt (building engines needs no GPU); `real_weights` needs $PULSE_EDGE_WEIGHTS. Each skip says
why, so a skipped check is never mistaken for a passed one.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


@pytest.fixture(scope="session", autouse=True)
def _own_user_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tests' bundles are stamped as verified (runtime/bundle/verified.py) in a cache of their own, not the
    user's; the compiled CPU kernels stay in the shared kernel cache (building them takes seconds each)."""
    from pulse_edge.runtime.kernels.build import CACHE_ENV, default_cache

    saved = {name: os.environ.get(name) for name in ("XDG_CACHE_HOME", CACHE_ENV)}
    os.environ[CACHE_ENV] = str(default_cache())  # resolved before the cache root moves
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user-cache"))
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _cuda_available() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rules = {
        "slow": (not config.getoption("--run-slow"), "slow test: run with --run-slow"),
        "gpu": (not _cuda_available(), "needs a CUDA GPU; none is visible"),
        "tensorrt": (not any(importlib.util.find_spec(m) for m in ("tensorrt_rtx", "tensorrt")),
                     "needs TensorRT (tensorrt_rtx or tensorrt): pip install 'pulse-edge[rtx]'"),
        "real_weights": (not os.environ.get("PULSE_EDGE_WEIGHTS"),
                         "needs the real PULSE-7B checkpoint: set PULSE_EDGE_WEIGHTS=DIR"),
    }
    for item in items:
        for marker, (skip, reason) in rules.items():
            if skip and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def kernel_or_skip() -> Callable[..., Any]:
    """`kernel_or_skip(load, why="")`: `load()` (a CPU kernel of pulse-edge's), or the test skipped where this
    machine cannot run it (runtime/kernels/build.py MachineUnsupported: the CPU's instructions, no compiler, no AMX
    state). Any other refusal (a failed self-test, a source that does not compile) fails the test: a broken kernel
    must never read as a skip on the machines that run it."""
    from pulse_edge.runtime.kernels.build import MachineUnsupported

    def load_or_skip(load: Callable[[], Any], why: str = "") -> Any:
        try:
            return load()
        except MachineUnsupported as e:
            pytest.skip(f"{why}{e}")
    return load_or_skip


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default tiny PULSE checkpoint: original layout, flat merge, tower inside."""
    from pulse_edge.export.fixtures.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint: Path):
    from pulse_edge.export.model.torch_backend import TorchPipeline

    return TorchPipeline.from_checkpoint(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint exported to an fp32 bundle (validated); copy it before damaging it."""
    from pulse_edge.export.build.bundle import export_bundle

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("bundle") / "fp32")


@pytest.fixture(scope="session")
def ecg_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rendered 12-lead sinus-rhythm print, 2200x1700 (US letter at 200 dpi)."""
    from pulse_edge.runtime.ecg.render import render_ecg
    from pulse_edge.runtime.ecg.synthetic import synthesize_ecg

    path = tmp_path_factory.mktemp("img") / "ecg.png"
    render_ecg(synthesize_ecg("sinus", seed=1), width_px=2200, height_px=1700).save(path)
    return path


# The packages whose versions decide what the suite exercises; the header says which ran and whether they are
# the tested ones of constraints.txt (the README's install command uses it).
REPORTED_PACKAGES = ("numpy", "onnx", "onnxruntime", "torch", "transformers", "tokenizers", "triton", "pillow",
                     "tensorrt-rtx")


def _pinned_versions() -> dict[str, str]:
    path = Path(__file__).resolve().parents[1] / "constraints.txt"
    pins = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def pytest_report_header(config: pytest.Config) -> list[str]:
    from importlib import metadata

    pins, cells, off = _pinned_versions(), [], []
    for name in REPORTED_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        cells.append(f"{name} {version}")
        pinned = pins.get(name)
        if pinned and version.split("+")[0] != pinned:
            off.append(f"{name} {version} (constraints.txt: {pinned})")
    lines = ["pulse-edge versions: " + ", ".join(cells)]
    lines.append("versions differ from constraints.txt: " + "; ".join(off) if off else
                 "versions: as pinned in constraints.txt")
    return lines
