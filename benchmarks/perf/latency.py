"""Latency suite: `pulse-edge bench latency` (one model, real ECG prints).

    ECG print (letter 200/300 dpi, A4 300 dpi) -> Conversation.ask x (warm-up + runs)
    -> p50/p95 of preprocess, vision, prefill, time to first token, decode tokens/s
    -> beside it the memory-bandwidth roofline at this machine's measured bandwidth

Absolute times on a shared machine drift, which is why the bandwidth is measured
in the same run. torch and onnxruntime are imported inside the functions that
use them; the CLI imports this module only when a command runs. The side-by-side
`bench backends` is in backends.py; what both share is in bench_common.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.measure import (
    Stat,
    bandwidth_probe,
    bandwidth_report,
    dir_size_bytes,
    ecg_print,
    load_average,
    machine_with_load,
    peak_since_reset,
    reset_peak,
    torch_threads,
)
from pulse_edge.benchmarks.common.roofline import (
    GIB,
    Bandwidth,
    DecoderFacts,
    bundle_decoder_facts,
    roofline_entry,
    torch_decoder_facts,
)
from pulse_edge.benchmarks.common.tables import decoder_line, gib, machine_lines, markdown_table, num, pp
from pulse_edge.errors import ConfigError

# Common ECG print sizes in pixels (width x height): what a cart's scanner or PDF export produces.
PRINT_SIZES = {(2200, 1700): "letter 200 dpi", (3300, 2550): "letter 300 dpi", (3508, 2480): "A4 300 dpi"}
TIMING_FIELDS = ("preprocess_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")
RSS_NOTE = "peak resident set size (RSS) of the whole benchmark process, from getrusage ru_maxrss"
PEAK_NOTE = ("peak resident set size (RSS) of the process from loading the model to its last run (Linux VmHWM, "
             "reset after the bandwidth probe freed its arrays; what ru_maxrss reports from that point)")


@dataclass(frozen=True)
class LatencyConfig:
    model: Path
    runs: int = 5
    warmup: int = 1
    sizes: tuple[tuple[int, int], ...] = tuple(PRINT_SIZES)
    max_new_tokens: int = 32
    backend: str = "auto"
    provider: str = "cpu"
    threads: int = 0
    bandwidth_bytes: int = GIB
    question: str | None = None
    prefill_graph: str = "auto"  # a CPU bundle's prefill graph (runtime/engines/memory.py)
    prefill_chunk: int | None = None  # None: the runtime's choice (runtime/engines/bundle_engine.py); 0: one pass


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'2200x1700,3300x2550' -> ((2200, 1700), (3300, 2550))."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError as e:
            raise ConfigError(f"--sizes takes WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {item!r}") from e
        if width < 1 or height < 1:
            raise ConfigError(f"--sizes: {item!r} is not a positive size")
        sizes.append((width, height))
    if not sizes:
        raise ConfigError("--sizes names no size")
    return tuple(sizes)


def _open(cfg: LatencyConfig) -> tuple[Any, DecoderFacts]:
    from pulse_edge.backends import open_backend
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.pipeline import Pipeline as OrtPipeline

    pipeline = open_backend(cfg.model, backend=cfg.backend, session=SessionConfig(
        provider=cfg.provider, threads=cfg.threads, prefill_graph=cfg.prefill_graph), prefill_chunk=cfg.prefill_chunk)
    if isinstance(pipeline, OrtPipeline):
        return pipeline, bundle_decoder_facts(cfg.model)
    torch_threads(cfg.threads)
    return pipeline, torch_decoder_facts(pipeline.model.language_model)


def _latency_row(pipeline: Any, size: tuple[int, int], cfg: LatencyConfig) -> dict[str, Any]:
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

    image = ecg_print(size)
    question = cfg.question or DEFAULT_QUESTION
    results = [pipeline.generate(image, question, max_new_tokens=cfg.max_new_tokens)
               for _ in range(cfg.warmup + cfg.runs)][cfg.warmup:]
    timings = [r.timings for r in results]
    stats = {name: Stat.of([getattr(t, name) for t in timings]) for name in TIMING_FIELDS}
    last = results[-1]
    decoded = stats["decode_tokens_per_s"].p50 > 0  # a random model may stop at EOS after its first token
    if not decoded:
        del stats["decode_tokens_per_s"]
    return {"size": f"{size[0]}x{size[1]}", "print": PRINT_SIZES.get(size, "custom"),
            "image_tokens": last.image_tokens, "prompt_tokens": last.prompt_tokens,
            "generated_tokens": last.generated_tokens, "stop_reason": last.stop_reason,
            "timings": {k: v.to_dict() for k, v in stats.items()},
            "decode_context": last.prompt_tokens + last.generated_tokens / 2}  # the mean over the decode steps


def _with_roofline(row: dict[str, Any], facts: DecoderFacts, bandwidth: Bandwidth) -> dict[str, Any]:
    rate = row["timings"].get("decode_tokens_per_s", {}).get("p50")
    return {**row, **roofline_entry(facts, bandwidth, row["decode_context"], rate)}


def run_latency(cfg: LatencyConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure one model on each print size; returns the report (see `latency_table`)."""
    started, machine = time.perf_counter(), machine_with_load()
    samples = {"start": bandwidth_probe(cfg.bandwidth_bytes, progress, "start")}
    reset = reset_peak()  # the probe's arrays are freed: they would otherwise be the peak of a small model
    progress(f"loading {cfg.model}")
    pipeline, facts = _open(cfg)
    rows = []
    for size in cfg.sizes:
        progress(f"{size[0]}x{size[1]}: {cfg.warmup} warm-up + {cfg.runs} runs")
        rows.append(_latency_row(pipeline, size, cfg))
    peak = peak_since_reset(reset)
    samples["end"] = bandwidth_probe(cfg.bandwidth_bytes, progress, "end")
    bandwidth, bandwidth_dict = bandwidth_report(samples)
    return {"kind": "latency", "machine": {**machine, "load_average_end": load_average()},
            "model": model_info(cfg.model),
            "backend": getattr(pipeline, "backend", "torch"), "settings": _latency_settings(cfg),
            "prefilled_by": getattr(pipeline, "prefilled_by", "decoder graph"),  # the torch reference: one graph
            "prefill_chunk": getattr(getattr(pipeline, "engine", None), "prefill_chunk", None),  # None: one pass
            "bandwidth": bandwidth_dict, "decoder": facts.to_dict(),
            "model_bytes_on_disk": dir_size_bytes(cfg.model), "peak_rss_bytes": peak,
            "peak_rss_note": PEAK_NOTE if reset else RSS_NOTE,
            "sizes": [_with_roofline(r, facts, bandwidth) for r in rows], "elapsed_s": time.perf_counter() - started}


def _latency_settings(cfg: LatencyConfig) -> dict[str, Any]:
    return {"runs": cfg.runs, "warmup": cfg.warmup, "max_new_tokens": cfg.max_new_tokens, "provider": cfg.provider,
            "threads": cfg.threads, "question": cfg.question or "default", "prefill_graph": cfg.prefill_graph}


def _chunking(report: dict[str, Any]) -> str:
    chunk = report.get("prefill_chunk")
    return f" in chunks of {chunk}" if chunk else (" in one pass" if report.get("backend") != "torch" else "")


def latency_table(report: dict[str, Any]) -> str:
    model, s = report["model"], report["settings"]
    header = ["print", "pixels", "image tok", "preprocess ms", "vision ms", "prefill ms", "TTFT ms",
              "decode tok/s", "roofline tok/s", "achieved GB/s"]
    rows = [[r["print"], r["size"], str(r["image_tokens"]), pp(r["timings"]["preprocess_ms"]),
             pp(r["timings"]["vision_ms"]), pp(r["timings"]["prefill_ms"]),
             pp(r["timings"]["time_to_first_token_ms"]), pp(r["timings"].get("decode_tokens_per_s"), 1),
             num(r["roofline_tokens_per_s"]), num(r["achieved_gb_s"])] for r in report["sizes"]]
    return "\n".join([
        *machine_lines(report),
        f"model: {model['name']} ({report['backend']} backend, {model['precision']}, hidden {model['hidden_size']}, "
        f"{model['layers']} layers; prompts prefilled by the {report.get('prefilled_by', 'decoder graph')}"
        f"{_chunking(report)}); "
        f"on disk {gib(report['model_bytes_on_disk'])}; "
        f"peak RSS {gib(report['peak_rss_bytes'])} ({report['peak_rss_note']})",
        decoder_line(report["decoder"]),
        f"{s['runs']} runs after {s['warmup']} warm-up, up to {s['max_new_tokens']} new tokens, greedy; cells: "
        "p50 / p95; decode tok/s as Conversation.ask times it (the steps after the first token); roofline at the "
        "mean decode context (prompt + half the generated tokens)",
        "", markdown_table(header, rows)])
