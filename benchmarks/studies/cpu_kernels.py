"""How fast ONNX Runtime's CPU kernels run the pieces `bench profile` names: a study, one table per kernel.

    attention    GroupQueryAttention (fp32, heads x 128) at several (new positions S, cached P):
                 FLOP/s of the full S x T product it computes; smaller S means less causal waste but a
                 less efficient kernel, which is why splitting a chunk's attention does not pay
    causal       a prompt chunk's causal attention: GroupQueryAttention against ONNX's own Attention (opset 23,
                 is_causal), the same outputs
    gemv         MatMulNBits at M = 1 (a decode step) over distinct weights far above the caches: bits 4 and 8,
                 accuracy levels 1 (fp32 compute) and 4 (int8 compute), block sizes: GB/s of packed weights
    vision       one CLIP layer's attention over 5 tiles: MatMul / Softmax / MatMul as the vision graph
                 writes it against MultiHeadAttention (MLAS's flash attention on the CPU EP)
    decode       GroupQueryAttention at one new position over a shared cache buffer (int8 with per-channel
                 scales, as the decode graph keeps it, and fp32), at 1 and `threads` threads and several buffer
                 lengths: GB/s of the cache's used positions. Time that halves with twice the threads is
                 compute, not memory; time that does not move with the buffer's length reads only the context

Every cell: median of `repeats` timed calls after a warm-up, the variants of a table interleaved call by call.
Random inputs: speed only. `python -m pulse_edge.benchmarks.studies.cpu_kernels --help`.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click
import numpy as np

from pulse_edge.benchmarks.common.host import HostWindow, host_sample
from pulse_edge.benchmarks.common.machine import machine_info, machine_text
from pulse_edge.benchmarks.common.output import write_json
from pulse_edge.benchmarks.common.tables import markdown_table
from pulse_edge.benchmarks.studies.common import CONTRIB, study_model, study_options, study_session


def _interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds per call, the variants interleaved (forward, then backward) after one warm-up each."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _rotary(room: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """GroupQueryAttention's cos / sin tables [room, d / 2] (base 10000; the speed does not depend on them)."""
    angles = np.arange(room)[:, None] / 10000 ** (np.arange(d // 2) / (d // 2))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def gqa_rates(shapes: list[tuple[int, int]], heads: int, threads: int, repeats: int) -> list[dict[str, Any]]:
    """GroupQueryAttention over a past of P positions (not a shared buffer), S new ones: FLOP/s of S x T."""
    from onnx import TensorProto, helper

    d, room = 128, max(s + p for s, p in shapes)
    f32 = TensorProto.FLOAT
    node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "pk", "pv", "sk", "total", "cos", "sin"],
                            ["o", "k", "v"], domain=CONTRIB, num_heads=heads, kv_num_heads=heads, do_rotary=1,
                            scale=d ** -0.5)
    inputs = [helper.make_tensor_value_info("qkv", f32, [1, "S", 3 * heads * d]),
              *(helper.make_tensor_value_info(n, f32, [1, heads, "P", d]) for n in ("pk", "pv")),
              helper.make_tensor_value_info("sk", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, []),
              *(helper.make_tensor_value_info(n, f32, [room, d // 2]) for n in ("cos", "sin"))]
    outputs = [helper.make_tensor_value_info(n, f32, None) for n in ("o", "k", "v")]
    session = study_session(study_model([node], inputs, outputs), threads)
    rng = np.random.default_rng(0)
    cos, sin = _rotary(room, d)
    rows = []
    for s, p in shapes:
        feed = {"qkv": rng.standard_normal((1, s, 3 * heads * d), np.float32),
                "pk": rng.standard_normal((1, heads, p, d), np.float32),
                "pv": rng.standard_normal((1, heads, p, d), np.float32),
                "sk": np.array([p + s - 1], np.int32), "total": np.array(p + s, np.int32),
                "cos": cos, "sin": sin}
        seconds = _interleaved({"gqa": lambda feed=feed: session.run(None, feed)}, repeats)["gqa"]
        rows.append({"s": s, "p": p, "ms": seconds * 1e3, "gflop_s": 4 * heads * s * (p + s) * d / seconds / 1e9})
    return rows


def _nbits_chain(k: int, n: int, layers: int, bits: int, block: int, level: int, rng: Any) -> tuple[Any, int]:
    """`layers` MatMulNBits of distinct random packed weights, all fed the same [1, K] row."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for i in range(layers):
        packed = rng.integers(0, 256, (n, k // block, block * bits // 8), dtype=np.uint8)
        scales = (rng.random(n * (k // block), dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
        inits += [numpy_helper.from_array(packed, f"q{i}"), numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["x", f"q{i}", f"s{i}"], [f"y{i}"], domain=CONTRIB, K=k, N=n,
                                      bits=bits, block_size=block, accuracy_level=level))
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(layers)]
    model = study_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], outputs, inits)
    return model, sum(t.ByteSize() for t in inits)


def gemv_rates(variants: list[tuple[int, int, int]], k: int, n: int, layers: int, threads: int,
               repeats: int) -> list[dict[str, Any]]:
    """MatMulNBits at M = 1 per (bits, accuracy level, block): GB/s of packed weights and scales."""
    rng = np.random.default_rng(0)
    x = {"x": (rng.standard_normal((1, k)) * 0.1).astype(np.float32)}
    sessions, sizes = {}, {}
    for bits, level, block in variants:
        model, sizes[(bits, level, block)] = _nbits_chain(k, n, layers, bits, block, level, rng)
        sessions[(bits, level, block)] = study_session(model, threads)
    seconds = _interleaved({key: (lambda s=s: s.run(None, x)) for key, s in sessions.items()}, repeats)
    return [{"bits": b, "accuracy_level": lv, "block": bl, "mib": sizes[(b, lv, bl)] / 2**20,
             "ms": seconds[(b, lv, bl)] * 1e3, "gb_s": sizes[(b, lv, bl)] / seconds[(b, lv, bl)] / 1e9}
            for b, lv, bl in variants]


def vision_attention(tiles: int, positions: int, heads: int, head_dim: int, threads: int,
                     repeats: int) -> list[dict[str, Any]]:
    """One layer's attention over the tiles: the vision graph's MatMul form against MultiHeadAttention."""
    from onnx import TensorProto, helper

    b, s, h, d = tiles, positions, heads, head_dim
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [b, s, h * d]) for n in "qkv"]
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [b, s, h * d])]
    split = [helper.make_node("Reshape", [n, "heads"], [f"{n}4"]) for n in "qkv"]
    plain = [*split, helper.make_node("Transpose", ["q4"], ["qt"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3]),
             helper.make_node("MatMul", ["qt", "kt"], ["scores"]), helper.make_node("Mul", ["scores", "scale"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probs"], axis=-1), helper.make_node("MatMul", ["probs", "vt"], ["o"]),
             helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["ot", "flat"], ["y"])]
    consts = [helper.make_tensor("heads", TensorProto.INT64, [4], [b, s, h, d]),
              helper.make_tensor("flat", TensorProto.INT64, [3], [b, s, h * d]),
              helper.make_tensor("scale", TensorProto.FLOAT, [], [d ** -0.5])]
    mha = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["y"], domain=CONTRIB, num_heads=h)
    sessions = {"MatMul / Softmax / MatMul": study_session(study_model(plain, io, out, consts), threads),
                "MultiHeadAttention": study_session(study_model([mha], io, out), threads)}
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((b, s, h * d), np.float32) for n in "qkv"}
    results = {name: s.run(None, feed)[0] for name, s in sessions.items()}
    first, second = results.values()
    if not np.allclose(first, second, atol=1e-4):
        raise RuntimeError("the two attention forms disagree: the comparison would be meaningless")
    seconds = _interleaved({name: (lambda s=s: s.run(None, feed)) for name, s in sessions.items()}, repeats)
    flops = 4 * b * h * s * s * d
    return [{"form": name, "ms": t * 1e3, "gflop_s": flops / t / 1e9} for name, t in seconds.items()]


GQA_OP, ONNX_ATTENTION_OP = "GroupQueryAttention", "Attention (opset 23, is_causal)"


def _causal_models(s: int, heads: int, d: int) -> dict[str, Any]:
    """The two ops ORT's CPU EP offers for one chunk's causal self-attention (no past, no rotary)."""
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    gqa = helper.make_node(GQA_OP, ["qkv", "", "", "", "", "sk", "total"], ["y", "pk", "pv"], domain=CONTRIB,
                           num_heads=heads, kv_num_heads=heads, scale=d ** -0.5)
    gqa_in = [helper.make_tensor_value_info("qkv", f32, [1, s, 3 * heads * d]),
              helper.make_tensor_value_info("sk", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    gqa_out = [helper.make_tensor_value_info(n, f32, None) for n in ("y", "pk", "pv")]
    attention = helper.make_node("Attention", ["q", "k", "v"], ["y"], is_causal=1, scale=d ** -0.5)
    graph = helper.make_graph([attention], "study", [helper.make_tensor_value_info(n, f32, [1, heads, s, d])
                                                     for n in "qkv"], [helper.make_tensor_value_info("y", f32, None)])
    return {GQA_OP: study_model([gqa], gqa_in, gqa_out),
            ONNX_ATTENTION_OP: helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=11)}


def causal_attention(s: int, heads: int, threads: int, repeats: int) -> list[dict[str, Any]]:
    """A prompt chunk's causal attention in both ops, checked equal, then timed interleaved."""
    d = 128
    sessions = {name: study_session(model, threads) for name, model in _causal_models(s, heads, d).items()}
    qkv = np.random.default_rng(0).standard_normal((1, s, 3 * heads * d), np.float32)
    q, k, v = (np.ascontiguousarray(qkv[..., i * heads * d:(i + 1) * heads * d].reshape(1, s, heads, d)
                                    .transpose(0, 2, 1, 3)) for i in range(3))  # [1, H, S, D]
    feeds = {GQA_OP: {"qkv": qkv, "sk": np.array([s - 1], np.int32), "total": np.array(s, np.int32)},
             ONNX_ATTENTION_OP: {"q": q, "k": k, "v": v}}
    first = sessions[GQA_OP].run(None, feeds[GQA_OP])[0]  # [1, S, H * D]
    second = sessions[ONNX_ATTENTION_OP].run(None, feeds[ONNX_ATTENTION_OP])[0]  # [1, H, S, D]
    if not np.allclose(first, second.transpose(0, 2, 1, 3).reshape(first.shape), atol=1e-4):
        raise RuntimeError("the two causal attention ops disagree: the comparison would be meaningless")
    seconds = _interleaved({n: (lambda x=x, fd=feeds[n]: x.run(None, fd)) for n, x in sessions.items()}, repeats)
    return [{"op": n, "s": s, "ms": t * 1e3, "gflop_s": 4 * heads * s * s * d / t / 1e9} for n, t in seconds.items()]


def decode_gqa_model(int8: bool, heads: int, layers: int, room: int) -> Any:
    """`layers` GroupQueryAttention nodes at S = 1, each over its own shared buffer [1, heads, L, 128]."""
    from onnx import TensorProto, helper, numpy_helper

    from pulse_edge.export.graphs.kv_cache import INT8_KV_ATTRS

    d, cache = 128, TensorProto.INT8 if int8 else TensorProto.FLOAT
    inits = [numpy_helper.from_array(table, name) for name, table in zip(("cos", "sin"), _rotary(room, d), strict=True)]
    scales, attrs = [], {}
    if int8:  # the decode graph's form (export/graphs/kv_cache.py): PER_CHANNEL scales [1, heads, 1, D]
        inits += [numpy_helper.from_array(np.full((1, heads, 1, d), 0.05, np.float32), n) for n in ("ks", "vs")]
        scales, attrs = ["", "", "", "ks", "vs"], INT8_KV_ATTRS
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, [1, 1, 3 * heads * d]),
              helper.make_tensor_value_info("sk", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    nodes, outputs = [], []
    for i in range(layers):
        names = [f"{kv}{i}" for kv in ("k", "v")]
        inputs += [helper.make_tensor_value_info(f"past_{n}", cache, [1, heads, "L", d]) for n in names]
        outputs += [helper.make_tensor_value_info(f"present_{n}", cache, [1, heads, "L", d]) for n in names]
        outputs.append(helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None))
        nodes.append(helper.make_node("GroupQueryAttention", ["qkv", "", "", *(f"past_{n}" for n in names), "sk",
                                                              "total", "cos", "sin", *scales],
                                      [f"o{i}", *(f"present_{n}" for n in names)], domain=CONTRIB, num_heads=heads,
                                      kv_num_heads=heads, do_rotary=1, scale=d ** -0.5, **attrs))
    return study_model(nodes, inputs, outputs, inits)


def bind_decode(session: Any, context: int, length: int, heads: int, layers: int, int8: bool, rng: Any
                 ) -> tuple[Any, list[Any]]:
    """An IO binding of one decode step over caches of `length` positions, each bound as input and output (present =
    past, as the runtime binds its buffer), and the OrtValues it binds: they hold the numpy memory the binding
    points into, so the caller keeps them as long as the binding runs."""
    import onnxruntime as ort

    binding = session.io_binding()
    binding.bind_cpu_input("qkv", rng.standard_normal((1, 1, 3 * heads * 128), np.float32))
    binding.bind_cpu_input("sk", np.array([context - 1], np.int32))
    binding.bind_cpu_input("total", np.array(context, np.int32))
    shape, values = (1, heads, length, 128), []
    for name in (f"{kv}{i}" for i in range(layers) for kv in ("k", "v")):
        cache = rng.integers(-100, 100, shape).astype(np.int8) if int8 else rng.standard_normal(shape, np.float32)
        values.append(ort.OrtValue.ortvalue_from_numpy(cache))
        binding.bind_ortvalue_input(f"past_{name}", values[-1])
        binding.bind_ortvalue_output(f"present_{name}", values[-1])
    for i in range(layers):
        binding.bind_output(f"o{i}")
    return binding, values


def decode_attention(context: int, buffers: list[int], heads: int, layers: int, threads: list[int],
                     repeats: int) -> list[dict[str, Any]]:
    """A decode step's attention over `context` positions, the buffer shared as the runtime binds it (IO binding,
    present = past); per cache dtype and thread count, the buffer lengths interleaved."""
    rng, rows = np.random.default_rng(0), []
    for int8 in (True, False):
        model = decode_gqa_model(int8, heads, layers, max(buffers))
        for n in threads:
            session = study_session(model, n)
            bindings = {b: bind_decode(session, context, b, heads, layers, int8, rng) for b in buffers}
            seconds = _interleaved({b: (lambda s=session, x=x: s.run_with_iobinding(x)) for b, (x, _) in
                                    bindings.items()}, repeats)
            used = layers * 2 * heads * context * 128 * (1 if int8 else 4)
            rows += [{"cache": "int8" if int8 else "fp32", "threads": n, "buffer": b, "ms": t * 1e3,
                      "gb_s": used / t / 1e9} for b, t in seconds.items()]
    return rows


def _timed(section: Callable[[], Any], hosts: dict[str, Any], name: str) -> Any:
    """Run one section of the study and note the host over it: a busy one's numbers say little about the kernels."""
    start = host_sample()
    rows = section()
    window = HostWindow.between(start, host_sample())
    hosts[name] = {**window.to_dict(), "busy": window.busy()}
    return rows


def _host(report: dict[str, Any], name: str) -> str:
    busy = report["host"][name]["busy"]
    return f" (host BUSY over this section: {busy})" if busy else " (host quiet)"


def _timing(report: dict[str, Any], name: str, text: str) -> str:
    """A timing cell, marked "(busy)" where its section's host was: a table copied without its heading keeps it."""
    return f"{text} (busy)" if report["host"][name]["busy"] else text


def _tables(report: dict[str, Any]) -> str:
    m = report["machine"]
    parts = [f"{report['date']}; {machine_text(m)}; threads {report['threads']}, "
             f"median of {report['repeats']} interleaved calls after a warm-up"]
    parts += ["", "GroupQueryAttention, fp32, the full S x T product" + _host(report, "attention") + ":",
              markdown_table(["S new", "P cached", "ms", "GFLOP/s"],
                             [[str(r["s"]), str(r["p"]), *(_timing(report, "attention", t) for t in
                                                           (f"{r['ms']:.1f}", f"{r['gflop_s']:.0f}"))]
                              for r in report["attention"]])]
    parts += ["", f"MatMulNBits at M = 1, {report['gemv_shape']}" + _host(report, "gemv") + ":",
              markdown_table(["bits", "accuracy level", "block", "MiB", "ms", "GB/s"],
                             [[str(r["bits"]), str(r["accuracy_level"]), str(r["block"]), f"{r['mib']:.0f}",
                               *(_timing(report, "gemv", t) for t in (f"{r['ms']:.1f}", f"{r['gb_s']:.1f}"))]
                              for r in report["gemv"]])]
    parts += ["", f"vision attention, one layer, {report['vision_shape']}" + _host(report, "vision") + ":",
              markdown_table(["form", "ms", "GFLOP/s"],
                             [[r["form"], *(_timing(report, "vision", t) for t in (f"{r['ms']:.1f}",
                                                                                  f"{r['gflop_s']:.0f}"))]
                              for r in report["vision"]])]
    parts += ["", "a prompt chunk's causal attention, fp32, GFLOP/s of the full S x S product"
              + _host(report, "causal") + ":",
              markdown_table(["op", "S", "ms", "GFLOP/s"], [[r["op"], str(r["s"]), *(_timing(report, "causal", t) for t
                                                                                      in (f"{r['ms']:.1f}",
                                                                                          f"{r['gflop_s']:.0f}"))]
                                                             for r in report["causal"]])]
    parts += ["", f"decode attention, one position over {report['decode_shape']}" + _host(report, "decode") + ":",
              markdown_table(["cache", "threads", "buffer", "ms", "GB/s of the context"],
                             [[r["cache"], str(r["threads"]), str(r["buffer"]),
                               *(_timing(report, "decode", t) for t in (f"{r['ms']:.2f}", f"{r['gb_s']:.1f}"))]
                              for r in report["decode"]])]
    return "\n".join(parts)


GQA_SHAPES = [(2048, 0), (1024, 0), (512, 0), (512, 1536), (902, 2048), (2950, 0)]
DECODE_BUFFERS = [3008, 4096, 8192]  # the cache buffer's length: just above the context, PULSE's 4096, twice that
GEMV_VARIANTS = [(4, 4, 128), (4, 1, 128), (4, 4, 32), (4, 4, 256), (8, 4, 128), (8, 1, 128)]


@click.command()
@study_options
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True)
def main(threads: int, repeats: int, heads: int, scale: float, json_path: Path | None) -> None:
    """ONNX Runtime's CPU attention and GEMV kernels at PULSE's shapes (the pieces `bench profile` names)."""
    def shrink(size: int) -> int:  # one rule for every size
        return max(16, int(size * scale))

    gemv_layers, k, n = max(1, int(16 * scale)), 4096, max(256, shrink(12288) // 256 * 256)
    hosts: dict[str, Any] = {}
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info(),
              "threads": threads, "repeats": repeats,
              "attention": _timed(lambda: gqa_rates([(shrink(s), shrink(p) if p else 0) for s, p in GQA_SHAPES],
                                                    heads, threads, repeats), hosts, "attention"),
              "causal": _timed(lambda: causal_attention(shrink(2048), heads, threads, repeats), hosts, "causal"),
              "gemv_shape": f"K {k} x N {n}, {gemv_layers} layers",
              "gemv": _timed(lambda: gemv_rates(GEMV_VARIANTS, k, n, gemv_layers, threads, repeats), hosts, "gemv"),
              "vision_shape": f"5 tiles x {shrink(577)} positions x 16 heads x 64",
              "vision": _timed(lambda: vision_attention(5, shrink(577), 16, 64, threads, repeats), hosts, "vision"),
              "decode_shape": f"{shrink(3000)} positions of context, {heads} heads x 128, 4 layers",
              "decode": _timed(lambda: decode_attention(shrink(3000), [shrink(b) for b in DECODE_BUFFERS], heads, 4,
                                                        sorted({1, threads}), repeats), hosts, "decode"),
              "host": hosts}
    click.echo(_tables(report))
    write_json(json_path, report)


if __name__ == "__main__":
    main()
