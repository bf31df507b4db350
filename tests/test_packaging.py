"""Packaging: every subpackage ships, and the card's top-level folders never shadow an installed module.

An editable install finds unlisted folders anyway, so a missing entry would only show up on a device
integrator's regular install; the first test catches it here. The folders `export/`, `runtime/`, `kernels/`,
`calibration/` and `benchmarks/` are namespace portions (no `__init__.py`), so that a regular package of the
same name installed in site-packages always wins over them, even with the repository root first on `sys.path`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]
CARD_FOLDERS = ("export", "runtime", "kernels", "calibration", "benchmarks")


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    """Namespace folders are not discovered by setuptools: each folder holding Python files must be listed."""
    table = _setuptools_table()
    listed = set(table["packages"])
    found = set()
    for package, folder in table["package-dir"].items():
        for module in (ROOT / folder).rglob("*.py"):
            rel = module.parent.relative_to(ROOT / folder)
            if "__pycache__" not in rel.parts:
                found.add(".".join((package, *rel.parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages"
    assert listed - found == set(), "these listed packages hold no Python file"


def test_no_top_level_module_named_like_a_card_folder() -> None:
    table = _setuptools_table()
    assert all(name == "pulse_edge" or name.startswith("pulse_edge.") for name in table["packages"])
    for folder in CARD_FOLDERS:
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py would shadow installed modules"


SHADOW_CHECK = """
import importlib, sys
names = sys.argv[1].split(",")
for name in names:
    module = importlib.import_module(name)
    assert getattr(module, "INSTALLED", False), (name, getattr(module, "__path__", None))
import pulse_edge.runtime.image.preprocess, pulse_edge.kernels.reference, pulse_edge.export.model.config
print("ok")
"""


def test_installed_modules_win_over_the_card_folders_from_the_repository_root(tmp_path: Path) -> None:
    """Run from the repository root (`python -c` puts it first on sys.path), installed modules named like the
    card's folders are the ones imported, and pulse_edge's own subpackages still resolve."""
    site = tmp_path / "site"
    for name in CARD_FOLDERS:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("INSTALLED = True\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", SHADOW_CHECK, ",".join(CARD_FOLDERS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_transformers_finds_its_kernels_package_from_the_repository_root() -> None:
    """transformers >= 5.25 imports Hugging Face's top-level `kernels`; from the repository root it must get it."""
    pytest.importorskip("transformers")
    if not _importable("kernels"):
        pytest.skip("Hugging Face's `kernels` package is not installed (transformers < 5.25)")
    code = ("import kernels, transformers; from kernels import get_kernel; "
            "import pulse_edge.export.model.reference; print(kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "site-packages" in done.stdout, done.stdout


def _importable(name: str) -> bool:
    probe = subprocess.run([sys.executable, "-c", f"import importlib.util as u; print(u.find_spec({name!r}))"],
                           cwd="/", capture_output=True, text=True, timeout=60)
    return probe.returncode == 0 and probe.stdout.strip() != "None"
