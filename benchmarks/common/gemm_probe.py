"""The compute bound on prefill: this host's int8 GEMM peak through ONNX Runtime, measured beside the bandwidth probe.

    x [M, K] float32 ─ one MatMul of each kind ─ y [M, N]      M = 2048, K = 4096, N = 4096 (a decoder layer's size)
      w8a8dyn      per-token uint8 activations x int8 weights (MatMulIntegerToFloat): the prefill graphs' GEMM
      dqmm         DynamicQuantizeMatMul: the same product with one activation scale per call
      nbits8       MatMulNBits bits 8, accuracy level 4: the weight-only decoder's GEMM
      fp32         MatMul in float32 (MLAS SGEMM), for scale

Each is timed as a whole ORT call (quantizing the activations included, as the graphs pay it): WARMUP
calls, then `repeats`; a kind's figure is its best call (what the host did at least once), its
median is kept beside it. Why the best call: on this project's 2-vCPU VM (2026-12-06, ORT 1.32) a
few calls in any series took twice the others, so the median of 5 calls after one warm-up in a
fresh session moved 2.5-3.7 TOP/s (dqmm) over 12 probes within 30 s, while the best of 15 after
3 warm-ups stayed within 3.5-3.8. The peak is the best int8 kind's ops/s (2 M K N per call); a
prefill's fraction of it counts the decoder's linear-layer MACs only (2 x weights x positions):
attention and the norms are extra work the fraction charges to the prefill. Which int8 kind wins
depends on the CPU: on Sapphire Rapids MLAS runs the u8 x s8 kinds on AMX tiles, MatMulNBits on
AVX-512 VNNI (docs/performance.md).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from pulse_edge.benchmarks.common.roofline import call_seconds
from pulse_edge.errors import ConfigError

INT8_KINDS = ("w8a8dyn", "dqmm", "nbits8")
KINDS = (*INT8_KINDS, "fp32")
PROBE_SHAPE = (2048, 4096, 4096)  # M, K, N
WARMUP = 3  # the first calls of a fresh session pay the arena's growth and the thread pool's start
REPEATS = 15


@dataclass(frozen=True)
class GemmPeak:
    """Ops/s per kind (2 M K N per call) of its best call, and of its median call; `peak` is the best int8 kind."""

    ops_per_s: dict[str, float]
    median_ops_per_s: dict[str, float]
    shape: tuple[int, int, int]
    repeats: int
    threads: int

    @property
    def best_kind(self) -> str | None:
        """The fastest int8 kind timed (None: only fp32 was)."""
        timed = [k for k in INT8_KINDS if k in self.ops_per_s]
        return max(timed, key=self.ops_per_s.__getitem__) if timed else None

    @property
    def peak(self) -> float | None:
        return None if self.best_kind is None else self.ops_per_s[self.best_kind]

    def to_dict(self) -> dict[str, Any]:
        return {"tops": {k: v / 1e12 for k, v in self.ops_per_s.items()},
                "median_tops": {k: v / 1e12 for k, v in self.median_ops_per_s.items()},
                "peak_tops": None if self.peak is None else self.peak / 1e12,
                "best_kind": self.best_kind, "shape_mkn": list(self.shape), "repeats": self.repeats,
                "threads": self.threads, "method": f"one ORT MatMul per kind, whole call timed (activation "
                                                   f"quantization included), the best of the repeats after "
                                                   f"{WARMUP} warm-up calls"}


def require_onnx() -> None:
    """Fail before a long run, not in its middle: the probe builds its graphs with the onnx package."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ConfigError("the int8 GEMM probe builds its graphs with the onnx package, which is not installed: "
                          "install pulse-edge[bench]") from e


def _graph(kind: str, weight: np.ndarray, m: int) -> Any:
    from onnx import TensorProto, helper, numpy_helper

    from pulse_edge.export.graphs.quant_ops import MatMulSpec, emit_matmul

    k, n = weight.shape
    if kind == "dqmm":
        q = np.clip(np.rint(weight / (scale := np.abs(weight).max(0) / 127)), -127, 127).astype(np.int8)
        nodes = [helper.make_node("DynamicQuantizeMatMul", ["x", "q", "s"], ["y"], domain="com.microsoft")]
        arrays = {"q": q, "s": scale.astype(np.float32)}
    else:
        scheme = {"w8a8dyn": "w8a8dyn", "nbits8": "w8", "fp32": "fp"}[kind]
        emitted = emit_matmul(scheme, MatMulSpec(site="probe", x="x", y="y", weight=weight, opset=17))
        nodes, arrays = emitted.nodes, {**emitted.arrays, **emitted.raw}
    graph = helper.make_graph(nodes, "gemm_probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              initializer=[numpy_helper.from_array(a, name) for name, a in arrays.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def measure_gemm_peak(threads: int = 0, repeats: int = REPEATS, kinds: tuple[str, ...] = KINDS,
                      shape: tuple[int, int, int] = PROBE_SHAPE) -> GemmPeak:
    """Time each kind in its own session, one kind after the other (each call is ~10-200 ms)."""
    import onnxruntime as ort

    m, k, n = shape
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    best, median = {}, {}
    for kind in kinds:
        session = ort.InferenceSession(_graph(kind, weight, m).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        # prepacking happened at load; the warm-up calls pay the arena's growth and the threads' start
        times = call_seconds(lambda session=session: session.run(None, {"x": x}), repeats, WARMUP)
        best[kind], median[kind] = 2.0 * m * k * n / min(times), 2.0 * m * k * n / statistics.median(times)
        del session
    return GemmPeak(ops_per_s=best, median_ops_per_s=median, shape=shape, repeats=repeats, threads=threads)
