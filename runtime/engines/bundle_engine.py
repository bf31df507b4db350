"""A bundle's model behind the `Engine` protocol, whatever runs its two graphs.

    image -> preprocess -> vision runner [K, 576, H] -> merge (flat: [K*576, H]; spatial_unpad: + newlines)
          -> table[ids] around the image slot = inputs_embeds [1, L, H]
          -> decoder runner (KV cache in place), in prefill chunks -> logits of the last position

The runners (ONNX Runtime sessions today) only run graphs; the embedding lookup, the image splice, the
merge and the prefill chunking live here, so every engine kind feeds its graphs the same way. The token
embedding table is a .npy file mapped into memory: a lookup reads only the rows it needs, and the 500 MB
table of the 7B model is never copied.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pulse_edge.errors import ConfigError, GenerationStopped, ModelOutputError
from pulse_edge.runtime.bundle.arrays import read_newline
from pulse_edge.runtime.bundle.loaded import LoadedFiles
from pulse_edge.runtime.bundle.manifest import Manifest
from pulse_edge.runtime.generation.sampling import check_logits
from pulse_edge.runtime.image.merge import MERGE_FUNCTIONS, ImageMerge
from pulse_edge.runtime.image.preprocess import Preprocessed
from pulse_edge.runtime.text.prompt import image_slot_index

MERGES_SERVED = tuple(MERGE_FUNCTIONS)  # PULSE's flat, and LLaVA-1.6's spatial_unpad
# Measured on the real-width 2-layer fp32 bundle (2 vCPU EPYC, ORT 1.31 CPU), 2950-position prefill:
# one pass 6.2 s and +1.83 GiB peak; chunks of 512: 5.8 s and +0.37 GiB (attention's
# probabilities are held per chunk). None = one pass.
DEFAULT_PREFILL_CHUNK = 512
# A CPU bundle's prefill graph runs its MatMuls as int8 GEMMs, which go faster with more rows per call, and
# its working memory did not grow. Measured (2-core Xeon VM, ORT 1.32, 2 threads, one process per setting):
# the 7B int8 bundle, 3024 positions: 39.9 / 40.3 s in chunks of 512, 33.8 / 31.5 s in chunks of 2048 (1.22x),
# peak RSS 18.90 vs 18.11 GiB; the real-width 4-layer one, 2950 positions: 1.1-1.2x, +0.17 GiB.
PREFILL_GRAPH_CHUNK = 2048
# Inputs at least this long run on a bundle's prefill graph (when it has one); shorter ones on the decode path.
PREFILL_GRAPH_MIN_POSITIONS = 16
AUTO_CHUNK = "auto"  # the runtime's choice: PREFILL_GRAPH_CHUNK where the prefill graph runs, else the default

# Bundles whose recipe has no fp16 base yet: what a GPU user can do instead.
GPU_FIX = {"fp8": "the fp8 recipe for ONNX Runtime keeps an fp32 base; for a GPU export it with --target tensorrt "
                  "(fp16 base) and serve its engines with --backend trt, or use an fp16 bundle"}


def check_servable(manifest: Manifest, prefill_chunk: int | str | None) -> None:
    """What every engine kind refuses before it loads a graph."""
    if manifest.image.merge not in MERGES_SERVED:
        raise ConfigError(f"this runtime serves the {', '.join(MERGES_SERVED)} merges; the bundle "
                          f"uses {manifest.image.merge!r}")
    if prefill_chunk not in (None, AUTO_CHUNK) and (isinstance(prefill_chunk, bool) or
                                                    not isinstance(prefill_chunk, int) or prefill_chunk < 1):
        raise ConfigError(f"prefill chunk must be >= 1 token, {AUTO_CHUNK!r} or None (one pass), got {prefill_chunk!r}")


def has_prefill_graph(decoder: object) -> bool:
    """Whether a decoder runner prefills long inputs on a CPU bundle's prefill graph (loaded where memory holds
    it, runtime/engines/memory.py), whole or in segments with the attention kernel (runtime/engines/segmented.py);
    TensorRT runners and single-graph bundles have none."""
    return getattr(decoder, "prefill_session", None) is not None or getattr(decoder, "segmented", None) is not None


def resolve_chunk(asked: int | str | None, *, prefill_graph: bool) -> int | None:
    """The prefill chunk to run: `asked`, or for AUTO_CHUNK the one measured best for the graph that prefills."""
    if asked != AUTO_CHUNK:
        return asked  # type: ignore[return-value]  # check_servable let only ints and None through
    return PREFILL_GRAPH_CHUNK if prefill_graph else DEFAULT_PREFILL_CHUNK


class VisionRunner(Protocol):
    def run(self, pixel_values: np.ndarray) -> np.ndarray: ...  # [K, 3, T, T] -> [K, P, H] float32


class DecoderRunner(Protocol):
    """The decoder graph with its own KV cache: `forward` appends positions and returns the last logits."""

    length: int

    def reset(self) -> None: ...

    def forward(self, embeds: np.ndarray) -> np.ndarray: ...  # [1, S, H] float32 -> [V] float32


def positions_to_run(embeds: np.ndarray, room: int, max_length: int) -> int:
    """How many positions `embeds` [1, S, H] appends, checked before anything moves (every DecoderRunner's
    forward): at least one (the caller's slip: no graph or kernel has anything to return for none), at most the
    `room` left in a cache of `max_length`."""
    steps = embeds.shape[1]
    if steps < 1:
        raise ValueError(f"no positions to run: embeds is {embeds.shape}")
    if steps > room:
        raise ValueError(f"{steps} positions do not fit: {room} left of {max_length}")
    return steps


def prefetch(path: Path) -> threading.Thread:
    """Read a file through once in a background thread, so that its pages are in the page cache before
    they are needed; returns the (daemon) thread.

    The embedding table is memory-mapped and each decode step reads one row of it: a row still on disk
    costs a read inside the token loop (measured on the real-width bundle after dropping the page cache:
    2.5-3.0 ms per step, 7.5-9% of the decode loop, against 0.1 ms warm). posix_fadvise(WILLNEED) read
    only the first 8 MB of the 500 MB table here, hence the plain read; vision and prefill take seconds,
    so it is done long before the first decode step."""
    def read_through() -> None:
        buffer = bytearray(8 << 20)
        try:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buffer):
                    pass
        except OSError:  # only a warm-up: the lookups fault the rows in themselves
            return

    thread = threading.Thread(target=read_through, name="pulse-edge-prefetch", daemon=True)
    thread.start()
    return thread


CLOSED = "this pipeline was closed (Pipeline.close); load the bundle again to go on"


class ClosedRunner:
    """What a closed engine holds in place of its runners: any use is one line, not a freed buffer's crash."""

    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        raise ConfigError(CLOSED)

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        raise ConfigError(CLOSED)

    def reset(self) -> None:
        raise ConfigError(CLOSED)

    @property
    def length(self) -> int:
        raise ConfigError(CLOSED)


class EngineLock:
    """The engine's re-entrant lock; a close asked while a thread held it is carried out as the outermost hold
    ends. Close raises its flag and then tries the lock; a holder lets go and then looks at the flag: in either
    order one of them sees both, so a close is never lost (a flag checked while still holding, before the
    closer's try, was: neither side released)."""

    def __init__(self, when_free: Callable[[], None]) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # changed only by the holder
        self._when_free = when_free

    def acquire(self, blocking: bool = True) -> bool:
        got = self._lock.acquire(blocking)
        if got:
            self._depth += 1
        return got

    def release(self) -> None:
        self._depth -= 1
        outermost = self._depth == 0
        self._lock.release()
        if outermost:
            self._when_free()

    def __enter__(self) -> EngineLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BundleEngine:
    """The bundle's two graphs (through their runners) and embedding table behind the `Engine` protocol."""

    def __init__(self, bundle: Path, manifest: Manifest, vision: VisionRunner, decoder: DecoderRunner, *,
                 prefill_chunk: int | str | None = AUTO_CHUNK, max_length: int | None = None,
                 release: Callable[[], None] | None = None) -> None:
        """max_length: the positions the decoder runner's cache holds (default the bundle's; a TensorRT engine
        may be built for fewer). prefill_chunk AUTO_CHUNK: resolve_chunk for the runner's prefilling graph.
        release: frees what the runners hold outside Python's memory (a TensorRT engine's device buffers)."""
        check_servable(manifest, prefill_chunk)
        self.vision, self.decoder = vision, decoder
        self.release, self.closed, self.closing = release, False, False
        self.released = threading.Event()  # set once the memory is gone (close may leave it to a running answer)
        # one computation at a time on the one cache: a conversation holds it for a whole question (its reset and
        # every step), so a second thread's reset could not move the cache under a running answer (Conversation)
        self.lock = EngineLock(self._close_if_asked)
        self.answering = False  # a conversation's question is running (generation/conversation.py)
        prefetch(bundle / manifest.embedding.file)
        self.table = np.load(bundle / manifest.embedding.file, mmap_mode="r")  # [V, H]
        self.files = LoadedFiles(bundle, manifest)  # a write into them after the load: refused, not answered
        self.merge = ImageMerge(manifest.image, read_newline(bundle, manifest))
        self.max_length = manifest.kv.max_length if max_length is None else max_length
        self.epoch = 0
        self.prefill_chunk = resolve_chunk(prefill_chunk, prefill_graph=has_prefill_graph(decoder))
        short = (self.prefill_chunk or PREFILL_GRAPH_MIN_POSITIONS) < PREFILL_GRAPH_MIN_POSITIONS
        if short and has_prefill_graph(decoder):
            # never a quiet detour: the loaded prefill graph (and its attention kernel) would run no chunk at all
            raise ConfigError(f"--prefill-chunk {self.prefill_chunk}: chunks under {PREFILL_GRAPH_MIN_POSITIONS} "
                              "positions never reach this bundle's prefill graph, which then prefills nothing; use "
                              f"{PREFILL_GRAPH_MIN_POSITIONS} or more (auto: {PREFILL_GRAPH_CHUNK}), or "
                              "--prefill-graph off")

    def close(self, wait: float | None = None) -> None:
        """Free the engine's memory now, not when the process ends: ONNX Runtime's sessions and caches (their last
        reference dropped), the embedding table's map and a TensorRT engine's device buffers. Any later use is
        refused in one line; a second close does nothing. While another thread computes an answer, it does not
        wait (that thread's on_text may be waiting on this one): the answer stops at its next step with the
        closed pipeline's one line, and the memory goes as that thread lets the engine go (EngineLock). `wait`:
        seconds to wait for that (a cart loading its next TensorRT bundle needs the GPU memory back first); a
        ConfigError if it has not gone by then."""
        if wait is not None and (isinstance(wait, bool) or not isinstance(wait, int | float) or not wait >= 0):
            raise ConfigError(f"close(wait=...) takes seconds >= 0 (or None: do not wait), got {wait!r}")
        self.closing = True
        self._close_if_asked()
        if wait is not None and not self.released.wait(wait):
            raise ConfigError(f"the answer another thread is computing did not end within {wait:g} s, so this "
                              "pipeline's memory is not free yet (it goes when that answer ends); wait longer, or "
                              "stop the answer (should_stop)")

    def _close_if_asked(self) -> None:
        """Release, if a close was asked and the lock is free now (or this thread's). Run by close() after it
        raises the flag, and by the lock as its outermost holder lets go: whichever looks last sees both."""
        if self.closing and not self.closed and self.lock.acquire(blocking=False):
            try:
                self._release()
            finally:
                self.lock.release()

    def _release(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.vision = self.decoder = ClosedRunner()  # type: ignore[assignment]  # the runners' contexts go first
        self.table = np.empty((0, self.table.shape[1]), self.table.dtype)  # the 500 MB map and its file go
        self.files.close()
        try:
            if self.release is not None:
                self.release()
        finally:
            self.released.set()  # a release that failed said so itself: close(wait=...) must not wait for it

    def check_open(self) -> None:
        if self.closed or self.closing:
            raise ConfigError(CLOSED)

    @property
    def length(self) -> int:
        return self.decoder.length

    def reset(self) -> None:
        self.decoder.reset()
        self.epoch += 1

    def image_features(self, pre: Preprocessed) -> np.ndarray:
        self.check_open()
        self.files.check()
        merged = self.merge(self.vision.run(pre.pixel_values), pre.image_size)  # [K, P, H] -> [T, H]
        # The prompt reserved num_image_tokens positions: any other length would shift the whole cache.
        if merged.shape[0] != pre.num_image_tokens:
            raise RuntimeError(f"the {self.merge.layout.merge} merge produced {merged.shape[0]} image tokens, "
                               f"preprocessing counted {pre.num_image_tokens}")
        if not np.isfinite(merged).all():  # 5 ms for 2880 x 4096; named here, not as the decoder's logits later
            raise ModelOutputError("the vision graph's output holds NaN or inf, so no answer is given: the bundle "
                                   "may be damaged (run `pulse-edge verify MODEL`) or its precision overflowed on "
                                   "this image")
        return merged

    def embed(self, ids: Sequence[int]) -> np.ndarray:
        self.check_open()  # a close asked mid-answer (another thread, or this one's on_text) stops it here
        return np.asarray(self.table[np.asarray(ids, dtype=np.int64)], dtype=np.float32)  # [S, H]

    def prefill(self, ids: Sequence[int], image_features: np.ndarray | None,
                should_stop: Callable[[], bool] | None = None) -> np.ndarray:
        """The prompt's positions into the cache, in chunks; the last position's logits. `should_stop` is asked
        between chunks: a 7B prompt on a CPU takes tens of seconds, which a cancelled request no longer holds."""
        self.files.check()  # before a question reads the table or runs a graph: a model written over answers not
        if image_features is None:
            embeds = self.embed(ids)
        else:
            slot = image_slot_index(ids)
            embeds = np.concatenate([self.embed(ids[:slot]), image_features, self.embed(ids[slot + 1:])])
        chunk = self.prefill_chunk or embeds.shape[0]
        logits = None
        for start in range(0, embeds.shape[0], chunk):
            if should_stop is not None and should_stop():  # before the first chunk too: a stop asked at once
                raise GenerationStopped(f"stopped after {start} of the prompt's {embeds.shape[0]} positions")
            logits = self.decoder.forward(embeds[None, start:start + chunk])
            # an int8 cache hides a non-finite position from later chunks; its graphs make this chunk's logits NaN
            # (export/graphs/decoder.py `_poisoned`), which only this check sees: the next chunk overwrites them
            check_logits(logits)
        return logits.copy()  # the decoder reuses its logits buffer on the next run

    def step(self, token: int) -> np.ndarray:
        return self.decoder.forward(self.embed([token])[None])
