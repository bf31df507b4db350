"""The GPU check of a bundle's TensorRT engines: greedy tokens against ONNX Runtime, and a speed table.

    python -m pulse_edge.benchmarks.studies.trt_check BUNDLE [--engines DIR] [--reference BUNDLE]

    rendered 12-lead print (2200x1700: 2880 image tokens) + question
      -> ONNX Runtime on the reference bundle (default: BUNDLE itself; e.g. the fp16 bundle for a quantized
         one), greedy: the token ids
      -> the trt backend on BUNDLE's engines: warm-up, then `--runs` greedy runs: the token ids and timings
      -> first divergence; vision / prefill / time to first token / decode tok/s (medians); the decoder's
         bytes per decode step against the GPU's memory bandwidth bound (clock x bus width x 2, from CUDA)

Needs an NVIDIA GPU, TensorRT (tensorrt_rtx for rtx engines, JetPack's tensorrt on a Jetson) and
cuda-bindings. Prints a markdown table; --json writes the report.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import click

from pulse_edge.benchmarks.common.output import REPORT_PATH, progress, write_json
from pulse_edge.calibration.fidelity import first_divergence

QUESTION = "What is the rhythm?"
PRINT = (2200, 1700)  # US letter at 200 dpi: PULSE's 672x672 pinpoint, 4 tiles + base = 2880 image tokens


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def run_check(bundle: Path, engines: Path | None, reference: Path | None, tokens: int, runs: int,
              reference_provider: str) -> dict[str, Any]:
    from pulse_edge.benchmarks.common.measure import ecg_print
    from pulse_edge.benchmarks.common.roofline import bundle_decoder_facts
    from pulse_edge.runtime.engines.ort import SessionConfig
    from pulse_edge.runtime.engines.trt import Cuda
    from pulse_edge.runtime.pipeline import Pipeline

    image = ecg_print(PRINT)
    device = Cuda().device()
    progress(f"ONNX Runtime ({reference_provider}) on {reference or bundle}")
    ort = Pipeline.from_bundle(reference or bundle, session=SessionConfig(provider=reference_provider))
    expected = ort.generate(image, QUESTION, max_new_tokens=tokens)
    del ort
    progress(f"TensorRT engines of {bundle} on {device['name']}")
    trt = Pipeline.from_bundle(bundle, backend="trt", engines=engines)
    results = [trt.generate(image, QUESTION, max_new_tokens=tokens) for _ in range(runs + 1)][1:]
    timings = [r.timings for r in results]
    facts = bundle_decoder_facts(bundle)
    context = results[-1].prompt_tokens + results[-1].generated_tokens / 2
    rates = [t.decode_tokens_per_s for t in timings if t.decode_tokens_per_s > 0]  # 0: one token, no decode step
    decode = _median(rates) if rates else None  # printed n/a, never 0 tok/s as if measured
    bandwidth = device["peak_bandwidth_bytes_s"] or None  # a device that reports no memory clock: no bound
    achieved = None if decode is None else decode * facts.bytes_per_token(round(context))
    return {"device": device, "bundle": str(bundle), "reference": str(reference or bundle),
            "engines": str(engines or "the bundle's engines-* folder"), "image_tokens": results[-1].image_tokens,
            "prompt_tokens": results[-1].prompt_tokens, "tokens_trt": results[-1].token_ids,
            "tokens_ort": expected.token_ids,
            "first_divergence": first_divergence(expected.token_ids, results[-1].token_ids),
            "vision_ms": _median([t.vision_ms for t in timings]),
            "prefill_ms": _median([t.prefill_ms for t in timings]),
            "ttft_ms": _median([t.time_to_first_token_ms for t in timings]), "decode_tokens_per_s": decode,
            "decode_context": context, "bytes_per_token": facts.bytes_per_token(round(context)),
            "fraction_of_bandwidth": None if achieved is None or bandwidth is None else achieved / bandwidth,
            "runs": runs}


def report_table(r: dict[str, Any]) -> str:
    d = r["device"]
    same = "equal" if r["first_divergence"] is None else f"differ from token {r['first_divergence']}"
    return "\n".join([
        f"device: {d['name']} (compute capability {d['compute_capability']}, {d['memory_bytes'] / 2**30:.1f} GiB, "
        f"bandwidth bound {d['peak_bandwidth_bytes_s'] / 1e9:.0f} GB/s)",
        f"greedy tokens ({len(r['tokens_trt'])}) of the engines and of ONNX Runtime on {r['reference']}: {same}",
        f"medians of {r['runs']} runs after one warm-up; {r['image_tokens']} image tokens, {r['prompt_tokens']} "
        "prompt positions", "",
        "| vision ms | prefill ms | time to first token ms | decode tok/s | bytes per decode step | % of bandwidth |",
        "|---|---|---|---|---|---|",
        f"| {r['vision_ms']:.1f} | {r['prefill_ms']:.1f} | {r['ttft_ms']:.1f} | {_cell(r['decode_tokens_per_s'], 1)} | "
        f"{r['bytes_per_token'] / 2**20:.0f} MiB | {_cell(r['fraction_of_bandwidth'], 0, 100)} % |"])


def _cell(value: float | None, digits: int, scale: float = 1.0) -> str:
    """n/a where nothing was measured (no decode step ran, or no bandwidth bound)."""
    return "n/a" if value is None else f"{scale * value:.{digits}f}"


@click.command("trt_check")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="The engine directory (default: the bundle's one engines-* folder).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="The bundle ONNX Runtime answers with (default: BUNDLE), e.g. the fp16 one.")
@click.option("--reference-provider", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True)
@click.option("--tokens", type=click.IntRange(min=2), default=32, show_default=True,
              help="New tokens per run (>= 2: the first comes from the prefill, a decode rate needs a step).")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--json", "json_path", type=REPORT_PATH, default=None)
def main(bundle: Path, engines: Path | None, reference: Path | None, reference_provider: str, tokens: int,
         runs: int, json_path: Path | None) -> None:
    """Greedy tokens of the engines against ONNX Runtime, and prefill/decode speed on this GPU."""
    from pulse_edge.errors import PulseEdgeError

    try:
        report = run_check(bundle, engines, reference, tokens, runs, reference_provider)
    except PulseEdgeError as e:
        raise click.ClickException(str(e)) from e
    click.echo(report_table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
