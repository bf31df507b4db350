"""The `trt` backend's bookkeeping without a GPU: profiles, shapes, buffers and refusals, against stand-ins for
the TensorRT engine and the CUDA runtime. Running real engines needs an NVIDIA GPU (the gpu-marked test)."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import click
import numpy as np
import pytest

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.engines import (
    ENGINES_FILE,
    ENGINES_SEAL,
    EngineSet,
    EngineSpec,
    ProfileSpec,
    find_engine_dir,
    manifest_sha256,
    read_engines,
)
from pulse_edge.runtime.bundle.integrity import file_record
from pulse_edge.runtime.bundle.manifest import BundleError, TensorSpec, read_manifest
from pulse_edge.runtime.bundle.seal import canonical_digest
from pulse_edge.runtime.engines import trt as trt_backend
from pulse_edge.runtime.engines.tensorrt_api import TensorRT

LAYERS, KVN, LENGTH, D, H, V = 2, 2, 64, 8, 16, 10


def _decoder_spec(length: int = LENGTH) -> EngineSpec:
    kv = (1, KVN, length, D)
    past, present = names.kv_names(LAYERS, "past"), names.kv_names(LAYERS, "present")
    total = ((1, 1), (1, length // 2), (1, length))

    def profile(name: str, steps: tuple[int, int, int]) -> ProfileSpec:
        return ProfileSpec(name, {names.INPUTS_EMBEDS: tuple((1, s, H) for s in steps),
                                  names.POSITION_IDS: tuple((1, s) for s in steps), names.ATTENTION_MASK: total})

    inputs = (TensorSpec(names.INPUTS_EMBEDS, "float32", (1, -1, H)), TensorSpec(names.POSITION_IDS, "int64", (1, -1)),
              TensorSpec(names.WRITE_INDEX, "int64", (1,)), TensorSpec(names.ATTENTION_MASK, "int64", (1, -1)),
              *(TensorSpec(n, "float16", kv) for n in past))
    outputs = (TensorSpec(names.LOGITS, "float32", (1, -1, V)), *(TensorSpec(n, "float16", kv) for n in present))
    return EngineSpec(file="decoder.engine", graph="decoder.onnx", precision="fp16", inputs=inputs, outputs=outputs,
                      profiles=(profile("decode", (1, 1, 2)), profile("prefill", (1, 16, length))), size=1,
                      kv_aliases=dict(zip(present, past, strict=True)))


def _vision_spec(max_tiles: int = 2) -> EngineSpec:
    pixels = TensorSpec(names.PIXEL_VALUES, "float32", (-1, 3, 14, 14))
    shapes = {names.PIXEL_VALUES: ((1, 3, 14, 14), (max_tiles, 3, 14, 14), (max_tiles, 3, 14, 14))}
    return EngineSpec(file="vision.engine", graph="vision.onnx", precision="fp16", inputs=(pixels,),
                      outputs=(TensorSpec(names.IMAGE_FEATURES, "float32", (-1, 1, H)),),
                      profiles=(ProfileSpec("tiles", shapes),), size=1)


class FakeCuda:
    """Device memory as host arrays; records what the runner asks for."""

    stream = 7

    def __init__(self) -> None:
        self.memory: dict[int, bytearray] = {}
        self.uploads: list[tuple[int, bytes]] = []

    def malloc(self, nbytes: int) -> int:
        ptr = 4096 * (len(self.memory) + 1)
        self.memory[ptr] = bytearray(max(nbytes, 1))
        return ptr

    def upload(self, ptr: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).tobytes()
        self.memory[ptr][: len(data)] = data
        self.uploads.append((ptr, data))

    def download(self, array: np.ndarray, ptr: int) -> None:
        array[...] = np.frombuffer(bytes(self.memory[ptr][: array.nbytes]), array.dtype).reshape(array.shape)

    def synchronize(self) -> None:
        pass


class FakeContext:
    """An execution context that records its calls; "running" writes a marker into the logits and cache."""

    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda, self.profiles, self.shapes, self.addresses, self.runs = cuda, [], {}, {}, 0

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profiles.append(index)
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def execute_async_v3(self, stream: int) -> bool:
        self.runs += 1
        if names.LOGITS in self.addresses:
            logits = np.full(V, float(self.runs), np.float32)
            self.cuda.memory[self.addresses[names.LOGITS]][: logits.nbytes] = logits.tobytes()
        return True


class FakeEngine:
    def __init__(self, spec: EngineSpec, aliased: bool = True) -> None:
        self.spec, self.aliased = spec, aliased
        self.tensors = [(t.name, "INPUT", t.dtype) for t in spec.inputs] + [(t.name, "OUTPUT", t.dtype)
                                                                           for t in spec.outputs]
        self.num_io_tensors, self.num_optimization_profiles = len(self.tensors), len(spec.profiles)

    def get_tensor_name(self, i: int) -> str:
        return self.tensors[i][0]

    def _find(self, name: str) -> tuple[str, str, str]:
        return next(t for t in self.tensors if t[0] == name)

    def get_tensor_mode(self, name: str) -> str:
        return f"TensorIOMode.{self._find(name)[1]}"

    def get_tensor_dtype(self, name: str) -> str:
        return "DataType." + {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}[self._find(name)[2]]

    def get_aliased_input_tensor(self, name: str) -> str | None:
        return self.spec.kv_aliases.get(name) if self.aliased else None


TRT = TensorRT(module=None, name="tensorrt_rtx")


def _decoder(aliased: bool = True) -> tuple[trt_backend.TrtDecoder, FakeContext, FakeCuda]:
    spec, cuda = _decoder_spec(), FakeCuda()
    context = FakeContext(cuda)
    return trt_backend.TrtDecoder(FakeEngine(spec, aliased), context, spec, cuda, V), context, cuda


def test_decode_runs_use_the_decode_profile_and_prefill_the_other() -> None:
    plan = trt_backend.DecoderPlan.from_spec(_decoder_spec())
    assert plan.max_length == LENGTH and plan.max_steps == LENGTH
    assert plan.profile_for(1, 40) == 0 and plan.profile_for(2, 3) == 0
    assert plan.profile_for(3, 3) == 1 and plan.profile_for(LENGTH, LENGTH) == 1
    with pytest.raises(ValueError, match="no profile"):
        plan.profile_for(5, LENGTH + 1)
    with pytest.raises(ConfigError, match="exceeds the 64 positions"):
        plan.check_chunk(65)
    plan.check_chunk(None)  # one run of the whole context: this engine's prefill profile spans it


def test_engines_built_for_shorter_runs_refuse_a_longer_chunk_or_one_pass() -> None:
    """build-engines --max-chunk caps the prefill profile (TensorRT reserves scratch for its largest run)."""
    spec = _decoder_spec()
    short = replace(spec, profiles=(spec.profiles[0], replace(spec.profiles[1], shapes={
        name: (low, opt, (*high[:-2], 32, *high[-1:]) if name == names.INPUTS_EMBEDS else
               ((1, 32) if name == names.POSITION_IDS else high))
        for name, (low, opt, high) in spec.profiles[1].shapes.items()})))
    plan = trt_backend.DecoderPlan.from_spec(short)
    assert plan.max_steps == 32 and plan.max_length == LENGTH
    plan.check_chunk(32)
    with pytest.raises(ConfigError, match=r"prefill chunk 33 exceeds the 32 positions .*--max-chunk"):
        plan.check_chunk(33)
    with pytest.raises(ConfigError, match=r"a prefill in one run needs the decoder engine to take 64 positions per "
                                          r"run; it was built for 32 \(build-engines --max-chunk\): give "
                                          r"--prefill-chunk 32 or less"):
        plan.check_chunk(None)


def test_tensorrts_own_reason_reaches_the_refusal() -> None:
    """TensorRT returns None or False and tells only its logger why; the last errors are kept for the message."""
    from pulse_edge.errors import DeviceMemoryError, EngineRunError

    log = trt_backend.TrtLog()
    for severity, text in [("WARNING", "slow"), ("ERROR", "first"), ("INFO", "x"), ("ERROR", "second\nline"),
                           ("INTERNAL_ERROR", "third"), ("ERROR", "fourth")]:
        log(severity, text)
    assert log.reason() == "second line; third; fourth" and trt_backend.TrtLog().reason() == "TensorRT gave no reason"

    def refusing(result: object, said: str):  # TensorRT logs its reason during the call, then returns
        return lambda *args: (log("ERROR", said), result)[1]

    # each call's message quotes what TensorRT said during that call, not an earlier one's errors
    failing = SimpleNamespace(execute_async_v3=refusing(False, "an illegal memory access"))
    with pytest.raises(EngineRunError, match=r"^TensorRT's execute_async_v3 failed \(an illegal memory access\);"):
        trt_backend._execute(failing, SimpleNamespace(stream=1), log)
    with pytest.raises(DeviceMemoryError, match=r"the GPU cannot hold the scratch memory of decoder\.engine "
                                                r"\(out of device memory\).*--max-chunk"):
        trt_backend._context(SimpleNamespace(create_execution_context=refusing(None, "out of device memory")),
                             Path("e/decoder.engine"), log)
    # TensorRT-RTX compiles for this GPU when a context is made: a failure of that is not the memory's
    with pytest.raises(ConfigError, match=r"^TensorRT cannot create an execution context for decoder\.engine "
                                          r"\(no kernel for this GPU\); delete e and rebuild the engines"):
        trt_backend._context(SimpleNamespace(create_execution_context=refusing(None, "no kernel for this GPU")),
                             Path("e/decoder.engine"), log)


def test_an_engine_file_is_mapped_not_read_and_a_refusal_says_delete_and_rebuild(tmp_path: Path) -> None:
    import mmap

    path = tmp_path / "engines-rtx" / "decoder.engine"
    path.parent.mkdir()
    path.write_bytes(b"not an engine")
    seen = []
    log = trt_backend.TrtLog()
    log("ERROR", "an earlier load's error")  # not this load's reason

    def deserialize(data: object) -> None:
        seen.append(type(data))
        log("ERROR", "Serialization assertion header.magicTag == kEXPECTED_MAGIC_TAG failed")

    runtime = SimpleNamespace(deserialize_cuda_engine=deserialize)
    with pytest.raises(ConfigError, match=rf"cannot load {re.escape(str(path))} \(Serialization assertion [^;]*\); "
                                          rf"delete {re.escape(str(path.parent))} and rebuild the engines"):
        trt_backend._deserialize(SimpleNamespace(name="tensorrt_rtx", version="1.7.1"), runtime, path, log)
    assert seen == [mmap.mmap]
    path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"decoder\.engine is empty; delete .* and rebuild the engines"):
        trt_backend._deserialize(SimpleNamespace(name="tensorrt_rtx", version="1.7.1"), runtime, path, log)


def test_engines_of_another_tensorrt_version_are_refused_before_loading(tmp_path: Path) -> None:
    engines = SimpleNamespace(tensorrt="tensorrt", tensorrt_version="10.3.0")
    for other in ("10.7.0", "10.3.1"):  # a JetPack upgrade; a patch release, which TensorRT refuses too
        with pytest.raises(ConfigError, match=rf"built with tensorrt 10\.3\.0, this is {re.escape(other)}; delete .* "
                                              "and rebuild"):
            trt_backend.check_build_versions(engines, SimpleNamespace(version=other), tmp_path)
    trt_backend.check_build_versions(engines, SimpleNamespace(version="10.3.0"), tmp_path)


def test_forward_feeds_positions_shapes_and_keeps_the_length() -> None:
    decoder, context, cuda = _decoder()
    decoder.forward(np.zeros((1, 5, H), np.float32))
    assert context.profiles == [1]
    assert context.shapes == {names.INPUTS_EMBEDS: (1, 5, H), names.POSITION_IDS: (1, 5),
                              names.ATTENTION_MASK: (1, 5)}
    logits = decoder.forward(np.zeros((1, 1, H), np.float32))
    assert context.profiles == [1, 0] and context.shapes[names.ATTENTION_MASK] == (1, 6)
    positions = np.frombuffer(cuda.memory[decoder.inputs[names.POSITION_IDS].ptr][:8], np.int64)
    write_index = np.frombuffer(cuda.memory[decoder.inputs[names.WRITE_INDEX].ptr][:8], np.int64)
    assert positions.tolist() == [5] and write_index.tolist() == [5]
    assert decoder.length == 6 and np.all(logits == 2.0)
    decoder.forward(np.zeros((1, 1, H), np.float32))
    assert context.profiles == [1, 0]  # the profile is switched only when the run's kind changes
    with pytest.raises(ValueError, match="do not fit"):
        decoder.forward(np.zeros((1, LENGTH, H), np.float32))
    decoder.reset()
    assert decoder.length == 0


@pytest.mark.parametrize("refused", ["set_optimization_profile_async", "set_input_shape", "set_tensor_address"])
def test_a_setter_tensorrt_refuses_stops_the_run_with_its_reason(refused: str) -> None:
    """TensorRT's setters return False and keep the previous setting: a prefill chunk run at the last decode step's
    one-position shape went on as if 5 positions were written (the length moved on, the logits another's)."""
    from pulse_edge.errors import EngineRunError

    decoder, context, _ = _decoder()
    decoder.forward(np.zeros((1, 1, H), np.float32))  # a decode step: profile 0, shapes of one position

    def refuse(*args: object) -> bool:
        decoder.log("ERROR", f"{refused} said no")
        return False

    setattr(context, refused, refuse)
    with pytest.raises(EngineRunError, match=rf"^TensorRT refused to .* \({refused} said no\)"):
        decoder.forward(np.zeros((1, 5, H), np.float32))
    assert decoder.length == 1 and context.runs == 1  # nothing ran, nothing counted


def test_an_aliased_cache_is_one_buffer_bound_as_past_and_present() -> None:
    decoder, context, _ = _decoder(aliased=True)
    decoder.forward(np.zeros((1, 3, H), np.float32))
    for present, past in decoder.spec.kv_aliases.items():
        assert context.addresses[present] == context.addresses[past]
    assert decoder.in_place and all(len(b) == 1 for b in decoder.cache.values())


def test_an_unaliased_cache_swaps_two_buffers_after_each_run() -> None:
    decoder, context, _ = _decoder(aliased=False)
    decoder.forward(np.zeros((1, 3, H), np.float32))
    present, past = next(iter(decoder.spec.kv_aliases.items()))
    written = context.addresses[present]
    assert written != context.addresses[past]
    decoder.forward(np.zeros((1, 1, H), np.float32))
    assert context.addresses[past] == written  # what the last run wrote is what the next one reads


def test_vision_runs_large_images_in_batches_of_max_tiles() -> None:
    spec, cuda = _vision_spec(max_tiles=2), FakeCuda()
    context = FakeContext(cuda)
    vision = trt_backend.TrtVision(FakeEngine(spec), context, spec, cuda)
    out = vision.run(np.zeros((5, 3, 14, 14), np.float32))
    assert out.shape == (5, 1, H) and context.runs == 3
    assert context.shapes[names.PIXEL_VALUES] == (1, 3, 14, 14)  # the last batch holds the fifth tile


def test_engine_io_must_match_engines_json() -> None:
    spec = _decoder_spec()
    trt_backend.check_engine_io(FakeEngine(spec), spec, TRT)
    other = replace(spec, inputs=(*spec.inputs[:-1], TensorSpec(spec.inputs[-1].name, "float32", (1,))))
    with pytest.raises(BundleError, match=r"differ from engines\.json"):
        trt_backend.check_engine_io(FakeEngine(spec), other, TRT)


def test_a_full_gpu_is_a_memory_error_the_cli_says_in_one_line() -> None:
    """cudaErrorMemoryAllocation (2) on the cache's allocation: the machine's state (a MemoryError, which the CLI
    prints as one line), not a RuntimeError traceback; other failures stay errors of their own."""
    runtime = SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1), cudaStreamCreate=lambda: (0, 7),
                              cudaMalloc=lambda n: (2, 0), cudaGetErrorString=lambda err: (0, b"out of memory"))
    cuda = trt_backend.Cuda(runtime)
    from click.testing import CliRunner

    from pulse_edge.cli.group import UserErrorGroup
    from pulse_edge.errors import DeviceMemoryError

    with pytest.raises(DeviceMemoryError, match=r"the GPU's memory is full \(cudaMalloc\(1024\): out of memory\)"):
        cuda.malloc(1024)

    @click.group(cls=UserErrorGroup)
    def group() -> None: ...

    @group.command()
    def serve() -> None:
        cuda.malloc(1024)

    runtime.cudaMalloc = lambda n: (2, 0)
    said = CliRunner().invoke(group, ["serve"])
    assert said.exit_code == 2 and said.output.count("\n") == 1 and "build-engines --max-context" in said.output
    assert "--threads" not in said.output  # the host's advice (RAM, threads) is not a full GPU's
    runtime.cudaMalloc = lambda n: (700, 0)  # cudaErrorIllegalAddress: a fault to report, one line, exit 3
    runtime.cudaGetErrorString = lambda err: (0, b"an illegal memory access was encountered")
    said = CliRunner().invoke(group, ["serve"])
    assert said.exit_code == 3 and said.output.splitlines() == [
        "pulse-edge: error: CUDA's cudaMalloc(1024) failed (an illegal memory access was encountered); the engines "
        "passed their load checks, so this is a fault in pulse-edge, TensorRT or the driver: please report it with "
        "`pulse-edge --version`, the GPU and the engines' engines.json"]


def test_no_gpu_is_one_line() -> None:
    def error_string(err: int) -> tuple[int, bytes]:
        return 0, b"CUDA driver version is insufficient for CUDA runtime version"

    runtime = SimpleNamespace(cudaGetDeviceCount=lambda: (35, 0), cudaGetErrorString=error_string)
    with pytest.raises(ConfigError, match=r"no CUDA GPU is usable here \(CUDA driver version is insufficient"):
        trt_backend.Cuda(runtime)
    # a GPU another process holds in exclusive mode fails at the first context, before any engine: not a fault
    busy = SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1), cudaStreamCreate=lambda: (46, 0),
                           cudaGetErrorString=lambda err: (0, b"CUDA-capable device(s) is/are busy or unavailable"))
    with pytest.raises(ConfigError, match=r"^the GPU cannot be used \(CUDA-capable device\(s\) is/are busy or "
                                          r"unavailable\): another process may hold it in exclusive mode"):
        trt_backend.Cuda(busy)


def test_a_load_that_fails_partway_frees_the_device_buffers_it_made(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision runner's buffers are made before the decoder's engine is refused (here: its context, a full
    GPU): they are freed, and buffers made before the load are not touched."""
    from pulse_edge.errors import DeviceMemoryError

    freed: list[int] = []
    runtime = SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1), cudaStreamCreate=lambda: (0, 7),
                              cudaMalloc=lambda n: (0, 4096 * (len(cuda.owned) + 1)),
                              cudaMemsetAsync=lambda *a: 0, cudaFree=lambda ptr: freed.append(ptr) or 0)
    cuda = trt_backend.Cuda(runtime)
    earlier = cuda.malloc(16)  # the caller's, from before this load
    specs = {names.VISION: _vision_spec(), names.DECODER: _decoder_spec()}
    engines = SimpleNamespace(engines={role: replace(spec, file=f"{role}.engine") for role, spec in specs.items()})
    monkeypatch.setattr(trt_backend, "_deserialize", lambda trt, runtime, path, log: FakeEngine(specs[path.stem]))
    monkeypatch.setattr(trt_backend, "check_engine_io", lambda engine, spec, trt: None)

    def context(engine: FakeEngine, path: Path, log: object) -> FakeContext:
        if path.stem == names.DECODER:
            raise DeviceMemoryError("the GPU cannot hold the scratch memory of decoder.engine")
        return FakeContext(FakeCuda())

    monkeypatch.setattr(trt_backend, "_context", context)
    trt = SimpleNamespace(logger=lambda log: None, module=SimpleNamespace(Runtime=lambda logger: None))
    manifest = SimpleNamespace(text=SimpleNamespace(vocab_size=V))
    with pytest.raises(DeviceMemoryError):
        trt_backend._runners(trt, tmp_path, engines, manifest, cuda)
    assert len(freed) == 2 and earlier not in freed and cuda.owned == [earlier]  # the vision runner's two buffers


def _engine_set(bundle: Path, directory: Path) -> EngineSet:
    directory.mkdir()
    specs = {}
    for role, spec in ((names.VISION, _vision_spec()), (names.DECODER, _decoder_spec())):
        (directory / spec.file).write_bytes(b"plan")
        record = file_record(directory / spec.file)
        specs[role] = replace(spec, size=record.size, sha256=record.sha256, sampled_sha256=record.sampled_sha256)
    engines = EngineSet(target="rtx", tensorrt="tensorrt_rtx", tensorrt_version="1.7.1.116",
                        compute_capabilities=("8.6",), max_context=LENGTH, max_tiles=2,
                        bundle_manifest_sha256=manifest_sha256(bundle), engines=specs)
    engines.write(directory)
    return engines


def test_engines_json_round_trips_and_refuses_stale_or_truncated_engines(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / names.MANIFEST_FILE).write_text("{}")
    written = _engine_set(bundle, bundle / "engines-rtx")
    assert read_engines(bundle / "engines-rtx", bundle) == written
    assert find_engine_dir(bundle) == bundle / "engines-rtx"
    (bundle / "engines-rtx" / "decoder.engine").write_bytes(b"pl")
    with pytest.raises(BundleError, match="incomplete"):
        read_engines(bundle / "engines-rtx", bundle)
    (bundle / names.MANIFEST_FILE).write_text('{"re-exported": 1}')
    with pytest.raises(BundleError, match="built from another bundle"):
        read_engines(bundle / "engines-rtx", bundle)
    _engine_set(bundle, bundle / "engines-jetson")
    with pytest.raises(BundleError, match="several engine directories"):
        find_engine_dir(bundle)
    bad = json.loads((bundle / "engines-rtx" / ENGINES_FILE).read_text()) | {"version": 99}
    (bundle / "engines-rtx" / ENGINES_FILE).write_text(json.dumps(bad))
    with pytest.raises(BundleError, match="rebuild the engines"):
        read_engines(bundle / "engines-rtx", bundle)


def test_a_damaged_engine_or_an_edited_engines_json_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Sizes alone let a flipped bit in a plan (it carries no checksum of its weights) and an edited profile or
    alias through: version 2 records and seals them."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / names.MANIFEST_FILE).write_text("{}")
    directory = bundle / "engines-rtx"
    _engine_set(bundle, directory)
    read_engines(directory, bundle)  # hashed whole and stamped
    (directory / "decoder.engine").write_bytes(b"plAn")  # same size
    with pytest.raises(BundleError, match=r"decoder\.engine is not the file build-engines wrote"):
        read_engines(directory, bundle)
    (directory / "decoder.engine").write_bytes(b"plan")
    listing = directory / ENGINES_FILE
    data = json.loads(listing.read_text())
    data["engines"]["decoder"]["kv_aliases"] = {"present.0.key": "past.1.key"}
    listing.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="was changed after build-engines wrote it"):
        read_engines(directory, bundle)
    old = {k: v for k, v in data.items() if k != "engines_sha256"} | {"version": 1}  # before checksums
    listing.write_text(json.dumps(old))
    with caplog.at_level("WARNING"):
        assert read_engines(directory, bundle).engines["decoder"].kv_aliases == {"present.0.key": "past.1.key"}
    assert "version 1: its engines are checked by size only" in caplog.text
    with pytest.raises(BundleError, match="is version 1 and records no checksums of its engines to verify"):
        read_engines(directory, bundle, verify=True)  # `verify` saying "match" must mean they were hashed


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: [d], "it is not an engine set"),
    (lambda d: {**d, "engines": []}, "it is not an engine set"),
    (lambda d: {**d, "engines": {"decoder": d["engines"]["decoder"]}}, "has no vision engine"),
    (lambda d: {**d, "engines": {**d["engines"], "vision": {**d["engines"]["vision"], "file": "../x.engine"}}},
     "engine file '../x.engine' is not a file name inside"),
    (lambda d: {**d, "engines": {**d["engines"], "vision": {**d["engines"]["vision"], "file": "/etc/x.engine"}}},
     "engine file '/etc/x.engine' is not a file name inside"),
], ids=["a list", "engines a list", "no vision engine", "a file up a folder", "an absolute file"])
def test_a_malformed_engines_json_is_one_line(tmp_path: Path, edit, expected: str) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / names.MANIFEST_FILE).write_text("{}")
    _engine_set(bundle, bundle / "engines-rtx")
    path = bundle / "engines-rtx" / ENGINES_FILE
    edited = edit(json.loads(path.read_text()))
    if isinstance(edited, dict):  # sealed again, as a builder that wrote it so would: the checks behind the seal
        edited[ENGINES_SEAL] = canonical_digest(edited, ENGINES_SEAL)
    path.write_text(json.dumps(edited))
    with pytest.raises(BundleError, match=re.escape(expected)):
        read_engines(bundle / "engines-rtx", bundle)


def test_a_bundle_without_engines_is_refused_by_the_trt_backend(tmp_path: Path, tiny_bundle: Path) -> None:
    with pytest.raises(BundleError, match="has no TensorRT engines"):
        find_engine_dir(tmp_path)
    # an ONNX Runtime bundle: not "build its engines", which build-engines then refuses
    with pytest.raises(BundleError, match="was exported for ONNX Runtime, which has no TensorRT engines: serve it "
                                          "with --backend ort, or export the checkpoint with --target tensorrt"):
        trt_backend.open_trt_engine(tiny_bundle, read_manifest(tiny_bundle))


def test_closing_frees_the_engines_device_buffers_and_stream() -> None:
    """BundleEngine.close -> release: a Cuda made by open_trt_engine is closed whole; on a caller's Cuda exactly the
    engine's own buffers are freed (another engine's on it, made later, stay)."""
    freed, destroyed = [], []
    runtime = SimpleNamespace(cudaGetDeviceCount=lambda: (0, 1), cudaStreamCreate=lambda: (0, 7),
                              cudaMalloc=lambda n: (0, 4096 * (len(cuda.owned) + 1)), cudaMemsetAsync=lambda *a: 0,
                              cudaFree=lambda ptr: freed.append(ptr) or 0,
                              cudaStreamDestroy=lambda stream: destroyed.append(stream) or 0)
    cuda = trt_backend.Cuda(runtime)
    earlier = cuda.malloc(16)
    engine_a = [cuda.malloc(16) for _ in range(2)]
    engine_b = [cuda.malloc(16) for _ in range(2)]  # opened on the same Cuda after A
    trt_backend.engine_release(cuda, engine_a, own=False)()  # A closes
    assert freed == engine_a[::-1] and cuda.owned == [earlier, *engine_b] and destroyed == []
    trt_backend.engine_release(cuda, engine_a, own=False)()  # nothing twice
    trt_backend.engine_release(cuda, [], own=True)()  # an engine that made its Cuda closes it whole
    trt_backend.engine_release(cuda, [], own=True)()
    assert freed == [*engine_a[::-1], *engine_b[::-1], earlier] and destroyed == [7] and cuda.owned == []


def test_verify_checks_the_engine_sets_inside_a_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from click.testing import CliRunner

    from pulse_edge.cli.main import main

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    _engine_set(bundle, bundle / "engines-rtx")
    ok = CliRunner().invoke(main, ["verify", str(bundle)])
    assert ok.exit_code == 0 and "engines-rtx: its engines match engines.json" in ok.stdout, ok.output
    (bundle / "engines-rtx" / "vision.engine").write_bytes(b"PLAN")
    damaged = CliRunner().invoke(main, ["verify", str(bundle)])
    assert damaged.exit_code == 2 and "vision.engine is not the file build-engines wrote" in damaged.stderr
    (bundle / "engines-rtx" / "engines.json").unlink()  # the index lost, the engines left: "ok" was printed
    incomplete = CliRunner().invoke(main, ["verify", str(bundle)])
    assert incomplete.exit_code == 2 and "holds TensorRT engines but no engines.json" in incomplete.stderr
