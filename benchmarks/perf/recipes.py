"""`pulse-edge bench recipes`: every precision recipe side by side on one random PULSE-shaped model.

    checkpoint ─ fp32 bundle ─┐
       └ calibrate (N synthetic samples) ─ scales ─ int8 (weight-only) | int8 W8A8 | int4 AWQ bundles
    ONE process: transformers generate, and ONNX Runtime on each bundle; each: vision (5 tiles),
    prefill (~2950 positions), decode tok/s at a fixed context, achieved bandwidth, x fp32

Bandwidth: bytes one decode step reads = the bundle's decoder files (packed weights and
scales) + the KV cache at the context; achieved = tok/s x that, against the bandwidth
measured in the same run. The backends are timed interleaved (see backends.py) so
ratios hold on a noisy machine. fp8 bundles are not timed: ORT's CPU EP only emulates
them (Q/DQ at the "basic" level), which says nothing about their speed on a GPU.
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
    load_average,
    machine_with_load,
    torch_threads,
)
from pulse_edge.benchmarks.common.roofline import bundle_decoder_facts, roofline_entry, torch_decoder_facts
from pulse_edge.benchmarks.common.tables import gib, machine_lines, markdown_table, num, percent, pp
from pulse_edge.benchmarks.perf.backend_runs import (
    BackendMeter,
    GenerateBench,
    OrtBench,
    TorchBench,
    bench_inputs,
    interleaved,
)
from pulse_edge.benchmarks.perf.backends import BackendsConfig, prepare_model, run_cli, work_dir

# recipe key -> (label, export arguments)
RECIPES = {
    "int8": ("int8: vision W8A8, decoder int8 weights (MatMulNBits)", ["--precision", "int8"]),
    "int8-w8a8": ("int8: vision W8A8, decoder W8A8 SmoothQuant (Q/DQ)",
                  ["--precision", "int8", "--int8-decoder", "w8a8"]),
    "int4": ("int4: vision W8A8, decoder int4 AWQ (MatMulNBits)", ["--precision", "int4"]),
}
MEASURES = {"vision_ms": "vision", "prefill_ms": "prefill", "decode_tokens_per_s": "decode"}


@dataclass(frozen=True)
class RecipesConfig:
    base: BackendsConfig
    recipes: tuple[str, ...] = tuple(RECIPES)
    calibration_samples: int = 4  # speed does not depend on the scales' quality
    transformers: bool = True


def prepare_recipes(cfg: RecipesConfig, work: Path, progress: Callable[[str], None]) -> dict[str, Path]:
    """fp32 bundle (backends.prepare_model), scales, and one bundle per recipe, each made once and reused."""
    prepared = prepare_model(cfg.base, work, progress)
    scales = work / "scales.npz"
    if not scales.is_file():
        progress(f"calibrating on {cfg.calibration_samples} synthetic samples")
        run_cli(["calibrate", str(prepared.checkpoint), "--samples", str(cfg.calibration_samples), "-o",
                  str(scales)], "calibrate", progress)
    bundles = {"fp32": prepared.bundle}
    for key in cfg.recipes:
        bundle = work / f"bundle-{key}"
        if not bundle.is_dir():
            progress(f"exporting the {key} bundle")
            run_cli(["export", str(prepared.checkpoint), "-o", str(bundle), *RECIPES[key][1], "--scales",
                      str(scales), "--validation", "quick", "--held-out", "1"], f"export {key}", progress)
        bundles[key] = bundle
    return bundles


def _ort_bench(key: str, bundle: Path, inputs: Any, cfg: BackendsConfig) -> OrtBench:
    bench = OrtBench(bundle, inputs, cfg)
    bench.key, bench.name = key, f"onnxruntime {key}"
    return bench


def run_recipes(cfg: RecipesConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    with work_dir(cfg.base.work) as work:
        bundles = prepare_recipes(cfg, work, progress)
        machine = machine_with_load()
        samples = {"start": bandwidth_probe(cfg.base.bandwidth_bytes, progress, "start")}
        results, facts = _measure(bundles, work / "checkpoint", cfg, progress)
        samples["end"] = bandwidth_probe(cfg.base.bandwidth_bytes, progress, "end")
        model = model_info(work / "checkpoint")
    bandwidth, bandwidth_dict = bandwidth_report(samples)
    fp32 = results["fp32"]["decode_tokens_per_s"].p50
    rows = {}
    for key, result in results.items():
        entry = {k: v.to_dict() if isinstance(v, Stat) else v for k, v in result.items()}
        entry.update(roofline_entry(facts[key], bandwidth, cfg.base.context, result["decode_tokens_per_s"].p50))
        entry["speedup_vs_fp32"] = result["decode_tokens_per_s"].p50 / fp32
        entry["decoder_bytes"] = facts[key].weight_bytes
        rows[key] = entry
    return {"kind": "recipes", "machine": {**machine, "load_average_end": load_average()}, "model": model,
            "bandwidth": bandwidth_dict, "settings": {**_settings(cfg), "context": cfg.base.context},
            "recipes": rows, "elapsed_s": time.perf_counter() - started}


def _measure(bundles: dict[str, Path], checkpoint: Path, cfg: RecipesConfig,
             progress: Callable[[str], None]) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    import transformers

    transformers.logging.set_verbosity_error()
    base = cfg.base
    torch_threads(base.threads)
    inputs = bench_inputs(bundles["fp32"], base)
    benches: list[Any] = []
    facts = {key: bundle_decoder_facts(path) for key, path in bundles.items()}
    if cfg.transformers:
        progress("loading the checkpoint for transformers generate")
        reference = TorchBench(checkpoint, inputs, base)
        generate = GenerateBench(reference, inputs, base)
        generate.vision = None  # transformers has no PULSE vision class: the recipes' vision is ORT's
        benches.append(generate)
        facts[generate.key] = torch_decoder_facts(reference.lm)
    for key, path in bundles.items():
        progress(f"loading the {key} bundle into onnxruntime")
        benches.append(_ort_bench(key, path, inputs, base))
    meters = {b.key: BackendMeter() for b in benches}
    results: dict[str, dict[str, Any]] = {b.key: {"name": b.name} for b in benches}
    for measure, method in MEASURES.items():
        progress(f"{method}: {base.warmup} warm-up + {base.timed_runs} timed runs per backend, interleaved")
        for key, stat in interleaved(benches, method, base, meters).items():
            results[key][measure] = stat
    for key, meter in meters.items():
        results[key]["meter"] = meter.to_dict()
    ordered = {k: results[k] for k in ("transformers", *bundles) if k in results}
    return ordered, facts


def _settings(cfg: RecipesConfig) -> dict[str, Any]:
    b = cfg.base
    return {"width": b.width, "layers": b.layers, "runs": b.timed_runs, "warmup": b.warmup,
            "decode_steps": b.steps, "prefill_positions": b.prefill_positions, "threads": b.threads,
            "calibration_samples": cfg.calibration_samples}


def _row(e: dict[str, Any]) -> list[str]:
    return [e["name"], pp(e.get("vision_ms")) if e.get("vision_ms") else "-", pp(e["prefill_ms"]),
            pp(e["decode_tokens_per_s"], 1), f"{e['speedup_vs_fp32']:.2f}x", gib(e["decoder_bytes"]),
            num(e["achieved_gb_s"]), percent(e["fraction_of_bandwidth"]),
            num(e["roofline_tokens_per_s"])]


def recipes_table(report: dict[str, Any]) -> str:
    s, m = report["settings"], report["model"]
    header = ["backend / recipe", "vision ms (5 tiles)", f"prefill ms ({s['prefill_positions']} pos)",
              f"decode tok/s @ {s['context']}", "vs fp32", "decoder bytes", "achieved GB/s", "% of measured BW",
              "roofline tok/s"]
    rows = [_row(e) for e in report["recipes"].values()]
    return "\n".join([
        *machine_lines(report),
        f"model: random PULSE-shaped, hidden {m['hidden_size']}, {m['layers']} decoder layers; scales from "
        f"{s['calibration_samples']} synthetic samples; {s['runs']} timed runs after {s['warmup']} warm-up, "
        f"decode {s['decode_steps']} steps per run; cells: p50 / p95",
        "", markdown_table(header, rows), "",
        "decoder bytes: what one decode step reads besides the KV cache (the bundle's decoder files; transformers: "
        "its fp32 parameters bar the embedding table); achieved GB/s = tok/s x (decoder bytes + KV at the context)",
        "fp8 is not timed: ONNX Runtime's CPU EP only emulates it; random weights: speed only, never accuracy",
        f"total {report['elapsed_s']:.0f} s"])
