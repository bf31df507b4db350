"""Regular installs ship every subpackage: each folder with an __init__.py is listed in pyproject.

An editable install finds unlisted folders anyway, so a missing entry would only
show up on a device integrator's regular install; this test catches it here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_listed() -> None:
    table = _setuptools_table()
    listed = set(table["packages"])
    found = set()
    for package, folder in table["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join((package, *rel.parts)))
    assert found - listed == set(), "add these to [tool.setuptools] packages and package-dir"


def test_no_top_level_module_named_like_a_card_folder() -> None:
    table = _setuptools_table()
    assert all(name == "pulse_edge" or name.startswith("pulse_edge.") for name in table["packages"])
