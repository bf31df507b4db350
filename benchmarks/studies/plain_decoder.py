"""The plain `torch.onnx` export of the decoder, measured against the direct builder.

The project builds its decoder graph directly (`export/onnx_decoder.py`: GroupQueryAttention
over a preallocated, shared KV buffer, SkipSimplifiedLayerNormalization, packed QKV and
gate/up MatMuls). The alternative is what `torch.onnx.export` gives by itself: the classic
"past_key_values.N.key/value in, present.N.key/value out" graph with the cache concatenated
inside, attention as MatMul/Softmax with an explicit mask, and separate rotary/norm nodes.
This module makes that alternative real so the choice is measured rather than assumed:

    export_plain_decoder(lm, out_dir)   torch.onnx.export(dynamo=True) of LlamaForCausalLM
                                        behind a wrapper that turns the KV tensors into a
                                        DynamicCache (no model code touched); last-position
                                        logits only, like the direct graph
    PlainDecoder(path)                  numpy in, numpy out, the past growing by one
                                        position per decode step (plain session.run,
                                        default session options at ORT_ENABLE_ALL)
    main()                              the real-width 2-layer model, exported in a spawned
                                        child; both graphs then timed in one process,
                                        interleaved: prefill ms, decode ms per token at a long
                                        context, RSS, node counts; a markdown table

Both graphs run fp32 on the CPU execution provider. The direct graph runs through the
project's own `DecoderEngine` with its default `SessionConfig` (prepacking on, one thread
per core), the plain one with ORT's defaults, which also prepack and use every core.

    python -m pulse_edge.benchmarks.studies.plain_decoder --work /tmp/plain-bench
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.benchmarks.common.host import HostWindow, busy_reason, host_sample
from pulse_edge.benchmarks.common.machine import machine_text
from pulse_edge.benchmarks.common.rounds import paired
from pulse_edge.runtime.bundle.manifest import GraphSpec
from pulse_edge.runtime.bundle.names import past_name

KV_PARTS = ("key", "value")
EXPORT_OPSET = 18  # the dynamo exporter's native opset (lower ones go through a version converter)
MAX_IR_VERSION = 10  # what the direct builder writes; ORT 1.31 refuses newer IRs than it knows
# Export sample: a non-empty past and a multi-position chunk, so neither dimension is
# specialised to 0 or 1 by torch.export (both must stay symbolic in the graph).
SAMPLE_PAST, SAMPLE_SEQ = 3, 5
PLAIN_FILE, DIRECT_FILE = "plain_decoder.onnx", "decoder.onnx"


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{part}" for i in range(layers) for part in KV_PARTS]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{part}" for i in range(layers) for part in KV_PARTS]


# ---------------------------------------------------------------- export


def _wrapper(lm: Any) -> Any:
    """LlamaForCausalLM with the cache as plain tensors in and out (built lazily: torch is optional here)."""
    import torch
    from transformers import DynamicCache

    class CacheFromTensors(torch.nn.Module):
        """inputs_embeds [1, S, H], past K/V [1, KVN, P, D] per layer -> logits [1, 1, V], present [1, KVN, P+S, D]."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs_embeds: torch.Tensor, past: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            cache = DynamicCache(config=self.model.config)
            for i in range(len(past) // 2):
                cache.update(past[2 * i], past[2 * i + 1], i)
            # Positions from the past's length (a symbolic size in the graph), given explicitly so
            # neither rotary nor the mask depends on how the cache counts its own length.
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past[0].shape[2]
            out = self.model(inputs_embeds=inputs_embeds, past_key_values=cache, cache_position=positions,
                             position_ids=positions[None], use_cache=True, logits_to_keep=1)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return CacheFromTensors(lm).eval()


def export_plain_decoder(lm: Any, out_dir: Path, file_name: str = PLAIN_FILE) -> Path:
    """Write `file_name` (+ `file_name.data`) with torch.onnx.export(dynamo=True); returns its path."""
    import onnx
    import torch

    cfg = lm.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    layers = cfg.num_hidden_layers
    embeds = torch.zeros(1, SAMPLE_SEQ, cfg.hidden_size)
    past = tuple(torch.zeros(1, cfg.num_key_value_heads, SAMPLE_PAST, head_dim) for _ in range(2 * layers))
    seq = torch.export.Dim("sequence", min=1, max=cfg.max_position_embeddings)
    past_len = torch.export.Dim("past", min=0, max=cfg.max_position_embeddings)
    shapes = {"inputs_embeds": {1: seq}, "past": tuple({2: past_len} for _ in past)}
    path = out_dir / file_name
    with torch.no_grad():
        program = torch.onnx.export(_wrapper(lm), (embeds, past), dynamo=True, dynamic_shapes=shapes,
                                    input_names=["inputs_embeds", *past_names(layers)],
                                    output_names=["logits", *present_names(layers)], opset_version=EXPORT_OPSET)
    if program.model.ir_version > MAX_IR_VERSION:  # the IR object, not model_proto: that copies every weight
        program.model.ir_version = MAX_IR_VERSION
    program.save(str(path), external_data=True)
    _check_ir(onnx.load(str(path), load_external_data=False))
    return path


def _check_ir(model: Any) -> None:
    if model.ir_version > MAX_IR_VERSION:
        raise RuntimeError(f"exported IR {model.ir_version} > {MAX_IR_VERSION}; ORT would refuse it")


# ---------------------------------------------------------------- runner


def plain_session(path: Path) -> Any:
    """ORT's default CPU session, optimisation level ORT_ENABLE_ALL (its default too, said explicitly)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])


class PlainDecoder:
    """Runs the plain graph: the whole past goes in every step and a one-longer present comes back."""

    def __init__(self, path: Path) -> None:
        self.session = plain_session(path)
        kv_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self._names = [i.name for i in kv_inputs]
        self._outputs = ["logits", *(name.replace("past_key_values.", "present.") for name in self._names)]
        self._kv_shape = (1, int(kv_inputs[0].shape[1]), int(kv_inputs[0].shape[3]))  # [1, KVN, -, D]
        self.past: list[np.ndarray] = []
        self.reset()

    @property
    def length(self) -> int:
        return int(self.past[0].shape[2])

    def reset(self, length: int = 0) -> None:
        """An empty cache, or `length` zero positions of past (for timing: the values do not matter)."""
        batch, heads, dim = self._kv_shape
        self.past = [np.zeros((batch, heads, length, dim), np.float32) for _ in self._names]

    def set_past(self, past: Sequence[np.ndarray]) -> None:
        self.past = list(past)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """embeds [1, S, H] float32 appended after the past -> logits [V] of the last position."""
        feed = dict(zip(self._names, self.past, strict=True))
        feed["inputs_embeds"] = np.ascontiguousarray(embeds, dtype=np.float32)
        logits, *self.past = self.session.run(self._outputs, feed)
        return logits[0, -1]


# ---------------------------------------------------------------- measurement helpers


def node_counts(path: Path) -> dict[str, int]:
    """Nodes of the file as written, and per op type (domain-qualified where not the default)."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}.{node.op_type}" if node.domain else node.op_type
        ops[key] = ops.get(key, 0) + 1
    return {"total": len(graph.node), **dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def optimized_node_count(path: Path, out_dir: Path) -> int:
    """Nodes after ORT's ORT_ENABLE_ALL rewrites (what actually runs), via a throwaway session."""
    import onnx
    import onnxruntime as ort

    target = out_dir / f"{path.stem}.optimized.onnx"
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = os.fspath(target)
    options.log_severity_level = 3
    # Prepacked weights cannot be written back; the weights go to a side file, not the protobuf.
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     f"{target.name}.data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(os.fspath(path), sess_options=options, providers=["CPUExecutionProvider"])
    count = len(onnx.load(os.fspath(target), load_external_data=False).graph.node)
    for leftover in (target, target.with_name(f"{target.name}.data")):
        leftover.unlink(missing_ok=True)
    return count


def rss_bytes() -> int:
    from pulse_edge.benchmarks.common.measure import proc_status_bytes

    return proc_status_bytes("VmRSS") or 0


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them), so RSS shows what is still alive."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):  # not glibc: RSS just stays higher, nothing breaks
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def time_ms(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def logits_agreement(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return {"max_abs": float(np.max(np.abs(a64 - b64))), "ref_max": float(np.max(np.abs(b64))),
            "cosine": float(a64 @ b64 / (np.linalg.norm(a64) * np.linalg.norm(b64) + 1e-30)),
            "argmax_equal": float(np.argmax(a) == np.argmax(b))}


# ---------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class BenchConfig:
    work: Path
    prefill: int = 2950
    context: int = 3000  # positions attended by the timed decode step (past + the new one)
    runs: int = 3
    warmup: int = 1
    decode_runs: int = 20  # a decode step takes tens of ms and is noisier than a prefill: more runs are cheap
    # Pause before each timed call: ORT's intra-op threads spin-wait after a run, and the other
    # session's spinning pool stole the cores from whichever graph ran second (measured: +45-70%
    # decode time for the second of each pair without it). Alone in a process, neither has that.
    settle_s: float = 0.5
    max_length: int = 4096  # the direct graph's KV buffer
    keep: bool = False


@dataclass
class Contender:
    """One graph under test: how to prefill, how to take one decode step at the long context."""

    name: str
    path: Path
    prefill: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray], np.ndarray]
    load_rss: int
    before_decode: Callable[[], None]  # untimed: put the cache at the long context


def _checkpoint(work: Path) -> Path:
    """The real-width 2-layer model (bf16 on disk: half the bytes to write), reused if already there."""
    import torch

    from pulse_edge.export.fixtures.tiny import TinySpec, make_tiny_checkpoint

    root = work / "ckpt-full-2l"
    if not (root / "config.json").is_file():
        make_tiny_checkpoint(root, TinySpec(full_shape=True, layers=2, dtype=torch.bfloat16))
    return root


def say(message: str) -> None:
    print(f"[plain_decoder] {message}", flush=True)


def _export_both(cfg: BenchConfig) -> tuple[GraphSpec, np.ndarray, np.ndarray]:
    """Write both graphs; return the direct graph's description and sample embeds (prefill, one token)."""
    import torch

    from pulse_edge.export.graphs.decoder import DecoderShape, build_decoder
    from pulse_edge.export.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(_checkpoint(cfg.work), dtype=torch.float32)
    lm = loaded.model.language_model
    say("exporting the plain graph (torch.onnx.export, dynamo)")
    export_plain_decoder(lm, cfg.work)
    say("building the direct graph")
    spec = build_decoder(lm, DecoderShape.from_config(loaded.config, max_length=cfg.max_length), cfg.work,
                         file_name=DIRECT_FILE)
    # Real embedding rows (random ids) so activations have the scale the model sees.
    table = lm.get_input_embeddings().weight.detach()
    ids = torch.randint(0, table.shape[0], (cfg.prefill + 1,), generator=torch.Generator().manual_seed(0))
    rows = table[ids].float().numpy()
    return spec, rows[None, :cfg.prefill].copy(), rows[None, cfg.prefill:].copy()


def _export_in_child(cfg: BenchConfig) -> tuple[GraphSpec, np.ndarray, np.ndarray]:
    """Export in a spawned child: torch.onnx's exporter keeps the weights referenced after it returns
    (~3 GiB here), which would inflate every RSS figure of the measuring process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_export_both, cfg).result()


def _direct(cfg: BenchConfig, graph: GraphSpec, layers: int, kv_heads: int, head_dim: int) -> Contender:
    from pulse_edge.runtime.bundle.manifest import KVLayout
    from pulse_edge.runtime.engines.ort import DecoderEngine, SessionConfig

    before = rss_bytes()
    vocab = int(graph.outputs[0].shape[-1])
    kv = KVLayout(layers=layers, kv_heads=kv_heads, head_dim=head_dim, dtype="float32", max_length=cfg.max_length)
    engine = DecoderEngine(cfg.work, graph, kv, vocab, SessionConfig())

    def prefill(embeds: np.ndarray) -> np.ndarray:
        engine.reset()
        return engine.forward(embeds).copy()  # forward returns a view of the engine's logits buffer

    def decode(embeds: np.ndarray) -> np.ndarray:
        return engine.forward(embeds).copy()

    def before_decode() -> None:
        engine.length = cfg.context - 1  # stale buffer contents: fine for timing, GQA reads them all the same

    return Contender("direct (fused ops, shared KV buffer)", cfg.work / DIRECT_FILE, prefill, decode,
                     rss_bytes() - before, before_decode)


def _plain(cfg: BenchConfig) -> Contender:
    before = rss_bytes()
    runner = PlainDecoder(cfg.work / PLAIN_FILE)

    def prefill(embeds: np.ndarray) -> np.ndarray:
        runner.reset()
        return runner.forward(embeds)

    def decode(embeds: np.ndarray) -> np.ndarray:
        return runner.forward(embeds)

    long_past: list[np.ndarray] = []

    def before_decode() -> None:
        if not long_past:  # made once and touched, so no timed step pays for fresh pages
            runner.reset(cfg.context - 1)
            long_past.extend(np.ones_like(p) for p in runner.past)
        runner.set_past(long_past)

    return Contender("plain torch.onnx export", cfg.work / PLAIN_FILE, prefill, decode, rss_bytes() - before,
                     before_decode)


def _interleaved(contenders: Sequence[Contender], fn: str, embeds: np.ndarray, cfg: BenchConfig,
                 runs: int) -> tuple[dict[str, list[float]], list[HostWindow]]:
    """Warm-up then timed runs, alternating contenders each round so drift on a shared machine hits both; the
    host's state over each timed round (was it quiet?)."""
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    windows: list[HostWindow] = []
    for round_ in range(cfg.warmup + runs):
        start = host_sample()
        for c in contenders if round_ % 2 == 0 else reversed(contenders):
            if fn == "decode":
                c.before_decode()
            time.sleep(cfg.settle_s)
            ms = time_ms(lambda c=c: getattr(c, fn)(embeds))
            if round_ >= cfg.warmup:
                times[c.name].append(ms)
        if round_ >= cfg.warmup:
            windows.append(HostWindow.between(start, host_sample()))
    return times, windows


def run_benchmark(cfg: BenchConfig, progress: Callable[[str], None] = say) -> dict[str, Any]:
    from pulse_edge.benchmarks.common.machine import machine_info
    from pulse_edge.benchmarks.common.measure import peak_since_reset, reset_peak

    cfg.work.mkdir(parents=True, exist_ok=True)
    spec, prompt, token = _export_in_child(cfg)
    gc.collect()
    release_freed_memory()  # this process never held torch weights: what follows is the two sessions only
    kv = spec.tensor(past_name(0, "key")).shape
    layers = sum(1 for i in spec.inputs if i.name.endswith(".key"))
    progress("loading both sessions")
    contenders = [_plain(cfg), _direct(cfg, spec, layers, kv[1], kv[3])]
    load_start = os.getloadavg()
    base_rss = rss_bytes()
    logits, working = [], []
    for c in contenders:  # one untimed prefill each: the logits check and each graph's own working memory
        reset_worked = reset_peak()
        before = rss_bytes()
        logits.append(c.prefill(prompt))
        working.append(peak_since_reset(reset_worked) - before)
        release_freed_memory()
    agreement = logits_agreement(*logits)
    reset_worked = reset_peak()
    progress(f"timing prefill of {cfg.prefill} positions")
    prefill_ms, prefill_host = _interleaved(contenders, "prefill", prompt, cfg, cfg.runs)
    progress(f"timing one decode step at {cfg.context} positions of context")
    decode_ms, decode_host = _interleaved(contenders, "decode", token, cfg, cfg.decode_runs)
    peak = peak_since_reset(reset_worked)
    rows = [{"graph": c.name,
             "prefill_ms": statistics.median(prefill_ms[c.name]), "prefill_runs_ms": prefill_ms[c.name],
             "decode_ms": statistics.median(decode_ms[c.name]), "decode_runs_ms": decode_ms[c.name],
             "load_rss_bytes": c.load_rss, "prefill_working_bytes": work, "nodes": node_counts(c.path),
             "nodes_after_ort": optimized_node_count(c.path, cfg.work)} for c, work in zip(contenders, working,
                                                                                          strict=True)]
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine_info(),
            "settings": {k: str(v) for k, v in vars(cfg).items()}, "rows": rows,
            "prefill_logits_agreement": agreement, "load_average": [load_start, os.getloadavg()],
            "host": {"prefill": [w.to_dict() for w in prefill_host], "decode": [w.to_dict() for w in decode_host]},
            "busy": {"prefill": busy_reason(prefill_host), "decode": busy_reason(decode_host)},
            # plain / direct round by round, the median over quiet rounds only (None: too few were quiet)
            "ratio": {phase: paired(ms[contenders[0].name], ms[contenders[1].name], host) for phase, ms, host in
                      (("prefill", prefill_ms, prefill_host), ("decode", decode_ms, decode_host))},
            "rss_before_runs_bytes": base_rss, "peak_rss_runs_bytes": peak}


def _ratio(ratio: float | None, busy: str | None) -> str:
    """The ratio, or why it is not printed: a busy host slows the two graphs unlike each other."""
    return f"{ratio:.2f}x" if ratio is not None else f"not printed ({busy})"


def _range(values: Sequence[float], digits: int) -> str:
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}"


def _top_ops(nodes: dict[str, int], n: int = 6) -> str:
    return ", ".join(f"{op} {count}" for op, count in list(nodes.items())[1:n + 1])


def report_table(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    agree = report["prefill_logits_agreement"]
    lines = [f"Plain `torch.onnx` export vs direct builder, real-width PULSE-7B decoder with 2 layers, fp32, "
             f"ORT CPU; {report['date']}; {machine_text(m)}.",
             f"p50 of {s['runs']} prefill / {s['decode_runs']} decode runs after {s['warmup']} warm-up, the two "
             f"graphs interleaved in one process; "
             f"prefill {s['prefill']} positions, decode one token with {s['context']} positions attended; "
             f"1-min load average {report['load_average'][0][0]:.2f} at the start of the runs, "
             f"{report['load_average'][1][0]:.2f} at the end.",
             "",
             "| graph | prefill ms p50 (min-max) | decode ms/token p50 (min-max) | RSS added by session load "
             "| peak RSS above that in prefill "
             "| nodes (file) | nodes (after ORT) | most frequent ops (file) |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['graph']} | {r['prefill_ms']:.0f} ({_range(r['prefill_runs_ms'], 0)}) | "
                     f"{r['decode_ms']:.1f} ({_range(r['decode_runs_ms'], 1)}) | "
                     f"{r['load_rss_bytes'] / 2**30:.2f} GiB | {r['prefill_working_bytes'] / 2**30:.2f} GiB | "
                     f"{r['nodes']['total']} | {r['nodes_after_ort']} | "
                     f"{_top_ops(r['nodes'])} |")
    lines += ["", "direct over plain (plain / direct per round, the median of the quiet rounds; above 1 the direct "
              "graph is faster): " + ", ".join(f"{phase} {_ratio(report['ratio'][phase], report['busy'][phase])}"
                                              for phase in ("prefill", "decode")) + ".",
              f"measuring process (export ran in a child): RSS with both sessions loaded "
              f"{report['rss_before_runs_bytes'] / 2**30:.2f} GiB, peak over all timed runs (both ORT arenas) "
              f"{report['peak_rss_runs_bytes'] / 2**30:.2f} GiB.",
              "plain decode: session.run with numpy in/out, so each step passes the whole past in and gets a "
              "one-longer present back (the graph concatenates); direct decode: IO binding, KV written in place.",
              f"prefill logits, plain vs direct: max abs diff {agree['max_abs']:.2e} (logits up to "
              f"{agree['ref_max']:.1f}), cosine {agree['cosine']:.8f}, same argmax: {bool(agree['argmax_equal'])}."]
    return "\n".join(lines)


def _cleanup(work: Path) -> None:
    """Remove the graphs and checkpoint this benchmark wrote (several GiB), not the directory's other files."""
    for name in (PLAIN_FILE, DIRECT_FILE):
        for path in (work / name, work / f"{name}.data"):
            path.unlink(missing_ok=True)
    shutil.rmtree(work / "ckpt-full-2l", ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=None,
                        help="directory for the checkpoint and graphs (~6 GiB; default: a temporary one)")
    parser.add_argument("--prefill", type=int, default=BenchConfig.prefill)
    parser.add_argument("--context", type=int, default=BenchConfig.context)
    parser.add_argument("--runs", type=int, default=BenchConfig.runs)
    parser.add_argument("--decode-runs", type=int, default=BenchConfig.decode_runs)
    parser.add_argument("--warmup", type=int, default=BenchConfig.warmup)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and graphs for a re-run")
    parser.add_argument("--json", type=Path, default=None, help="also write the full report here")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="plain-decoder-"))
    cfg = BenchConfig(work=work, prefill=args.prefill, context=args.context, runs=args.runs,
                      decode_runs=args.decode_runs, warmup=args.warmup, keep=args.keep)
    try:
        report = run_benchmark(cfg)
    finally:
        if not cfg.keep:
            _cleanup(work)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    print(report_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
