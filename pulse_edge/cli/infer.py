"""`pulse-edge infer`: answer a question about one ECG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pulse_edge.backends import open_backend
from pulse_edge.choices import BACKENDS, OPT_LEVELS, PROVIDERS, TORCH_DTYPES
from pulse_edge.cli.params import SEED, TORCH_DEVICE
from pulse_edge.cli.progress import HashBar


@click.command("infer")
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
@click.option("--seed", type=SEED, default=0, show_default=True, help="Seed for sampling (temperature > 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming text.")
@click.option("--vision-tower", type=click.Path(path_type=Path), default=None,
              help="A local CLIP vision tower directory; takes precedence over the tower named in the config.")
@click.option("--dtype", type=click.Choice(TORCH_DTYPES), default="auto", show_default=True,
              help="auto: fp16 on a GPU, fp32 on a CPU.")
@click.option("--device", type=TORCH_DEVICE, default="auto", show_default=True,
              help="torch backend: auto, cpu, cuda or cuda:N.")
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
@click.option("--verify", is_flag=True,
              help="Check every byte of the bundle against its manifest's sha256 before loading it.")
def infer(image: Path, model_dir: Path, question: str | None, backend: str, max_new_tokens: int,
          temperature: float, top_p: float, seed: int, as_json: bool, vision_tower: Path | None, dtype: str,
          device: str, provider: str, threads: int, opt_level: str, prefill_chunk: int | None,
          prepack: bool, verify: bool) -> None:
    """Answer a question about one ECG image (PNG, JPEG, TIFF, BMP or the first page of a PDF)."""
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.generation.sampling import SamplingParams
    from pulse_edge.runtime.inputs.images import load_image
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION

    picture = load_image(image)  # bad input fails here, before any model is loaded
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    session = SessionConfig(provider=provider, threads=threads, opt_level=opt_level, prepack=prepack)
    with HashBar() as bar:
        pipeline = open_backend(model_dir, backend=backend, vision_tower=vision_tower, dtype=dtype, device=device,
                                session=session, prefill_chunk=prefill_chunk, verify=verify, progress=bar)

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
