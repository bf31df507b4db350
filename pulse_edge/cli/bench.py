"""`pulse-edge bench ...`: latency of one model on ECG prints, and the backends side by side.

Registered in the main CLI with `main.add_command(bench_group)`. Only the
standard library, click and pulse_edge.errors are imported here, so that
`pulse-edge --help` stays fast; each command imports numpy, torch or
onnxruntime when it runs. User errors are `PulseEdgeError`s: one line on
stderr and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from pulse_edge.benchmarks.common.output import REPORT_PATH, progress, write_json
from pulse_edge.choices import ATTENTION_MODES, BACKENDS, DECODE_STEPS, PREFILL_GRAPH_MODES, PROVIDERS
from pulse_edge.cli.group import UserErrorGroup
from pulse_edge.cli.params import at_most_usable_cpus
from pulse_edge.errors import ConfigError

_DEFAULT_SIZES = "2200x1700,3300x2550,3508x2480"  # letter 200 dpi, letter 300 dpi, A4 300 dpi
TORCH_AND_ORT_THREADS = "Intra-op threads for torch and ORT (0 = one per core)."

# options the measuring commands share
BANDWIDTH_MIB = click.option("--bandwidth-mib", type=click.IntRange(min=1), default=1024, show_default=True,
                             help="Array size for the memory bandwidth measurement (far above the caches).")


def threads_option(help_text: str = "Intra-op threads (0 = one per core).") -> Any:
    return click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True, help=help_text,
                        callback=at_most_usable_cpus)


@click.group("bench", cls=UserErrorGroup)
def bench_group() -> None:
    """Latency and throughput: one model on ECG prints, or the backends side by side (the memory-bandwidth roofline)."""


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
@click.option("--provider", type=click.Choice(PROVIDERS), default="cpu", show_default=True,
              help="ort backend: execution provider.")
@threads_option()
@BANDWIDTH_MIB
@click.option("--prefill-graph", type=click.Choice(PREFILL_GRAPH_MODES), default="auto", show_default=True,
              help="ort backend: a CPU bundle's prefill graph (as infer --prefill-graph); the table says which "
                   "graph prefilled.")
@click.option("--prefill-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="ort backend: as infer --prefill-attention; the table says what prefilled.")
@click.option("--decode-attention", type=click.Choice(ATTENTION_MODES), default="auto", show_default=True,
              help="ort backend: as infer --decode-attention; the table says what decoded.")
@click.option("--decode-step", type=click.Choice(DECODE_STEPS), default="auto", show_default=True,
              help="ort backend: as infer --decode-step; the table says what decoded.")
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=None,
              help="ort backend: as infer --prefill-chunk (default: the runtime's; 0 = one pass); the table says it.")
@click.option("--engines", type=click.Path(path_type=Path), default=None,
              help="trt backend: the engine directory build-engines wrote, where it is not inside the bundle.")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
@click.option("--report", "report_dir", type=click.Path(path_type=Path), default=None,
              help="Write latency.md, latency.json and latency.png (the per-stage breakdown) into this directory.")
def latency_command(model_dir: Path, runs: int, warmup: int, sizes: str, max_new_tokens: int, backend: str,
                    provider: str, threads: int, bandwidth_mib: int, prefill_graph: str, prefill_attention: str,
                    decode_attention: str, decode_step: str, prefill_chunk: int | None, engines: Path | None,
                    json_path: Path | None, report_dir: Path | None) -> None:
    """Preprocess, vision, time to first token, decode tok/s (p50/p95) on rendered 12-lead prints. On the CPU,
    read bandwidth and the peak of the model's GEMMs (int8 for a quantized bundle, fp32 for a float model) are probed
    before each run and after the last, and each run is held against the better of its two probes: vision and
    prefill as % of that peak, decode as % of the read bound."""
    from pulse_edge.benchmarks.perf.latency import LatencyConfig, latency_table, parse_sizes, run_latency

    if report_dir is not None:
        from pulse_edge.benchmarks.common.plots import require_plotting
        from pulse_edge.staging import check_output_file

        require_plotting()  # fail before a long run, not after it
        check_output_file(report_dir / "latency.md", what="--report folder")
    config = LatencyConfig(model=model_dir, runs=runs, warmup=warmup, sizes=parse_sizes(sizes),
                           max_new_tokens=max_new_tokens, backend=backend, provider=provider, threads=threads,
                           bandwidth_bytes=bandwidth_mib * 2**20, prefill_graph=prefill_graph,
                           prefill_attention=prefill_attention, decode_attention=decode_attention,
                           decode_step=decode_step, prefill_chunk=prefill_chunk, engines=engines)
    report = run_latency(config, progress=progress)
    table = latency_table(report)
    click.echo(table)
    write_json(json_path, report)
    if report_dir is not None:
        from pulse_edge.benchmarks.perf.latency_report import write_latency_report

        for path in write_latency_report(report_dir, report, table):
            click.echo(f"wrote {path}", err=True)


@bench_group.command("profile")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path), help="A bundle.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs per phase.")
@click.option("--positions", type=click.IntRange(min=16), default=2950, show_default=True,
              help="Prompt positions prefilled (a letter print's prompt: 2880 image tokens and its text).")
@click.option("--context", type=click.IntRange(min=2), default=3000, show_default=True,
              help="Positions of context for the decode steps.")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Decode steps per run.")
@threads_option()
@click.option("--prefill-chunk", type=click.IntRange(min=0), default=None,
              help="As infer --prefill-chunk (default: the runtime's; 0 = one pass).")
@click.option("--traces", type=click.Path(path_type=Path), default=None,
              help="Keep ONNX Runtime's traces here (Perfetto or chrome://tracing opens them) [default: removed].")
@BANDWIDTH_MIB
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def profile_command(model_dir: Path, runs: int, positions: int, context: int, steps: int, threads: int,
                    prefill_chunk: int | None, traces: Path | None, bandwidth_mib: int, json_path: Path | None) -> None:
    """Where a bundle's time goes on this CPU: vision, prefill and decode op by op (ONNX Runtime's profiler),
    grouped by role, each against this host's int8 GEMM, fp32 GEMM and read-bandwidth bounds, probed just before
    and just after each phase."""
    from pulse_edge.benchmarks.perf.profile import ProfileConfig, run_profile
    from pulse_edge.benchmarks.perf.profile_report import profile_table

    config = ProfileConfig(model=model_dir, runs=runs, positions=positions, context=context, steps=steps,
                           threads=threads, prefill_chunk=prefill_chunk, traces=traces,
                           bandwidth_bytes=bandwidth_mib * 2**20)
    report = run_profile(config, progress=progress)
    click.echo(profile_table(report))
    write_json(json_path, report)


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
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the made checkpoint and bundle here and reuse them [default: a temp dir, removed].")
@threads_option(TORCH_AND_ORT_THREADS)
@BANDWIDTH_MIB
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def backends_command(width: str, layers: int, runs: int | None, warmup: int, context: int,
                     decode_tokens: int | None, work: Path | None, threads: int, bandwidth_mib: int,
                     json_path: Path | None) -> None:
    """transformers generate vs the torch reference vs ONNX Runtime on the same random PULSE-shaped model,
    in one process: vision, prefill, decode tok/s, achieved bandwidth, peak RSS, pipeline overhead."""
    from pulse_edge.benchmarks.perf.backends import BackendsConfig, backends_table, run_backends

    config = BackendsConfig(width=width, layers=layers, runs=runs, warmup=warmup, context=context,
                            decode_tokens=decode_tokens, work=work, threads=threads,
                            bandwidth_bytes=bandwidth_mib * 2**20)
    progress(f"{width} width, {layers} decoder layers: {config.timed_runs} timed runs after {warmup} warm-up, "
              f"{config.steps} decode steps at {context} positions")
    report = run_backends(config, progress=progress)
    click.echo(backends_table(report))
    write_json(json_path, report)


@bench_group.command("projector")
@click.option("--tokens", default="576,2880,14400", show_default=True,
              help="Token counts T, comma-separated: 576 per tile; 2880 is one 12-lead print.")
@click.option("--precisions", default="bf16,int8,fp8", show_default=True,
              help="bf16, int8 (weight-only), fp8 (E4M3, compute capability >= 8.9).")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True, help="Timed calls per cell.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Untimed calls first (autotuning and torch.compile happen here).")
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True,
              help="Also time torch.compile of the eager projector.")
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def projector_command(tokens: str, precisions: str, runs: int, warmup: int, compile_: bool,
                      json_path: Path | None) -> None:
    """The fused Triton vision projector vs torch eager vs torch.compile on this CUDA GPU: median time,
    TFLOP/s, GB/s, and their fraction of the bf16 matmul peak and copy bandwidth measured in the same run."""
    from pulse_edge.benchmarks.perf.projector import (
        PRECISIONS,
        ProjectorBenchConfig,
        parse_list,
        parse_tokens,
        projector_table,
        require_gpu,
        run_projector_bench,
    )

    config = ProjectorBenchConfig(tokens=parse_tokens(tokens), precisions=parse_list(precisions, PRECISIONS),
                                  runs=runs, warmup=warmup, compile=compile_)
    require_gpu()  # before anything else: one line, no numbers
    report = run_projector_bench(config, progress=progress)
    click.echo(projector_table(report))
    write_json(json_path, report)


@bench_group.command("recipes")
@click.option("--layers", type=click.IntRange(min=1), default=2, show_default=True, help="Decoder layers.")
@click.option("--width", type=click.Choice(["tiny", "real"]), default="real", show_default=True)
@click.option("--recipes", default="int8,int4", show_default=True,
              help="Comma-separated: int8, int4, int8-w8a8 (SmoothQuant), int8-single and int4-single (no "
                   "prefill graph, fp32 KV: the single-graph bundles), fp32-kv16 (fp32 with an fp16 KV cache).")
@click.option("--runs", type=click.IntRange(min=1), default=None, help="Timed runs [default: 5 tiny, 3 real].")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True)
@click.option("--context", type=click.IntRange(min=2), default=3000, show_default=True)
@click.option("--decode-tokens", type=click.IntRange(min=1), default=None)
@click.option("--calibration-samples", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--no-transformers", is_flag=True, help="Leave transformers generate out (saves its fp32 copy).")
@click.option("--no-fp32", is_flag=True, help="Leave the fp32 bundle out of the timed rows (saves its memory).")
@click.option("--extra", "extra", multiple=True, metavar="NAME=DIR",
              help="Also time this bundle (made elsewhere, e.g. by another pulse-edge version); repeatable.")
@click.option("--baseline", default="fp32", show_default=True,
              help="The row the speedup columns compare against (a recipe, fp32, or an --extra NAME), or one per "
                   "row: ROW=BASE,ROW=BASE.")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the made checkpoint and bundles here and reuse them [default: a temp dir, removed].")
@threads_option(TORCH_AND_ORT_THREADS)
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def recipes_command(layers: int, width: str, recipes: str, runs: int | None, warmup: int, context: int,
                    decode_tokens: int | None, calibration_samples: int, no_transformers: bool, no_fp32: bool,
                    extra: tuple[str, ...], baseline: str, work: Path | None, threads: int,
                    json_path: Path | None) -> None:
    """fp32 vs int8 vs int4 bundles (and transformers generate) on one random PULSE-shaped model, in one
    process, against this host's read bandwidth and int8 GEMM peak, probed around every round: vision, prefill,
    decode tok/s."""
    from pulse_edge.benchmarks.perf.backends import BackendsConfig
    from pulse_edge.benchmarks.perf.recipes import RECIPES, RecipesConfig, recipes_table, run_recipes
    from pulse_edge.errors import ConfigError

    chosen = tuple(r.strip() for r in recipes.split(",") if r.strip())
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        raise ConfigError(f"--recipes: {', '.join(unknown)} not one of {', '.join(RECIPES)}")
    extras = tuple(_named_bundle(item) for item in extra)
    rows = {*chosen, *(name for name, _ in extras), *(() if no_fp32 else ("fp32",))}
    named = {n for pair in baseline.split(",") for n in pair.split("=")} if "=" in baseline else {baseline}
    if not named <= rows:
        raise ConfigError(f"--baseline names {', '.join(sorted(named - rows))}, not timed rows "
                          f"({', '.join(sorted(rows))})")
    base = BackendsConfig(width=width, layers=layers, runs=runs, warmup=warmup, context=context,
                          decode_tokens=decode_tokens, work=work, threads=threads)
    report = run_recipes(RecipesConfig(base=base, recipes=chosen, calibration_samples=calibration_samples,
                                       transformers=not no_transformers, fp32=not no_fp32, extra=extras,
                                       baseline=baseline), progress=progress)
    click.echo(recipes_table(report))
    write_json(json_path, report)


def _named_bundle(item: str) -> tuple[str, Path]:
    """--extra NAME=DIR -> (NAME, DIR); DIR must be a bundle directory."""
    from pulse_edge.errors import ConfigError

    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise ConfigError(f"--extra takes NAME=DIR, got {item!r}")
    if not (Path(path) / "manifest.json").is_file():
        raise ConfigError(f"--extra {name}: {path} is not a bundle (no manifest.json)")
    return name, Path(path)


@bench_group.command("gpu")
@click.option("--out", type=click.Path(path_type=Path), default=Path("gpu-check-out"), show_default=True,
              help="Folder for gpu-check.md, gpu-check.json and gpu-check.log (rewritten after every step).")
@click.option("--work", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the made model and the steps' files here and reuse them [default: a temp dir, removed].")
@click.option("--layers", type=click.IntRange(min=1, max=32), default=2, show_default=True,
              help="Decoder layers of the real-width model the torch backend and ORT are timed on.")
@click.option("--steps", default=None, help="Comma-separated steps to run (and the steps they need) [default: all].")
@click.option("--budget-s", type=click.IntRange(min=60), default=450, show_default=True,
              help="Seconds for the whole run: every step's timeout is cut to what is left; later steps are skipped.")
@click.option("--dry-run", is_flag=True, help="Check the plan, the commands, the imports and the pytest marks; "
              "print the plan; needs no GPU.")
def gpu_command(out: Path, work: Path | None, layers: int, steps: str | None, budget_s: int, dry_run: bool) -> None:
    """Every GPU check in one run (docs/gpu.md): GPU tests, bench projector, the torch backend (and ORT CUDA/TensorRT
    where present) on a real-width model; a markdown and JSON report; exit 1 if a GPU test or a step failed."""
    from pulse_edge.benchmarks.perf.gpu_check import run_gpu_check
    from pulse_edge.benchmarks.perf.gpu_dry_run import dry_run as check_plan
    from pulse_edge.benchmarks.perf.gpu_plan import GpuCheckConfig
    from pulse_edge.benchmarks.perf.projector import parse_list
    from pulse_edge.cli.main import main  # the root group: the dry run parses the steps' command lines with it

    if steps is not None and not steps.strip(" ,"):  # parse_list's line asked for integers; steps have names
        raise ConfigError("--steps names no step; give e.g. versions,pytest-gpu, or leave it out for all")
    chosen = parse_list(steps) if steps is not None else None
    config = GpuCheckConfig(out=out, work=work, layers=layers, budget_s=budget_s, steps=chosen)
    code = check_plan(config, echo=click.echo, cli=main) if dry_run else run_gpu_check(config, echo=click.echo)
    click.get_current_context().exit(code)


@bench_group.command("soak")
@click.option("--model", "model_dir", required=True, type=click.Path(path_type=Path),
              help="A bundle; served by `pulse-edge serve` in a subprocess on a free localhost port.")
@click.option("--sequential", type=click.IntRange(min=1), default=500, show_default=True,
              help="Requests sent one after another.")
@click.option("--concurrent", type=click.IntRange(min=1), default=200, show_default=True,
              help="Requests shared by --clients clients sending at once.")
@click.option("--clients", type=click.IntRange(min=1), default=8, show_default=True,
              help="Concurrent clients (the server's queue is sized to them: no 503 expected).")
@click.option("--warmup", type=click.IntRange(min=0), default=6, show_default=True,
              help="Untimed requests before the first phase (the RSS baseline is read after them).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--json", "json_path", type=REPORT_PATH, default=None, help="Also write the report.")
def soak_command(model_dir: Path, sequential: int, concurrent: int, clients: int, warmup: int,
                 max_new_tokens: int, json_path: Path | None) -> None:
    """Soak `pulse-edge serve`: sequential then concurrent chat, streamed chat and ECG-upload requests;
    p50/p95 latency, errors, 503s, and the server's RSS from start to end (a leak shows as growth)."""
    from pulse_edge.benchmarks.perf.soak import SoakConfig, run_soak, soak_table

    config = SoakConfig(model=model_dir, sequential=sequential, concurrent=concurrent, clients=clients,
                        warmup=warmup, max_new_tokens=max_new_tokens)
    report = run_soak(config, progress=progress)
    click.echo(soak_table(report))
    write_json(json_path, report)
