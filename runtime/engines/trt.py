"""TensorRT engines behind `BundleEngine`: the `trt` backend (lean: no torch; cuda-bindings for device memory).

    engines.json (runtime/bundle/engines.py) ─ Runtime.deserialize_cuda_engine ─ IO checked against it
    device buffers, allocated once:
      vision   pixel_values [max_tiles, 3, T, T] f32 -> image_features [max_tiles, P, H] f32 (images with more
               tiles run in batches)
      decoder  inputs_embeds [1, max_context, H] f32, position_ids, write_index, attention_mask, logits [1, 1, V];
               the KV cache [1, KVN, max_context, D] fp16 per layer and part, bound as both `past` and `present`
               (TensorRT's KV-cache layer writes in place); an engine that does not alias them gets a second
               buffer per tensor, swapped after every run
    per run: profile ("decode" for 1-2 positions, else "prefill"), set_input_shape, host-to-device copies,
             execute_async_v3, the logits back, synchronize

The feeding (embedding lookup, image splice, prefill chunks), generation loop and sampling are BundleEngine's
and runtime/generation's, shared with the `ort` backend. The bookkeeping (which profile, which shapes, which
buffer) is plain Python over the engine's and CUDA's interfaces, so it is tested here with stand-ins; running
the engines needs an NVIDIA GPU and was not done on the machines pulse-edge is developed on.
"""

from __future__ import annotations

import mmap
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pulse_edge.errors import ConfigError, DeviceMemoryError, EngineRunError
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.engines import EngineSet, EngineSpec, find_engine_dir, read_engines
from pulse_edge.runtime.bundle.integrity import HashProgress
from pulse_edge.runtime.bundle.manifest import BundleError, Manifest
from pulse_edge.runtime.engines.bundle_engine import (
    AUTO_CHUNK,
    BundleEngine,
    check_servable,
    positions_to_run,
    resolve_chunk,
)
from pulse_edge.runtime.engines.tensorrt_api import TensorRT, load_module

NP_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "int8": np.int8,
             "uint8": np.uint8, "bool": np.bool_}
INPUT_MODE, OUTPUT_MODE = "INPUT", "OUTPUT"
# build-engines refuses a non-empty output folder: the old engines go first
REBUILD = "delete {directory} and rebuild the engines with pulse-edge build-engines on this machine"


# ----------------------------------------------------------------------------- CUDA through cuda-bindings


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime  # cuda-bindings >= 12.6 (cuda-python's runtime module)
    except ImportError:
        try:
            from cuda import cudart as runtime  # older cuda-python
        except ImportError as e:
            raise ConfigError("the trt backend needs cuda-bindings for device memory: pip install "
                              "'pulse-edge[rtx]' (or cuda-bindings matching your CUDA, e.g. on a Jetson)") from e
    return runtime


CUDA_OUT_OF_MEMORY = 2  # cudaErrorMemoryAllocation (CUDA runtime API)
MEMORY_WORDS = ("memory", "alloc")  # in TensorRT's log when a context's scratch memory was refused


class Cuda:
    """The few CUDA runtime calls the backend makes; each failure becomes one line."""

    def __init__(self, runtime: Any | None = None) -> None:
        self.rt = runtime or _cudart()
        err, count = self.rt.cudaGetDeviceCount()
        if int(err) != 0 or count == 0:
            raise ConfigError(f"no CUDA GPU is usable here ({self._message(err)}): the trt backend needs an NVIDIA "
                              "GPU with a driver for this CUDA; use --backend ort")
        self.owned: list[int] = []  # device buffers from malloc, in order (free_from releases a failed load's)
        err, stream = self.rt.cudaStreamCreate()  # the first call that makes a CUDA context on the GPU
        if int(err) not in (0, CUDA_OUT_OF_MEMORY):  # before any engine: the GPU's state or the driver, not a fault
            raise ConfigError(f"the GPU cannot be used ({self._message(err)}): another process may hold it in "
                              "exclusive mode, or the driver does not match this CUDA; use --backend ort")
        self.stream = self._check((err, stream), "cudaStreamCreate")

    def _message(self, err: Any) -> str:
        return self.rt.cudaGetErrorString(err)[1].decode(errors="replace") if int(err) else "no device"

    def _check(self, result: Any, call: str) -> Any:
        err, *values = result if isinstance(result, tuple) else (result,)
        if int(err) == CUDA_OUT_OF_MEMORY:  # the machine's state, not a bug: one line (pulse_edge/cli/group.py)
            raise DeviceMemoryError(f"the GPU's memory is full ({call}: {self._message(err)}); build the engines for a "
                              "shorter context (build-engines --max-context) or free the GPU")
        if int(err) != 0:  # an illegal address, a launch failure: the engines passed their checks, a fault to report
            raise EngineRunError(f"CUDA's {call} failed ({self._message(err)}); the engines passed their load checks, "
                                 "so this is a fault in pulse-edge, TensorRT or the driver: please report it with "
                                 "`pulse-edge --version`, the GPU and the engines' engines.json")
        return values[0] if len(values) == 1 else values

    def malloc(self, nbytes: int) -> int:
        ptr = int(self._check(self.rt.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes})"))
        self.owned.append(ptr)
        self._check(self.rt.cudaMemsetAsync(ptr, 0, max(nbytes, 1), self.stream), "cudaMemsetAsync")
        return ptr

    def close(self) -> None:
        """Free every buffer and the stream (BundleEngine.close); CUDA's errors are not raised: nothing could
        act on them, and the process's end frees the rest."""
        self.free_from(0)
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None

    def free_from(self, mark: int) -> None:
        """Free every buffer allocated since len(owned) was `mark`, newest first; on a failing path, so CUDA's own
        errors here are not raised over the failure being reported."""
        self.free_buffers(self.owned[mark:])

    def free_buffers(self, ptrs: Sequence[int]) -> None:
        """Free these buffers of ours, newest first, best effort (as free_from)."""
        for ptr in reversed(ptrs):
            if ptr in self.owned:
                self.owned.remove(ptr)
                self.rt.cudaFree(ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self.rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, self.stream), "upload")

    def download(self, array: np.ndarray, ptr: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self.rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, self.stream), "download")

    def synchronize(self) -> None:
        self._check(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def device(self) -> dict[str, Any]:
        """Name, compute capability and the memory bandwidth bound (clock x bus width x 2, DDR) of device 0."""
        props = self._check(self.rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        attr = self.rt.cudaDeviceAttr
        clock_khz = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrMemoryClockRate, 0), "clock")
        bus_bits = self._check(self.rt.cudaDeviceGetAttribute(attr.cudaDevAttrGlobalMemoryBusWidth, 0), "bus")
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return {"name": name, "compute_capability": f"{props.major}.{props.minor}",
                "memory_bytes": int(props.totalGlobalMem),
                "peak_bandwidth_bytes_s": 2.0 * clock_khz * 1e3 * bus_bits / 8}


@dataclass
class DeviceTensor:
    """A device buffer for one tensor at its largest shape."""

    ptr: int
    shape: tuple[int, ...]
    dtype: type

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def allocate(cuda: Cuda, shape: tuple[int, ...], dtype: type) -> DeviceTensor:
    return DeviceTensor(cuda.malloc(int(np.prod(shape)) * np.dtype(dtype).itemsize), tuple(shape), dtype)


# ----------------------------------------------------------------------------- the engine's interface, checked


def check_engine_io(engine: Any, spec: EngineSpec, trt: TensorRT) -> None:
    """The deserialized engine must have exactly the IO engines.json records (names, directions, dtypes)."""
    found = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        mode = str(engine.get_tensor_mode(name)).rsplit(".", 1)[-1]
        found[name] = (mode, trt.dtype_name(engine.get_tensor_dtype(name)))
    want = {t.name: (INPUT_MODE, t.dtype) for t in spec.inputs} | {t.name: (OUTPUT_MODE, t.dtype) for t in spec.outputs}
    if found != want:
        raise BundleError(f"{spec.file}'s tensors {sorted(found.items())} differ from engines.json's "
                          f"{sorted(want.items())}; rebuild the engines")
    if engine.num_optimization_profiles != len(spec.profiles):
        raise BundleError(f"{spec.file} has {engine.num_optimization_profiles} profiles, engines.json "
                          f"{len(spec.profiles)}; rebuild the engines")


def aliased_cache(engine: Any, aliases: Mapping[str, str]) -> bool:
    """Whether every `present` output is written into its `past` input's memory (TensorRT's KV-cache layer)."""
    probe = getattr(engine, "get_aliased_input_tensor", None)
    return probe is not None and all(probe(present) == past for present, past in aliases.items())


@dataclass(frozen=True)
class DecoderPlan:
    """Which profile and input shapes a run of S positions after L held ones needs (GPU-free bookkeeping)."""

    spec: EngineSpec
    max_length: int
    hidden: int

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> DecoderPlan:
        past = spec.tensor(names.past_name(0, "key"))
        return cls(spec=spec, max_length=int(past.shape[2]), hidden=int(spec.tensor(names.INPUTS_EMBEDS).shape[2]))

    @property
    def max_steps(self) -> int:
        return max(p.limits(names.INPUTS_EMBEDS, 1)[1] for p in self.spec.profiles)

    def shapes(self, steps: int, total: int) -> dict[str, tuple[int, ...]]:
        return {names.INPUTS_EMBEDS: (1, steps, self.hidden), names.POSITION_IDS: (1, steps),
                names.ATTENTION_MASK: (1, total)}

    def profile_for(self, steps: int, total: int) -> int:
        """The decode profile when it admits the run (it is tuned for one position), else the first that does."""
        order = sorted(range(len(self.spec.profiles)), key=lambda i: self.spec.profiles[i].name != "decode")
        shapes = self.shapes(steps, total)
        for index in order:
            if self.spec.profiles[index].admits(shapes):
                return index
        raise ValueError(f"no profile of {self.spec.file} takes {steps} positions with {total} held (engine built "
                         f"for at most {self.max_steps} per run and {self.max_length} in all)")

    def check_chunk(self, prefill_chunk: int | None) -> None:
        """None: the whole prompt in one run, which needs engines whose prefill profile spans the context."""
        if prefill_chunk is None and self.max_steps < self.max_length:
            raise ConfigError(f"a prefill in one run needs the decoder engine to take {self.max_length} positions per "
                              f"run; it was built for {self.max_steps} (build-engines --max-chunk): give "
                              f"--prefill-chunk {self.max_steps} or less")
        if prefill_chunk is not None and prefill_chunk > self.max_steps:
            raise ConfigError(f"prefill chunk {prefill_chunk} exceeds the {self.max_steps} positions per run the "
                              "decoder engine was built for (build-engines --max-chunk)")


# ----------------------------------------------------------------------------- runners


class TrtLog:
    """TensorRT's errors, the last few kept: its refusals return None or False and say why only to its logger."""

    KEPT = 3

    def __init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=self.KEPT)

    def __call__(self, severity: str, text: str) -> None:
        if severity in ("ERROR", "INTERNAL_ERROR"):
            self.errors.append(" ".join(text.split()))

    def reason(self) -> str:
        return "; ".join(self.errors) or "TensorRT gave no reason"

    def clear(self) -> None:
        """Before each call whose refusal may quote the log: an earlier one's errors are not its reason."""
        self.errors.clear()


def _set(ok: bool, what: str, log: TrtLog) -> None:
    """TensorRT's setters return False on a refusal and keep the previous setting: a prefill chunk's shape left at
    the last decode step's one position would run 512 positions as one, and the length move on by 512."""
    if not ok:
        raise EngineRunError(f"TensorRT refused to {what} ({log.reason()}); please report it with `pulse-edge "
                             "--version`, the GPU and the engines' engines.json")


def _execute(context: Any, cuda: Cuda, log: TrtLog) -> None:
    log.clear()
    if not context.execute_async_v3(cuda.stream):
        raise EngineRunError(f"TensorRT's execute_async_v3 failed ({log.reason()}); please report it with "
                             "`pulse-edge --version`, the GPU and the engines' engines.json")


class TrtVision:
    """pixel_values [K, 3, T, T] float32 -> image_features [K, P, H] float32, max_tiles tiles per run."""

    def __init__(self, engine: Any, context: Any, spec: EngineSpec, cuda: Cuda, log: TrtLog | None = None) -> None:
        self.context, self.cuda, self.spec, self.log = context, cuda, spec, log or TrtLog()
        index, profile = spec.profile("tiles")
        self.max_tiles = profile.limits(names.PIXEL_VALUES, 0)[1]
        pixels = spec.tensor(names.PIXEL_VALUES).shape
        features = spec.tensor(names.IMAGE_FEATURES).shape
        self.pixels = allocate(cuda, (self.max_tiles, *pixels[1:]), np.float32)
        self.features = allocate(cuda, (self.max_tiles, *features[1:]), np.float32)
        self.log.clear()
        _set(context.set_optimization_profile_async(index, cuda.stream), "select the vision profile", self.log)
        _set(context.set_tensor_address(names.PIXEL_VALUES, self.pixels.ptr), "bind pixel_values", self.log)
        _set(context.set_tensor_address(names.IMAGE_FEATURES, self.features.ptr), "bind image_features", self.log)

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        out = np.empty((pixel_values.shape[0], *self.features.shape[1:]), np.float32)
        for start in range(0, pixel_values.shape[0], self.max_tiles):
            batch = pixel_values[start:start + self.max_tiles]
            self.log.clear()
            _set(self.context.set_input_shape(names.PIXEL_VALUES, batch.shape),
                 f"set pixel_values to {list(batch.shape)}", self.log)
            self.cuda.upload(self.pixels.ptr, batch)
            _execute(self.context, self.cuda, self.log)
            self.cuda.download(out[start:start + len(batch)], self.features.ptr)
        self.cuda.synchronize()
        return out


class TrtDecoder:
    """The decoder engine with its device KV cache: `forward` appends positions and returns the last logits."""

    def __init__(self, engine: Any, context: Any, spec: EngineSpec, cuda: Cuda, vocab: int,
                 log: TrtLog | None = None) -> None:
        self.context, self.cuda, self.spec, self.log = context, cuda, spec, log or TrtLog()
        self.plan = DecoderPlan.from_spec(spec)
        self.length, self.active = 0, -1
        steps, hidden, length = self.plan.max_steps, self.plan.hidden, self.plan.max_length
        self.inputs = {names.INPUTS_EMBEDS: allocate(cuda, (1, steps, hidden), np.float32),
                       names.POSITION_IDS: allocate(cuda, (1, steps), np.int64),
                       names.WRITE_INDEX: allocate(cuda, (1,), np.int64),
                       names.ATTENTION_MASK: allocate(cuda, (1, length), np.int64)}
        self.logits = allocate(cuda, (1, 1, vocab), np.float32)
        self._host_logits = np.zeros((1, 1, vocab), np.float32)
        self.in_place = aliased_cache(engine, spec.kv_aliases)
        self.cache = {past: self._cache_buffers(spec, past) for past in spec.kv_aliases.values()}
        cuda.upload(self.inputs[names.ATTENTION_MASK].ptr, np.ones((1, length), np.int64))  # only its shape is read

    def _cache_buffers(self, spec: EngineSpec, past: str) -> list[DeviceTensor]:
        shape = tuple(int(d) for d in spec.tensor(past).shape)
        return [allocate(self.cuda, shape, np.float16) for _ in range(1 if self.in_place else 2)]

    @property
    def room(self) -> int:
        return self.plan.max_length - self.length

    def reset(self) -> None:
        """A new conversation; positions beyond `length` are never attended to, so nothing is cleared."""
        self.length = 0

    def _bind(self, profile: int, shapes: Mapping[str, tuple[int, ...]]) -> None:
        context, log = self.context, self.log
        log.clear()
        if profile != self.active:
            self.active = -1  # unknown until TensorRT took it
            _set(context.set_optimization_profile_async(profile, self.cuda.stream), f"select profile {profile}", log)
            self.active = profile
        for name, shape in shapes.items():
            _set(context.set_input_shape(name, shape), f"set {name} to {list(shape)}", log)
        addresses = {**{name: tensor.ptr for name, tensor in self.inputs.items()}, names.LOGITS: self.logits.ptr}
        for present, past in self.spec.kv_aliases.items():
            addresses[past], addresses[present] = self.cache[past][0].ptr, self.cache[past][-1].ptr
        for name, pointer in addresses.items():
            _set(context.set_tensor_address(name, pointer), f"bind {name}", log)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        """embeds [1, S, H] float32 at positions [length, length + S) -> logits [V] of the last one."""
        steps = positions_to_run(embeds, self.room, self.plan.max_length)
        start, total = self.length, self.length + steps
        self._bind(self.plan.profile_for(steps, total), self.plan.shapes(steps, total))
        self.cuda.upload(self.inputs[names.INPUTS_EMBEDS].ptr, np.ascontiguousarray(embeds, dtype=np.float32))
        self.cuda.upload(self.inputs[names.POSITION_IDS].ptr, np.arange(start, total, dtype=np.int64)[None])
        self.cuda.upload(self.inputs[names.WRITE_INDEX].ptr, np.array([start], np.int64))
        _execute(self.context, self.cuda, self.log)
        self.cuda.download(self._host_logits, self.logits.ptr)
        self.cuda.synchronize()
        if not self.in_place:  # the present buffers hold the whole cache now: they are the next run's past
            for buffers in self.cache.values():
                buffers.reverse()
        self.length = total
        return self._host_logits[0, -1]


# ----------------------------------------------------------------------------- opening a bundle's engines


def _deserialize(trt: TensorRT, runtime: Any, path: Path, log: TrtLog) -> Any:
    """The engine from its file, mapped rather than read: a host copy of a 7 GB engine beside its device copy would
    not fit a Jetson, whose GPU shares the same memory."""
    if path.stat().st_size == 0:  # nothing to map (mmap refuses an empty file)
        raise ConfigError(f"{path} is empty; {REBUILD.format(directory=path.parent)}")
    log.clear()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        rebuild = REBUILD.format(directory=path.parent)
        raise ConfigError(f"{trt.name} {trt.version} cannot load {path} ({log.reason()}); {rebuild}")
    return engine


def _context(engine: Any, path: Path, log: TrtLog) -> Any:
    """An execution context, whose scratch memory TensorRT allocates for the largest shape the profiles admit."""
    log.clear()
    context = engine.create_execution_context()
    if context is None and log.errors and not any(word in log.reason().lower() for word in MEMORY_WORDS):
        # TensorRT-RTX also compiles its kernels for this GPU here: a failure of that is not the memory's
        raise ConfigError(f"TensorRT cannot create an execution context for {path.name} ({log.reason()}); "
                          f"{REBUILD.format(directory=path.parent)}")
    if context is None:  # its scratch memory for the largest shape the profiles admit, the usual cause
        raise DeviceMemoryError(f"the GPU cannot hold the scratch memory of {path.name} ({log.reason()}); build the "
                                "engines for a shorter context or prefill chunk (build-engines --max-context, "
                                "--max-chunk) or free the GPU")
    return context


def check_build_versions(engines: EngineSet, trt: TensorRT, directory: Path) -> None:
    """An engine loads only in the TensorRT release it was built with, patch level included (TensorRT refuses
    "expecting library version X got Y"; TensorRT-RTX's engines are not compatible between releases): said before
    deserializing, which would only return None."""
    if engines.tensorrt_version != trt.version:
        raise ConfigError(f"the engines in {directory} were built with {engines.tensorrt} {engines.tensorrt_version}, "
                          f"this is {trt.version}; {REBUILD.format(directory=directory)}")


def check_engine_set(engines: EngineSet, manifest: Manifest) -> None:
    if engines.max_context > manifest.kv.max_length:
        raise BundleError(f"engines.json says {engines.max_context} positions, the bundle holds "
                          f"{manifest.kv.max_length}; rebuild the engines")


def _runners(trt: TensorRT, directory: Path, engines: EngineSet, manifest: Manifest,
             cuda: Cuda) -> dict[str, Any]:
    """The vision and decoder runners. A refusal partway (a full GPU, a stale engine) frees the device buffers
    made before it: a caller may retry with smaller engines, and a Jetson's GPU memory is the host's."""
    log = TrtLog()
    logger = trt.logger(log)
    runtime = trt.module.Runtime(logger)
    runners: dict[str, Any] = {}
    mark = len(cuda.owned)
    try:
        for role in (names.VISION, names.DECODER):
            spec = engines.engines[role]
            engine = _deserialize(trt, runtime, directory / spec.file, log)
            check_engine_io(engine, spec, trt)
            context = _context(engine, directory / spec.file, log)
            runners[role] = (TrtVision(engine, context, spec, cuda, log) if role == names.VISION else
                             TrtDecoder(engine, context, spec, cuda, manifest.text.vocab_size, log))
            # contexts need their engine alive; a tuple lets go of its items last first: the engine, then the
            # runtime that made it, then the logger (TensorRT: a factory outlives what it made)
            runners[role]._keep = (logger, runtime, engine)
    except BaseException:
        cuda.free_from(mark)
        raise
    return runners


def open_trt_engine(bundle: Path, manifest: Manifest, *, engines_dir: Path | None = None,
                    prefill_chunk: int | str | None = AUTO_CHUNK, cuda: Cuda | None = None, verify: bool = False,
                    progress: HashProgress | None = None) -> BundleEngine:
    """The bundle's engines (engines_dir, default its one `engines-*` folder) behind BundleEngine; `verify`:
    every byte of the engines hashed too (runtime/bundle/engines.py)."""
    if any(graph.target != "tensorrt" for graph in manifest.graphs.values()):  # build-engines would refuse it too
        raise BundleError(f"{bundle} was exported for ONNX Runtime, which has no TensorRT engines: serve it with "
                          "--backend ort, or export the checkpoint with --target tensorrt and run `pulse-edge "
                          "build-engines` on that bundle")
    check_servable(manifest, prefill_chunk)
    directory = engines_dir or find_engine_dir(bundle)
    engines = read_engines(directory, bundle, verify=verify, progress=progress)
    check_engine_set(engines, manifest)
    plan = DecoderPlan.from_spec(engines.engines[names.DECODER])
    # auto: the runtime's chunk, or the engines' largest run where they were built for less (build-engines
    # --max-chunk); anything asked is checked against it before a byte of the engines is loaded
    prefill_chunk = (min(resolve_chunk(AUTO_CHUNK, prefill_graph=False), plan.max_steps)
                     if prefill_chunk == AUTO_CHUNK else prefill_chunk)
    plan.check_chunk(prefill_chunk)  # type: ignore[arg-type]  # check_servable let only ints and None through
    trt = load_module(engines.tensorrt)
    check_build_versions(engines, trt, directory)
    own = cuda is None
    cuda = cuda or Cuda()
    mark = len(cuda.owned)
    try:
        runners = _runners(trt, directory, engines, manifest, cuda)  # frees its buffers when it fails
    except BaseException:
        if own:  # and the stream made for it
            cuda.close()
        raise
    return BundleEngine(bundle, manifest, runners[names.VISION], runners[names.DECODER], prefill_chunk=prefill_chunk,
                        max_length=runners[names.DECODER].plan.max_length,
                        release=engine_release(cuda, cuda.owned[mark:], own=own))


def engine_release(cuda: Cuda, made: Sequence[int], *, own: bool) -> Callable[[], None]:
    """What BundleEngine.close calls: a Cuda made for this engine is closed whole; on a caller's Cuda, exactly the
    buffers this engine made (another engine's on the same Cuda stay)."""
    return cuda.close if own else partial(cuda.free_buffers, tuple(made))
