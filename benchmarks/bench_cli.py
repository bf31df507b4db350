"""`pulse-edge bench ...`: latency of one model on ECG prints, and the backends side by side.

Registered in the main CLI with `main.add_command(bench_group)`. Only the
standard library, click and pulse_edge.errors are imported here, so that
`pulse-edge --help` stays fast; each command imports numpy, torch or
onnxruntime when it runs. User errors are `PulseEdgeError`s: one line on
stderr and exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pulse_edge.clickgroup import UserErrorGroup
from pulse_edge.pipelines import BACKENDS  # lean: pathlib, typing, errors

_PROVIDERS = ("cpu", "cuda", "tensorrt")
_DEFAULT_SIZES = "2200x1700,3300x2550,3508x2480"  # letter 200 dpi, letter 300 dpi, A4 300 dpi


def _progress(message: str) -> None:
    click.echo(f"[bench] {message}", err=True)


def _write_json(path: Path | None, report: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        click.echo(f"wrote {path}", err=True)


@click.group("bench", cls=UserErrorGroup)
def bench_group() -> None:
    """Latency and throughput: one model on ECG prints, or the backends side by side (DESIGN §7 roofline)."""


@bench_group.command("latency")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A bundle (ONNX Runtime) or a checkpoint (torch reference).")
@click.option("--runs", type=click.IntRange(min=1), default=5, show_default=True, help="Timed runs per size.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Untimed runs first.")
@click.option("--sizes", default=_DEFAULT_SIZES, show_default=True,
              help="ECG print sizes WIDTHxHEIGHT in pixels, comma-separated.")
@click.option("--max-new-tokens", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="auto: ort for a bundle, torch for a checkpoint.")
@click.option("--provider", type=click.Choice(_PROVIDERS), default="cpu", show_default=True,
              help="ort backend: execution provider.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Intra-op threads (0 = one per core).")
@click.option("--bandwidth-mib", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Array size for the memory bandwidth measurement (far above the caches).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the report.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write latency.md, latency.json and latency.png (the per-stage breakdown) into this directory.")
def latency_command(model_dir: Path, runs: int, warmup: int, sizes: str, max_new_tokens: int, backend: str,
                    provider: str, threads: int, bandwidth_mib: int, json_path: Path | None,
                    report_dir: Path | None) -> None:
    """Preprocess, vision, time to first token, decode tok/s (p50/p95) on rendered 12-lead prints,
    beside the memory-bandwidth roofline measured on this machine."""
    from pulse_edge.benchmarks.latency import LatencyConfig, latency_table, parse_sizes, run_latency

    if report_dir is not None:
        from pulse_edge.benchmarks.ecgbench_report import require_plotting

        require_plotting()  # fail before a long run, not after it
    config = LatencyConfig(model=model_dir, runs=runs, warmup=warmup, sizes=parse_sizes(sizes),
                           max_new_tokens=max_new_tokens, backend=backend, provider=provider, threads=threads,
                           bandwidth_bytes=bandwidth_mib * 2**20)
    report = run_latency(config, progress=_progress)
    table = latency_table(report)
    click.echo(table)
    _write_json(json_path, report)
    if report_dir is not None:
        from pulse_edge.benchmarks.latency_report import write_latency_report

        for path in write_latency_report(report_dir, report, table):
            click.echo(f"wrote {path}", err=True)


@bench_group.command("backends")
@click.option("--width", type=click.Choice(["tiny", "real"]), default="tiny", show_default=True,
              help="real: hidden 4096 and the full CLIP tower, with --layers decoder layers.")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="Decoder layers.")
@click.option("--runs", type=click.IntRange(min=1), default=None,
              help="Timed runs per measurement [default: 5 tiny, 3 real].")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--context", type=click.IntRange(min=2), default=3000, show_default=True,
              help="Positions of context for the decode measurement.")
@click.option("--decode-tokens", type=click.IntRange(min=1), default=None,
              help="Decode steps per timed run [default: 32 tiny, 16 real].")
@click.option("--work", type=click.Path(path_type=Path), default=None,
              help="Keep the made checkpoint and bundle here and reuse them [default: a temp dir, removed].")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Intra-op threads for torch and ORT (0 = one per core).")
@click.option("--bandwidth-mib", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Array size for the memory bandwidth measurement.")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Also write the report.")
def backends_command(width: str, layers: int, runs: int | None, warmup: int, context: int,
                     decode_tokens: int | None, work: Path | None, threads: int, bandwidth_mib: int,
                     json_path: Path | None) -> None:
    """transformers generate vs the torch reference vs ONNX Runtime on the same random PULSE-shaped model,
    in one process: vision, prefill, decode tok/s, achieved bandwidth, peak RSS, pipeline overhead."""
    from pulse_edge.benchmarks.backends import BackendsConfig, backends_table, run_backends

    config = BackendsConfig(width=width, layers=layers, runs=runs, warmup=warmup, context=context,
                            decode_tokens=decode_tokens, work=work, threads=threads,
                            bandwidth_bytes=bandwidth_mib * 2**20)
    _progress(f"{width} width, {layers} decoder layers: {config.timed_runs} timed runs after {warmup} warm-up, "
              f"{config.steps} decode steps at {context} positions")
    report = run_backends(config, progress=_progress)
    click.echo(backends_table(report))
    _write_json(json_path, report)
