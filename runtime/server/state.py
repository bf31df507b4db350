"""What every request handler shares: the settings, the one model, its worker, the metrics."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.generation.decode import StopCheck
from pulse_edge.runtime.server.errors import SHUTTING_DOWN, ApiError
from pulse_edge.runtime.server.metrics import Metrics
from pulse_edge.runtime.server.model import ServedModel
from pulse_edge.runtime.server.worker import ModelWorker, QueueFull, Ticket

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """The settings of `pulse-edge serve` (its defaults live with the command's options)."""

    bundle: Path
    host: str
    port: int
    api_key: str | None
    max_queue: int
    allow_dir: Path | None  # resolved; None: no request may name a file
    max_body_bytes: int
    timeout_s: float
    session: SessionConfig = field(default_factory=SessionConfig)
    quiet: bool = False  # `pulse-edge -q serve`: no line per request, uvicorn's warnings and errors only


@dataclass
class ServerState:
    config: ServerConfig
    model: ServedModel
    worker: ModelWorker
    metrics: Metrics

    @classmethod
    def create(cls, config: ServerConfig, model: ServedModel) -> ServerState:
        metrics = Metrics(waiting=lambda: worker.waiting, busy=lambda: worker.busy)
        worker = ModelWorker(config.max_queue, on_start=metrics.queue_wait.observe)
        return cls(config=config, model=model, worker=worker, metrics=metrics)

    def submit(self, job: Callable[[StopCheck], T]) -> Ticket[T]:
        """Queue a job for the model; a full queue is a 503 whose Retry-After is the recent mean job time."""
        try:
            ticket = self.worker.submit(job)
        except QueueFull:
            if self.worker.closing:  # not busy: gone, once the running answer ends (launch.ClosingServer)
                raise ApiError("unavailable", SHUTTING_DOWN) from None
            wait = max(1, min(600, math.ceil(self.worker.expected_job_s())))
            raise ApiError("queue_full", f"the model is busy ({self.worker.max_queue} requests already waiting); "
                           f"retry in {wait} s", headers={"Retry-After": str(wait)}) from None
        return ticket
