"""Latency suite: `pulse-edge bench latency` (one model, real ECG prints).

    ECG print (letter 200/300 dpi, A4 300 dpi) -> Conversation.ask x (warm-up + runs)
      a probe before each timed run and after the last (CPU runs): read bandwidth (numpy, one array) and the
      compute peak of the model's GEMMs (gemm_probe.py: int8 kinds for a quantized bundle, fp32 SGEMM for a float
      one), beside the loaded model, outside the runs and outside their peak RSS
    -> p50/p95 of preprocess, vision, prefill, time to first token, decode tokens/s
    -> each run against the better of the probes on either side of it (common/rounds.py), median over quiet runs:
       vision and prefill as linear-layer ops/s (model_ops.py) of that peak, decode as bytes/s of the read
       bound (weights + KV at the mean context), and the roofline at the best read probe

Absolute times on a shared machine drift, which is why the bounds are measured beside each run: on this
project's 2-vCPU VM the int8 probe moved 1.9-4.0 TOP/s within 40 minutes (docs/performance.md). torch and
onnxruntime are imported inside the functions that use them; the CLI imports this module only when a command
runs. The side-by-side `bench backends` is in backends.py; what the benchmarks share is in benchmarks/common.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.gemm_probe import INT8_KINDS, require_onnx
from pulse_edge.benchmarks.common.host import HostWindow, busy_reason, host_sample
from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.measure import (
    PeakWatch,
    Stat,
    bandwidth_probe,
    bandwidth_report,
    dir_size_bytes,
    ecg_print,
    load_average,
    machine_with_load,
    torch_threads,
)
from pulse_edge.benchmarks.common.probes import GEMM, READ, Probes
from pulse_edge.benchmarks.common.roofline import (
    GIB,
    DecoderFacts,
    bundle_decoder_facts,
    decode_entry,
    roofline_entry,
    torch_decoder_facts,
)
from pulse_edge.benchmarks.common.rounds import RoundProber, best_read, round_bounds, round_fractions
from pulse_edge.benchmarks.common.tables import decoder_line, gib, machine_lines, markdown_table, num, percent, pp
from pulse_edge.benchmarks.perf.model_ops import ModelOps, ops_of
from pulse_edge.choices import QUANTIZED_PRECISIONS
from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle.names import MANIFEST_FILE
from pulse_edge.runtime.inputs.images import MIN_SIDE_PX

# Common ECG print sizes in pixels (width x height): what a cart's scanner or PDF export produces.
PRINT_SIZES = {(2200, 1700): "letter 200 dpi", (3300, 2550): "letter 300 dpi", (3508, 2480): "A4 300 dpi"}
TIMING_FIELDS = ("preprocess_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms", "decode_tokens_per_s")
RSS_NOTE = "peak resident set size (RSS) of the whole benchmark process, from getrusage ru_maxrss"
# What a run's vision and prefill are held against, by the GEMMs they run (is the model quantized?): a quantized
# bundle's vision and prefill graphs run int8 GEMMs (W8A8, or the weight-only decode graph at accuracy level 4);
# a float bundle and the torch reference run float ones, held against MLAS's fp32 SGEMM.
COMPUTE_BOUNDS = {True: {"bound": "int8_peak", "kinds": INT8_KINDS, "label": "int8 peak", "probe": "int8_peak_tops",
                         "unit": "TOP/s int8"},
                  False: {"bound": "fp32", "kinds": ("fp32",), "label": "fp32 peak", "probe": "fp32_tflops",
                          "unit": "TFLOP/s fp32"}}
PEAK_NOTE = ("peak resident set size (RSS) of the process from loading the model to its last run, the probes "
             "beside the runs left out (Linux VmHWM, reset after each probe)")


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
    prefill_attention: str = "auto"  # a cut prefill graph's attention: the CPU kernel where it runs
    decode_attention: str = "auto"  # a cut decode graph's attention: the CPU decode kernel where it runs
    decode_step: str = "auto"  # a decode graph with a decode index: pulse-edge's own decode step where it runs
    prefill_chunk: int | None = None  # None: the runtime's choice (runtime/engines/bundle_engine.py); 0: one pass
    engines: Path | None = None  # the trt backend's engine directory, where it is not inside the bundle


def parse_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """'2200x1700,3300x2550' -> ((2200, 1700), (3300, 2550))."""
    sizes = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError as e:
            raise ConfigError(f"--sizes takes WIDTHxHEIGHT[,WIDTHxHEIGHT...], got {item!r}") from e
        if min(width, height) < MIN_SIDE_PX:  # refused here, not by the pipeline after the probes and the load
            raise ConfigError(f"--sizes: {item!r} is smaller than the runtime reads (an ECG print needs at least "
                              f"{MIN_SIDE_PX} px on the shorter side)")
        sizes.append((width, height))
    if not sizes:
        raise ConfigError("--sizes names no size")
    return tuple(sizes)


def _open(cfg: LatencyConfig) -> tuple[Any, DecoderFacts]:
    from pulse_edge.backends import open_backend
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.pipeline import Pipeline as OrtPipeline

    bundle = (Path(cfg.model) / MANIFEST_FILE).is_file()  # a checkpoint's torch backend takes threads from torch
    pipeline = open_backend(cfg.model, backend=cfg.backend, session=SessionConfig(
        provider=cfg.provider, threads=cfg.threads if bundle else 0, prefill_graph=cfg.prefill_graph,
        prefill_attention=cfg.prefill_attention, decode_attention=cfg.decode_attention,
        decode_step=cfg.decode_step),
        prefill_chunk=cfg.prefill_chunk, engines=cfg.engines)
    if isinstance(pipeline, OrtPipeline):
        return pipeline, bundle_decoder_facts(cfg.model)
    torch_threads(cfg.threads)
    return pipeline, torch_decoder_facts(pipeline.model.language_model)


def _timed_runs(pipeline: Any, size: tuple[int, int], cfg: LatencyConfig, prober: RoundProber | None,
                watch: PeakWatch) -> tuple[list[Any], list[HostWindow]]:
    """Warm-up runs, then the timed runs, each with the host's state over it; a probe before each timed run and one
    after the last (outside the runs, and outside the watched peak)."""
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

    image, question = ecg_print(size), cfg.question or DEFAULT_QUESTION

    def answer() -> Any:
        return pipeline.generate(image, question, max_new_tokens=cfg.max_new_tokens)

    for _ in range(cfg.warmup):
        answer()
    results, windows = [], []
    for _ in range(cfg.runs):
        if prober is not None:
            watch.aside(prober)
        before = host_sample()
        results.append(answer())
        windows.append(HostWindow.between(before, host_sample()))
    if prober is not None:
        watch.aside(prober)
    return results, windows


def _latency_row(results: list[Any], size: tuple[int, int]) -> dict[str, Any]:
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


def _fractions(results: list[Any], windows: list[HostWindow], probes: list[Probes], facts: DecoderFacts,
               work: dict[str, float | None], context: float, bound: str) -> dict[str, float | None]:
    """Each run against the better of the probes on either side of it, the median over quiet runs (rounds.py):
    vision and prefill as linear-layer ops/s (`work`: ops per run) of the compute `bound` (a Probes property:
    int8_peak, fp32), decode as bytes/s of the read probe; a fraction whose work is unknown or whose time is zero
    is left out."""
    timings = [r.timings for r in results]
    compute, read = round_bounds(probes, bound), round_bounds(probes, "read")
    fractions: dict[str, float | None] = {}
    for phase in ("vision", "prefill"):
        ops, seconds = work.get(phase), [getattr(t, f"{phase}_ms") / 1e3 for t in timings]
        if ops and all(s > 0 for s in seconds):
            fractions[f"{phase}_of_compute_peak"] = round_fractions([ops / s for s in seconds], compute, windows)
    if all(t.decode_tokens_per_s > 0 for t in timings):
        per_step = facts.bytes_per_token(round(context))
        fractions["decode_of_read"] = round_fractions([t.decode_tokens_per_s * per_step for t in timings], read,
                                                      windows)
    return fractions


def _work(ops: ModelOps | None, size: tuple[int, int], prompt_tokens: int) -> dict[str, float | None]:
    """Linear-layer ops of one run's vision (the tiles of a `size` print) and prefill (its prompt)."""
    tiles = ops.tiles(size) if ops is not None else None
    return {"vision_tiles": tiles, "vision": None if tiles is None else ops.vision(tiles),
            "prefill": None if ops is None else ops.prefill(prompt_tokens)}


def _measure_size(pipeline: Any, size: tuple[int, int], cfg: LatencyConfig, facts: DecoderFacts,
                  ops: ModelOps | None, compute: dict[str, Any] | None, watch: PeakWatch,
                  progress: Callable[[str], None]) -> dict[str, Any]:
    """One print size's runs; `compute`: the compute bound (COMPUTE_BOUNDS) when the run is probed, else None."""
    progress(f"{size[0]}x{size[1]}: {cfg.warmup} warm-up + {cfg.runs} runs" + (
        f", read bandwidth and the {compute['label']} probed before each run and after the last" if compute else ""))
    prober = RoundProber(f"{size[0]}x{size[1]}", (READ, GEMM), cfg.runs, cfg.bandwidth_bytes, cfg.threads,
                         progress, kinds=compute["kinds"]) if compute else None
    results, windows = _timed_runs(pipeline, size, cfg, prober, watch)
    row = {**_latency_row(results, size), "host": {"runs": [w.to_dict() for w in windows],
                                                   "busy": busy_reason(windows)}}
    work = _work(ops, size, row["prompt_tokens"])
    rate, context = row["timings"].get("decode_tokens_per_s", {}).get("p50"), row["decode_context"]
    row.update(decode_entry(facts, context, rate), vision_tiles=work["vision_tiles"])
    if prober is None:  # the bytes a step reads still say something; a roofline of this host would not
        return {**row, "probes": [], "fractions": {}}
    row.update(probes=[p.to_dict() for p in prober.taken],
               fractions=_fractions(results, windows, prober.taken, facts, work, context, compute["bound"]))
    bandwidth = best_read(prober.taken)  # the decode bound is a read
    return {**row, **(roofline_entry(facts, bandwidth, context, rate) if bandwidth else {})}


def compute_bound(precision: str) -> dict[str, Any]:
    """The bound a model's vision and prefill are held against (COMPUTE_BOUNDS), by its precision."""
    return COMPUTE_BOUNDS[precision in QUANTIZED_PRECISIONS]


def host_bound(cfg: LatencyConfig, pipeline: Any) -> bool:
    """Whether this host's CPU and memory bound the run: ORT's CPU provider, or the torch reference on the CPU
    (--provider is ORT's; torch picks its device at load); a GPU run is held against no probe of this host."""
    backend = getattr(pipeline, "backend", "torch")
    if backend == "torch":
        return next(pipeline.model.parameters()).device.type == "cpu"
    return backend == "ort" and cfg.provider == "cpu"


def run_latency(cfg: LatencyConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure one model on each print size; returns the report (see `latency_table`)."""
    if cfg.provider == "cpu":
        require_onnx()  # the GEMM probe beside the runs; refused before anything is loaded
    if not (Path(cfg.model) / MANIFEST_FILE).is_file():  # a missing or wrong --model: before the probe's seconds
        from pulse_edge.backends import check_checkpoint_dir

        check_checkpoint_dir(Path(cfg.model))
    started, machine = time.perf_counter(), machine_with_load()
    samples = {"start": bandwidth_probe(cfg.bandwidth_bytes, progress, "start", threads=cfg.threads)}  # the machine
    watch = PeakWatch.start()  # the probe's arrays are freed: they would otherwise be the peak of a small model
    progress(f"loading {cfg.model}")
    pipeline, facts = _open(cfg)
    probed, model = host_bound(cfg, pipeline), model_info(cfg.model)
    compute = compute_bound(model["precision"]) if probed else None
    # the work the compute fractions count; reading the graphs is no part of the model's memory
    ops = watch.aside(lambda: ops_of(cfg.model)) if probed else None
    rows = [_measure_size(pipeline, size, cfg, facts, ops, compute, watch, progress) for size in cfg.sizes]
    return {"kind": "latency", "machine": {**machine, "load_average_end": load_average()}, "model": model,
            "backend": getattr(pipeline, "backend", "torch"), "settings": _latency_settings(cfg),
            "prefilled_by": getattr(pipeline, "prefilled_by", "decoder graph"),  # the torch reference: one graph
            "decoded_by": getattr(pipeline, "decoded_by", "decoder graph"),
            "prefill_chunk": getattr(getattr(pipeline, "engine", None), "prefill_chunk", None),  # None: one pass
            "bandwidth": bandwidth_report(samples)[1], "decoder": facts.to_dict(),
            "ops": ops.to_dict() if ops is not None else None, "probed": probed,
            "compute_bound": None if compute is None else {**compute, "kinds": list(compute["kinds"])},
            "model_bytes_on_disk": dir_size_bytes(cfg.model), "peak_rss_bytes": watch.stop(),
            "peak_rss_note": PEAK_NOTE if watch.reset_works else RSS_NOTE,
            "sizes": rows, "elapsed_s": time.perf_counter() - started}


def _latency_settings(cfg: LatencyConfig) -> dict[str, Any]:
    return {"runs": cfg.runs, "warmup": cfg.warmup, "max_new_tokens": cfg.max_new_tokens, "provider": cfg.provider,
            "threads": cfg.threads, "question": cfg.question or "default", "prefill_graph": cfg.prefill_graph,
            "prefill_attention": cfg.prefill_attention, "decode_attention": cfg.decode_attention,
            "decode_step": cfg.decode_step}


def _chunking(report: dict[str, Any]) -> str:
    chunk = report.get("prefill_chunk")
    return f" in chunks of {chunk}" if chunk else (" in one pass" if report.get("backend") != "torch" else "")


FRACTIONS = (("vision_of_compute_peak", "vision % of {compute}"), ("prefill_of_compute_peak", "prefill % of {compute}"),
             ("decode_of_read", "decode % of read BW"))


def _fraction_cell(row: dict[str, Any], key: str) -> str:
    """The fraction; "busy" where the host was too busy for one; "n/a" where nothing was probed, counted or timed."""
    value = row.get("fractions", {}).get(key)
    if value is None:
        return "busy" if key in row.get("fractions", {}) and row["host"]["busy"] else "n/a"
    return percent(value)


def _bounds_words(row: dict[str, Any], compute: dict[str, Any]) -> str:
    """The bounds probed beside a size's runs, as ranges: how far the host moved while it ran."""
    reads = [p["read_gb_s"] for p in row["probes"] if p["read_gb_s"] is not None]
    peaks = [p[compute["probe"]] for p in row["probes"] if p[compute["probe"]] is not None]
    kinds = sorted({p["int8_kind"] for p in row["probes"] if p["int8_kind"]})
    return (f"{row['size']}: read {min(reads):.1f}-{max(reads):.1f} GB/s, {min(peaks):.2f}-{max(peaks):.2f} "
            f"{compute['unit']}" + (f" (best kind: {', '.join(kinds)})" if kinds else "")
            ) if reads and peaks else f"{row['size']}: none"


def _probe_lines(report: dict[str, Any]) -> list[str]:
    if not report.get("probed"):
        return ["no bounds beside the runs: the bounds probed here are this host's CPU and memory, and this run's "
                "work was not on them (a GPU provider or engine); no fractions, no roofline"]
    busy = [f"no fraction for {r['size']}: {r['host']['busy']}" for r in report["sizes"] if r["host"]["busy"]]
    compute = report["compute_bound"]
    return [f"bounds probed before each run and after the last, beside the loaded model (vision and prefill against "
            f"the {compute['label']}: this model's GEMMs): "
            f"{'; '.join(_bounds_words(r, compute) for r in report['sizes'])}", *busy]


def latency_table(report: dict[str, Any]) -> str:
    model, s = report["model"], report["settings"]
    compute = (report.get("compute_bound") or {}).get("label", "compute peak")
    header = ["print", "pixels", "image tok", "preprocess ms", "vision ms", "prefill ms", "TTFT ms", "decode tok/s",
              "roofline tok/s", "achieved GB/s", *(label.format(compute=compute) for _, label in FRACTIONS)]
    rows = [[r["print"], r["size"], str(r["image_tokens"]), *_time_cells(r),
             num(r.get("roofline_tokens_per_s")), num(r.get("achieved_gb_s")),
             *(_fraction_cell(r, key) for key, _ in FRACTIONS)] for r in report["sizes"]]
    return "\n".join([
        *machine_lines(report, use="a description of the machine" + (
            "; the fractions use the probes beside the runs" if report.get("probed") else "")),
        *_probe_lines(report),
        f"model: {model['name']} ({report['backend']} backend, {model['precision']}, hidden {model['hidden_size']}, "
        f"{model['layers']} layers; prompts prefilled by the {report.get('prefilled_by', 'decoder graph')}"
        f"{_chunking(report)}, decode steps by the {report.get('decoded_by', 'decoder graph')}); "
        f"on disk {gib(report['model_bytes_on_disk'])}; "
        f"peak RSS {gib(report['peak_rss_bytes'])} ({report['peak_rss_note']})",
        decoder_line(report["decoder"]),
        f"{s['runs']} runs after {s['warmup']} warm-up, up to {s['max_new_tokens']} new tokens, greedy; cells: "
        "p50 / p95 (\"busy\" where too few runs were quiet: not for comparison); decode tok/s as "
        "Conversation.ask times it (the steps after the first token); achieved GB/s "
        "at the mean decode context (prompt + half the generated tokens)"
        + (", the roofline at the best read probe beside the runs" if report.get("probed") else ""),
        *([_fractions_line(report.get("ops"))] if report.get("probed") else []),
        "", markdown_table(header, rows)])


def _time_cells(row: dict[str, Any]) -> list[str]:
    """A size's p50 / p95 cells, marked where its runs were too busy for a fraction (or unjudged: no probes)."""
    t, busy = row["timings"], bool(row.get("host", {}).get("busy"))
    return [*(pp(t[key], busy=busy) for key in ("preprocess_ms", "vision_ms", "prefill_ms", "time_to_first_token_ms")),
            pp(t.get("decode_tokens_per_s"), 1, busy=busy)]


def _fractions_line(ops: dict[str, Any] | None) -> str:
    if ops is None:
        counted = "; not counted for this model"
    else:
        tile = ops["vision_ops_per_tile"]
        counted = (f": {ops['decoder_ops_per_position'] / 1e9:.2f} GOP per prompt position"
                   + (f", {tile / 1e9:.0f} GOP per tile" if tile else ", no vision graph"))
    return ("fractions: each run over the better of the probes before and after it, the median of the quiet runs; "
            f"vision and prefill count the linear layers' ops (2 x weights x positions{counted}), decode the bytes a "
            "step reads")
