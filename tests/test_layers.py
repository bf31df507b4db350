"""Layers point one way: the import-linter contracts of pyproject.toml hold, and they do catch a back-import.

import-linter (grimp) walks packages with `__init__.py` files, and the card's folders are namespace folders
beside `pulse_edge/` in a checkout. So the check runs on a copy of the package in its installed layout (the
folders inside `pulse_edge/`, as a wheel has them), with an `__init__.py` added where a folder lacks one.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
pytest.importorskip("importlinter", reason="the layer contract needs import-linter (the dev extra)")

ROOT = Path(__file__).resolve().parents[1]


def _installed_layout(dest: Path) -> Path:
    """Copy the package as a wheel lays it out; returns the folder to put on sys.path."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for package, folder in setuptools["package-dir"].items():
        target = dest.joinpath(*package.split("."))
        shutil.copytree(ROOT / folder, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    for folder in [dest / "pulse_edge", *(dest / "pulse_edge").rglob("*")]:
        if folder.is_dir():
            (folder / "__init__.py").touch(exist_ok=True)
    shutil.copy(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _lint(site: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run([sys.executable, "-c", code, "--config", str(site / "pyproject.toml"), "--no-cache"],
                          cwd=site, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contracts_hold(tmp_path: Path) -> None:
    done = _lint(_installed_layout(tmp_path))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    assert f"Contracts: {len(contracts)} kept, 0 broken." in done.stdout


@pytest.mark.parametrize(("module", "back_import"), [
    ("runtime/text/prompt.py", "import pulse_edge.export.model.reference"),  # runtime -> export
    ("calibration/samples.py", "from pulse_edge.benchmarks.ecgbench import score"),  # calibration -> benchmarks
    ("runtime/image/preprocess.py", "import torch"),  # the lean runtime -> torch
    ("runtime/generation/decode.py", "import starlette"),  # the runtime outside the server -> the web stack
])
def test_a_back_import_breaks_a_contract(tmp_path: Path, module: str, back_import: str) -> None:
    site = _installed_layout(tmp_path)
    path = site / "pulse_edge" / module
    path.write_text(path.read_text() + f"\n\ndef _back() -> None:\n    {back_import}  # noqa\n")
    done = _lint(site)
    assert done.returncode != 0
    assert "BROKEN" in done.stdout
