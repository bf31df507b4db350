"""Deliberately broken graphs: rewrite named initializers of an exported graph in place.

An initializer in external data (the decoder) is rewritten where it lies in the data file; one inside the
.onnx file (the tiny vision graph) through onnx, and the manifest's recorded sizes follow. Either way each
edit keeps the initializer's dtype and shape: the graph still loads and runs, it just computes the wrong
thing, which is what the parity checks must catch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pulse_testing.manifests import edit_manifest

Edit = Callable[[np.ndarray], np.ndarray]


def read_initializer(graph: Path, name: str) -> np.ndarray:
    proto = onnx.load(str(graph), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    raw = np.fromfile(graph.parent / info["location"], np.uint8, int(info["length"]), offset=int(info["offset"]))
    return raw.view(dtype).reshape(tuple(tensor.dims))


def edit_initializers(graph: Path, edits: Mapping[str, Edit]) -> None:
    """Replace each named initializer x by edits[name](x) (same dtype and shape)."""
    proto = onnx.load(str(graph), load_external_data=False)
    tensors = {t.name: t for t in proto.graph.initializer}
    inline = False
    for name, edit in edits.items():
        tensor = tensors[name]
        old = read_initializer(graph, name)
        new = np.ascontiguousarray(edit(old.copy()), dtype=old.dtype).reshape(old.shape)
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: e.value for e in tensor.external_data}
            data = np.memmap(graph.parent / info["location"], np.uint8, "r+", int(info["offset"]), int(info["length"]))
            data[:] = new.reshape(-1).view(np.uint8)
            data.flush()
        else:
            tensor.CopyFrom(numpy_helper.from_array(new, name))
            inline = True
    if inline:
        onnx.save_model(proto, str(graph))
        _update_sizes(graph)


def _update_sizes(graph: Path) -> None:
    def resize(manifest: dict) -> None:
        for spec in manifest["graphs"].values():
            for file in spec.get("sizes", {}):
                spec["sizes"][file] = (graph.parent / file).stat().st_size

    edit_manifest(graph.parent, resize)
