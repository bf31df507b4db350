"""The graph file TensorRT parses for one engine: the bundle's own, or a copy with a shorter KV cache.

The decoder's cache length is static in the graph (TensorRT's KV-cache layer needs it static). A build with
--max-context below the bundle's length rewrites only the small .onnx file (the cache inputs' and outputs'
length) into the build's work directory, next to a link to the bundle's weights file: the engine's cache
then takes max_context positions of device memory, not the bundle's. The rotary tables keep all positions.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, Manifest

CACHE_AXIS = 2  # [1, kv_heads, length, head_dim]


@contextmanager
def prepared_graph(bundle: Path, graph: GraphSpec, manifest: Manifest, max_context: int, work: Path) -> Iterator[Path]:
    """Yield the path to parse; a rewritten copy lives in `work/.graph-*` until the build is done."""
    if not graph.kv_update or max_context == manifest.kv.max_length:
        yield bundle / graph.file
        return
    import onnx  # only this path needs it

    folder = work / f".graph-{Path(graph.file).stem}"
    folder.mkdir()
    try:
        proto = onnx.load(os.fspath(bundle / graph.file), load_external_data=False)
        cache = set(names.kv_names(manifest.kv.layers, "past")) | set(names.kv_names(manifest.kv.layers, "present"))
        for value in (*proto.graph.input, *proto.graph.output):
            if value.name in cache:
                value.type.tensor_type.shape.dim[CACHE_AXIS].dim_value = max_context
        onnx.save_model(proto, os.fspath(folder / graph.file))
        if graph.external_data:
            (folder / graph.external_data).symlink_to((bundle / graph.external_data).resolve())
        yield folder / graph.file
    finally:
        shutil.rmtree(folder, ignore_errors=True)
