"""Validation must fit a model as large as the machine's memory: its ORT sessions keep the weights mapped.

Each case opens a chain of MatMuls (8 weights of 64 MiB in fp32) in a fresh process and reports the peak
anonymous memory the session added over its creation and two runs. The serving defaults (prepacking,
level "all") are the control: they must show the copies, or the measurement proves nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pulse_edge.errors import ConfigError
from pulse_edge.export.bundle import validation_session
from pulse_edge.runtime.ort_engine import SessionConfig

WIDTH, LAYERS = 4096, 8  # 8 x 64 MiB of fp32 weights
MiB = 1 << 20

# Samples RssAnon every millisecond while the session is made and run: the peak is what an OOM sees.
CHILD = """
import json, sys, threading, time
from pathlib import Path
import numpy as np
from pulse_edge.runtime.ort_engine import SessionConfig, make_session

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

path, config, dtype = Path(sys.argv[1]), SessionConfig(**json.loads(sys.argv[2])), sys.argv[3]
width, before, peak, done = int(sys.argv[4]), anon_mib(), [0.0], threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon_mib())
        time.sleep(0.001)

watcher = threading.Thread(target=watch)
watcher.start()
session = make_session(path, config)
for _ in range(2):
    session.run(None, {"x": np.ones((1, width), dtype)})
done.set()
watcher.join()
print(json.dumps({"peak_added_mib": max(peak[0], anon_mib()) - before}))
"""


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
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(fields), np_dtype, str(WIDTH)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_added_mib"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_validation_sessions_keep_float_weights_mapped(tmp_path: Path, dtype: str) -> None:
    """fp16 is the hard case: the CPU EP computes behind a Cast per weight, folded into fp32 copies at level
    "all", and all run before the first MatMul in ORT's default node order (every weight upcast at once)."""
    path = _matmul_chain(tmp_path, dtype)
    fp32_weights_mib = LAYERS * WIDTH * WIDTH * 4 / MiB
    serving = _peak_added_mib(path, SessionConfig(), dtype)
    assert serving > 0.8 * fp32_weights_mib  # the control: a repacked or upcast copy of every weight
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


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="needs Linux's /proc/meminfo")
def test_validation_session_loads_weights_larger_than_the_machine(tmp_path: Path) -> None:
    """The full 7B in fp32 on a 24 GiB machine, without the 26 GB file: ORT's memory pattern reserves address
    space for every weight; under Linux's default overcommit heuristic a reservation larger than RAM + swap
    fails (bad_alloc) before anything runs, so mapped sessions turn the pattern off."""
    from pulse_edge.runtime.ort_engine import make_session

    path = _sparse_graph(tmp_path, _ram_and_swap_bytes() + (1 << 30))
    session = make_session(path, validation_session("fp32"))
    assert session.get_inputs()[0].name == "h0"
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0":  # the control: the heuristic refuses
        with pytest.raises(ConfigError, match=r"^sparse.onnx does not fit in memory .* serve it with --no-prepack"):
            make_session(path, SessionConfig(prepack=False, mem_pattern=True))
