"""`pulse-edge infer`: answer a question about one ECG (image, PDF or recording), or about many into a file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pulse_edge.backends import model_identity, open_backend
from pulse_edge.choices import (
    ATTENTION_MODES,
    BACKENDS,
    DECODE_STEPS,
    OPT_LEVELS,
    PREFILL_GRAPH_MODES,
    PROVIDERS,
    TORCH_DTYPES,
    VOLTAGE_UNITS,
)
from pulse_edge.cli.params import SEED, TORCH_DEVICE
from pulse_edge.cli.progress import HashBar, quiet
from pulse_edge.click_types import FiniteFloatRange, given
from pulse_edge.errors import ConfigError
from pulse_edge.staging import check_output_file


@click.command("infer")
@click.argument("inputs", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A bundle (from `pulse-edge export`) or a PULSE checkpoint directory.")
@click.option("--question", default=None, help="The question to ask; default: a full ECG interpretation.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: ort for a bundle, torch for a checkpoint; trt: the bundle's TensorRT engines "
                   "(build-engines).")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="trt backend: the engine directory (default: the bundle's one engines-* folder).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1024, show_default=True,
              help="The paper's evaluation uses 1024.")
@click.option("--temperature", type=FiniteFloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = greedy, as in the paper's evaluation.")
@click.option("--top-p", type=FiniteFloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True)
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
              help="prefill long prompts in chunks of N positions; default: the runtime's (2048 on a CPU bundle's "
                   "prefill graph, else 512; measured fastest; trt: at most the engines' --max-chunk); 0 = one "
                   "pass.")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="ort backend: let ORT repack weights (faster decode, but a second copy of the weights in RAM).")
@click.option("--prefill-graph", type=click.Choice(PREFILL_GRAPH_MODES), default="auto", show_default=True,
              help="ort backend: a CPU bundle's prefill graph (int8 GEMM for long prompts); auto: loaded when this "
                   "machine's memory holds it beside the decode graph, else the decode graph prefills (one warning).")
@click.option("--prefill-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="ort backend, a prefill graph cut for pulse-edge's CPU attention kernel (bf16: AMX or AVX-512): "
                   "auto: the kernel where this CPU and a C compiler run it, else the whole graph; kernel: or an "
                   "error; graph: always the whole graph.")
@click.option("--decode-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="ort backend, a decode graph cut for pulse-edge's CPU decode-attention kernel (AVX-512, reads the "
                   "int8 cache at memory speed): auto, kernel, graph as for --prefill-attention.")
@click.option("--decode-step", type=click.Choice(DECODE_STEPS), default="auto", show_default=True,
              help="ort backend, an int8/int4 CPU bundle: native: decode steps on pulse-edge's own kernels (AVX-512 "
                   "VNNI) from the decode graph's weights, or an error; onnx: ONNX Runtime runs the decode graph; "
                   "auto: native where it runs, the export validated it, the prefill graph is loaded and "
                   "--decode-attention is auto.")
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Answer every input (files, folders, quoted glob patterns) into this JSON-lines file, one line "
                   "each; a rerun skips the inputs already answered.")
@click.option("--fail-fast", is_flag=True, help="With --output: stop at the first input that fails.")
@click.option("--save-render", type=click.Path(path_type=Path), default=None,
              help="Keep the image the model read (a recording's rendered 12-lead print); with --output a folder "
                   "that gets one PNG per recording, named after its path and a short hash (the line's 'render').")
@click.option("--fs", type=FiniteFloatRange(min=0, min_open=True), default=None,
              help="Sampling rate in Hz of CSV and NPY recordings, which do not store one.")
@click.option("--leads", default=None,
              help="Lead order of an NPY recording, comma-separated; default I,II,III,aVR,aVL,aVF,V1,...,V6.")
@click.option("--unit", type=click.Choice(VOLTAGE_UNITS), default=None,
              help="Voltage unit of CSV and NPY recordings (default mV).")
@click.option("--verify", is_flag=True,
              help="Check every byte of the bundle against its manifest's sha256 before loading it.")
def infer(inputs: tuple[str, ...], model_dir: Path, question: str | None, backend: str, engines: Path | None,
          max_new_tokens: int,
          temperature: float, top_p: float, seed: int, as_json: bool, vision_tower: Path | None, dtype: str,
          device: str, provider: str, threads: int, opt_level: str, prefill_chunk: int | None,
          prepack: bool, prefill_graph: str, prefill_attention: str, decode_attention: str, decode_step: str,
          output: Path | None,
          fail_fast: bool,
          save_render: Path | None,
          fs: float | None, leads: str | None, unit: str | None, verify: bool) -> None:
    """Answer a question about an ECG: an image (PNG, JPEG, TIFF, BMP), the first page of a PDF, or a recording
    (DICOM waveform, WFDB record, HL7 aECG, CSV or NPY) rendered as the standard 12-lead print."""
    from pulse_edge.runtime.batch import save_image
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.generation.interpretation import interpret
    from pulse_edge.runtime.generation.sampling import SamplingParams
    from pulse_edge.runtime.inputs import load_input
    from pulse_edge.runtime.text.prompt import DEFAULT_QUESTION, check_text

    if question is not None and not question.strip():  # given, yet nothing to ask: never the default in silence
        raise ConfigError("--question is empty; leave it out to ask for a full interpretation")
    question = check_text(question or DEFAULT_QUESTION, "--question")  # before any model is loaded
    sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    unused = [f"--{name.replace('_', '-')}" for name in ("top_p", "seed") if given(name)]
    if temperature == 0 and unused:  # never dropped in silence: the answer is the greedy one
        click.echo(f"pulse-edge: note: {', '.join(unused)} shape sampling (--temperature > 0); with --temperature 0 "
                   "the answer is greedy and they are not used", err=True)
    session = SessionConfig(provider=provider, threads=threads, opt_level=opt_level, prepack=prepack,
                            prefill_graph=prefill_graph, prefill_attention=prefill_attention,
                            decode_attention=decode_attention, decode_step=decode_step)

    def open_model():
        with HashBar() as bar:
            return open_backend(model_dir, backend=backend, vision_tower=vision_tower, dtype=dtype, device=device,
                                session=session, prefill_chunk=prefill_chunk, engines=engines, verify=verify,
                                progress=bar)

    reading = {"fs": fs, "unit": unit, "leads": tuple(n.strip() for n in leads.split(",")) if leads else None}
    if output is not None:
        from pulse_edge.cli.batch import infer_many

        if as_json:
            raise ConfigError("--json prints one answer as JSON; with --output every answer is a JSON line of that "
                              "file already: leave --json out")

        infer_many(inputs, output, open_model, question=question, max_new_tokens=max_new_tokens,
                   sampling=sampling, reading=reading, save_render=save_render, fail_fast=fail_fast,
                   model=model_identity(model_dir, backend, provider=provider, engines=engines, dtype=dtype,
                                        device=device, vision_tower=vision_tower))
        return
    if len(inputs) != 1 or fail_fast:
        raise ConfigError("several inputs (and --fail-fast) need --output FILE: the answers go there, one JSON "
                          "line each")
    if save_render is not None:
        check_output_file(save_render, what="--save-render file")
    ecg = load_input(inputs[0], **reading)  # bad input fails here, before any model is loaded
    if save_render is not None:
        save_image(ecg.image, save_render)
    for note in ecg.notes:
        click.echo(f"pulse-edge: note: {note}", err=True)
    pipeline = open_model()

    def stream(piece: str) -> None:
        click.echo(piece, nl=False)
        sys.stdout.flush()

    result = interpret(pipeline, ecg, question, max_new_tokens=max_new_tokens,
                       sampling=sampling, on_text=None if as_json else stream)
    if as_json:
        click.echo(json.dumps(result.to_dict(), ensure_ascii=False))
        return
    click.echo()
    for note in result.notes[len(ecg.notes):]:  # about the answer (the input's were said before it)
        click.echo(f"pulse-edge: note: {note}", err=True)
    if quiet():
        return
    t = result.timings
    click.echo(f"[{result.backend}: {result.image_tokens} image tokens, {result.prompt_tokens} prompt positions, "
               f"{result.generated_tokens} generated ({result.stop_reason}); preprocess {t.preprocess_ms:.0f} ms, "
               f"vision {t.vision_ms:.0f} ms, prefill {t.prefill_ms:.0f} ms, "
               f"decode {t.decode_tokens_per_s:.1f} tok/s]", err=True)
