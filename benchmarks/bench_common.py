"""Shared pieces of `pulse-edge bench latency` and `bench backends` (see latency.py and backends.py).

Percentiles over timed runs, peak RSS (ru_maxrss, and Linux VmHWM reset around a
stretch of work), the bytes one decode step reads (DecoderFacts) and the roofline
against them, the rendered ECG print every run uses, the bandwidth probes, the
machine description, and the table helpers both reports print with. torch and
the pulse_edge runtime are imported inside the functions that use them.
"""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.benchmarks.ecgbench_env import machine_info
from pulse_edge.benchmarks.roofline import (
    GB,
    GIB,
    Bandwidth,
    achieved_bandwidth,
    bytes_per_token,
    kv_bytes_per_position,
    measure_bandwidth,
    roofline_tokens_per_s,
)

RU_MAXRSS_UNIT = {"darwin": 1}  # bytes on macOS; KiB on Linux and the BSDs


# ---------------------------------------------------------------- measurement helpers

@dataclass(frozen=True)
class Stat:
    """p50 and p95 (linear interpolation, as numpy.percentile) over the timed runs."""

    p50: float
    p95: float
    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        if not values:
            raise ValueError("no timed runs")
        p50, p95 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95])
        return cls(p50=float(p50), p95=float(p95), values=tuple(float(v) for v in values))

    def to_dict(self) -> dict[str, Any]:
        return {"p50": self.p50, "p95": self.p95, "values": list(self.values)}


def peak_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss): loading, every run, everything."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * RU_MAXRSS_UNIT.get(sys.platform, 1024)


def reset_peak() -> bool:
    """Reset this process's RSS high-water mark (Linux clear_refs 5); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return proc_status_bytes("VmHWM") is not None


def peak_since_reset(reset_worked: bool) -> int:
    """The high-water mark since `reset_peak` (VmHWM), or the process's ru_maxrss where it could not reset."""
    return (proc_status_bytes("VmHWM") if reset_worked else None) or peak_rss_bytes()


def proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dir_size_bytes(path: Path) -> int:
    """Bytes on disk of a bundle or checkpoint directory (the directory itself may be a link)."""
    root = path.resolve()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def gib(value: float) -> str:
    """Bytes for people: GiB from 1 GiB up, MiB below (a tiny model's bundle is a few MiB)."""
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 2**20:.1f} MiB"


# ---------------------------------------------------------------- what one decode step reads

@dataclass(frozen=True)
class DecoderFacts:
    """Bytes one decode step must read: every decoder weight (the embedding table only by one row,
    so it is left out), and the KV cache of every position of context."""

    weight_bytes: int
    kv_bytes_per_position: float
    layers: int
    kv_heads: int
    head_dim: int
    kv_itemsize: int
    hidden_size: int
    source: str

    def bytes_per_token(self, context: int) -> float:
        return bytes_per_token(self.weight_bytes, self.kv_bytes_per_position, context)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


KV_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "uint8": 1}


def bundle_decoder_facts(bundle: Path) -> DecoderFacts:
    """From the manifest: the decoder graph's files (its initializers live in the external data)."""
    from pulse_edge.runtime.manifest import read_manifest

    manifest = read_manifest(bundle)
    kv = manifest.kv
    sizes = manifest.graphs["decoder"].sizes
    return DecoderFacts(weight_bytes=int(sum(sizes.values())),
                        kv_bytes_per_position=kv_bytes_per_position(kv.layers, kv.kv_heads, kv.head_dim,
                                                                    KV_ITEMSIZE[kv.dtype]),
                        layers=kv.layers, kv_heads=kv.kv_heads, head_dim=kv.head_dim,
                        kv_itemsize=KV_ITEMSIZE[kv.dtype], hidden_size=manifest.text.hidden_size,
                        source=f"bundle manifest: {', '.join(sizes)} ({manifest.precision})")


def torch_decoder_facts(lm: Any) -> DecoderFacts:
    """From the loaded language model: its parameters (bar the embedding table) x their dtype size."""
    cfg = lm.config
    params = [p for name, p in lm.named_parameters() if "embed_tokens" not in name]
    itemsize = params[0].element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderFacts(weight_bytes=sum(p.numel() * p.element_size() for p in params),
                        kv_bytes_per_position=kv_bytes_per_position(cfg.num_hidden_layers, cfg.num_key_value_heads,
                                                                    head_dim, itemsize),
                        layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                        kv_itemsize=itemsize, hidden_size=cfg.hidden_size,
                        source=f"checkpoint: language-model parameters x {itemsize} bytes")


def roofline_entry(facts: DecoderFacts, bandwidth: Bandwidth, context: float, tokens_per_s: float | None,
                   ) -> dict[str, Any]:
    """The bound and what was achieved against it, at one context length."""
    per_token = facts.bytes_per_token(round(context))
    bound = roofline_tokens_per_s(bandwidth.best, facts.weight_bytes, facts.kv_bytes_per_position, round(context))
    achieved = achieved_bandwidth(tokens_per_s, per_token) if tokens_per_s else None
    return {"context": context, "bytes_per_token": per_token, "roofline_tokens_per_s": bound,
            "achieved_gb_s": achieved / GB if achieved is not None else None,
            "fraction_of_bandwidth": achieved / bandwidth.best if achieved is not None else None}


def paired_fraction(facts: DecoderFacts, context: float, tokens_per_s: Sequence[float],
                    probes_bytes_s: Sequence[float]) -> float | None:
    """Median over decode rounds of achieved / the bandwidth probed just before that round: the machine's
    bandwidth moves within a run (neighbours), and a probe beside each round follows it; None without probes."""
    if not probes_bytes_s or len(probes_bytes_s) != len(tokens_per_s):
        return None
    per_token = facts.bytes_per_token(round(context))
    return float(np.median([achieved_bandwidth(t, per_token) / b for t, b in zip(tokens_per_s, probes_bytes_s,
                                                                                 strict=True)]))


# ---------------------------------------------------------------- inputs, threads, machine, bandwidth

def ecg_print(size: tuple[int, int], seed: int = 1) -> Any:
    """A rendered 12-lead sinus-rhythm print of the given pixel size."""
    from pulse_edge.calibration.ecg_render import render_ecg
    from pulse_edge.calibration.ecg_signals import synthesize_ecg

    return render_ecg(synthesize_ecg("sinus", seed=seed), width_px=size[0], height_px=size[1])


def torch_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def bandwidth_probe(array_bytes: int, progress: Callable[[str], None], when: str) -> Bandwidth:
    progress(f"measuring memory bandwidth ({when}, {gib(array_bytes)} arrays)")
    return measure_bandwidth(array_bytes)


def bandwidth_report(samples: dict[str, Bandwidth]) -> tuple[Bandwidth, dict[str, Any]]:
    """The best sample is what the roofline uses (the machine did at least that); all are reported,
    since other processes on the machine move both."""
    best = max(samples.values(), key=lambda b: b.best)
    return best, {**best.to_dict(), "samples": {when: b.to_dict() for when, b in samples.items()}}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_with_load() -> dict[str, Any]:
    """ecgbench_env's description, plus the load average: a busy machine explains a slow run."""
    return {**machine_info(), "load_average": load_average()}


# ---------------------------------------------------------------- tables

def pp(stat: dict[str, Any] | None, digits: int = 0) -> str:
    return "n/a" if stat is None else f"{stat['p50']:.{digits}f} / {stat['p95']:.{digits}f}"


def num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def machine_lines(report: dict[str, Any]) -> list[str]:
    m, bw = report["machine"], report["bandwidth"]
    samples = "; ".join(f"{when}: read {b['read_gb_s']:.1f}, copy {b['copy_gb_s']:.1f}"
                        for when, b in bw["samples"].items())
    return [f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['platform']}; "
            f"python {m['python']}; load average {' '.join(map(str, m['load_average']))} at start, "
            f"{' '.join(map(str, m['load_average_end']))} at end",
            f"memory bandwidth (numpy, {gib(bw['array_bytes'])} arrays, {bw['threads']} threads, median of "
            f"{bw['repeats']}; GB/s) {samples} -> the roofline uses {bw['best_gb_s']:.1f} GB/s (the best seen)"]


def decoder_line(facts: dict[str, Any]) -> str:
    return (f"one decode step reads {gib(facts['weight_bytes'])} of decoder weights ({facts['source']}) "
            f"+ {facts['kv_bytes_per_position'] / 2**10:.1f} KiB of KV per position of context "
            f"({facts['layers']} layers x 2 x {facts['kv_heads']} heads x {facts['head_dim']} x "
            f"{facts['kv_itemsize']} bytes)")
