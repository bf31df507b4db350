"""pulse-edge's bf16 prefill attention (runtime/kernels: AMX, else AVX-512 BF16) against what the prefill graph runs
today: a study.

The prefill graph of the CPU recipes attends, per layer and chunk, as export/graphs/kv_cache.py draws it:

    ORT today:   int8 cache ─ Slice [0, P) ─ Cast ─ x scale ─┐
                 qkv (new keys, values in float) ─────────── GroupQueryAttention, float32 ─ out
    the kernel:  int8 cache (the chunk already stored) ─ bf16 causal flash attention (AMX or AVX-512) ─ out

Both sides here leave out what either design keeps in the graph (the rotary embedding; quantizing the
chunk's keys and values and storing them). The chunk's keys and values are drawn on the int8 grid, so both
compute the same function: ORT in float32, the kernel with q and the softmax weights rounded to bf16. Each
is checked against the float32 numpy twin before it is timed.

Rounds: ORT, kernel, kernel, ORT, ... (ABBA), each round's host window read from /proc/stat; the speedup is
the median over quiet rounds of ORT's time over the kernel's in the same round, or "busy" (host.py). Random
inputs: speed and rounding only. `python -m pulse_edge.benchmarks.studies.prefill_attention --help`.
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
from pulse_edge.benchmarks.studies.common import (
    CONTRIB,
    against_kernel,
    busy_lines,
    cell,
    study_model,
    study_options,
    study_session,
)
from pulse_edge.errors import KernelUnavailable
from pulse_edge.runtime.kernels.attention import CausalAttention, reference

HEAD_DIM = 128
# (new positions S, cached P): PULSE's 2950 positions in chunks of 2048 (the runtime's default), then of 512
CHUNKS = [(2048, 0), (902, 2048), (512, 0), (512, 2438)]


def _ort_form(rows: int, past: int, heads: int, capacity: int) -> Any:
    """The prefill graph's attention of one layer over the int8 cache (module doc), rotary and store left out."""
    from onnx import TensorProto, helper

    f32, i8, i64 = TensorProto.FLOAT, TensorProto.INT8, TensorProto.INT64
    inputs = [helper.make_tensor_value_info("qkv", f32, [1, rows, 3 * heads * HEAD_DIM]),
              *(helper.make_tensor_value_info(n, i8, [1, heads, capacity, HEAD_DIM]) for n in ("k8", "v8")),
              *(helper.make_tensor_value_info(n, f32, [1, heads, 1, HEAD_DIM]) for n in ("ks", "vs")),
              helper.make_tensor_value_info("past", i64, [1]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, i64, [1], [v]))
             for n, v in (("zero", 0), ("axis", 2))]
    for part in ("k", "v"):
        nodes += [helper.make_node("Slice", [f"{part}8", "zero", "past", "axis"], [f"{part}_cached"]),
                  helper.make_node("Cast", [f"{part}_cached"], [f"{part}_f"], to=f32),
                  helper.make_node("Mul", [f"{part}_f", f"{part}s"], [f"{part}_past"])]
    nodes.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", "k_past", "v_past", "seqlens_k", "total"],
                                  ["out", "k_all", "v_all"], domain=CONTRIB, num_heads=heads, kv_num_heads=heads,
                                  scale=HEAD_DIM ** -0.5))
    return study_model(nodes, inputs, [helper.make_tensor_value_info(n, f32, None) for n in ("out", "k_all", "v_all")])


def _inputs(rows: int, past: int, heads: int, capacity: int, rng: Any) -> dict[str, np.ndarray]:
    """A cache of int8 codes with per-channel scales, queries near N(0, 1) scores, the chunk on the grid."""
    codes = {p: rng.integers(-127, 128, (heads, capacity, HEAD_DIM), dtype=np.int8) for p in "kv"}
    scales = {"k": rng.uniform(0.5, 1.5, (heads, HEAD_DIM)).astype(np.float32) / 73,
              "v": rng.uniform(0.005, 0.02, (heads, HEAD_DIM)).astype(np.float32)}
    q = rng.standard_normal((rows, heads, HEAD_DIM), np.float32)
    new = {p: (codes[p][:, past:past + rows] * scales[p][:, None]).transpose(1, 0, 2) for p in "kv"}  # [S, H, D]
    qkv = np.concatenate([x.reshape(1, rows, heads * HEAD_DIM) for x in (q, new["k"], new["v"])], axis=-1)
    return {"q": q, "k": codes["k"], "v": codes["v"], "ks": scales["k"], "vs": scales["v"],
            "qkv": np.ascontiguousarray(qkv, np.float32)}


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def compare(rows: int, past: int, heads: int, threads: int, rounds: int, kernel: CausalAttention,
            seed: int = 0) -> dict[str, Any]:
    """One chunk shape: both forms checked against the twin, then timed in ABBA rounds."""
    capacity = past + rows
    x = _inputs(rows, past, heads, capacity, np.random.default_rng(seed))
    # ORT's pool spins after a run by default and then competes with the kernel for the cores: on 2 cores the
    # kernel ran ~25% slower between ORT runs (90 against 68 ms per 2048-position chunk), ORT's own time the
    # same either way. A prefill that alternates the two turns the spinning off, so the study does.
    session = study_session(_ort_form(rows, past, heads, capacity), threads, spinning=False)
    feed = {"qkv": x["qkv"], "k8": x["k"][None], "v8": x["v"][None], "ks": x["ks"][:, None][None],
            "vs": x["vs"][:, None][None], "past": np.array([past], np.int64),
            "seqlens_k": np.array([capacity - 1], np.int32), "total": np.array(capacity, np.int32)}
    out = np.empty_like(x["q"])
    calls = {"ort": lambda: session.run(["out"], feed)[0],
             "kernel": lambda: kernel(x["q"], x["k"], x["v"], x["ks"], x["vs"], past=past, threads=threads, out=out)}
    truth = reference(x["q"], x["k"], x["v"], x["ks"], x["vs"], past=past)
    errors = {name: _relative(np.asarray(call()).reshape(truth.shape), truth) for name, call in calls.items()}
    ort_s, kernel_s, windows = abba(calls["ort"], calls["kernel"], rounds)
    work = 4 * heads * HEAD_DIM * sum(past + i + 1 for i in range(rows))  # the causal product, both GEMMs
    return {"rows": rows, "past": past, "heads": heads, "relative_error": errors,
            **against_kernel(ort_s, kernel_s, windows, work, "causal_gflop_s")}


def table(report: dict[str, Any]) -> str:
    m = report["machine"]
    head = (f"{machine_text(m)}; {report['threads']} threads; {report['rounds']} ABBA rounds, "
            f"medians over quiet rounds; {report['heads']} heads x {HEAD_DIM}; kernel {report['kernel']}")
    rows = [[str(r["rows"]), str(r["past"]), cell(r["ms"]["ort"], ".1f"), cell(r["ms"]["kernel"], ".1f"),
             cell(r["speedup"], ".2f") + ("" if r["speedup"] is None else "x"),
             cell(r["causal_gflop_s"]["kernel"], ".0f"),
             f"{r['relative_error']['ort']:.1e} / {r['relative_error']['kernel']:.1e}"] for r in report["chunks"]]
    return "\n".join([head, "", markdown_table(
        ["S new", "P cached", "ORT dequantize + GQA fp32, ms", "bf16 kernel, ms", "speedup (per round)",
         "kernel GFLOP/s (causal work)", "error vs fp32 twin: ORT / kernel"], rows),
        *busy_lines(report["chunks"], lambda r: f"S {r['rows']}, P {r['past']}")])


@click.command()
@study_options
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
def main(threads: int, rounds: int, heads: int, scale: float, json_path: Path | None) -> None:
    """The bf16 prefill attention (AMX, else AVX-512 BF16) against ORT's form of it, at the chunks of a
    2950-position prompt."""
    try:
        kernel = CausalAttention.load()
    except KernelUnavailable as e:
        raise click.ClickException(str(e)) from e
    chunks = [(max(1, int(s * scale)), int(p * scale)) for s, p in CHUNKS]
    report = {"machine": machine_info(), "threads": threads, "rounds": rounds, "heads": heads,
              "kernel": f"{kernel.kind.what} ({kernel.path.name})",
              "chunks": [compare(s, p, heads, threads, rounds, kernel) for s, p in chunks]}
    click.echo(table(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
