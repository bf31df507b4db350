"""`pulse-edge bench profile`: ORT traces read and grouped by role, work counted from the recorded shapes, the phases
placed by the clock, and the command on a tiny bundle."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.benchmarks.common.host import HostWindow
from pulse_edge.benchmarks.common.ort_trace import (
    ATTENTION,
    FLOAT_GEMM,
    INT8_GEMM,
    WEIGHT_ONLY_GEMM,
    NodeEvent,
    in_window,
    onnx_weight_bytes,
    read_trace,
    role_totals,
)
from pulse_edge.benchmarks.perf.profile_report import Bounds, Phase, phase_report
from pulse_edge.cli.bench import bench_group


def _event(op: str, inputs=(), outputs=(), start: int = 0, dur: int = 1000, name: str = "n") -> NodeEvent:
    return NodeEvent(graph="g", name=name, op=op, start_ns=start, dur_ns=dur, inputs=tuple(map(tuple, inputs)),
                     outputs=tuple(map(tuple, outputs)))


def test_a_gemm_counts_two_m_k_n_from_its_recorded_shapes() -> None:
    # prepacked: the weight is not among the recorded inputs; the output shape gives N
    e = _event("MatMulIntegerToFloat", [[2048, 4096], [2048, 1], [12288], []], [[2048, 12288]])
    assert e.role == INT8_GEMM and e.gemm_ops() == 2 * 2048 * 4096 * 12288
    assert _event("MatMulNBits", [[1, 1, 4096], [1024000]], [[1, 1, 32000]]).gemm_ops() == 2 * 4096 * 32000


def test_a_matmul_of_two_activations_is_attention_not_a_linear_layer() -> None:
    qk = _event("FusedMatMul", [[5, 16, 577, 64], [5, 16, 64, 577]], [[5, 16, 577, 577]])
    linear = _event("MatMul", [[577, 1024], [1024, 1024]], [[577, 1024]])
    assert qk.role == ATTENTION and linear.role == FLOAT_GEMM
    assert _event("Softmax").role == ATTENTION and _event("NoSuchOp").role == "other"
    # TensorRT-ready graphs write the rotation and the norm as standard ops
    assert _event("RotaryEmbedding").role == ATTENTION and _event("RMSNormalization").role == "norms"


@pytest.mark.parametrize("p", [0, 1536])  # the first chunk (nothing cached) and a later one
def test_group_query_attention_flops_count_the_full_product_orts_kernel_computes(p: int) -> None:
    heads, kv, d, s = 32, 8, 128, 512
    inputs = [[1, s, (heads + 2 * kv) * d], [1, kv, p, d], [1, kv, p, d], [1], [], [4096, 64]]
    gqa = _event("GroupQueryAttention", inputs, [[1, s, heads * d], [1, kv, p + s, d], [1, kv, p + s, d]])
    assert gqa.attention_flops() == 4 * heads * s * (p + s) * d
    # a shared buffer: past and present are the whole buffer, so the attended length is not in the shapes
    shared = _event("GroupQueryAttention", [[1, 1, (heads + 2 * kv) * d], [1, kv, 4096, d], [1, kv, 4096, d]],
                    [[1, 1, heads * d], [1, kv, 4096, d], [1, kv, 4096, d]])
    assert shared.attention_flops() is None


def test_role_totals_are_per_run_and_say_unknown_work_instead_of_guessing() -> None:
    gemm = [_event("MatMulIntegerToFloat", [[8, 16]], [[8, 32]], dur=3000, name=f"layers.{i}.qkv/matmul_int")
            for i in range(4)]
    shared = _event("GroupQueryAttention", [[1, 1, 96], [1, 1, 64, 32], [1, 1, 64, 32]],
                    [[1, 1, 32], [1, 1, 64, 32], [1, 1, 64, 32]], dur=2000)
    weights = {("g", f"layers.{i}.qkv/matmul_int"): 512 for i in range(4)}
    totals = {t.role: t for t in role_totals([*gemm, shared, _event("Split", dur=1000)], runs=2, weight_bytes=weights)}
    assert totals[INT8_GEMM].seconds == pytest.approx(6e-6) and totals[INT8_GEMM].nodes == 2
    assert totals[INT8_GEMM].work == 2 * (2 * 8 * 16 * 32) and totals[INT8_GEMM].weight_bytes == 2 * 512
    assert totals[ATTENTION].work is None  # one node of unknown work makes the role's work unknown
    assert list(totals) == [INT8_GEMM, ATTENTION, "data movement"]  # ROLE_ORDER, not the order seen
    assert totals["data movement"].to_dict()["op_seconds_per_run"] == {"Split": pytest.approx(0.5e-6)}
    # weights known in another graph only, or as 0 bytes: unknown, not zero
    for other in ({("prefill", n): 512 for _, n in weights}, {k: 0 for k in weights}):
        assert role_totals(gemm, runs=2, weight_bytes=other)[0].weight_bytes is None


def test_events_are_read_onto_the_wall_clock_and_placed_in_windows(tmp_path: Path) -> None:
    trace = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 50},
             {"cat": "Node", "name": "a/matmul_kernel_time", "ts": 10, "dur": 5,
              "args": {"op_name": "MatMul", "input_type_shape": [{"float": [2, 3]}, {"float": [3, 4]}],
                       "output_type_shape": [{"float": [2, 4]}]}},
             {"cat": "Node", "name": "b_fence_before", "ts": 20, "dur": 0, "args": {}}]
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    read = read_trace(path, "decoder", start_ns=1_000_000)
    assert read.runs == [1_000_000]
    (event,) = read.nodes
    assert (event.name, event.op, event.start_ns, event.dur_ns) == ("a/matmul", "MatMul", 1_010_000, 5_000)
    assert event.inputs == ((2, 3), (3, 4)) and event.gemm_ops() == 2 * 2 * 4 * 3
    assert in_window([event], 1_000_000, 1_009_999) == [] and in_window([event], 1_010_000, 1_020_000) == [event]


def _tiny_graph(path: Path) -> None:
    """x [M, 16] -> MatMul(W [16, 8]) -> y, W in an external-data file (the bundles' layout)."""
    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="proj/matmul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)


def test_weight_bytes_come_from_the_graph_without_reading_its_data(tmp_path: Path) -> None:
    _tiny_graph(tmp_path / "g.onnx")
    (tmp_path / "g.onnx.data").write_bytes(b"")  # emptied: only the headers may be read
    assert onnx_weight_bytes(tmp_path / "g.onnx") == {"proj/matmul": 16 * 8 * 4}


def test_a_qdq_weight_is_counted_through_its_dequantize_node(tmp_path: Path) -> None:
    """TensorRT-ready graphs feed a MatMul its weight through DequantizeLinear; ORT fuses the pair and keeps the
    MatMul's name, so the weight's bytes must be found behind the DequantizeLinear."""
    q = numpy_helper.from_array(np.ones((16, 8), np.int8), "wq")
    scale = numpy_helper.from_array(np.ones(8, np.float32), "ws")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="w/dq", axis=1),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="proj/matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])], initializer=[q, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "q.onnx"))
    assert onnx_weight_bytes(tmp_path / "q.onnx")["proj/matmul"] == 16 * 8 + 8 * 4


def test_int4_weights_count_half_a_byte_each(tmp_path: Path) -> None:
    """TensorRT-ready int4 graphs store INT4 initializers (numpy's dtype for them says one byte)."""
    q = helper.make_tensor("wq", TensorProto.INT4, [16, 8], np.zeros(16 * 8, np.int8).tolist())
    scale = numpy_helper.from_array(np.ones((1, 8), np.float32), "ws")
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="w/dq", axis=0, block_size=16),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="proj/matmul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])], initializer=[q, scale])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(tmp_path / "q4.onnx"))
    assert onnx_weight_bytes(tmp_path / "q4.onnx")["proj/matmul"] == 16 * 8 // 2 + 8 * 4


def test_an_ort_trace_lands_in_the_window_the_caller_timed(tmp_path: Path) -> None:
    """The runtime's sessions write traces (SessionConfig.profile_dir) whose times are on the wall clock, with the
    shapes the work is counted from: a guard against an ORT upgrade changing either."""
    from pulse_edge.runtime.engines.ort import SessionConfig, make_session

    _tiny_graph(tmp_path / "g.onnx")
    session = make_session(tmp_path / "g.onnx", SessionConfig(threads=1, profile_dir=tmp_path / "traces"))
    session.run(None, {"x": np.ones((4, 16), np.float32)})  # before the window
    start = time.time_ns()
    session.run(None, {"x": np.ones((32, 16), np.float32)})
    end = time.time_ns()
    trace = Path(session.end_profiling())
    assert trace.parent == tmp_path / "traces" and trace.name.startswith("g_")
    read = read_trace(trace, "g", session.get_profiling_start_time_ns())
    events = [e for e in read.nodes if e.op == "MatMul"]
    assert len(events) == 2 and len(read.runs) == 2
    (inside,) = in_window(events, start, end)
    assert inside.gemm_ops() == 2 * 32 * 16 * 8


@pytest.fixture(scope="module")
def quick_bundle(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle
    from pulse_edge.export.validate.parity import ValidationPlan

    return export_bundle(tiny_checkpoint, tmp_path_factory.mktemp("profile") / "bundle",
                         ExportOptions(precision="fp32", plan=ValidationPlan.quick()))


def _decoder_matmuls(bundle: Path) -> list[tuple[str, int, int]]:
    """(name, K, N) of the decoder graph's weight MatMuls, from the graph itself."""
    proto = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer}
    return [(n.name, *shapes[n.input[1]]) for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in shapes]


def test_bench_profile_on_a_tiny_bundle(quick_bundle: Path, tmp_path: Path, small_probes: None,
                                        quiet_host: None) -> None:
    out, positions, steps = tmp_path / "profile.json", 40, 3
    result = CliRunner().invoke(bench_group, ["profile", "--model", str(quick_bundle), "--runs", "2", "--positions",
                                              str(positions), "--context", "48", "--steps", str(steps), "--threads",
                                              "1", "--bandwidth-mib", "8", "--traces", str(tmp_path / "traces"),
                                              "--json", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    for name in ("vision", "prefill", "decode"):
        phase = report["phases"][name]
        assert f"{name}: " in result.output
        assert 0 < phase["kernel_s_per_run"] <= phase["wall_s_per_run"]
        assert abs(sum(r["seconds_per_run"] for r in phase["roles"]) - phase["kernel_s_per_run"]) < 1e-9
    # exact work per run, from the graph: the warm-up run and the other phases' runs are not counted
    matmuls = _decoder_matmuls(quick_bundle)
    prefill = {r["role"]: r for r in report["phases"]["prefill"]["roles"]}
    rows = {name: 1 if "lm_head" in name else positions for name, _, _ in matmuls}  # one chunk; logits of the last
    assert prefill[FLOAT_GEMM]["work_per_run"] == sum(2 * k * n * rows[name] for name, k, n in matmuls)
    assert prefill[FLOAT_GEMM]["node_runs_per_run"] == len(matmuls)
    assert "attention" in prefill and report["config"]["prefilled_by"] == ["decoder"]
    decode = {r["role"]: r for r in report["phases"]["decode"]["roles"]}
    assert decode[FLOAT_GEMM]["weight_bytes_per_run"] == steps * sum(4 * k * n for _, k, n in matmuls)
    assert decode[FLOAT_GEMM]["node_runs_per_run"] == steps * len(matmuls)
    from pulse_edge.benchmarks.common.roofline import bundle_decoder_facts

    kv_per_step = bundle_decoder_facts(quick_bundle).kv_bytes_per_position * 48  # --context 48
    assert report["phases"]["decode"]["work_per_run"] == pytest.approx(
        steps * (sum(4 * k * n for _, k, n in matmuls) + kv_per_step))
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "traces").glob("*.json")) == ["decoder", "vision"]
    # each phase against the probes just before and after its own window, the best of the two; decode by bandwidth
    for name, phase in report["phases"].items():
        bounds, probed = phase["bounds"], ("bandwidth" if name == "decode" else "gemm")
        assert list(bounds[probed]) == [f"{name} before", f"{name} after"]
        assert not bounds["gemm" if name == "decode" else "bandwidth"]
    decode_bounds = report["phases"]["decode"]["bounds"]
    best_read = max(b["read_gb_s"] for b in decode_bounds["bandwidth"].values())
    assert decode_bounds["read_gb_s"] == best_read
    decode_phase = report["phases"]["decode"]
    assert decode_phase["busy"] is None
    assert decode_phase["of_bound"] == pytest.approx(decode_phase["rate"] / (best_read * 1e9))
    for name in ("vision", "prefill"):  # the compute phases against the probes beside their own windows: an fp32
        phase, bounds = report["phases"][name], report["phases"][name]["bounds"]  # bundle's GEMMs are SGEMMs
        assert bounds["int8_peak_tops"] == max(g["peak_tops"] for g in bounds["gemm"].values())
        best_fp32 = max(g["tops"]["fp32"] for g in bounds["gemm"].values())
        assert bounds["fp32_tflops"] == best_fp32 and phase["bound"] == "fp32 SGEMM probe"
        assert phase["of_bound"] == pytest.approx(phase["rate"] / (best_fp32 * 1e12))
        assert "of the fp32 SGEMM probe" in result.output


def _phase(busy: bool) -> Phase:
    host = HostWindow(seconds=1.0, others_cores=1.5 if busy else 0.0, steal_fraction=0.0, load_average=0.0)
    return Phase("prefill", calls=1, start_ns=0, end_ns=4_000_000_000, host=host)  # 2 runs of 2 s


def _prefill_events(gemm_shapes: bool = True) -> list[NodeEvent]:
    gemm = _event("MatMulIntegerToFloat", [[1000, 1000]] if gemm_shapes else [], [[1000, 1000]], dur=500_000_000)
    attention = _event("GroupQueryAttention", [[1, 1000, 3 * 128], [1, 1, 0, 128]],
                       [[1, 1000, 128], [1, 1, 1000, 128]], start=1, dur=500_000_000)
    return [gemm, attention, _event("Split", start=2, dur=1_000_000_000),
            _event("MatMulNBits", [[1, 1, 1000]], [[1, 1, 10]], start=3, dur=10_000_000)]  # 0.25% of the phase


def test_a_phase_report_gives_rates_fractions_and_the_ceiling_as_times_say() -> None:
    bounds = Bounds(int8=1e12, fp32=1e11, read=1e10)
    report = phase_report(_phase(busy=False), _prefill_events(), {}, 2, bounds, kv_bytes_per_run=0.0)
    roles = {r["role"]: r for r in report["roles"]}
    gemm_ops = 2 * 1000 * 1000 * 1000 + 2 * 1000 * 10  # in 2 runs: the int8 GEMM and the lm_head-like GEMV
    # per run: 1e9 ops in 0.25 s; attention (1 head: 3 x 128 wide, 1 kv head) 4 x 1000 x 1000 x 128 / 2 in 0.25 s
    assert roles[INT8_GEMM]["rate"] == pytest.approx(1e9 / 0.25) and roles[INT8_GEMM]["of_bound"] == pytest.approx(4e-3)
    assert roles[ATTENTION]["of_bound"] == pytest.approx(4 * 1000 * 1000 * 128 / 2 / 0.25 / 1e11)
    assert "rate" not in roles[WEIGHT_ONLY_GEMM]  # under MIN_SHARE of the phase: no rate
    assert report["rate"] == pytest.approx(gemm_ops / 2 / 2.0)
    # wall 2 s per run; GEMMs 0.255 s, attention 0.25 s
    assert report["ceiling_speedup"]["gemm_and_attention"] == pytest.approx(2.0 / 0.505)
    assert report["ceiling_of_bound"]["gemm_only"] == pytest.approx(report["of_bound"] * 2.0 / 0.255)
    # probe-free: the linear ops run at the GEMMs' share of the time, and would at their share of GEMMs + attention
    assert report["of_own_gemm_rate"] == pytest.approx({"now": 0.255 / 2.0, "gemm_and_attention": 0.255 / 0.505})
    assert report["bound"] == "int8 GEMM probe" and report["of_bound"] == pytest.approx(report["rate"] / 1e12)


def test_a_phase_of_float_gemms_only_is_held_against_the_fp32_probe() -> None:
    """An fp32 bundle's prefill runs MLAS's SGEMM: its fraction of the int8 peak would say little."""
    bounds = Bounds(int8=1e12, fp32=1e11, read=1e10)
    events = [_event("MatMul", [[1000, 1000], [1000, 1000]], [[1000, 1000]], dur=500_000_000)]
    report = phase_report(_phase(busy=False), events, {("g", "n"): 4_000_000}, 2, bounds, kv_bytes_per_run=0.0)
    assert report["bound"] == "fp32 SGEMM probe"
    assert report["of_bound"] == pytest.approx(2 * 1000**3 / 2 / 2.0 / 1e11)  # 2e9 FLOP over 2 runs of 2 s, of 1e11


def test_a_decode_report_counts_weights_and_the_kv_cache_apart() -> None:
    """Decode is judged by bytes: the GEMMs' weights, attention's KV cache; the GEMMs-alone ceiling counts only
    the weights (the cache is attention's to stream)."""
    bounds = Bounds(int8=1e12, fp32=1e11, read=1e10)
    phase = Phase("decode", calls=1, start_ns=0, end_ns=2_000_000_000, host=_phase(busy=False).host)  # 1 run, 2 s
    gemv = _event("MatMulNBits", [[1, 1, 64]], [[1, 1, 64]], dur=1_500_000_000, name="layers.0.qkv/matmul_nbits")
    gqa = _event("GroupQueryAttention", [[1, 1, 96], [1, 1, 64, 32]], [[1, 1, 32], [1, 1, 64, 32]], start=1,
                 dur=400_000_000)
    weights = {("g", "layers.0.qkv/matmul_nbits"): 12_000_000_000}
    report = phase_report(phase, [gemv, gqa], weights, 1, bounds, kv_bytes_per_run=2_000_000_000)
    roles = {r["role"]: r for r in report["roles"]}
    assert roles[WEIGHT_ONLY_GEMM]["rate"] == pytest.approx(12e9 / 1.5) and roles[ATTENTION]["rate"] == 2e9 / 0.4
    assert report["work_per_run"] == 14e9 and report["of_bound"] == pytest.approx(14e9 / 2.0 / 1e10)
    assert report["ceiling_of_bound"]["gemm_only"] == pytest.approx(12e9 / 1.5 / 1e10)  # 0.8, not (12 + 2) / 1.5
    assert report["ceiling_of_bound"]["gemm_and_attention"] == pytest.approx(14e9 / 1.9 / 1e10)
    assert report["of_own_gemm_rate"] is None


def test_a_busy_window_or_unknown_work_prints_no_fraction() -> None:
    bounds = Bounds(int8=1e12, fp32=1e11, read=1e10)
    busy = phase_report(_phase(busy=True), _prefill_events(), {}, 2, bounds, kv_bytes_per_run=0.0)
    assert busy["busy"] and busy["of_bound"] is None and busy["ceiling_of_bound"] is None
    assert all(r.get("of_bound") is None for r in busy["roles"]) and busy["rate"] > 0
    unknown = phase_report(_phase(busy=False), _prefill_events(gemm_shapes=False), {}, 2, bounds, kv_bytes_per_run=0.0)
    assert unknown["rate"] is None and unknown["of_bound"] is None and "int8 GEMM" in unknown["work_unknown"]
    from pulse_edge.benchmarks.perf.profile_report import _phase_line

    assert "no rate (the trace does not give the work of its int8 GEMM)" in _phase_line("prefill", unknown)
    assert "busy: no fraction" in _phase_line("prefill", busy)


@pytest.mark.parametrize(("args", "message"), [
    (["--positions", "5000"], "this bundle's cache holds"),
    (["--context", "100000"], "this bundle's cache holds"),
])
def test_bench_profile_refuses_more_positions_than_the_cache_holds(quick_bundle: Path, args: list[str], message: str,
                                                                    small_probes: None) -> None:
    result = CliRunner().invoke(bench_group, ["profile", "--model", str(quick_bundle), "--bandwidth-mib", "8", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_bench_profile_refuses_a_folder_that_is_not_a_bundle(tmp_path: Path) -> None:
    result = CliRunner().invoke(bench_group, ["profile", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "is not a bundle" in result.output


def test_bench_profile_refuses_a_damaged_bundle_in_one_line(quick_bundle: Path, tmp_path: Path) -> None:
    """A truncated embedding table (the first file the benchmark opens) or a replaced graph: one line, exit 2,
    before anything is timed."""
    import shutil

    from pulse_edge.runtime.bundle.manifest import read_manifest

    manifest = read_manifest(quick_bundle)
    for damaged in (manifest.embedding.file, "decoder.onnx"):
        bundle = tmp_path / damaged
        shutil.copytree(quick_bundle, bundle)
        target = bundle / damaged
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        result = CliRunner().invoke(bench_group, ["profile", "--model", str(bundle), "--bandwidth-mib", "8"])
        errors = [line for line in result.output.splitlines() if not line.startswith("[bench] ")]  # stages aside
        assert result.exit_code == 2 and len(errors) == 1 and errors[0].startswith("pulse-edge: error:"), result.output
        assert str(target) in result.output and "measuring" not in result.output


def test_bench_profile_refuses_a_traces_folder_it_cannot_write(quick_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for traces in (tmp_path / "file", tmp_path / "file" / "below"):
        result = CliRunner().invoke(bench_group, ["profile", "--model", str(quick_bundle), "--traces", str(traces)])
        assert result.exit_code == 2 and "cannot write there" in result.output and "Traceback" not in result.output


def test_bench_profile_refuses_a_trace_short_of_the_runs_it_timed(quick_bundle: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  small_probes: None) -> None:
    """ORT's profiler stops after 1M events: a window holding fewer session runs than were timed gives one line."""
    from pulse_edge.benchmarks.perf import profile

    calls = profile._Runner.calls
    monkeypatch.setattr(profile._Runner, "calls", lambda self: {**calls(self), "decode": calls(self)["decode"] + 1})
    result = CliRunner().invoke(bench_group, ["profile", "--model", str(quick_bundle), "--runs", "1", "--positions",
                                              "20", "--context", "24", "--steps", "2", "--bandwidth-mib", "8"])
    assert result.exit_code == 2 and "holds 2 of the 3 session runs of the decode window" in result.output


def test_a_window_counts_session_runs_across_graphs_and_refuses_a_short_one() -> None:
    """A prefill's chunks run on the prefill graph, a short last chunk on the decoder graph: both count."""
    from pulse_edge.benchmarks.common.ort_trace import Trace
    from pulse_edge.benchmarks.perf.profile import _check_complete
    from pulse_edge.errors import ConfigError

    traces = {"prefill": Trace(nodes=[], runs=[10, 20, 50]), "decoder": Trace(nodes=[], runs=[5, 30, 60, 200])}
    # per timed run 3 session runs (2 chunks on the prefill graph, a short last one on the decoder graph); 2 runs
    phase = Phase("prefill", calls=3, start_ns=10, end_ns=60)
    with pytest.raises(ConfigError, match="holds 5 of the 6 session runs of the prefill window"):
        _check_complete(phase, traces, runs=2)
    traces["decoder"].runs.append(40)
    _check_complete(phase, traces, runs=2)
    assert phase.graphs == ["prefill", "decoder"]


def test_a_profiler_off_the_wall_clock_is_refused() -> None:
    from pulse_edge.benchmarks.perf.profile import _traces
    from pulse_edge.errors import ConfigError

    class Monotonic:  # a profiler start on another clock: far from the load's wall-clock window
        def get_profiling_start_time_ns(self) -> int:
            return 41_148_923_238_603

    class Runner:
        opened, loaded = time.time_ns() - 10**9, time.time_ns()

        def sessions(self) -> dict:
            return {"decoder": Monotonic()}

    with pytest.raises(ConfigError, match="does not count time on the wall clock"):
        _traces(Runner())


def test_bench_progress_lines_follow_the_cli_quiet_flag(capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """`pulse-edge -q bench ...` prints the table and nothing of the stages; the benchmarks never import the CLI, so
    they ask the `pulse_edge` logger's console."""
    import logging

    from pulse_edge.benchmarks.common.output import progress
    from pulse_edge.cli import progress as cli_progress

    logger = logging.getLogger("pulse_edge")
    for attribute in ("handlers", "propagate", "level"):  # configure() sets all three; put back after the test
        monkeypatch.setattr(logger, attribute, list(logger.handlers) if attribute == "handlers" else
                            getattr(logger, attribute))
    logger.handlers.clear()
    progress("with no console")
    cli_progress.configure(verbose=False, quiet=True)
    progress("under -q")
    cli_progress.configure(verbose=False, quiet=False)
    progress("without -q")
    assert capsys.readouterr().err.splitlines() == ["[bench] with no console", "[bench] without -q"]
