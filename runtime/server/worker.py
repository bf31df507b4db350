"""One model, one generation at a time: a bounded queue in front of a single model thread.

    request --submit--> [ waiting (at most max_queue) ] --> model thread: job(should_stop) --> result
                 `--> QueueFull (503) when max_queue are already waiting behind the running one

A job runs on the one model thread (ONNX Runtime sessions and the KV cache are not shared between
generations); the event loop only waits for it. Each job gets a `should_stop` callable that turns true when
its ticket is cancelled (client gone, deadline passed) or the server is closing; the decode loop asks it
before every step, so a cancelled generation frees the model within one decode step. A job cancelled while
still waiting never starts. The slot is counted free only when the job has really ended.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Generic, TypeVar

from pulse_edge.runtime.generation.decode import StopCheck

T = TypeVar("T")
JOB_TIME_WEIGHT = 0.3  # of the newest job in the moving average of job durations


class QueueFull(Exception):
    """Every slot is taken: one generation running and `max_queue` waiting."""


class Ticket(Generic[T]):
    """A submitted job: await `result`, or `cancel()` it (idempotent, callable from any thread)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._future: Future[T] | None = None
        self.result: asyncio.Future[T] | None = None  # set by ModelWorker.submit
        self.submitted = time.perf_counter()
        self.started: float | None = None  # when the model thread picked it up

    def cancel(self) -> None:
        self._stop.set()
        if self._future is not None:
            self._future.cancel()  # only succeeds while it waits; a running job sees _stop instead

    @property
    def cancelled(self) -> bool:
        return self._stop.is_set()

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        """`fn(future)` once the job has ended, been cancelled before starting, or failed (on any thread)."""
        assert self._future is not None
        self._future.add_done_callback(fn)


def _read_if_stopped(ticket: Ticket, result: asyncio.Future) -> None:
    """A job whose request was stopped (the client left, the deadline passed) ends in GenerationStopped, or its own
    error, with no handler left to await it: read here, or asyncio logs it "never retrieved" with a traceback,
    long after, for a routine 504 or disconnect."""
    if ticket.cancelled and not result.cancelled():
        result.exception()


class ModelWorker:
    """Admits up to 1 + max_queue jobs and runs them one by one, in order, on one thread."""

    def __init__(self, max_queue: int, on_start: Callable[[float], None] | None = None) -> None:
        """on_start: told each job's wait in the queue (seconds) as the model thread picks it up (the metric)."""
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.max_queue = max_queue
        self._on_start = on_start
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pulse-edge-model")
        self._lock = threading.Lock()
        self._admitted = 0  # waiting + running
        self._running = False
        self._closing = threading.Event()
        self._mean_job_s = 1.0  # moving average of how long a job holds the model (a guess until one ran)

    @property
    def waiting(self) -> int:
        with self._lock:
            return self._admitted - int(self._running)

    @property
    def busy(self) -> bool:
        return self._running

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def submit(self, job: Callable[[StopCheck], T]) -> Ticket[T]:
        """Queue `job`; raises QueueFull when every slot is taken. Call from the event loop's thread."""
        with self._lock:
            if self._closing.is_set() or self._admitted > self.max_queue:
                raise QueueFull()
            self._admitted += 1
        stop = threading.Event()
        ticket: Ticket[T] = Ticket(stop)
        should_stop: StopCheck = lambda: stop.is_set() or self._closing.is_set()  # noqa: E731

        def run() -> T:
            ticket.started = time.perf_counter()
            if self._on_start is not None:  # at the start, not when the answer is done: a monitor sees it then
                self._on_start(ticket.started - ticket.submitted)
            with self._lock:
                self._running = True
            try:
                return job(should_stop)
            finally:
                with self._lock:  # not running and not admitted at once: never counted as waiting in between
                    self._running = False
                    self._admitted -= 1
                    took = time.perf_counter() - ticket.started
                    self._mean_job_s += JOB_TIME_WEIGHT * (took - self._mean_job_s)

        ticket._future = self._executor.submit(run)
        ticket.result = asyncio.wrap_future(ticket._future)
        ticket._future.add_done_callback(self._release_unstarted)
        ticket.result.add_done_callback(partial(_read_if_stopped, ticket))
        return ticket

    def expected_job_s(self) -> float:
        """The recent mean time a job holds the model: about when the next slot frees."""
        with self._lock:
            return self._mean_job_s

    def _release_unstarted(self, future: Future) -> None:
        """A job cancelled before it ran (a started one cannot be) frees its slot here; a run frees its own."""
        if future.cancelled():
            with self._lock:
                self._admitted -= 1

    def close(self) -> None:
        """Stop every job at its next decode step and start no waiting one."""
        self._closing.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
