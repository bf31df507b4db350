"""`pulse-edge bench recipes`: every precision recipe side by side on one random PULSE-shaped model, against the
host's measured bounds.

    checkpoint ─ fp32 bundle ─┐
       └ calibrate (N synthetic samples) ─ scales ─ int8 | int8 W8A8 | int4 | ... bundles (+ --extra bundles)
    probes at start and end: read / copy bandwidth (numpy) and the GEMM peaks (ORT, gemm_probe.py), for the header
    ONE process, each measurement interleaved round by round, the host's state noted per round:
      vision (5 tiles), prefill (~2950 positions, the runtime's chunks), decode tok/s at a fixed context
      before each round and after the last, the probe its fractions are held against (probes.PHASE_BOUNDS): int8 GEMM
      peak, read bandwidth; a round against the better of the probes on either side of it

Bounds: a decode step reads the decoder graph's files (packed weights and scales) plus the KV cache
at the context (its own dtype: an int8 cache is a quarter of an fp32 one); its fraction is achieved
GB/s over the read probe. Prefill and vision are compute: their fraction is the linear layers'
ops (2 x weights x positions) per second over the int8 GEMM peak. Each round's fraction is held
against the probes taken just before and just after that round (the better of the two: a probe
that caught a neighbour's burst does not inflate the fraction), as a speedup pairs two rows of one
round: the host's int8 rate moves within minutes (benchmarks/common/probes.py). Ratios (these fractions,
speedups against the baseline row) come from quiet rounds only, paired round by round; when fewer than
host.MIN_QUIET_ROUNDS rounds were quiet the cell says "busy" and the report says why (mixing
quiet and busy rounds would give a ratio of neither state). fp8 bundles are not timed: ORT's CPU EP
only emulates them.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.host import HostWindow, busy_reason
from pulse_edge.benchmarks.common.machine import model_info
from pulse_edge.benchmarks.common.made import ensure_made, file_digest, stamp_path
from pulse_edge.benchmarks.common.measure import (
    Stat,
    bandwidth_report,
    load_average,
    machine_with_load,
    torch_threads,
)
from pulse_edge.benchmarks.common.probes import PHASE_BOUNDS, READ, Probes
from pulse_edge.benchmarks.common.roofline import bundle_decoder_facts, torch_decoder_facts
from pulse_edge.benchmarks.common.rounds import RoundProber, paired, round_bounds, round_fractions
from pulse_edge.benchmarks.common.tables import gib, machine_lines, markdown_table, percent, pp
from pulse_edge.benchmarks.perf.backend_runs import (
    BackendMeter,
    GenerateBench,
    OrtBench,
    TorchBench,
    bench_inputs,
    interleaved,
)
from pulse_edge.benchmarks.perf.backends import BackendsConfig, prepare_model, run_cli, work_dir
from pulse_edge.benchmarks.perf.model_ops import ModelOps, model_ops
from pulse_edge.choices import FLOAT_PRECISIONS

# recipe key -> (label, export arguments)
RECIPES = {
    "int8": ("int8: W8A8 vision, int8-weight decode, W8A8 prefill graph, int8 KV", ["--precision", "int8"]),
    "int8-w8a8": ("int8: decoder W8A8 SmoothQuant (Q/DQ)", ["--precision", "int8", "--int8-decoder", "w8a8"]),
    "int4": ("int4: W8A8 vision, int4 AWQ decode, W8A8 prefill graph, int8 KV", ["--precision", "int4"]),
    "int8-single": ("int8 without the prefill graph, fp32 KV", ["--precision", "int8", "--no-prefill-graph",
                                                               "--kv-cache", "float"]),
    "int4-single": ("int4 without the prefill graph, fp32 KV", ["--precision", "int4", "--no-prefill-graph",
                                                               "--kv-cache", "float"]),
    "fp32-kv16": ("fp32 with an fp16 KV cache (no calibration)", ["--precision", "fp32", "--kv-cache", "fp16"]),
}
MEASURES = {"vision_ms": "vision", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}
RoundProbes = dict[str, list[Probes]]  # measurement -> a probe before each round and one after the last


@dataclass(frozen=True)
class RecipesConfig:
    base: BackendsConfig
    recipes: tuple[str, ...] = ("int8", "int4")
    calibration_samples: int = 4  # speed does not depend on the scales' quality
    transformers: bool = True
    fp32: bool = True
    extra: tuple[tuple[str, Path], ...] = ()  # (name, bundle): bundles made elsewhere, e.g. by another version
    baseline: str = "fp32"  # the row the speedup columns divide by: one row, or "ROW=BASE,ROW=BASE" per row

    def baseline_of(self, row: str) -> str | None:
        """The row `row`'s speedups are against (None: no speedup for it)."""
        if "=" not in self.baseline:
            return self.baseline
        pairs = dict(part.split("=", 1) for part in self.baseline.split(",") if part)
        return pairs.get(row)


def prepare_recipes(cfg: RecipesConfig, work: Path, progress: Callable[[str], None]) -> dict[str, Path]:
    """fp32 bundle (backends.prepare_model), scales, and one bundle per recipe, each made once and reused where
    made so already: the same arguments and code (benchmarks/common/made.py)."""
    prepared = prepare_model(cfg.base, work, progress)
    scales = work / "scales.npz"
    calibrate = ["calibrate", str(prepared.checkpoint), "--samples", str(cfg.calibration_samples), "-o", str(scales)]
    ensure_made(scales, calibrate, partial(run_cli, what="calibrate", progress=progress), progress,
                inputs=_from(prepared.checkpoint), saying=f"calibrating on {cfg.calibration_samples} synthetic samples")
    bundles = {"fp32": prepared.bundle} if cfg.fp32 else {}
    for key in cfg.recipes:
        bundle = work / f"bundle-{key}"
        args = RECIPES[key][1]
        calibrated = ["--scales", str(scales)] if args[1] != "fp32" else []
        export = ["export", str(prepared.checkpoint), "-o", str(bundle), *args, *calibrated, "--validation", "quick",
                  "--held-out", "1"]
        inputs = [*_from(prepared.checkpoint), *(["scales", file_digest(scales)] if calibrated else [])]
        ensure_made(bundle, export, partial(run_cli, what=f"export {key}", progress=progress), progress, inputs=inputs,
                    saying=f"exporting the {key} bundle")
        bundles[key] = bundle
    return {**bundles, **dict(cfg.extra)}


def _from(checkpoint: Path) -> list[str]:
    """What a calibration or export is made from: the checkpoint, as its own stamp records it."""
    return ["checkpoint", stamp_path(checkpoint).read_text(encoding="utf-8") if stamp_path(checkpoint).is_file()
            else str(checkpoint.resolve())]


def _ort_bench(key: str, bundle: Path, inputs: Any, cfg: BackendsConfig) -> OrtBench:
    bench = OrtBench(bundle, inputs, cfg)
    bench.key, bench.name = key, f"onnxruntime {key}"
    return bench


def run_recipes(cfg: RecipesConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    with work_dir(cfg.base.work) as work:
        bundles = prepare_recipes(cfg, work, progress)
        quantized = {key: _quantized(path) for key, path in bundles.items()}  # transformers: float, like fp32
        ops = model_ops(work / "checkpoint")
        machine = machine_with_load()
        probes = Probes()
        probes.measure("start", cfg.base.bandwidth_bytes, cfg.base.threads, progress)
        results, facts, windows, rounds = _measure(bundles, work / "checkpoint", cfg, progress)
        gc.collect()  # the backends are unreachable now: free them before the end probe allocates its arrays
        probes.measure("end", cfg.base.bandwidth_bytes, cfg.base.threads, progress)
        model = model_info(work / "checkpoint")
    rows = {key: _row_report(key, result, facts[key], ops, rounds, results, windows, cfg, quantized.get(key, False))
            for key, result in results.items()}
    return {"kind": "recipes", "machine": {**machine, "load_average_end": load_average()}, "model": model,
            "probes": probes.to_dict(), "bandwidth": bandwidth_report(probes.bandwidth)[1], "ops": ops.to_dict(),
            "round_probes": {m: [p.to_dict() for p in ps] for m, ps in rounds.items()},
            "settings": _settings(cfg), "recipes": rows,
            "host": {m: {"rounds": [w.to_dict() for w in ws], "busy": busy_reason(ws)} for m, ws in windows.items()},
            "elapsed_s": time.perf_counter() - started}


def _quantized(bundle: Path) -> bool:
    from pulse_edge.runtime.bundle.manifest import read_manifest

    return read_manifest(bundle).precision not in FLOAT_PRECISIONS


def _row_report(key: str, result: dict[str, Any], facts: Any, ops: ModelOps, rounds: RoundProbes,
                results: dict[str, dict[str, Any]], windows: dict[str, list[HostWindow]],
                cfg: RecipesConfig, quantized: bool) -> dict[str, Any]:
    entry = {k: v.to_dict() if isinstance(v, Stat) else v for k, v in result.items()}
    context, positions = cfg.base.context, cfg.base.prefill_positions
    per_step = facts.bytes_per_token(context)
    decode = result["decode_tokens_per_s"].values
    entry.update(decoder_bytes=facts.weight_bytes, kv_bytes=facts.kv_bytes_per_position * context,
                 bytes_per_step=per_step,
                 fraction_of_read=round_fractions([t * per_step for t in decode],
                                                   round_bounds(rounds["decode"], "read"), windows["decode"]))
    entry["float_gemms"] = not quantized  # its GEMMs are fp32 ones: no fraction of the int8 peak (bench latency
    for method, work in (("prefill", ops.prefill(positions)), ("vision", ops.vision(5))):  # holds those to SGEMM)
        stat = result.get(f"{method}_ms")
        if stat is not None and quantized:
            entry[f"{method}_fraction_of_int8_peak"] = round_fractions(
                [work / (ms / 1e3) for ms in stat.values], round_bounds(rounds[method], "int8_peak"),
                windows[method])
    base = results.get(cfg.baseline_of(key) or "")
    entry["baseline"] = cfg.baseline_of(key) if base is not None else None
    if base is not None:
        for measure, better in (("vision_ms", "lower"), ("prefill_ms", "lower"), ("decode_tokens_per_s", "higher")):
            mine, theirs = result.get(measure), base.get(measure)
            if mine is not None and theirs is not None:
                a, b = (theirs.values, mine.values) if better == "lower" else (mine.values, theirs.values)
                entry[f"{measure}_speedup"] = paired(a, b, windows[MEASURES[measure]])
    return entry


def _measure(bundles: dict[str, Path], checkpoint: Path, cfg: RecipesConfig, progress: Callable[[str], None],
             ) -> tuple[dict[str, dict[str, Any]], dict[str, Any], dict[str, list[HostWindow]], RoundProbes]:
    import transformers

    transformers.logging.set_verbosity_error()
    base = cfg.base
    torch_threads(base.threads)
    inputs = bench_inputs(next(iter(bundles.values())), base)
    benches: list[Any] = []
    facts = {key: bundle_decoder_facts(path) for key, path in bundles.items()}
    meters = {key: BackendMeter() for key in (*(("transformers",) if cfg.transformers else ()), *bundles)}
    if cfg.transformers:
        progress("loading the checkpoint for transformers generate")
        reference = meters["transformers"].load(lambda: TorchBench(checkpoint, inputs, base))
        generate = GenerateBench(reference, inputs, base)
        generate.vision = None  # transformers has no PULSE vision class: the recipes' vision is ORT's
        benches.append(generate)
        facts[generate.key] = torch_decoder_facts(reference.lm)
    for key, path in bundles.items():
        progress(f"loading the {key} bundle into onnxruntime")
        benches.append(meters[key].load(lambda key=key, path=path: _ort_bench(key, path, inputs, base)))
    results: dict[str, dict[str, Any]] = {b.key: {"name": b.name} for b in benches}
    windows: dict[str, list[HostWindow]] = {}
    rounds: RoundProbes = {}
    for measure, method in MEASURES.items():
        progress(f"{method}: {base.warmup} warm-up + {base.timed_runs} timed runs per backend, interleaved, a "
                 f"{PHASE_BOUNDS[method]} probe before each round and after the last")
        windows[method] = []
        stats, rounds[method] = probed_rounds(benches, method, base, meters, windows[method], progress)
        for key, stat in stats.items():
            results[key][measure] = stat
    for key, meter in meters.items():
        results[key]["meter"] = meter.to_dict()
    ordered = {k: results[k] for k in ("transformers", *bundles) if k in results}
    return ordered, facts, windows, rounds


def probed_rounds(benches: Sequence[Any], method: str, base: BackendsConfig, meters: dict[str, BackendMeter],
                  windows: list[HostWindow], progress: Callable[[str], None]) -> tuple[dict[str, Stat], list[Probes]]:
    """backend_runs.interleaved, with `method`'s bound probed before every round and after the last (beside the
    loaded backends: read only, one array; the int8 kinds only)."""
    prober = RoundProber(method, (PHASE_BOUNDS[method],), base.timed_runs, base.bandwidth_bytes, base.threads,
                         progress)
    stats = interleaved(benches, method, base, meters, before_round=prober, windows=windows)
    prober()
    return stats, prober.taken


def _settings(cfg: RecipesConfig) -> dict[str, Any]:
    b = cfg.base
    return {"width": b.width, "layers": b.layers, "runs": b.timed_runs, "warmup": b.warmup, "context": b.context,
            "decode_steps": b.steps, "prefill_positions": b.prefill_positions, "threads": b.threads,
            "calibration_samples": cfg.calibration_samples, "baseline": cfg.baseline,
            "extra": {name: str(path) for name, path in cfg.extra}}


def _ratio(value: float | None) -> str:
    return "busy" if value is None else f"{value:.2f}x"


def _fraction(value: float | None) -> str:
    return "busy" if value is None else percent(value)


def _row(e: dict[str, Any], busy: set[str]) -> list[str]:
    """One backend's cells; those of a measurement whose rounds were busy (`busy`: its names) are marked."""
    vision = e.get("vision_ms")
    return [e["name"], pp(vision, busy="vision" in busy) if vision else "-",
            pp(e["prefill_ms"], busy="prefill" in busy), pp(e["decode_tokens_per_s"], 1, busy="decode" in busy),
            f"{gib(e['decoder_bytes'])} + {gib(e['kv_bytes'])}",
            _fraction(e.get("fraction_of_read")), *_compute_fractions(e, bool(vision)), e.get("baseline") or "-",
            *(_ratio(e.get(f"{m}_speedup")) if e.get("baseline") and e.get(m) else "-" for m in MEASURES),
            _memory(e["meter"])]


def _compute_fractions(e: dict[str, Any], vision: bool) -> list[str]:
    """Prefill's and vision's fractions of the int8 peak; a float row runs fp32 GEMMs, which it does not bound."""
    if e.get("float_gemms"):
        return ["n/a (fp32 GEMMs)", "n/a (fp32 GEMMs)" if vision else "-"]
    return [_fraction(e.get("prefill_fraction_of_int8_peak")),
            _fraction(e.get("vision_fraction_of_int8_peak")) if vision else "-"]


def _memory(meter: dict[str, Any]) -> str:
    """What loading the backend added to the RSS + the most one of its calls raised it (backend_runs.BackendMeter)."""
    working = "n/a" if meter["working_bytes"] is None else gib(meter["working_bytes"])
    return f"{gib(meter['resident_bytes'])} + {working}"


def _round_bounds_words(rounds: dict[str, list[dict[str, Any]]]) -> str:
    """Each measurement's per-round probes as a range: how far the host moved during the run."""
    parts = []
    for method, probes in rounds.items():
        key, unit = ("read_gb_s", "GB/s read") if PHASE_BOUNDS[method] == READ else ("int8_peak_tops", "TOP/s int8")
        values = [p[key] for p in probes if p[key] is not None]
        parts.append(f"{method} {min(values):.2f}-{max(values):.2f} {unit}" if values else f"{method} none")
    return "; ".join(parts)


def recipes_table(report: dict[str, Any]) -> str:
    s, m, p = report["settings"], report["model"], report["probes"]
    header = ["backend / recipe", "vision ms (5 tiles)", f"prefill ms ({s['prefill_positions']} pos)",
              f"decode tok/s @ {s['context']}", "bytes / step (weights + KV)", "decode % of read BW",
              "prefill % of int8 peak", "vision % of int8 peak", "baseline", "vision speedup", "prefill speedup",
              "decode speedup", "memory: loaded + working"]
    rows = [_row(e, {m_ for m_, h in report["host"].items() if h["busy"]}) for e in report["recipes"].values()]
    gemm = "; ".join(f"{when}: " + ", ".join(f"{k} {v:.2f}" for k, v in g["tops"].items())
                     for when, g in p["gemm"].items())
    busy = [f"{m_}: {h['busy']}" for m_, h in report["host"].items() if h["busy"]]
    return "\n".join([
        *machine_lines(report, use="the fractions use the probes beside the rounds (below)"),
        f"int8 GEMM probe at start and end (TOP/s, M K N {p['gemm']['start']['shape_mkn']}): {gemm}",
        f"the bounds the fractions use, probed before each round and after the last: "
        f"{_round_bounds_words(report['round_probes'])}",
        f"model: random PULSE-shaped, hidden {m['hidden_size']}, {m['layers']} decoder layers; scales from "
        f"{s['calibration_samples']} synthetic samples; {s['runs']} timed runs after {s['warmup']} warm-up, "
        f"decode {s['decode_steps']} steps per run; cells: p50 / p95 of all rounds (\"busy\" where too few were "
        f"quiet: not for comparison); fractions and ratios: median of the quiet rounds, paired round by round",
        "", markdown_table(header, rows), "",
        "bytes / step: the decoder graph's files + the KV cache at the context (its own dtype); decode % of read BW "
        "= tok/s x bytes / step over the better of the read probes before and after the round; prefill and "
        "vision % = linear-layer ops (2 x weights x "
        f"positions: {report['ops']['decoder_ops_per_position'] / 1e9:.2f} GOP per prefill position, "
        f"{report['ops']['vision_ops_per_tile'] / 1e9:.0f} GOP per tile) per second over the better of the int8 "
        "probes before and after the round",
        *(f"no ratio: {line}" for line in busy),
        "fp8 is not timed: ONNX Runtime's CPU EP only emulates it; random weights: speed only, never accuracy",
        f"total {report['elapsed_s']:.0f} s"])
