"""The format libraries of the `ecg` extra, imported only when a file of their format is read.

A cart that only receives DICOM never loads wfdb (and the pandas it drags in);
an install without the extra gets one line naming what to install instead of a
traceback from deep inside a reader.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from pulse_edge.errors import InputError

EXTRA = "ecg"
# Python module -> the PyPI distribution that provides it (both in pyproject's `ecg` extra).
_DISTRIBUTIONS = {"pydicom": "pydicom", "wfdb": "wfdb", "defusedxml": "defusedxml"}


def require(module: str, *, reading: str, source: str) -> ModuleType:
    """Import `module` for reading a `reading` file, or fail with one line saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = _DISTRIBUTIONS.get(module.split(".")[0], module)
        raise InputError(
            f"{source}: reading {reading} needs the {package} package, which is not installed; "
            f"install the extra: pip install 'pulse-edge[{EXTRA}]'."
        ) from None
