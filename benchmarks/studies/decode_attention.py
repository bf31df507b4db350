"""pulse-edge's AVX-512 decode attention (runtime/kernels/decode_attention.c) against the decode graph's: a study.

A decode step's attention over the int8 cache, every layer of it, as each side runs it:

    the decode graph:   qkv ─ GroupQueryAttention (its own int8 cache, PER_CHANNEL scales; rotary, the new
                        position quantized and stored inside) ─ out                        x layers, one Run
    the decode kernel:  q (rotary applied and the new position stored by the segment before it) ─ kernel ─ out
                                                                                           x layers, one call each

Both read the same buffers ([1, heads, L, 128] int8 per layer and part, `layers` of them, so a step's cache is
far larger than the CPU's caches, as the 7B's 0.8 GB is). The kernel is first checked against the float32 numpy
twin on the buffers ORT wrote. ABBA rounds, each round's host window read from /proc/stat; the speedup is the
median over quiet rounds of ORT's time over the kernel's in the same round, or "busy". GB/s counts the context's
keys and values once. `python -m pulse_edge.benchmarks.studies.decode_attention --help`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import numpy as np

from pulse_edge.benchmarks.common.machine import machine_info, machine_text
from pulse_edge.benchmarks.common.output import write_json
from pulse_edge.benchmarks.common.rounds import abba
from pulse_edge.benchmarks.common.tables import markdown_table
from pulse_edge.benchmarks.studies.common import against_kernel, busy_lines, cell, study_options, study_session
from pulse_edge.benchmarks.studies.cpu_kernels import bind_decode, decode_gqa_model
from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.engines.segmented import int8_view
from pulse_edge.runtime.kernels.attention import DECODE, CausalAttention, reference

HEAD_DIM = 128
SCALE = 0.05  # the study's cache scales (cpu_kernels.decode_gqa_model)
CONTEXTS = [3040, 1024]  # a decode step after PULSE's ~3024-position prompt; a shorter conversation


def _layer_arrays(values: list[Any], layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Layer `layer`'s key and value buffers [heads, L, 128] int8, over the OrtValues' own memory (as the runtime
    hands them to the kernel: OrtValue.numpy() would copy)."""
    return int8_view(values[2 * layer]), int8_view(values[2 * layer + 1])


def compare(context: int, heads: int, layers: int, threads: int, rounds: int, kernel: CausalAttention,
            seed: int = 0) -> dict[str, Any]:
    """One context length: the kernel checked against the twin, then both timed in ABBA rounds."""
    rng = np.random.default_rng(seed)
    session = study_session(decode_gqa_model(True, heads, layers, context + 8), threads, spinning=False)
    binding, values = bind_decode(session, context, context + 8, heads, layers, True, rng)
    session.run_with_iobinding(binding)  # ORT stores its new position: the buffers then hold the whole context
    caches = [_layer_arrays(values, i) for i in range(layers)]
    scales = np.full((heads, HEAD_DIM), SCALE, np.float32)
    q = rng.standard_normal((1, heads, HEAD_DIM), np.float32)
    out = np.empty_like(q)

    def run_kernel() -> None:
        for k, v in caches:
            kernel(q, k, v, scales, scales, past=context - 1, threads=threads, out=out)

    error = float(np.linalg.norm(kernel(q, *caches[0], scales, scales, past=context - 1, threads=threads)
                                 - (want := reference(q, *caches[0], scales, scales, past=context - 1)))
                  / np.linalg.norm(want))
    ort_s, kernel_s, windows = abba(lambda: session.run_with_iobinding(binding), run_kernel, rounds)
    read = layers * 2 * heads * context * HEAD_DIM  # the context's int8 keys and values
    return {"context": context, "layers": layers, "heads": heads, "kernel_relative_error": error,
            **against_kernel(ort_s, kernel_s, windows, read, "gb_s")}


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = (f"{machine_text(m)}; {report['threads']} threads; {report['rounds']} ABBA rounds, medians "
            f"over quiet rounds; {report['heads']} heads x {HEAD_DIM}, {report['layers']} layers per step; kernel "
            f"{report['kernel']}")
    rows = [[str(r["context"]), cell(r["ms"]["ort"], ".2f"), cell(r["ms"]["kernel"], ".2f"),
             cell(r["speedup"], ".2f") + ("" if r["speedup"] is None else "x"),
             f"{cell(r['gb_s']['ort'], '.1f')} / {cell(r['gb_s']['kernel'], '.1f')}",
             f"{r['kernel_relative_error']:.1e}"] for r in report["contexts"]]
    return "\n".join([head, "", markdown_table(
        ["context", "ORT GroupQueryAttention (int8 cache), ms", "AVX-512 kernel, ms", "speedup (per round)",
         "GB/s of the context: ORT / kernel", "kernel vs fp32 twin"], rows),
        *busy_lines(report["contexts"], lambda r: f"context {r['context']}")])


@click.command()
@study_options
@click.option("--layers", type=click.IntRange(min=1), default=32, show_default=True,
              help="Layers per step (each its own cache buffers): 32 is the 7B's.")
@click.option("--rounds", type=click.IntRange(min=1), default=7, show_default=True)
def main(threads: int, rounds: int, layers: int, heads: int, scale: float, json_path: Path | None) -> None:
    """A decode step's attention over the int8 cache: the AVX-512 decode kernel against the decode graph's GQA."""
    try:
        kernel = CausalAttention.load(DECODE)
    except KernelUnavailable as e:
        raise click.ClickException(str(e)) from e
    report = {"machine": machine_info(), "threads": threads, "rounds": rounds, "heads": heads, "layers": layers,
              "kernel": kernel.path.name,
              "contexts": [compare(max(2, int(c * scale)), heads, layers, threads, rounds, kernel) for c in CONTEXTS]}
    click.echo(table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
