"""Parity of the vision graph (tower + projector) with the torch reference, on random CLIP-range tiles."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pulse_edge.export.graphs.quant_ops import FP8_MIN_OPSET
from pulse_edge.export.graphs.vision import (
    INPUT_NAME,
    OUTPUT_NAME,
    VisionGraph,
    graph_opset,
    graph_precision,
    has_float8,
)
from pulse_edge.export.model.reference import PulseReference
from pulse_edge.export.validate.tolerances import TOLERANCES, Tolerance
from pulse_edge.runtime.engines.sessions import cpu_precision_entries
from pulse_edge.runtime.image.preprocess import ImageLayout

CPU = ("CPUExecutionProvider",)


def random_pixel_values(tiles: int, layout: ImageLayout, seed: int) -> np.ndarray:
    """CLIP-normalised uniform noise [tiles, 3, T, T]: the value range real tiles have."""
    rng = np.random.default_rng([seed, tiles])
    pixels = rng.random((tiles, 3, layout.tile_size, layout.tile_size), dtype=np.float32)
    mean = np.asarray(layout.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(layout.image_std, dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


def validate_vision_graph(model: PulseReference, onnx_path: Path, *, tile_counts: tuple[int, ...] = (1, 5),
                          seed: int = 0, providers: list[str] | None = None,
                          tolerance: Tolerance | None = None, reference: str | None = None,
                          entries: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Compare the graph in ORT with the torch reference in fp32; pass=False is the caller's to act on.

    The tolerance defaults to the graph's float precision; a quantized graph's caller passes its own and
    runs this inside export/validate/emulate.emulated_reference (`reference` names it in the report).
    `entries`: session config entries the graph's manifest entry demands (runtime/engines/ort.py).
    """
    proto = onnx.load(str(onnx_path), load_external_data=False)
    precision = graph_precision(proto)
    tolerance = tolerance or TOLERANCES[precision]
    forward = _fp32_reference(model)
    options = ort.SessionOptions()
    if graph_opset(proto) >= FP8_MIN_OPSET and has_float8(proto):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see export/graphs/quant_ops.py
    for key, value in {**cpu_precision_entries(), **(entries or {})}.items():  # as the runtime opens it
        options.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(onnx_path), options, providers=list(providers or CPU))
    shapes = []
    for tiles in tile_counts:
        pixels = random_pixel_values(tiles, model.cfg.image, seed)
        with torch.no_grad():
            ref = forward(torch.from_numpy(pixels)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        shapes.append({"tiles": tiles, **compare_features(ref, got, tolerance)})
    source = "vision_features" if model.dtype == torch.float32 else f"fp32 copy of the {model.dtype} weights"
    source = f"{reference} ({source})" if reference else source
    return {"file": Path(onnx_path).name, "precision": precision, "providers": session.get_providers(),
            "reference": source, "tolerance": asdict(tolerance), "shapes": shapes,
            "pass": all(s["pass"] for s in shapes)}


def _fp32_reference(model: PulseReference) -> Callable[[torch.Tensor], torch.Tensor]:
    """`vision_features` itself for an fp32 model. A bf16 model (how a bundle loads a checkpoint too big
    for fp32) gets an fp32 copy of its tower and projector: the graph was exported from those same
    weights, so it is held to its own precision's tolerance, not to bf16 compute's error."""
    if model.dtype == torch.float32:
        return model.vision_features
    return VisionGraph.from_reference(model, torch.float32)


def compare_features(ref: np.ndarray, got: np.ndarray, tolerance: Tolerance) -> dict[str, Any]:
    """Error metrics of `got` against `ref` ([tiles, P, H]) and the verdict under `tolerance`."""
    if got.shape != ref.shape:
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "cosine": -1.0, "pass": False,
                "error": f"shape {list(got.shape)}, expected {list(ref.shape)}"}
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    max_abs = float(np.max(np.abs(got64 - ref64)))
    max_rel = max_abs / max(float(np.max(np.abs(ref64))), np.finfo(np.float64).tiny)
    a, b = ref64.reshape(len(ref64), -1), got64.reshape(len(got64), -1)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = float(np.min(np.sum(a * b, axis=1) / np.maximum(norms, np.finfo(np.float64).tiny)))
    ok = bool(np.isfinite(got64).all()) and max_rel <= tolerance.max_rel_err and cosine >= tolerance.min_cosine
    return {"max_abs_err": max_abs, "max_rel_err": max_rel, "cosine": cosine, "pass": ok}
