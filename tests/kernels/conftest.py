"""What the kernel tests share: a kernel built into a cache of the module's own, or the test skipped with the
reason its load gave (a CPU without the instructions, no C compiler, a failed self-test)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pulse_edge.errors import KernelUnavailable


@pytest.fixture(scope="module")
def load_or_skip(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Callable[[Path], Any]], Any]:
    """`load_or_skip(lambda cache: Kernel.load(..., cache=cache))`: the kernel, or pytest.skip with
    KernelUnavailable's reason."""
    def load(loader: Callable[[Path], Any]) -> Any:
        try:
            return loader(tmp_path_factory.mktemp("kernels"))
        except KernelUnavailable as e:
            pytest.skip(str(e))
    return load
