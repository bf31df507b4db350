"""ONNX Runtime profiler traces: node events read, put on the wall clock, and grouped by what they do.

    trace JSON (one per session) ─ node events {op, name, ts, dur, input / output shapes}
      ts is microseconds from the session's profiling start (`get_profiling_start_time_ns`: nanoseconds
      since the epoch, measured with ORT 1.32, not the monotonic clock its docstring names), so an
      event lands in the window a benchmark timed with time.time_ns()
    events in a window ─ grouped by role (ROLES: op type -> role) ─ per role: time, share, work done

A float MatMul of two activations (its second operand batched, rank >= 3: the vision tower's
Q x K' and P x V) is attention, not a GEMM, and so is Softmax (only attention uses it here): the
GEMM roles are the linear layers, whose weights are 2-D (or prepacked, and then absent from the
recorded inputs). So is RotaryEmbedding where a graph writes it apart (GroupQueryAttention does it inside).
Softmax's and the rotation's own FLOPs are not counted; their time is attention's.

Work is counted from the shapes ORT recorded, not from the model's config:
  GEMMs       2 x prod(output shape) x K (K = the first input's last axis); prepacked weights
              are absent from the recorded inputs, which is why the output shape is used
              (the same count for the attention MatMuls above)
  attention   GroupQueryAttention with a past that is not the shared buffer (the prefill graphs':
              present = past + the new positions): 4 x heads x S x T x D, the full S x T product
              that ORT's CPU kernel computes (its causal upper triangle included). Over a shared
              buffer the recorded past is the whole buffer, so T is unknown and no work is counted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

INT8_GEMM, WEIGHT_ONLY_GEMM, FLOAT_GEMM, ATTENTION = "int8 GEMM", "weight-only GEMM", "float GEMM", "attention"
GEMM_ROLES = (INT8_GEMM, WEIGHT_ONLY_GEMM, FLOAT_GEMM)
_ROLE_OPS = {
    INT8_GEMM: ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger", "QLinearMatMul", "QGemm"),
    WEIGHT_ONLY_GEMM: ("MatMulNBits",),
    FLOAT_GEMM: ("MatMul", "FusedMatMul", "Gemm", "FusedGemm"),
    ATTENTION: ("GroupQueryAttention", "MultiHeadAttention", "Attention", "Softmax", "RotaryEmbedding"),
    "activation quantization": ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"),
    "reductions": ("ReduceMax", "ReduceMin", "ReduceSum", "ReduceMean"),  # the prefill graphs' per-token scales
    "norms": ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
              "SkipLayerNormalization", "RMSNormalization"),
    "activations": ("QuickGelu", "Gelu", "FastGelu", "BiasGelu", "Sigmoid"),
    "elementwise": ("Add", "Sub", "Mul", "Div", "Neg", "Max", "Min", "Clip", "Round", "Cast", "Where", "Pow",
                    "Sqrt", "Erf", "Tanh"),
    "data movement": ("Split", "Slice", "Concat", "Transpose", "Reshape", "Gather", "Expand", "Shape", "Squeeze",
                      "Unsqueeze", "TensorScatter", "ScatterND", "Identity", "Flatten", "Pad"),
}
UNCOUNTED = frozenset({"Softmax", "RotaryEmbedding"})  # attention's own ops whose FLOPs are not counted
ROLES: Mapping[str, str] = MappingProxyType({op: role for role, ops in _ROLE_OPS.items() for op in ops})
ROLE_ORDER = (*_ROLE_OPS, "other")


def role_of(op: str) -> str:
    return ROLES.get(op, "other")


@dataclass(frozen=True)
class NodeEvent:
    """One node's kernel run, on the wall clock (ns since the epoch)."""

    graph: str
    name: str
    op: str
    start_ns: int
    dur_ns: int
    inputs: tuple[tuple[int, ...], ...]
    outputs: tuple[tuple[int, ...], ...]

    @property
    def role(self) -> str:
        role = role_of(self.op)
        if role == FLOAT_GEMM and len(self.inputs) >= 2 and len(self.inputs[1]) >= 3:
            return ATTENTION  # activations x activations (module doc)
        return role

    def gemm_ops(self) -> float | None:
        """2 M K N of a MatMul-kind node, from its recorded shapes."""
        if role_of(self.op) not in GEMM_ROLES or not self.inputs or not self.outputs or not self.inputs[0]:
            return None
        return 2.0 * math.prod(self.outputs[0]) * self.inputs[0][-1]

    def attention_flops(self) -> float | None:
        """GroupQueryAttention over a past that is not the shared buffer (module doc); None otherwise."""
        if self.op != "GroupQueryAttention" or len(self.inputs) < 2 or len(self.outputs) < 2:
            return None
        qkv, past, present = self.inputs[0], self.inputs[1], self.outputs[1]
        if len(qkv) != 3 or len(past) != 4 or len(present) != 4:
            return None
        _, s, width = qkv
        _, kv_heads, cached, head_dim = past
        if present[2] != cached + s or head_dim == 0:
            return None  # a shared buffer: the recorded past is the whole buffer, not what is attended to
        heads = width // head_dim - 2 * kv_heads
        return 4.0 * heads * s * present[2] * head_dim


def _shapes(recorded: Any) -> tuple[tuple[int, ...], ...]:
    """[{"float": [1, 2, 3]}, ...] -> ((1, 2, 3), ...)."""
    return tuple(tuple(int(d) for d in next(iter(entry.values()))) for entry in recorded or () if entry)


@dataclass(frozen=True)
class Trace:
    """One session's trace: its node events and the start of each of its runs (model_run), on the wall clock."""

    nodes: list[NodeEvent]
    runs: list[int]


def read_trace(path: Path, graph: str, start_ns: int) -> Trace:
    """One session's trace; `start_ns`: the session's profiling start (ns since the epoch)."""
    nodes, runs = [], []
    for event in json.loads(Path(path).read_text()):
        args = event.get("args") or {}
        at = start_ns + int(event.get("ts", 0)) * 1000
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs.append(at)
        if event.get("cat") != "Node" or "op_name" not in args:
            continue
        nodes.append(NodeEvent(graph=graph, name=str(event["name"]).removesuffix("_kernel_time"), op=args["op_name"],
                               start_ns=at, dur_ns=int(event["dur"]) * 1000,
                               inputs=_shapes(args.get("input_type_shape")),
                               outputs=_shapes(args.get("output_type_shape"))))
    return Trace(nodes=nodes, runs=runs)


def in_window(events: Iterable[NodeEvent], start_ns: int, end_ns: int) -> list[NodeEvent]:
    """The events that started inside [start_ns, end_ns]."""
    return [e for e in events if start_ns <= e.start_ns <= end_ns]


def runs_in_window(runs: Iterable[int], start_ns: int, end_ns: int) -> int:
    return sum(1 for r in runs if start_ns <= r <= end_ns)


@dataclass(frozen=True)
class RoleTotal:
    """One role's share of a phase, per run of the phase."""

    role: str
    ops: tuple[tuple[str, float], ...]  # (op type, seconds per run), most time first
    seconds: float  # per run
    nodes: int  # node runs per run
    work: float | None  # GEMM ops or attention FLOPs per run; None where the shapes do not say
    weight_bytes: float | None  # weight bytes the role's nodes read per run (decode), where known

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "ops": [op for op, _ in self.ops], "op_seconds_per_run": dict(self.ops),
                "seconds_per_run": self.seconds,
                "node_runs_per_run": self.nodes, "work_per_run": self.work, "weight_bytes_per_run": self.weight_bytes}


def _work(event: NodeEvent) -> float | None:
    """GEMM ops or attention FLOPs (Softmax, RotaryEmbedding: 0, module doc); None where the shapes do not say."""
    if event.op in UNCOUNTED:
        return 0.0
    return event.gemm_ops() if role_of(event.op) in GEMM_ROLES else event.attention_flops()


def role_totals(events: Sequence[NodeEvent], runs: int,
                weight_bytes: Mapping[tuple[str, str], int] | None = None) -> list[RoleTotal]:
    """Per role, in ROLE_ORDER, what `runs` runs of a phase spent, divided by `runs`. `weight_bytes`: (graph, node
    name) -> bytes of its weights (onnx_weight_bytes), for the GEMM roles' bytes read; a GEMM node it does not
    know, or knows as 0 bytes, makes the role's bytes unknown."""
    totals = []
    for role in ROLE_ORDER:
        mine = [e for e in events if e.role == role]
        if not mine:
            continue
        per_op: dict[str, int] = {}
        for e in mine:
            per_op[e.op] = per_op.get(e.op, 0) + e.dur_ns
        works = [_work(e) for e in mine]
        known = role in GEMM_ROLES or role == ATTENTION
        work = sum(w for w in works if w is not None) / runs if known and all(w is not None for w in works) else None
        sizes = ([weight_bytes.get((e.graph, e.name)) or None for e in mine]
                 if weight_bytes is not None and role in GEMM_ROLES else [])
        read = sum(s for s in sizes if s is not None) / runs if sizes and all(s is not None for s in sizes) else None
        ranked = sorted(per_op, key=per_op.get, reverse=True)
        totals.append(RoleTotal(role=role, ops=tuple((op, per_op[op] / 1e9 / runs) for op in ranked),
                                seconds=sum(per_op.values()) / 1e9 / runs, nodes=len(mine) // runs, work=work,
                                weight_bytes=read))
    return totals


# Ops a weight passes through on its way to a GEMM in a Q/DQ graph (ORT fuses them into the GEMM, keeping its name)
PASS_THROUGH = frozenset({"DequantizeLinear", "Cast", "Reshape", "Transpose", "Identity", "Squeeze", "Unsqueeze"})


def onnx_weight_bytes(path: Path) -> dict[str, int]:
    """Node name -> bytes of the initializers it reads, directly or through PASS_THROUGH nodes (a Q/DQ weight's
    DequantizeLinear); external data is sized from the headers, never read."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {t.name: _tensor_bytes(t) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}

    def weight(name: str, depth: int = 0) -> int:
        if name in sizes:
            return sizes[name]
        node = producer.get(name)
        if node is None or node.op_type not in PASS_THROUGH or depth > 4:
            return 0
        return sum(weight(i, depth + 1) for i in node.input)

    return {n.name: sum(weight(i) for i in n.input) for n in graph.node}


def _tensor_bytes(tensor: Any) -> int:
    """Bytes as stored: 4-bit types pack two elements a byte (numpy's dtype for them says one byte each)."""
    import onnx

    count = math.prod(tensor.dims)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
