"""A loaded graph's inputs and outputs against the manifest's record of them.

The manifest's IO lists are checked against each other before any engine is built (runtime/bundle/checks.py);
this checks the graph file itself, once its session exists and before anything is bound or run: a graph
swapped in from another bundle, or a manifest edited after export, fails with one line naming the
difference instead of an error from inside the engine (or a buffer bound with the wrong size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pulse_edge.errors import BundleError
from pulse_edge.runtime.bundle.manifest import GraphSpec, SegmentSpec, TensorSpec

# ONNX Runtime's element type names -> the manifest's (pulse_edge.choices.TENSOR_DTYPES).
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(uint8)": "uint8", "tensor(int8)": "int8"}


def check_graph_io(spec: GraphSpec, session: Any) -> None:
    """`session`: an onnxruntime InferenceSession (anything with get_inputs/get_outputs of NodeArgs)."""
    _compare(spec, "inputs", spec.inputs, session.get_inputs())
    _compare(spec, "outputs", spec.outputs, session.get_outputs())


def check_segment_io(segment: SegmentSpec, session: Any) -> None:
    """A prefill segment's names against its manifest entry (as sets: the runtime binds by name, in the manifest's
    order)."""
    for kind, declared, found in (("inputs", segment.inputs, session.get_inputs()),
                                  ("outputs", segment.outputs, session.get_outputs())):
        if sorted(declared) != sorted(arg.name for arg in found):
            raise BundleError(f"{segment.file} does not have the {kind} the manifest lists; the graph was replaced "
                              "or the manifest edited; re-copy or re-export the bundle")


def _compare(spec: GraphSpec, kind: str, declared: Sequence[TensorSpec], found: Sequence[Any]) -> None:
    fix = "the graph was replaced or the manifest edited; re-copy or re-export the bundle"
    by_name = {arg.name: arg for arg in found}
    if sorted(by_name) != sorted(t.name for t in declared):
        extra = sorted(set(by_name) - {t.name for t in declared})
        missing = sorted({t.name for t in declared} - set(by_name))
        raise BundleError(f"{spec.file} does not have the {kind} the manifest lists (in the graph only: {extra[:4]}, "
                          f"in the manifest only: {missing[:4]}): {fix}")
    for tensor in declared:
        arg = by_name[tensor.name]
        dtype = ORT_TYPES.get(arg.type, arg.type)
        if dtype != tensor.dtype:
            raise BundleError(f"{spec.file}: {tensor.name} is {dtype} in the graph, {tensor.dtype} in the manifest: "
                              f"{fix}")
        shape = list(arg.shape or [])
        if len(shape) != len(tensor.shape) or any(
                isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(shape, tensor.shape, strict=True)):
            raise BundleError(f"{spec.file}: {tensor.name} is {shape} in the graph, {list(tensor.shape)} in the "
                              f"manifest: {fix}")
