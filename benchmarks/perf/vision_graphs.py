"""Wall time of vision graphs side by side (plain vs fused, float vs quantized), interleaved per round."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from pulse_edge.benchmarks.perf.backend_runs import round_order
from pulse_edge.export.graphs.vision import INPUT_NAME, OUTPUT_NAME
from pulse_edge.runtime.engines.sessions import cpu_precision_entries

CPU = ("CPUExecutionProvider",)


def time_vision_graphs(paths: Mapping[str, Path], *, tile_counts: Sequence[int] = (1, 5), rounds: int = 5,
                       providers: list[str] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Wall time (ms) of one `session.run`: {name: {tiles: {median, min, max}}} over `rounds`.

    All sessions stay open and every round runs each graph once per tile count, in an
    order that changes per round (backend_runs.round_order), so load from other processes spreads over all graphs
    instead of landing on whichever ran last; the ratios are what carries over to
    other machines, not the absolute times.
    """
    options = ort.SessionOptions()
    for key, value in cpu_precision_entries().items():  # the int8 kernels the runtime uses on this CPU
        options.add_session_config_entry(key, value)
    sessions = [(name, ort.InferenceSession(str(path), options, providers=list(providers or CPU)))
                for name, path in paths.items()]
    size = sessions[0][1].get_inputs()[0].shape[-1]
    inputs = {tiles: np.zeros((tiles, 3, size, size), dtype=np.float32) for tiles in tile_counts}
    for _, session in sessions:
        for pixels in inputs.values():
            session.run([OUTPUT_NAME], {INPUT_NAME: pixels})  # warm-up: allocations, prepacking
    samples: dict[tuple[str, int], list[float]] = {(n, t): [] for n, _ in sessions for t in tile_counts}
    for index in range(rounds):
        for name, session in round_order(sessions, index):
            for tiles in tile_counts:
                start = time.perf_counter()
                session.run([OUTPUT_NAME], {INPUT_NAME: inputs[tiles]})
                samples[(name, tiles)].append((time.perf_counter() - start) * 1e3)
    return {name: {t: {"median": statistics.median(samples[(name, t)]), "min": min(samples[(name, t)]),
                       "max": max(samples[(name, t)])} for t in tile_counts} for name, _ in sessions}
