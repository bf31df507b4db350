"""ONNX Runtime session settings that earlier tests left open (a fifth mutation round): thread bounds, the TensorRT
engine cache's key, provider options, load-error remedies, run-error translation."""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
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


def test_tensorrt_builds_fp16_only_where_asked() -> None:
    """fp32 and FP8 bundles' engines built with fp16 enabled were another precision than the bundle's, silently."""
    for fp16 in (False, True):
        (_, options), *_ = s.provider_chain(s.SessionConfig(provider="tensorrt"), fp16=fp16)
        assert options["trt_fp16_enable"] is fp16
        assert options["trt_engine_cache_enable"] is True  # a 7B engine builds for minutes: once, not every start


def test_the_u8_rewrite_is_asked_at_every_level_where_onnxruntime_makes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """On an x86 CPU without VNNI the rewrite is made at "extended" and "all": left out at "extended", the int8
    GEMMs ran on the saturating kernel, with a false warning and u8u8_matmul false in the manifest."""
    monkeypatch.setattr(s, "int8_products_saturate", lambda flags=None: True)
    for level, made in (("all", True), ("extended", True), ("basic", False), ("disable", False)):
        config = s.SessionConfig(opt_level=level)
        assert s.session_settings(config)["u8u8_matmul"] is made
        assert (s.saturation_warning(config, None, ["w8a8u8"]) is None) is made


def test_each_graph_session_gets_its_precision_and_entries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision graph's session: fp16 tactics for an fp16 graph (an fp32 TensorRT engine under an fp16 cache key
    otherwise) and the entries its Q/DQ graph needs; a segmented prefill's sessions: no spinning and one shared
    arena (measured 25% faster kernels on 2 cores, 3.10 against 4.73 GiB: engines/ort.py)."""
    from types import SimpleNamespace

    from pulse_edge.runtime.bundle import names
    from pulse_edge.runtime.engines import ort as engines

    made: list[dict] = []
    monkeypatch.setattr(engines, "make_session", lambda path, config, **kw: made.append(kw) or path)
    monkeypatch.setattr(engines, "check_graph_io", lambda spec, session: None)
    spec = SimpleNamespace(file="vision.onnx", opt_level_limit=None, precision="fp16",
                           ort_qdq_matmulnbits_accuracy_level=4)
    engines.VisionEngine(tmp_path, spec, s.SessionConfig())
    assert made[0]["fp16"] is True and made[0]["entries"] == {"session.qdq_matmulnbits_accuracy_level": "4"}
    monkeypatch.setattr(engines, "kernel_for", lambda *args: "kernel")
    monkeypatch.setattr(engines, "SegmentedDecoder", lambda *args: args)
    graph = SimpleNamespace(segments=[SimpleNamespace(file="s0.onnx"), SimpleNamespace(file="s1.onnx")],
                            opt_level_limit=None, ort_qdq_matmulnbits_accuracy_level=None)
    for arena, entries in ((True, {"session.intra_op.allow_spinning": "0", "session.use_env_allocators": "1"}),
                           (False, {"session.intra_op.allow_spinning": "0"})):
        made.clear()
        engines._open_segmented(names.PREFILL, tmp_path, graph, None, [], None, s.SessionConfig(mem_arena=arena))
        assert [kw["entries"] for kw in made] == [entries, entries]


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


def test_engine_folders_no_run_can_use_again_are_removed_and_the_rest_kept(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7B engine is gigabytes: every re-export at the same path and every ONNX Runtime upgrade keyed a new folder
    and left the old one's engines on the cart's disk for good. What another run may still use stays: another ORT's
    engines until they go unused for OTHER_RUNTIME_IDLE_DAYS, other bundles' (a shared graph file linked from two
    bundles included), other settings', unrecorded folders."""
    from pulse_edge.runtime.engines import trt_cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    graph = tmp_path / "bundle" / "decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph-A")
    config = s.SessionConfig(provider="tensorrt")

    def built(fp16: bool, onnxruntime: str, graph: Path = graph) -> Path:
        folder = s.engine_cache_dir(graph, config, fp16=fp16, onnxruntime=onnxruntime)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "TensorrtExecutionProvider_TRTKernel.engine").write_bytes(b"e" * 4096)
        trt_cache.keep_and_prune(folder, graph, onnxruntime)
        return folder

    def unused_for(folder: Path, days: float) -> None:
        then = time.time() - days * 86400
        os.utime(folder / trt_cache.RECORD, (then, then))

    other_ort = built(True, "1.31.0")
    fp32_tactics = built(False, "1.32.0")  # another setting, this ORT: kept until the bundle changes
    assert other_ort.exists()  # another environment's, used today: it stays
    shared = tmp_path / "blobs" / "decoder.onnx"
    shared.parent.mkdir()
    shared.write_bytes(b"graph-B")
    revisions = []
    for name in ("rev1", "rev2"):  # two bundles linking one graph file
        (tmp_path / name).mkdir()
        (tmp_path / name / "decoder.onnx").symlink_to(shared)
        (tmp_path / name / "manifest.json").write_text(f'{{"rev": "{name}"}}')
        revisions.append(built(True, "1.32.0", tmp_path / name / "decoder.onnx"))
    unrecorded = s.default_trt_cache() / "made-by-hand"
    unrecorded.mkdir()
    garbage = s.default_trt_cache() / "not-ours"
    garbage.mkdir()
    (garbage / trt_cache.RECORD).write_text("[1, 2]")
    timing = s.default_trt_cache() / "timing-x.cache"
    timing.write_bytes(b"t")

    unused_for(other_ort, trt_cache.OTHER_RUNTIME_IDLE_DAYS - 1)
    built(True, "1.32.0")
    assert other_ort.exists()  # idle for days, not yet the month: another environment may still start on them
    unused_for(other_ort, trt_cache.OTHER_RUNTIME_IDLE_DAYS + 1)
    current = built(True, "1.32.0")  # the other ORT's engines of this graph went unused for a month: removed
    assert not other_ort.exists()
    assert fp32_tactics.exists() and all(r.exists() for r in revisions) and unrecorded.exists() and garbage.exists()
    assert timing.exists()

    graph.write_bytes(b"graph-A, re-exported")  # the bundle at the path changed: every folder of its old state goes
    newest = built(True, "1.32.0")
    assert newest != current and not current.exists() and not fp32_tactics.exists()
    assert all(r.exists() for r in revisions) and unrecorded.exists() and garbage.exists()
    record = json.loads((newest / trt_cache.RECORD).read_text())
    assert record == {"graph": str(graph.absolute()), "bundle": s.graph_cache_key(graph), "onnxruntime": "1.32.0"}

    # deployment by a link: "current" moves from v2 to v3; v2 stays on disk (a rollback), and so do its engines
    versions = []
    for name in ("v2", "v3"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "decoder.onnx").write_bytes(f"graph {name}".encode())
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "v2")
    versions.append(built(True, "1.32.0", current / "decoder.onnx"))
    current.unlink()
    current.symlink_to(tmp_path / "v3")
    versions.append(built(True, "1.32.0", current / "decoder.onnx"))
    assert all(v.exists() for v in versions)


def test_engines_a_live_session_holds_are_never_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server writes its folder's record once, at its start: after a month up (or a clock set forward by NTP on a
    cart without a real-time clock) another environment's session start removed the engines it was running on, and
    a re-export at its bundle's path did so at once. Held, they stay until the session goes."""
    import gc

    from pulse_edge.runtime.engines import trt_cache

    class Session:  # what holds the engines: ORT's InferenceSession in a run
        pass

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    graph = tmp_path / "bundle" / "decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph-A")
    config = s.SessionConfig(provider="tensorrt")

    def started(onnxruntime: str, session: object | None = None) -> Path:
        folder = s.engine_cache_dir(graph, config, fp16=True, onnxruntime=onnxruntime)
        folder.mkdir(parents=True, exist_ok=True)
        if session is not None:
            trt_cache.keep_held(trt_cache.hold_folder(folder), session)
        trt_cache.keep_and_prune(folder, graph, onnxruntime)
        return folder

    server = Session()
    serving = started("1.31.0", server)
    then = time.time() - (trt_cache.OTHER_RUNTIME_IDLE_DAYS + 1) * 86400
    os.utime(serving / trt_cache.RECORD, (then, then))
    started("1.32.0")  # another environment, a month later: the server's engines are in use
    graph.write_bytes(b"graph-A, re-exported")
    started("1.32.0")  # a re-export at the path: stale, but still held
    assert serving.is_dir()
    del server
    gc.collect()
    started("1.32.0")  # the server is gone: its folder goes at the next start
    assert not serving.exists()


def test_a_cache_that_cannot_be_tidied_never_fails_the_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pulse_edge.runtime.engines import trt_cache

    graph = tmp_path / "decoder.onnx"
    graph.write_bytes(b"graph")
    trt_cache.keep_and_prune(tmp_path / "gone" / "abc", graph, "1.32.0")  # its folder removed under it
    assert "could not be tidied" in caplog.text and "used all the same" in caplog.text


def test_a_tensorrt_session_records_its_engines_and_removes_those_of_the_bundle_it_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Through make_session, with ONNX Runtime's session faked (no GPU here): only the folder pulse-edge chose is
    recorded and tidied; a cache path the caller gives is theirs."""

    from pulse_edge.runtime.engines import trt_cache

    class BuildsAnEngine(_OnTensorRT):
        def __init__(self, path: str, sess_options: object = None, providers: list = ()) -> None:
            self.cache = Path(providers[0][1]["trt_engine_cache_path"])
            (self.cache / "TensorrtExecutionProvider_TRTKernel.engine").write_bytes(b"engine")

    _fake_tensorrt(monkeypatch, tmp_path, BuildsAnEngine)
    graph = tmp_path / "bundle" / "decoder.onnx"
    graph.parent.mkdir()
    graph.write_bytes(b"graph-A")
    running = s.make_session(graph, s.SessionConfig(provider="tensorrt"))  # a server's session, alive
    first = running.cache
    assert json.loads((first / trt_cache.RECORD).read_text())["graph"] == str(graph.resolve())
    graph.write_bytes(b"graph-A, re-exported")
    second = s.make_session(graph, s.SessionConfig(provider="tensorrt")).cache
    assert second != first and second.is_dir() and first.is_dir()  # the running server's engines stay
    del running  # the server stopped: the next start removes them
    gc.collect()
    assert s.make_session(graph, s.SessionConfig(provider="tensorrt")).cache == second and not first.exists()
    mine = tmp_path / "my-engines"
    mine.mkdir()
    graph.write_bytes(b"graph-A, re-exported twice")  # a run that leaves pulse-edge's cache unused leaves it as it is
    given = s.SessionConfig(provider="tensorrt", provider_options={"trt_engine_cache_path": str(mine)})
    assert s.make_session(graph, given).cache == mine and not (mine / trt_cache.RECORD).exists()
    assert second.is_dir() and "TensorRT engine cache" not in caplog.text


def test_engines_are_held_while_they_are_built_and_let_go_when_the_build_fails(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 7B engine builds for minutes: a prune in that time (another bundle's session start) took the folder TensorRT
    was writing into, since the hold came after the build. A build that fails leaves the folder free to prune."""

    from pulse_edge.runtime.engines import trt_cache

    tried: list[bool] = []
    folders: list[Path] = []

    class Builds(_OnTensorRT):
        def __init__(self, path: str, sess_options: object = None, providers: list = ()) -> None:
            cache = Path(providers[0][1]["trt_engine_cache_path"])
            folders.append(cache)
            (cache / "TensorrtExecutionProvider_TRTKernel.engine").write_bytes(b"engine, half written")
            tried.append(trt_cache._removed_unless_held(cache))  # a prune meanwhile, as another process makes it
            if fail:
                raise RuntimeError("out of device memory")

    _fake_tensorrt(monkeypatch, tmp_path, Builds)
    graph = tmp_path / "decoder.onnx"
    graph.write_bytes(b"graph")
    fail = False
    session = s.make_session(graph, s.SessionConfig(provider="tensorrt"))
    assert tried == [False]  # held while it was built
    fail = True
    with pytest.raises(ConfigError, match="out of device memory"):
        s.make_session(graph, s.SessionConfig(provider="tensorrt", provider_options={"trt_max_workspace_size": 1}))
    assert tried == [False, False] and folders[1] != folders[0]
    assert trt_cache._removed_unless_held(folders[1])  # failed: nothing holds it
    assert not trt_cache._removed_unless_held(folders[0])
    del session


def test_a_hold_taken_on_a_folder_a_prune_removed_meanwhile_holds_the_folder_made_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session waiting on a prune's exclusive lock got its shared lock on a file the prune had just deleted: a
    lock on nothing, and the folder ORT made again was unheld."""
    import fcntl

    from pulse_edge.runtime.engines import trt_cache

    folder = tmp_path / "engines"
    real_flock = fcntl.flock
    pruned: list[int] = []  # the lock file descriptor that waited

    def flock_after_a_prune(fd: int, op: int) -> None:
        real_flock(fd, op)
        if not pruned:  # the prune that held the folder finished while this waited
            pruned.append(fd)
            shutil.rmtree(folder)

    monkeypatch.setattr(trt_cache.fcntl, "flock", flock_after_a_prune)
    fd = trt_cache.hold_folder(folder)
    monkeypatch.setattr(trt_cache.fcntl, "flock", real_flock)
    assert fd is not None and os.fstat(fd).st_ino == (folder / trt_cache.IN_USE).stat().st_ino
    assert not trt_cache._removed_unless_held(folder) and folder.is_dir()
    os.close(fd)
    assert trt_cache._removed_unless_held(folder)


class _OnTensorRT:
    """ONNX Runtime's session as a TensorRT one reports itself (no GPU here: its __init__ is each test's)."""

    def get_providers(self) -> list[str]:
        return ["TensorrtExecutionProvider", "CUDAExecutionProvider"]


def _fake_tensorrt(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, session: type) -> None:
    """ONNX Runtime with TensorRT available and `session` as its InferenceSession; the user's cache under tmp_path."""
    import onnxruntime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
