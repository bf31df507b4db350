"""The VNNI bound study (benchmarks/studies/vnni_bound.py): its instruction loop is built and counted, and the
GEMMs are held against it in the same rounds. Where the CPU has no AVX-512 VNNI it says so in one line."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pulse_edge.benchmarks.studies import vnni_bound
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.kernels import build


@pytest.fixture(scope="module")
def spin(kernel_or_skip: Callable[..., Any]) -> Any:
    kernel_or_skip(lambda: build.require_cpu(vnni_bound.CPU_FEATURES, "the VNNI bound study"))
    return vnni_bound.load_spin()


def test_the_loop_does_its_instructions_and_the_bound_scales_with_its_count(spin: Any) -> None:
    assert spin(1000) == 1000 * vnni_bound.CHAINS * 4 * (1 * 2)  # a lane: 4 products of 1 x 2 per instruction
    short, long = (vnni_bound.instruction_bound(spin, 1, n) for n in (200_000, 2_000_000))
    assert short > 0 and long > 0.3 * short  # a rate, not a count: ten times the work takes about ten times as long


def test_the_study_holds_the_gemms_against_the_bound_in_the_same_rounds(spin: Any, quiet_host: None) -> None:
    row = vnni_bound.compare(1, 2, iterations=200_000, shape=(64, 256, 256))
    assert set(row["ops_per_s"]) == {"vpdpbusd zmm", *vnni_bound.INT8_KINDS} and len(row["rounds"]) == 2
    assert all(row["of_bound"][kind] > 0 for kind in vnni_bound.INT8_KINDS)
    assert "of the bound" in vnni_bound.table(row)


def test_a_cpu_without_vnni_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"sse2"}))
    with pytest.raises(ConfigError, match="needs CPU features this machine lacks"):
        vnni_bound.load_spin()


def test_a_busy_run_prints_busy_cells_not_fractions() -> None:
    """Busy rounds printed "busy%" beside a "100%" bound row."""
    kinds = {k: None for k in vnni_bound.INT8_KINDS}
    row = {"threads": 2, "ops_per_s": {"vpdpbusd zmm": None, **kinds}, "of_bound": kinds,
           "busy": "host busy: 0 of 4 rounds quiet (need 3)"}
    lines = vnni_bound.table(row).splitlines()[2:]
    assert all(line.endswith("| busy | busy |") for line in lines) and "%" not in "".join(lines)
