"""Validation must fit a model as large as the machine's memory: its ORT sessions keep the weights mapped.

Each case opens a chain of MatMuls (8 weights of 64 MiB in fp32) in a fresh process and reports the peak
anonymous memory the session added over its creation and two runs. The serving defaults (prepacking,
level "all") are the control: they must show the copies, or the measurement proves nothing.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.errors import ConfigError
from pulse_edge.export.build.memory import validation_anon_bytes, validation_session
from pulse_edge.runtime.engines.ort import SessionConfig, session_settings

# RSS from /proc, and ORT's CPU EP upcasting fp16 MatMuls (on ARM64 it has native fp16 kernels, no Casts).
LINUX_X86 = pytest.mark.skipif(sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"),
                               reason="measures Linux /proc memory figures of ORT's x86 CPU EP")

WIDTH, LAYERS = 4096, 8  # 8 x 64 MiB of fp32 weights
MiB = 1 << 20

# The child reports its anonymous memory once its imports are done, then makes and runs the session; the
# parent samples the child's /proc status every millisecond meanwhile (from outside, so a GIL the child's
# ORT call holds cannot hide a peak).
CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from pulse_edge.runtime.engines.ort import SessionConfig, make_session

status = Path("/proc/self/status").read_text().splitlines()
print(json.dumps({"before_kib": int(next(l for l in status if l.startswith("RssAnon:")).split()[1])}), flush=True)
path, config, dtype, width = Path(sys.argv[1]), SessionConfig(**json.loads(sys.argv[2])), sys.argv[3], int(sys.argv[4])
session = make_session(path, config)
for _ in range(2):
    session.run(None, {"x": np.ones((1, width), dtype)})
"""


def _anon_kib(pid: int) -> int | None:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith("RssAnon:")), None)


def _matmul_chain(root: Path, dtype: str) -> Path:
    np_dtype, onnx_dtype = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}[dtype]
    rng = np.random.default_rng(0)
    weights = [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH), np.float32) / 64).astype(np_dtype),
                                       f"w{i}") for i in range(LAYERS)]
    nodes = [helper.make_node("MatMul", [f"h{i}" if i else "x", f"w{i}"], [f"h{i + 1}"]) for i in range(LAYERS)]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", onnx_dtype, [1, WIDTH])],
                              [helper.make_tensor_value_info(f"h{LAYERS}", onnx_dtype, [1, WIDTH])], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = root / f"chain_{dtype}.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return path


def _peak_added_mib(path: Path, config: SessionConfig, dtype: str) -> float:
    fields = {k: v for k, v in asdict(config).items() if k != "provider_options"}
    np_dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), json.dumps(fields), np_dtype, str(WIDTH)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def watch() -> None:
        while child.poll() is None:
            peak[0] = max(peak[0], _anon_kib(child.pid) or 0)
            time.sleep(0.001)

    before = json.loads(child.stdout.readline())["before_kib"]
    watcher = threading.Thread(target=watch)
    watcher.start()
    _, err = child.communicate()
    watcher.join()
    assert child.returncode == 0, err
    return (peak[0] - before) / 1024


@LINUX_X86
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_validation_sessions_keep_float_weights_mapped(tmp_path: Path, dtype: str) -> None:
    """fp16 is the hard case: the CPU EP computes behind a Cast per weight, folded into fp32 copies at level
    "all", and all run before the first MatMul in ORT's default node order (every weight upcast at once)."""
    path = _matmul_chain(tmp_path, dtype)
    fp32_weights_mib = LAYERS * WIDTH * WIDTH * 4 / MiB
    if COPYING_ORT[0] <= _ort_version() <= COPYING_ORT[1]:  # the control, on the versions it was measured on
        serving = _peak_added_mib(path, SessionConfig(), dtype)
        assert serving > 0.8 * fp32_weights_mib  # a repacked or upcast copy of every weight
    else:
        serving = float("nan")
    validating = _peak_added_mib(path, validation_session(dtype), dtype)
    assert validating < 0.4 * fp32_weights_mib, (serving, validating)


def _sparse_graph(root: Path, total_bytes: int) -> Path:
    """A chain of MatMuls whose external weights add up to `total_bytes`, in a sparse file (no disk used)."""
    k, n = 4096, 32768  # 512 MiB per fp32 weight
    count = -(-total_bytes // (k * n * 4))
    nodes, inits = [], []
    for i in range(count):
        dims = [k, n] if i % 2 == 0 else [n, k]  # the chain alternates widths so that the shapes match
        tensor = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=dims,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "w.bin"), ("offset", str(i * k * n * 4)), ("length", str(k * n * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
        nodes.append(helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"]))
    graph = helper.make_graph(nodes, "sparse", [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info(f"h{count}", TensorProto.FLOAT, None)], inits)
    with open(root / "w.bin", "wb") as f:
        f.truncate(count * k * n * 4)
    path = root / "sparse.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10), str(path))
    return path


def _ram_and_swap_bytes() -> int:
    lines = Path("/proc/meminfo").read_text().splitlines()
    fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in lines}
    return fields["MemTotal"] + fields.get("SwapTotal", 0)


def _overcommit_mode() -> str | None:
    try:
        return Path("/proc/sys/vm/overcommit_memory").read_text().strip()
    except OSError:
        return None


@pytest.mark.skipif(_overcommit_mode() not in ("0", "1"),
                    reason="needs Linux with overcommit 0 or 1 (ORT's private writable mappings count against a "
                           "strict commit limit)")
def test_validation_session_loads_weights_larger_than_the_machine(tmp_path: Path) -> None:
    """The full 7B in fp32 on a 24 GiB machine, without the 26 GB file: anything that copies the weights
    (prepacking) fails here. Up to ORT 1.31 its memory pattern also reserved address space for every weight
    (a reservation larger than RAM + swap fails under Linux's overcommit heuristic), so mapped sessions turn
    the pattern off; from 1.32 it reserves nothing (the control below skips there), and on that version this
    test guards the copies only."""
    from pulse_edge.runtime.engines.ort import make_session

    path = _sparse_graph(tmp_path, _ram_and_swap_bytes() + (1 << 30))
    if os.stat(tmp_path / "w.bin").st_blocks * 512 > (1 << 30):
        pytest.skip("this filesystem does not keep the weights file sparse")
    session = make_session(path, validation_session("fp32"))
    assert session.get_inputs()[0].name == "h0"


# The serving defaults' copies (prepacked fp32, upcast fp16) are ORT internals measured on these versions.
COPYING_ORT = ((1, 20), (1, 32))

# The control below depends on an internal of ONNX Runtime's CPU EP: up to 1.31 its memory pattern reserved
# address space for every weight of a mapped session when the session was made. 1.32 no longer does (the same
# session loads), so there the control has nothing to show; it runs on the versions it was written for.
RESERVING_ORT = ((1, 20), (1, 31))


def _ort_version() -> tuple[int, int]:
    import onnxruntime

    major, minor = onnxruntime.__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.skipif(_overcommit_mode() != "0", reason="needs Linux's heuristic overcommit (mode 0) to refuse the "
                    "reservation")
def test_the_memory_pattern_reservation_is_refused_where_ort_reserves(tmp_path: Path) -> None:
    """The control for the test above: with ORT's memory pattern on, a mapped session of weights larger than
    RAM + swap fails at creation (bad_alloc), reported in one line."""
    from pulse_edge.runtime.engines.ort import make_session

    if not RESERVING_ORT[0] <= _ort_version() <= RESERVING_ORT[1]:
        pytest.skip(f"onnxruntime {'.'.join(map(str, _ort_version()))}: the reservation this control shows was "
                    f"measured on 1.20-1.31 only")
    path = _sparse_graph(tmp_path, _ram_and_swap_bytes() + (1 << 30))
    if os.stat(tmp_path / "w.bin").st_blocks * 512 > (1 << 30):
        pytest.skip("this filesystem does not keep the weights file sparse")
    with pytest.raises(ConfigError, match=r"^sparse.onnx does not fit in this machine's memory even with"):
        make_session(path, SessionConfig(prepack=False, mem_pattern=True))


def test_the_memory_estimate_covers_what_the_7b_validations_measured() -> None:
    """docs/performance.md: peak anonymous memory 9.4 GiB (fp32, with a 2950-position decoder check) and
    6.2 GiB (fp16, quick plan) for the full 7B at 4096 positions."""
    shape = {"layers": 32, "kv_heads": 32, "head_dim": 128, "max_context": 4096}
    fp32 = validation_anon_bytes(7_060_000_000, precision="fp32", **shape)
    fp16 = validation_anon_bytes(7_060_000_000, precision="fp16", **shape)
    assert fp32["kv_cache"] == 2 * 32 * 32 * 128 * 4096 * 4 == 2 * fp16["kv_cache"]
    assert 9.4 * 2**30 <= fp32["total"] <= 14 * 2**30  # covers the measurement, still fits a 24 GiB machine
    assert 6.2 * 2**30 <= fp16["total"] <= 12 * 2**30


def test_the_estimate_counts_an_int8_cache_as_one_byte_and_an_fp16_one_as_two() -> None:
    """The int8 CPU recipes' cache: a quarter of the fp32 cache the estimate used to count (3 GiB less for the 7B
    at 4096 positions, which let the 7B int8 bundle be validated on this project's 23.5 GiB machine)."""
    shape = {"layers": 32, "kv_heads": 32, "head_dim": 128, "max_context": 4096, "precision": "int8"}
    plain = validation_anon_bytes(7_060_000_000, **shape)
    int8_cache = validation_anon_bytes(7_060_000_000, kv_cache="int8", **shape)
    assert int8_cache["kv_cache"] == 2 * 32 * 32 * 128 * 4096 == plain["kv_cache"] / 4
    assert plain["total"] - int8_cache["total"] == 3 * 2**30
    fp32 = {**shape, "precision": "fp32"}  # an fp32 bundle's fp16 cache: half its fp32 one
    assert (validation_anon_bytes(7_060_000_000, kv_cache="fp16", **fp32)["kv_cache"] * 2
            == validation_anon_bytes(7_060_000_000, **fp32)["kv_cache"] == 4 * 2**30)



def test_the_estimate_covers_the_7b_two_graph_validation_measured() -> None:
    """docs/performance.md: validating the 7B int8 CPU recipe (decode + prefill graph) peaked at 22.2 GiB of
    anonymous memory, in the prefill graph's parity stage."""
    shape = {"layers": 32, "kv_heads": 32, "head_dim": 128, "max_context": 4096, "precision": "int8",
             "kv_cache": "int8"}
    one_graph = validation_anon_bytes(7_060_000_000, **shape)
    two_graphs = validation_anon_bytes(7_060_000_000, prefill_graph=True, **shape)
    assert one_graph["total"] < 22.2 * 2**30 <= two_graphs["total"] <= 23 * 2**30


def test_only_mapped_cpu_sessions_change_orts_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.runtime.engines.sessions as sessions

    monkeypatch.setattr(sessions, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert session_settings(SessionConfig()) == {"opt_level": "all", "prepack": True, "mem_arena": True,
                                                 "mem_pattern": True, "node_order": "default", "u8u8_matmul": False}
    mapped = session_settings(SessionConfig(prepack=False))
    assert (mapped["mem_pattern"], mapped["node_order"]) == (False, "priority")
    gpu = session_settings(SessionConfig(provider="cuda", prepack=False))  # weights live on the device there
    assert (gpu["mem_pattern"], gpu["node_order"]) == (True, "default")
    assert session_settings(SessionConfig(), graph_limit="basic")["opt_level"] == "basic"


def test_graphs_whose_shapes_vary_plan_no_memory_pattern_on_the_cpu() -> None:
    assert session_settings(SessionConfig(), shapes_vary=True)["mem_pattern"] is False
    assert session_settings(SessionConfig(provider="cuda"), shapes_vary=True)["mem_pattern"] is True
    assert session_settings(SessionConfig(mem_pattern=True), shapes_vary=True)["mem_pattern"] is True  # asked for


def test_the_disk_estimate_is_below_every_bundle_measured() -> None:
    """export/build/memory.py's floors against the bundle sizes measured (docs/performance.md): a refusal must
    mean the bundle cannot fit."""
    from pulse_edge.export.build.memory import BUNDLE_BYTES_PER_PARAM, PREFILL_GRAPH_BYTES_PER_PARAM

    measured = {("fp32", False): 3.97, ("int8", True): 1.79, ("int4", True): 1.41, ("int8", False): 1.04,
                ("int4", False): 0.58}
    for (precision, prefill), per_param in measured.items():
        assert BUNDLE_BYTES_PER_PARAM[precision] + PREFILL_GRAPH_BYTES_PER_PARAM * prefill < per_param


def test_an_export_the_disk_cannot_hold_is_refused_before_any_graph(tiny_checkpoint: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from collections import namedtuple

    import pulse_edge.export.build.memory as memory
    from pulse_edge.errors import ConfigError
    from pulse_edge.export.build.bundle import ExportOptions, export_bundle

    usage = namedtuple("usage", "total used free")
    free = usage(2**30, 2**30 - 4096, 4096)
    monkeypatch.setattr(memory.shutil, "disk_usage", lambda _path: free)  # shutil's own, restored after the test
    # a small model on a nearly full disk: sizes in the unit that says something ("~0.0 GiB ... 0.0 GiB is free")
    with pytest.raises(ConfigError, match=r"the fp32 bundle of this model takes at least ~\d+\.\d MiB on disk but 4 "
                                          r"KiB is free where it is written .*; free some space or choose another"):
        export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(precision="fp32"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("machine", "flags", "provider", "u8u8"), [
    ("x86_64", {"avx2", "fma"}, "cpu", True),  # AVX2 without VNNI (Zen 2/3, Intel before Ice Lake): saturates
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, "cpu", True),  # AVX-512 without VNNI (Skylake-SP)
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, "cpu", False),
    ("x86_64", {"avx2", "avx_vnni"}, "cpu", False),  # Alder Lake's AVX-VNNI
    ("x86_64", {"avx2"}, "cuda", False),  # the GPU computes those GEMMs
    ("aarch64", set(), "cpu", False),  # a Jetson's CPU: no vpmaddubsw
])
def test_int8_gemms_run_u8u8_where_orts_u8s8_products_would_saturate(machine: str, flags: set[str], provider: str,
                                                                      u8u8: bool,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.runtime.engines.sessions as sessions

    monkeypatch.setattr(sessions.platform, "machine", lambda: machine)
    monkeypatch.setattr(sessions, "cpu_flags", lambda: frozenset(flags))
    assert session_settings(SessionConfig(provider=provider))["u8u8_matmul"] is u8u8
    assert sessions.cpu_precision_entries() == ({"session.x64quantprecision": "1"} if u8u8 else {}) or provider != "cpu"
    # ORT rewrites the weights at level 2: a session held to "basic" keeps the saturating kernel, and says so
    basic = SessionConfig(provider=provider, opt_level="basic")
    assert session_settings(basic)["u8u8_matmul"] is False
    # ... and the runtime warns where that loses the exact products: int8 GEMMs on such a CPU at such a level
    assert (sessions.saturation_warning(basic, None, ["w8a8u8", "fp"]) is not None) is u8u8
    assert sessions.saturation_warning(basic, None, ["w4", "fp"]) is None  # MatMulNBits: no int8 x int8 GEMM
    assert sessions.saturation_warning(SessionConfig(provider=provider), None, ["w8a8dyn"]) is None  # rewritten


def test_the_u8_weight_copies_are_counted_where_ort_makes_them() -> None:
    """On x86 without VNNI the u8 x u8 rewrite copies the int8 GEMMs' weights into the process's memory even when
    they are not prepacked: counted by the export's check (with the prefill graph) and the runtime's choice."""
    from pulse_edge.runtime.engines.memory import choose_prefill_graph

    shape = {"layers": 32, "kv_heads": 32, "head_dim": 128, "max_context": 4096, "precision": "int8",
             "kv_cache": "int8"}
    plain = validation_anon_bytes(7_060_000_000, prefill_graph=True, **shape)
    copied = validation_anon_bytes(7_060_000_000, prefill_graph=True, u8_copies=True, **shape)
    assert copied["total"] - plain["total"] == copied["u8_weight_copies"] == 7_060_000_000
    assert validation_anon_bytes(7_060_000_000, u8_copies=True, **shape)["u8_weight_copies"] == 0  # no int8 GEMM
    gib = 2**30
    assert choose_prefill_graph("auto", 6 * gib, prepacked=False, available=9 * gib).load  # mapped: 2 GiB
    assert not choose_prefill_graph("auto", 6 * gib, prepacked=False, available=7 * gib, u8_copies=True).load
    assert choose_prefill_graph("auto", 6 * gib, prepacked=False, available=9 * gib, u8_copies=True).load


def test_a_u8u8_session_computes_the_exact_int32_products(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The codes that saturate vpmaddubsw's int16 pair sums (255 against 127), through the session as make_session
    opens it on a CPU without VNNI: the exact product, as the emulated reference computes it. (On this CPU the
    saturating kernel is not the one ORT picks either way; this pins that the entry is taken and changes no
    result.)"""
    import onnxruntime

    import pulse_edge.runtime.engines.sessions as sessions
    from pulse_edge.runtime.engines.ort import make_session

    k, n = 64, 8
    w = np.full((k, n), 127, np.int8)
    nodes = [helper.make_node("MatMulIntegerToFloat", ["a", "w", "sa", "sw", "za"], ["y"], domain="com.microsoft")]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array(0.5, np.float32), "sa"),
             numpy_helper.from_array(np.full(n, 0.25, np.float32), "sw"),
             numpy_helper.from_array(np.array(0, np.uint8), "za")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft",
                                                                                                     1)])
    model.ir_version = 9
    path = tmp_path / "mm.onnx"
    onnx.save_model(model, path)
    seen: dict[str, str] = {}
    entry = onnxruntime.SessionOptions.add_session_config_entry
    monkeypatch.setattr(onnxruntime.SessionOptions, "add_session_config_entry",
                        lambda self, key, value: (seen.__setitem__(key, value), entry(self, key, value))[1])
    monkeypatch.setattr(sessions, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(sessions.platform, "machine", lambda: "x86_64")
    a = np.full((1, k), 255, np.uint8)
    got = make_session(path, SessionConfig()).run(None, {"a": a})[0]
    assert seen.get("session.x64quantprecision") == "1"
    np.testing.assert_array_equal(got, np.full((1, n), 255 * 127 * k * 0.5 * 0.25, np.float32))


def test_the_export_counts_the_u8_copies_where_this_cpu_needs_them(tiny_pipeline,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import pulse_edge.export.build.memory as memory

    seen: list[bool] = []
    monkeypatch.setattr(memory, "validation_anon_bytes",
                        lambda *args, **kw: seen.append(kw["u8_copies"]) or {"total": 0.0})
    for saturate in (True, False):
        monkeypatch.setattr(memory, "int8_products_saturate", lambda saturate=saturate: saturate)
        memory.check_validation_memory(tiny_pipeline.loaded, 1000, 64, precision="int8", kv_cache="int8",
                                       prefill_graph=True)
    assert seen == [True, False]
