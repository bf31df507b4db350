"""pulse-edge: run PULSE, the multimodal LLM that reads ECG images, on edge devices.

The repository's top-level folders `export/`, `runtime/`, `kernels/`, `calibration/` and `benchmarks/` are the
subpackages `pulse_edge.export`, `pulse_edge.runtime`, ... They carry no `__init__.py` on purpose: Python puts
the working directory first on `sys.path`, and a regular package named `kernels/` in the repository root would
shadow an installed top-level module of the same name (transformers imports Hugging Face's `kernels`). As
namespace portions they can never win over a regular installed package, whatever the working directory;
`tests/test_packaging.py` checks it.

A wheel copies those folders inside `pulse_edge/`. An editable install or a source checkout keeps them beside
this folder, so the package's search path takes in the repository root (the folders are found there as
namespace subpackages).
"""

from __future__ import annotations

from pathlib import Path as _Path

__version__ = "0.1.0"

_HERE = _Path(__file__).resolve().parent
# Installed from a wheel the subpackages live inside this folder; otherwise in the checkout beside it.
if not (_HERE / "runtime").is_dir() and (_HERE.parent / "runtime").is_dir():
    __path__.append(str(_HERE.parent))
