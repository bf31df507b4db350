"""ONNX Runtime session settings that earlier tests left open (a fifth mutation round): thread bounds, the TensorRT
engine cache's key, provider options, load-error remedies, run-error translation."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from pulse_edge.errors import ConfigError, EngineRunError
from pulse_edge.runtime.engines import sessions as s


def test_threads_bounds_are_exact() -> None:
    s.check_threads(0)
    s.check_threads(s.usable_cpus())
    for bad in (-1, s.usable_cpus() + 1):
        with pytest.raises(ConfigError):
            s.check_threads(bad)


def test_the_engine_cache_key_follows_same_size_rewrites_and_the_path(tmp_path: Path) -> None:
    graph = tmp_path / "a" / "decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph")
    data = graph.with_name("decoder.onnx.data")
    data.write_bytes(b"weights")
    first = s.graph_cache_key(graph)
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same size, newer
    newer = s.graph_cache_key(graph)
    assert newer != first
    data.write_bytes(b"weightsXX")
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # other size, same time
    assert s.graph_cache_key(graph) != newer
    shutil.copytree(graph.parent, tmp_path / "b")  # copy2: same sizes and times, another bundle
    assert s.graph_cache_key(tmp_path / "b" / "decoder.onnx") != s.graph_cache_key(graph)


def test_cuda_provider_options_win() -> None:
    chain = s.provider_chain(s.SessionConfig(provider="cuda", device_id=1, provider_options={"device_id": 0}),
                             fp16=False)
    assert chain[0][1]["device_id"] == 0


@pytest.mark.parametrize(("text", "prepack", "says"), [
    ("InvalidGraph: bad node", True, "re-export the bundle"),
    ("std::bad_alloc", True, "--no-prepack"),
    ("std::bad_alloc", False, "even with its weights mapped")])
def test_load_errors_name_their_remedy(text: str, prepack: bool, says: str) -> None:
    error = s._load_error(Path("decoder.onnx"), s.SessionConfig(prepack=prepack), RuntimeError(text))
    assert says in str(error)


def test_a_plain_runtime_error_passes_through() -> None:
    with pytest.raises(RuntimeError, match=r"^not ort$"), s.ort_run_errors("g"):
        raise RuntimeError("not ort")
    with pytest.raises(EngineRunError), s.ort_run_errors("g"):
        raise RuntimeError(s.IOBINDING_FAILURE + "boom")


def test_the_engine_cache_key_follows_the_bundle_and_how_its_engines_are_built(tmp_path: Path) -> None:
    """A re-export copied over the old bundle with its files' times kept (`cp -p`, `rsync -a`) has the same sizes
    and times: the key followed only those, so the old engine, its old weights built in, ran with no error."""
    graph = tmp_path / "decoder.onnx"
    graph.write_bytes(b"graph")
    data = graph.with_name("decoder.onnx.data")
    data.write_bytes(b"weights-A")
    manifest = tmp_path / "manifest.json"
    manifest.write_text('{"files": {"decoder.onnx.data": {"sha256": "a"}}}')
    first = s.graph_cache_key(graph)
    times = data.stat()
    data.write_bytes(b"weights-B")
    manifest.write_text('{"files": {"decoder.onnx.data": {"sha256": "b"}}}')
    os.utime(data, ns=(times.st_atime_ns, times.st_mtime_ns))
    os.utime(manifest, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert s.graph_cache_key(graph) != first
    built = {"onnxruntime": "1.32.0", "fp16": True, "options": {}}
    assert s.graph_cache_key(graph, built) != s.graph_cache_key(graph, {**built, "fp16": False})
    assert s.graph_cache_key(graph, built) != s.graph_cache_key(graph, {**built, "onnxruntime": "1.33.0"})
    assert s.graph_cache_key(graph, built) == s.graph_cache_key(graph, dict(built))


def test_engines_built_otherwise_are_cached_apart(tmp_path: Path) -> None:
    """ORT's documentation: an engine is rebuilt for another ORT (TensorRT) version or other build options."""
    graph = tmp_path / "decoder.onnx"
    graph.write_bytes(b"graph")
    config = s.SessionConfig(provider="tensorrt")
    here = s.engine_cache_dir(graph, config, fp16=True, onnxruntime="1.32.0")
    assert here.parent == s.default_trt_cache() and here == s.engine_cache_dir(graph, config, fp16=True,
                                                                               onnxruntime="1.32.0")
    assert here != s.engine_cache_dir(graph, config, fp16=False, onnxruntime="1.32.0")
    assert here != s.engine_cache_dir(graph, config, fp16=True, onnxruntime="1.33.0")
    other = s.SessionConfig(provider="tensorrt", provider_options={"trt_int8_enable": True})
    assert here != s.engine_cache_dir(graph, other, fp16=True, onnxruntime="1.32.0")
