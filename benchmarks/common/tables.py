"""The cells and lines that benchmark reports print: numbers, percentiles, markdown tables, the machine."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pulse_edge.benchmarks.common.machine import machine_text

GIB = 2**30


def gib(value: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below (a tiny model's bundle is a few MiB)."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


BUSY_MARK = " (busy)"  # on a cell whose rounds were too few quiet ones for a ratio (host.busy_reason)


def pp(stat: dict[str, Any] | None, digits: int = 0, *, busy: bool = False) -> str:
    """p50 / p95; marked where the rounds behind it were busy, so that no one sets it beside a quiet cell."""
    if stat is None:
        return "n/a"
    return f"{stat['p50']:.{digits}f} / {stat['p95']:.{digits}f}" + (BUSY_MARK if busy else "")


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


ROOFLINE_USE = "the roofline uses {best:.1f} GB/s (the best seen)"


def machine_lines(report: dict[str, Any], use: str = ROOFLINE_USE) -> list[str]:
    """The machine and its bandwidth samples; `use` says what the report does with them ({best}: the best GB/s)."""
    m, bw = report["machine"], report["bandwidth"]
    samples = "; ".join(f"{when}: read {b['read_gb_s']:.1f}, copy "
                        + ("-" if b["copy_gb_s"] is None else f"{b['copy_gb_s']:.1f}")
                        for when, b in bw["samples"].items())
    return [f"machine: {machine_text(m)}; {m['platform']}; "
            f"python {m['python']}; load average {' '.join(map(str, m['load_average']))} at start, "
            f"{' '.join(map(str, m['load_average_end']))} at end",
            f"memory bandwidth (numpy, {gib(bw['array_bytes'])} arrays, {bw['threads']} threads, median of "
            f"{bw['repeats']}; GB/s) {samples} -> {use.format(best=bw['best_gb_s'])}"]


def decoder_line(facts: dict[str, Any]) -> str:
    return (f"one decode step reads {gib(facts['weight_bytes'])} of decoder weights ({facts['source']}) "
            f"+ {facts['kv_bytes_per_position'] / 2**10:.1f} KiB of KV per position of context "
            f"({facts['layers']} layers x 2 x {facts['kv_heads']} heads x {facts['head_dim']} x "
            f"{facts['kv_itemsize']} bytes)")
