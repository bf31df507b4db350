"""The runtime stays lean: importing it must not pull torch, transformers, triton or optimum."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "triton", "optimum", "sentencepiece")
RUNTIME_MODULES = ("pulse_edge.runtime", "pulse_edge.runtime.inputs", "pulse_edge.runtime.preprocess",
                   "pulse_edge.runtime.prompt", "pulse_edge.runtime.tokenizer", "pulse_edge.runtime.sampling",
                   "pulse_edge.runtime.generation", "pulse_edge.runtime.result", "pulse_edge.runtime.manifest",
                   "pulse_edge.runtime.conversation", "pulse_edge.runtime.ort_engine", "pulse_edge.runtime.pipeline",
                   "pulse_edge.pipelines", "pulse_edge.clickgroup", "pulse_edge.cli")


def test_runtime_imports_no_heavy_module() -> None:
    code = (
        "import sys\n"
        f"for m in {RUNTIME_MODULES!r}: __import__(m)\n"
        f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the lean runtime imported: {out.stdout.strip()}"


def test_the_check_itself_sees_a_heavy_import() -> None:
    """Guard against a vacuous check: the same probe does notice torch once it is imported."""
    code = "import sys, pulse_edge.export.reference\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
