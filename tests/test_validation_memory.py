"""Validation must fit a model as large as the machine's memory: its ORT sessions keep the weights mapped.

Each case opens a one-MatMul graph with a 256 MiB (fp32) weight in a fresh process and reports how much
anonymous memory the session added after two runs. The serving defaults (prepacking, level "all") are
the control: they must show the copy, or the measurement proves nothing.
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

ROWS, COLS = 4096, 16384  # 64 Mi weights: 256 MiB in fp32, 128 MiB in fp16
MiB = 1 << 20

CHILD = """
import json, sys
from pathlib import Path
import numpy as np
from pulse_edge.runtime.ort_engine import SessionConfig, make_session

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

path, config, dtype = Path(sys.argv[1]), SessionConfig(**json.loads(sys.argv[2])), sys.argv[3]
ROWS = int(sys.argv[4])
before = anon_mib()
session = make_session(path, config)
x = np.ones((1, ROWS), dtype)
for _ in range(2):
    session.run(None, {"x": x})
print(json.dumps({"added_mib": anon_mib() - before}))
"""


def _matmul_graph(root: Path, dtype: str) -> Path:
    np_dtype, onnx_dtype = {"fp32": (np.float32, TensorProto.FLOAT), "fp16": (np.float16, TensorProto.FLOAT16)}[dtype]
    weight = np.random.default_rng(0).standard_normal((ROWS, COLS), np.float32).astype(np_dtype) * 0.01
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", onnx_dtype, [1, ROWS])],
        [helper.make_tensor_value_info("y", onnx_dtype, [1, COLS])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = root / f"probe_{dtype}.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024)
    return path


def _added_anonymous_mib(path: Path, config: SessionConfig, dtype: str) -> float:
    fields = {k: v for k, v in asdict(config).items() if k != "provider_options"}
    np_dtype = {"fp32": "float32", "fp16": "float16"}[dtype]
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), json.dumps(fields), np_dtype, str(ROWS)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["added_mib"]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_validation_sessions_keep_float_weights_mapped(tmp_path: Path, dtype: str) -> None:
    path = _matmul_graph(tmp_path, dtype)
    fp32_weight_mib = ROWS * COLS * 4 / MiB
    serving = _added_anonymous_mib(path, SessionConfig(), dtype)
    assert serving > 0.8 * fp32_weight_mib  # the control: a repacked or upcast copy of the weight
    validating = _added_anonymous_mib(path, validation_session(dtype), dtype)
    assert validating < 0.15 * fp32_weight_mib, (serving, validating)


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
