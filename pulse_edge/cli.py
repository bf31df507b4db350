"""`pulse-edge`: the command line.

Every command validates its inputs before loading anything heavy, imports
torch/transformers only inside the command that needs them, and turns a
`PulseEdgeError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import click

from pulse_edge import __version__
from pulse_edge.benchmarks.bench_cli import bench_group
from pulse_edge.benchmarks.eval_cli import eval_group
from pulse_edge.clickgroup import UserErrorGroup
from pulse_edge.pipelines import BACKENDS, open_pipeline
from pulse_edge.quant_cli import calibrate_cmd, print_fidelity, quant_options, quant_settings

PROVIDERS = ("cpu", "cuda", "tensorrt")
OPT_LEVELS = ("disable", "basic", "extended", "all")
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


@click.group(cls=UserErrorGroup)
@click.version_option(__version__, prog_name="pulse-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """Run PULSE, the ECG-image LLM, on edge devices."""
    # Only pulse-edge's own logger: exporters and optimisers log plenty at INFO on the root logger.
    logger = logging.getLogger("pulse_edge")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pulse-edge: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if verbose else logging.WARNING)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A bundle (from `pulse-edge export`) or a PULSE checkpoint directory.")
@click.option("--question", default=None, help="The question to ask; default: a full ECG interpretation.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: ort for a bundle, torch for a checkpoint.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="The paper's evaluation uses 1024.")
@click.option("--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy, as in the paper's evaluation.")
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling (temperature > 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
              help="A local CLIP vision tower directory; takes precedence over the tower named in the config.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
              help="auto: fp16 on a GPU, fp32 on a CPU.")
@click.option("--device", default="auto", show_default=True, help="torch backend: auto, cpu, cuda or cuda:N.")
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="ort backend: execution provider (cuda/tensorrt need onnxruntime-gpu; never a silent fallback).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ort backend: intra-op threads (0 = one per core).")
@click.option("--opt-level", type=click.Choice(OPT_LEVELS), default="all", show_default=True,
              help="ort backend: graph optimisation level.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=None,
              help="ort backend: prefill long prompts in chunks of N positions; default: the runtime's (512: less "
                   "memory, measured a little faster); 0 = one pass.")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="ort backend: let ORT repack weights (faster decode, but a second copy of the weights in RAM).")
def infer(image: Path, model_dir: Path, question: str | None, backend: str, max_new_tokens: int,
          temperature: float, top_p: float, seed: int, as_json: bool, vision_tower: Path | None, dtype: str,
          device: str, provider: str, threads: int, opt_level: str, prefill_chunk: int | None,
          prepack: bool) -> None:
    """Answer a question about one ECG image (PNG, JPEG, TIFF, BMP or the first page of a PDF)."""
    from pulse_edge.runtime.inputs import load_image
    from pulse_edge.runtime.ort_engine import SessionConfig
    from pulse_edge.runtime.prompt import DEFAULT_QUESTION
    from pulse_edge.runtime.sampling import SamplingParams

    picture = load_image(image)  # bad input fails here, before any model is loaded
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    session = SessionConfig(provider=provider, threads=threads, opt_level=opt_level, prepack=prepack)
    pipeline = open_pipeline(model_dir, backend=backend, vision_tower=vision_tower, dtype=dtype, device=device,
                             session=session, prefill_chunk=prefill_chunk)

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = pipeline.generate(picture, question or DEFAULT_QUESTION, max_new_tokens=max_new_tokens,
                               sampling=sampling, on_text=None if as_json else stream)
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo()
    t = result.timings
    click.echo(f"[{result.backend}: {result.image_tokens} image tokens, {result.prompt_tokens} prompt positions, "
               f"{result.generated_tokens} generated ({result.stop_reason}); preprocess {t.preprocess_ms:.0f} ms, "
               f"vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, "
               f"decode {t.decode_tokens_per_s:.1f} tok/s]", err=True)


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="The bundle directory to create (must not exist or be empty).")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int4", "fp8"]), default="fp32",
              show_default=True, help="int8 / int4 / fp8: quantized recipes (see the options below and the README).")
@click.option("--max-context", type=int, default=None,
              help="KV cache length in positions (default: the model's 4096).")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
              help="A local CLIP vision tower directory; takes precedence over the tower named in the config.")
@click.option("--validation", type=click.Choice(["standard", "quick"]), default="standard", show_default=True,
              help="quick: short prefills only (the full 7B in fp32 on a small CPU).")
@quant_options
def export_cmd(checkpoint: Path, out: Path, precision: str, max_context: int | None, vision_tower: Path | None,
               validation: str, **quant: Any) -> None:
    """Export a checkpoint to a validated bundle (ONNX graphs, tokenizer.json, manifest.json)."""
    import transformers

    transformers.logging.set_verbosity_error()
    from pulse_edge.export.bundle import ExportOptions, export_bundle
    from pulse_edge.export.validate import ValidationPlan

    plan = ValidationPlan() if validation == "standard" else ValidationPlan.quick()
    options = ExportOptions(precision=precision, max_context=max_context, vision_tower=vision_tower, plan=plan,
                            quant=quant_settings(precision, **quant))
    exporter_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = exporter_log.level
    try:
        # torch's exporter warns about torchvision ops and trips its own pytree deprecation:
        # nothing a user exporting PULSE can act on.
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            path = export_bundle(checkpoint, out, options)
    finally:
        exporter_log.setLevel(level)
    print_fidelity(path)
    click.echo(f"wrote {precision} bundle to {path} (validated against the torch reference)")


@main.command("make-tiny")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--merge", type=click.Choice(["flat", "spatial_unpad"]), default="flat", show_default=True,
              help="flat is PULSE's layout; spatial_unpad adds image_newline (LLaVA-1.6 default).")
@click.option("--tower", type=click.Choice(["inside", "separate"]), default="inside", show_default=True,
              help="separate: the checkpoint only names its tower; pass --vision-tower DIR/clip-vision-tower.")
@click.option("--layout", type=click.Choice(["llava", "llava_next"]), default="llava", show_default=True,
              help="llava: PULSE's original format; llava_next: transformers' format.")
@click.option("--full-shape", is_flag=True,
              help="Real PULSE-7B shapes (random, ~14 GB in bf16) for memory and speed tests.")
@click.option("--layers", type=click.IntRange(min=1), default=None,
              help="Override the decoder's layer count (e.g. --full-shape --layers 2: real width, 2 layers).")
@click.option("--outliers", type=click.IntRange(min=0), default=0, show_default=True,
              help="Hidden dims whose q/k/v and gate/up inputs get outlier activations (function-preserving), "
                   "as trained LLMs have; for testing quantization.")
@click.option("--outlier-scale", type=click.FloatRange(min=0, min_open=True), default=50.0, show_default=True,
              help="How many times larger the outlier dims' activations are.")
def make_tiny(out_dir: Path, seed: int, merge: str, tower: str, layout: str, full_shape: bool,
              layers: int | None, outliers: int, outlier_scale: float) -> None:
    """Write a random PULSE-shaped checkpoint (original LLaVA layout) with a real SentencePiece tokenizer."""
    import torch

    from pulse_edge.export.tiny import TinySpec, make_tiny_checkpoint

    spec = TinySpec(seed=seed, merge=merge, tower=tower, layout=layout, full_shape=full_shape,
                    dtype=torch.bfloat16 if full_shape else torch.float32, layers=layers, outliers=outliers,
                    outlier_scale=outlier_scale)
    path = make_tiny_checkpoint(out_dir, spec)
    click.echo(f"wrote {'full-shape' if full_shape else 'tiny'} random checkpoint to {path}")


@main.command("render-ecg")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--rhythm", default="sinus", show_default=True, help="sinus, tachycardia, bradycardia, afib, ...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--size", default="2200x1700", show_default=True, help="WIDTHxHEIGHT in pixels (200 dpi letter).")
@click.option("--header", default=None, help="Header text printed at the top.")
def render_ecg(out: Path, rhythm: str, seed: int, size: str, header: str | None) -> None:
    """Render a synthetic 12-lead ECG print with a known rhythm to a PNG."""
    from pulse_edge.calibration.ecg_render import render_ecg as render
    from pulse_edge.calibration.ecg_signals import synthesize_ecg
    from pulse_edge.errors import ConfigError

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError as e:
        raise ConfigError(f"--size must look like 2200x1700, got {size!r}") from e
    record = synthesize_ecg(rhythm, seed=seed)
    render(record, width_px=width, height_px=height, header=header).save(out)
    click.echo(f"wrote {out}: {record.description}")


main.add_command(eval_group)
main.add_command(bench_group)
main.add_command(calibrate_cmd)

if __name__ == "__main__":
    main()
