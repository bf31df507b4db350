"""pulse-edge: run PULSE, the multimodal LLM that reads ECG images, on edge devices.

The repository's top-level folders `export/`, `runtime/`, `kernels/`, `calibration/` and `benchmarks/` are the
subpackages `pulse_edge.export`, `pulse_edge.runtime`, ... They carry no `__init__.py` on purpose: Python puts
the working directory first on `sys.path`, and a regular package named `kernels/` in the repository root would
shadow an installed top-level module of the same name (transformers imports Hugging Face's `kernels`). As
namespace folders they can never win over a regular installed package, whatever the working directory;
`tests/test_packaging.py` checks it.

A wheel copies those folders inside `pulse_edge/`, where the import system finds them unaided. An editable
install or a bare source checkout keeps them beside this folder: `_CheckoutFolders` maps exactly those five
names to them (adding the whole checkout to `__path__` would also expose `pulse_edge.pulse_edge`, and tools
that walk packages would recurse forever).
"""

from __future__ import annotations

import sys
from importlib.machinery import ModuleSpec
from pathlib import Path

__version__ = "0.1.0"

CARD_FOLDERS = ("export", "runtime", "kernels", "calibration", "benchmarks")


class _CheckoutFolders:
    """A meta path finder for `pulse_edge.<folder>` in a source checkout: a namespace spec on that folder."""

    def __init__(self, folders: dict[str, str]) -> None:
        self.folders = folders  # {"pulse_edge.export": "/path/to/checkout/export", ...}

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> ModuleSpec | None:
        folder = self.folders.get(fullname)
        if folder is None:
            return None
        spec = ModuleSpec(fullname, None, is_package=True)
        spec.submodule_search_locations = [folder]
        return spec


def _install_checkout_finder() -> None:
    here = Path(__file__).resolve().parent
    if (here / "runtime").is_dir() or not (here.parent / "runtime").is_dir():
        return  # a wheel (folders inside), or an unrelated layout: the import system needs no help
    if any(isinstance(finder, _CheckoutFolders) for finder in sys.meta_path):
        return
    folders = {f"{__name__}.{name}": str(here.parent / name) for name in CARD_FOLDERS}
    sys.meta_path.append(_CheckoutFolders(folders))


_install_checkout_finder()
