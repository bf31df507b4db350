"""The runtime stays lean: importing it must not pull torch, transformers, triton or optimum."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "triton", "optimum", "sentencepiece")
# The `ecg` extra's libraries (and what wfdb drags in) load only when a file of their format is read.
FORMAT_LIBRARIES = ("pydicom", "wfdb", "defusedxml", "pandas", "scipy", "matplotlib")
RUNTIME_MODULES = (
    "pulse_edge.runtime",
    "pulse_edge.runtime.inputs",
    "pulse_edge.runtime.inputs.images",
    "pulse_edge.runtime.inputs.discover",
    "pulse_edge.runtime.findings",
    "pulse_edge.runtime.generation.interpretation",
    "pulse_edge.runtime.batch",
    "pulse_edge.runtime.image.preprocess",
    "pulse_edge.runtime.text.prompt",
    "pulse_edge.runtime.text.tokenizer",
    "pulse_edge.runtime.generation.sampling",
    "pulse_edge.runtime.generation.decode",
    "pulse_edge.runtime.generation.result",
    "pulse_edge.runtime.bundle.manifest",
    "pulse_edge.runtime.generation.conversation",
    "pulse_edge.runtime.engines.ort",
    "pulse_edge.runtime.pipeline",
    "pulse_edge.backends",
    "pulse_edge.cli.group",
    "pulse_edge.cli.main",
)


def _loaded_by_the_runtime(candidates: tuple[str, ...], modules: tuple[str, ...] = RUNTIME_MODULES) -> str:
    """Which of `candidates` a fresh interpreter holds after importing `modules`, space-separated."""
    code = (
        "import sys\n"
        f"for m in {modules!r}: __import__(m)\n"
        f"print(' '.join(m for m in {candidates!r} if m in sys.modules))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def test_runtime_imports_no_heavy_module() -> None:
    loaded = _loaded_by_the_runtime(HEAVY)
    assert loaded == "", f"the lean runtime imported: {loaded}"


def test_format_libraries_load_only_when_a_recording_is_read() -> None:
    loaded = _loaded_by_the_runtime(FORMAT_LIBRARIES)
    assert loaded == "", f"importing the runtime loaded: {loaded}"


def test_the_check_itself_sees_a_heavy_import() -> None:
    """Guard against a vacuous check: the same probe names torch once a module that imports it is among those
    imported."""
    assert _loaded_by_the_runtime(HEAVY, (*RUNTIME_MODULES, "pulse_edge.export.model.reference")).split()[0] == "torch"
