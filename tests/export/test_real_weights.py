"""The real PULSE-7B checkpoint end to end: the torch reference reads a print, an int8 bundle exports, validates,
meets its recipe's recommended fidelity on real weights and answers the same print. Skipped unless
PULSE_EDGE_WEIGHTS names the checkpoint's folder (no weights can be downloaded where the default suite runs);
on a 24 GiB, 2-core machine the export alone takes about an hour (docs/performance.md, "the full 7B").

What random weights cannot show is asserted here: the recipe's fidelity on the real weights' activations, and
that the model's answer is an ECG reading (a finding of the vocabulary), not only that the graphs match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_weights

QUESTION = "What is the rhythm?"


def _pulse_edge(*args: str, timeout: int) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("pulse-edge")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pulse_edge.cli.main"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="module")
def weights() -> Path:
    return Path(os.environ["PULSE_EDGE_WEIGHTS"])


@pytest.fixture(scope="module")
def sinus_print(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("print") / "sinus.png"
    _pulse_edge("render-ecg", str(out), "--rhythm", "sinus", timeout=120)
    return out


def _answer(model: Path, image: Path, *extra: str) -> dict:
    done = _pulse_edge("infer", str(image), "--model", str(model), "--question", QUESTION, "--json",
                       "--max-new-tokens", "64", *extra, timeout=3600)
    return json.loads(done.stdout)


def test_the_reference_reads_a_letter_size_print_as_an_ecg(weights: Path, sinus_print: Path) -> None:
    answer = _answer(weights, sinus_print, "--backend", "torch")
    assert answer["image_tokens"] == 2880  # anyres, flat merge, 336 px tiles: 5 x 576
    assert answer["text"].strip() and answer["stop_reason"] in ("eos", "max_new_tokens")
    assert any(f["category"] == "rhythm" for f in answer["findings"]), answer["text"]


def test_an_int8_bundle_meets_its_recipe_on_the_real_weights_and_answers(weights: Path, sinus_print: Path,
                                                                        tmp_path: Path) -> None:
    bundle = tmp_path / "pulse-int8"
    _pulse_edge("export", str(weights), "-o", str(bundle), "--precision", "int8", "--validation", "quick",
                "--calibration-samples", "8", "--held-out", "2", timeout=4 * 3600)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["pass"] is True
    recommended = manifest["calibration"]["fidelity"]["recommended"]
    assert recommended["below"] == [], recommended  # random weights cannot tell whether the recipe is good enough
    answer = _answer(bundle, sinus_print)
    assert answer["image_tokens"] == 2880 and answer["text"].strip()
    assert any(f["category"] == "rhythm" for f in answer["findings"]), answer["text"]
