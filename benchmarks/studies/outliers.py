"""`pulse-edge bench outliers`: how each decoder recipe keeps the logits, on a model with outlier channels.

    checkpoint (e.g. make-tiny --full-shape --layers 2 --outliers 8) + scales (pulse-edge calibrate)
      -> held-out ECG samples: the torch reference's logits once (prefill, then teacher-forced steps)
      -> per recipe: the decoder graph alone, built with its LinearPlan, on the same embeddings
      -> logit cosine (mean, min), KL, top-1 agreement, decoder bytes

The vision graph is left out (every decoder recipe shares it), and no validation
gate stops a recipe that fails: seeing plain W8A8 fail is the point.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pulse_edge.benchmarks.common.output import REPORT_PATH, progress, write_json

# recipe key -> (label, make_recipe arguments); None = the float graph. The rows above the CPU ones are the
# decode graph alone with an fp32 KV cache; the CPU rows are what the int8 / int4 bundles serve: the prefill
# graph for the prompt, the decode graph for the steps, both on an int8 KV cache.
_DECODE_ONLY = {"kv_cache": "float", "prefill": False}
DECODER_RECIPES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fp32": ("fp32 (no quantization)", None),
    "int8-plain": ("int8 weights (MatMulNBits), no smoothing", {"precision": "int8", "smooth": False, **_DECODE_ONLY}),
    "int8": ("int8 weights (MatMulNBits) + smoothing", {"precision": "int8", **_DECODE_ONLY}),
    "w8a8-plain": ("W8A8, no smoothing", {"precision": "int8", "int8_decoder": "w8a8", "smooth": False,
                                          **_DECODE_ONLY}),
    "w8a8-smooth": ("W8A8 + SmoothQuant (alpha per site)", {"precision": "int8", "int8_decoder": "w8a8",
                                                            **_DECODE_ONLY}),
    "int4-rtn": ("int4 RTN (block 128)", {"precision": "int4", "int4_method": "rtn", **_DECODE_ONLY}),
    "int4-awq": ("int4 AWQ (block 128)", {"precision": "int4", **_DECODE_ONLY}),
    "int8-kv8": ("int8 weights + smoothing, int8 KV cache", {"precision": "int8", "kv_cache": "int8",
                                                             "prefill": False}),
    "int8-prefill": ("int8 + W8A8 per-token prefill graph, fp32 KV", {"precision": "int8", "kv_cache": "float"}),
    "int8-cpu": ("int8 CPU bundle: prefill graph + int8 KV (the int8 default)", {"precision": "int8"}),
    "int4-cpu": ("int4 CPU bundle: AWQ + prefill graph + int8 KV (the int4 default)", {"precision": "int4"}),
}


@dataclass(frozen=True)
class OutliersConfig:
    checkpoint: Path
    scales: Path
    samples: int = 2
    steps: int = 8
    recipes: tuple[str, ...] = tuple(DECODER_RECIPES)


def run_outliers(cfg: OutliersConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from pulse_edge.calibration.calibrate import CalibrationOptions, choose_samples, prepare_all
    from pulse_edge.calibration.scales import Scales
    from pulse_edge.export.model.torch_backend import TorchPipeline
    from pulse_edge.export.validate.fidelity import reference_trace

    started = time.perf_counter()
    reference = TorchPipeline.from_checkpoint(cfg.checkpoint, dtype="fp32", device="cpu", fused_projector=False)
    scales = Scales.load(cfg.scales)
    scales.check_model(reference.loaded.sha256, cfg.scales)
    samples = choose_samples(CalibrationOptions(samples=cfg.samples, seed=1), exclude=scales.samples.get("ids", []))
    prepared = prepare_all(reference.loaded, reference.tokenizer, samples, 4096)
    progress(f"reference logits on {len(samples)} held-out samples")
    traces = [reference_trace(reference, s, p, cfg.steps) for s, p in zip(samples, prepared, strict=True)]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="pulse-edge-outliers-") as tmp:
        for key in cfg.recipes:
            progress(f"{key}: building the decoder graph and comparing")
            rows[key] = _one_recipe(key, reference, scales, traces, Path(tmp) / key)
    return {"kind": "outliers", "checkpoint": str(cfg.checkpoint), "scales": str(cfg.scales),
            "samples": [s.id for s in samples], "steps": cfg.steps, "recipes": rows,
            "outlier_ratio": _outlier_ratio(scales), "elapsed_s": time.perf_counter() - started}


def _one_recipe(key: str, reference: Any, scales: Any, traces: list[Any], out: Path) -> dict[str, Any]:
    from pulse_edge.calibration.recipes import make_recipe
    from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, build_decoder
    from pulse_edge.export.graphs.prefill import build_prefill, kv_scales_for
    from pulse_edge.export.quant.apply import decoder_plan
    from pulse_edge.export.validate.fidelity import compare_trace, summarise_steps
    from pulse_edge.runtime.bundle.manifest import KVLayout
    from pulse_edge.runtime.engines.ort import DecoderEngine, SessionConfig

    label, args = DECODER_RECIPES[key]
    model, cfg = reference.model, reference.loaded.config
    shape = DecoderShape.from_config(cfg, max_length=4096)
    recipe = None if args is None else make_recipe(**args)
    plan = FLOAT_PLAN if recipe is None else decoder_plan(model, recipe, scales, shape)
    kv_scales = None if recipe is None else kv_scales_for(recipe, scales, shape, plan)
    out.mkdir(parents=True)
    desc = build_decoder(model.language_model, shape, out, precision="fp32", plan=plan, kv=kv_scales)
    prefill = (build_prefill(model.language_model, shape, out, recipe, plan, kv_scales, label=recipe.name)
               if recipe is not None and recipe.prefill else None)
    kv = KVLayout(layers=shape.layers, kv_heads=shape.kv_heads, head_dim=shape.head_dim,
                  dtype="int8" if kv_scales else "float32", max_length=shape.max_length,
                  scales="per_channel" if kv_scales else None)
    engine = DecoderEngine(out, desc, kv, shape.vocab, SessionConfig(prepack=False), prefill=prefill)
    table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
    rows = [row for trace in traces for row in compare_trace(trace, engine, lambda token: table[token])]
    summary = {k: v for k, v in summarise_steps(rows).items() if k != "steps"}
    return {"label": label, **summary, "decoder_bytes": int(sum(desc.sizes.values())),
            "kv_bytes_per_position": kv.bytes_per_token, "scaled_sites": len(plan.input_scales)}


def _outlier_ratio(scales: Any) -> float:
    """The largest max/median channel ratio over the decoder's qkv inputs: how strong the outliers are."""
    import numpy as np

    ratios = [float(np.max(s.absmax) / max(float(np.median(s.absmax)), 1e-12))
              for name, s in scales.sites.items() if name.endswith(".qkv")]
    return max(ratios) if ratios else float("nan")


def outliers_table(report: dict[str, Any]) -> str:
    from pulse_edge.benchmarks.common.tables import gib, markdown_table

    header = ["decoder recipe", "logit cosine (mean)", "min", "KL (mean)", "top-1 agree", "decoder bytes",
              "KV bytes / position"]
    rows = [[r["label"], f"{r['cosine']:.5f}", f"{r['min_cosine']:.5f}", f"{r['kl']:.3g}", f"{r['top1']:.2f}",
             gib(r["decoder_bytes"]), f"{r['kv_bytes_per_position'] / 2**10:.0f} KiB"]
            for r in report["recipes"].values()]
    return "\n".join([
        f"checkpoint {report['checkpoint']}; scales {report['scales']}; qkv input max/median channel "
        f"{report['outlier_ratio']:.0f}x",
        f"{len(report['samples'])} held-out synthetic ECG samples, prefill + {report['steps']} teacher-forced steps "
        "each, logits vs the fp32 torch reference (same embeddings into both)",
        "", markdown_table(header, rows), "", f"total {report['elapsed_s']:.0f} s"])


@click.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--scales", required=True, type=click.Path(path_type=Path), help="From pulse-edge calibrate.")
@click.option("--samples", type=click.IntRange(min=1), default=2, show_default=True, help="Held-out samples.")
@click.option("--steps", type=click.IntRange(min=0), default=8, show_default=True,
              help="Teacher-forced decode steps after each prefill.")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def main(checkpoint: Path, scales: Path, samples: int, steps: int, json_path: Path | None) -> None:
    """Logit fidelity of each decoder recipe (int8, W8A8 plain vs SmoothQuant, int4 RTN vs AWQ) against the
    fp32 torch reference, on held-out ECG samples: for models with outlier channels (make-tiny --outliers)."""
    import transformers

    from pulse_edge.benchmarks.studies.outliers import OutliersConfig, outliers_table, run_outliers

    transformers.logging.set_verbosity_error()
    report = run_outliers(OutliersConfig(checkpoint=checkpoint, scales=scales, samples=samples, steps=steps),
                          progress=progress)
    click.echo(outliers_table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
