"""How close ONNX Runtime's int8 GEMMs come to the CPU's int8 instruction bound: a study.

    the bound:  vpdpbusd zmm back to back, from `threads` threads at once (vnni_bound.c): 128 ops each
    the GEMMs:  gemm_probe's kinds (one ORT MatMul of 2048 x 4096 x 4096 each: w8a8dyn, dqmm, nbits8)

The int8 GEMM probe the benchmarks hold prefill and vision against is itself a library's rate: this study says
how far that rate is from what the instructions allow, which is where a claim such as "the vision graph's
GEMMs run at the probe, so vision cannot get 2x faster" stands or falls. Rounds alternate the bound and the
GEMMs (ABBA, host windows from /proc/stat); each rate is its median over quiet rounds, the fraction the median
of the rounds' own ratios, or "busy". AVX-512 VNNI only (Cascade Lake and later, Zen 4 and later): elsewhere the
study says so and stops. `python -m pulse_edge.benchmarks.studies.vnni_bound --help`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pulse_edge.benchmarks.common.gemm_probe import INT8_KINDS, PROBE_SHAPE, measure_gemm_peak, require_onnx
from pulse_edge.benchmarks.common.host import HostWindow, busy_reason, host_sample
from pulse_edge.benchmarks.common.machine import machine_info
from pulse_edge.benchmarks.common.output import REPORT_PATH, write_json
from pulse_edge.benchmarks.common.rounds import abba, paired, quiet_median
from pulse_edge.benchmarks.common.tables import markdown_table
from pulse_edge.benchmarks.studies.common import cell
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.kernels import build

SOURCE = Path(__file__).with_name("vnni_bound.c")
ISA_FLAGS = ("-mavx512f", "-mavx512vnni")
CPU_FEATURES = ("avx512f", "avx512_vnni")
OPS_PER_INSTRUCTION = 2 * 64  # 64 u8 x s8 products, each a multiply and an add
CHAINS = 10  # vpdpbusd per loop iteration (vnni_bound.c)
# per thread and call: 2e9 vpdpbusd, ~0.55 s at one a cycle and 3.6 GHz (measured 0.055 s for a tenth of it): long
# enough that a neighbour's burst during it weighs in the round's host window as much as during the GEMMs
ITERATIONS = 200_000_000


def load_spin() -> Any:
    """The compiled loop (the kernels' build cache), or ConfigError naming what this machine lacks."""
    import ctypes

    try:
        build.require_cpu(CPU_FEATURES, "the VNNI bound study")
        library = build.load(build.build(SOURCE, ISA_FLAGS))
    except build.MachineUnsupported as e:
        raise ConfigError(str(e)) from e
    library.pe_vnni_spin.argtypes = (ctypes.c_int64,)
    library.pe_vnni_spin.restype = ctypes.c_int32
    return library.pe_vnni_spin


def instruction_bound(spin: Any, threads: int, iterations: int = ITERATIONS) -> float:
    """Ops/s of `threads` threads spinning at once (one call each, joined): 128 ops per vpdpbusd."""
    import time

    workers = [threading.Thread(target=spin, args=(iterations,)) for _ in range(threads)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return threads * iterations * CHAINS * OPS_PER_INSTRUCTION / (time.perf_counter() - start)


def compare(threads: int, rounds: int, iterations: int = ITERATIONS,
            shape: tuple[int, int, int] = PROBE_SHAPE) -> dict[str, Any]:
    """The bound and each int8 GEMM kind (of `shape`), timed in ABBA rounds; rates in ops/s. Each side has its
    own host window, and a round counts as quiet only when both were: in one window for both, a burst during the
    short bound was diluted by the GEMMs' seconds, and fractions above 100% were printed as quiet."""
    spin = load_spin()
    bound: list[float] = []
    gemms: list[dict[str, float]] = []
    sides: tuple[list[HostWindow], list[HostWindow]] = ([], [])

    def timed(side: int, work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            before = host_sample()
            work()
            sides[side].append(HostWindow.between(before, host_sample()))
        return run

    seconds_bound, seconds_gemm, _ = abba(
        timed(0, lambda: bound.append(instruction_bound(spin, threads, iterations))),
        timed(1, lambda: gemms.append(measure_gemm_peak(threads=threads, kinds=INT8_KINDS, repeats=5,
                                                        shape=shape).median_ops_per_s)),  # one statistic: medians
        rounds)
    windows = [b if b.busy() else g for b, g in zip(*sides, strict=True)]  # busy if either side was
    rows = {"vpdpbusd zmm": quiet_median(bound, windows)}
    fractions = {}
    for kind in INT8_KINDS:
        rates = [g[kind] for g in gemms]
        rows[kind] = quiet_median(rates, windows)  # each round's median call (5 after gemm_probe's warm-up)
        fractions[kind] = paired(rates, bound, windows)
    return {"threads": threads, "ops_per_s": rows, "of_bound": fractions, "busy": busy_reason(windows),
            "rounds": [{"bound_ops_per_s": b, **{k: g[k] for k in INT8_KINDS}, **w.to_dict()}
                       for b, g, w in zip(bound, gemms, windows, strict=True)],
            "seconds": {"bound": sum(seconds_bound), "gemms": sum(seconds_gemm)}}


def table(row: dict[str, Any]) -> str:
    def share(name: str) -> str:
        if row["busy"]:
            return "busy"
        fraction = 1.0 if name == "vpdpbusd zmm" else row["of_bound"][name]
        return cell(None if fraction is None else 100 * fraction, ".0f") + "%"

    lines = [[name, cell(None if rate is None else rate / 1e12, ".3f"), share(name)]
             for name, rate in row["ops_per_s"].items()]
    return markdown_table(["", f"TOP/s, {row['threads']} threads (median of quiet rounds)", "of the bound"], lines)


@click.command()
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(min=2), default=4, show_default=True, help="ABBA rounds.")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def main(threads: int, rounds: int, json_path: Path | None) -> None:
    """Print the int8 instruction bound beside ORT's int8 GEMM kinds (module doc)."""
    require_onnx()
    row = compare(threads, rounds)
    click.echo(f"machine: {machine_info()}")
    click.echo(table(row))
    if row["busy"]:
        click.echo(f"busy rounds: {row['busy']}")
    if json_path is not None:
        write_json(json_path, {"machine": machine_info(), **row})


if __name__ == "__main__":
    main()
