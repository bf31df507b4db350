"""`pulse-edge`: the command line.

Every command validates its inputs before loading anything heavy, imports
torch/transformers only inside the command that needs them, and turns a
`PulseEdgeError` into one line on stderr and exit code 2 (no traceback).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from pulse_edge import __version__
from pulse_edge.errors import PulseEdgeError
from pulse_edge.pipelines import open_pipeline

BACKENDS = ("torch",)
DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")


class _Cli(click.Group):
    """A group whose commands report user errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PulseEdgeError as e:
            click.echo(f"pulse-edge: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("pulse-edge: interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Cli)
@click.version_option(__version__, prog_name="pulse-edge")
@click.option("-v", "--verbose", is_flag=True, help="Log progress to stderr.")
def main(verbose: bool) -> None:
    """Run PULSE, the ECG-image LLM, on edge devices."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="pulse-edge: %(message)s",
                        stream=sys.stderr)


@main.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A PULSE checkpoint directory (original LLaVA or llava_next layout).")
@click.option("--question", default=None, help="The question to ask; default: a full ECG interpretation.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True)
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
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
def infer(image: Path, model_dir: Path, question: str | None, backend: str, max_new_tokens: int,
          temperature: float, top_p: float, seed: int, as_json: bool, vision_tower: Path | None, dtype: str,
          device: str) -> None:
    """Answer a question about one ECG image (PNG, JPEG, TIFF, BMP or the first page of a PDF)."""
    from pulse_edge.runtime.inputs import load_image
    from pulse_edge.runtime.prompt import DEFAULT_QUESTION
    from pulse_edge.runtime.sampling import SamplingParams

    picture = load_image(image)  # bad input fails here, before any model is loaded
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    pipeline = open_pipeline(model_dir, backend=backend, vision_tower=vision_tower, dtype=dtype, device=device)

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
    click.echo(f"[{backend}: {result.image_tokens} image tokens, {result.prompt_tokens} prompt positions, "
               f"{result.generated_tokens} generated ({result.stop_reason}); preprocess {t.preprocess_ms:.0f} ms, "
               f"vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, "
               f"decode {t.decode_tokens_per_s:.1f} tok/s]", err=True)


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
def make_tiny(out_dir: Path, seed: int, merge: str, tower: str, layout: str, full_shape: bool) -> None:
    """Write a random PULSE-shaped checkpoint (original LLaVA layout) with a real SentencePiece tokenizer."""
    import torch

    from pulse_edge.export.tiny import TinySpec, make_tiny_checkpoint

    spec = TinySpec(seed=seed, merge=merge, tower=tower, layout=layout, full_shape=full_shape,
                    dtype=torch.bfloat16 if full_shape else torch.float32)
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


if __name__ == "__main__":
    main()
