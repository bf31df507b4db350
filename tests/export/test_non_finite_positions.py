"""A position that goes NaN or inf in the middle of a prompt, over an int8 KV cache, on the tiny model's int8 CPU
bundle: whatever runs the prompt, its logits come out NaN, and the runtime refuses at that chunk.

The int8 cache cannot hold NaN: the graphs' round-and-clip and ORT's own quantizer in GroupQueryAttention write a
finite code for it, so the positions after it would attend to a plausible key and value, and the answer would be
wrong with no error. export/graphs/decoder.py `_poisoned` (the graphs) and runtime/engines/native.py (the native
step) carry a non-finite position into the logits; runtime/engines/bundle_engine.py checks each prefill chunk's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pulse_edge.errors import ModelOutputError
from pulse_edge.runtime.engines.ort import SessionConfig
from pulse_edge.runtime.kernels.attention import DECODE, PREFILL, CausalAttention
from pulse_edge.runtime.kernels.layer_ops import LayerOps
from pulse_edge.runtime.kernels.linear import BlockGemv
from pulse_edge.runtime.pipeline import Pipeline

# who runs a chunk of how many positions, and what the pipeline must say ran it (pipeline.prefilled_by/decoded_by)
RUNNERS = {
    "decode graph": (SessionConfig(prefill_graph="off", decode_step="onnx", decode_attention="graph"), 10,
                     "decoded_by", "decoder graph"),
    "decode graph segments": (SessionConfig(prefill_graph="off", decode_step="onnx"), 10, "decoded_by",
                              "decoder graph segments + decode kernel"),
    "native step": (SessionConfig(decode_step="native"), 10, "decoded_by",
                    "native decode step (block GEMV + decode kernel)"),
    "prefill graph": (SessionConfig(prefill_attention="graph"), 20, "prefilled_by", "prefill graph"),
    "prefill graph segments": (SessionConfig(prefill_attention="kernel"), 20, "prefilled_by",
                               "prefill graph segments"),
}
NEEDS_KERNELS = {"decode graph segments": (lambda: CausalAttention.load(DECODE),),
                 "native step": (BlockGemv.load, lambda: CausalAttention.load(DECODE), LayerOps.load),
                 "prefill graph segments": (lambda: CausalAttention.load(PREFILL),)}


def _embeds(length: int, hidden: int, bad_at: int | None, bad: float = np.nan) -> np.ndarray:
    x = (np.random.default_rng(5).standard_normal((1, length, hidden)) * 0.5).astype(np.float32)
    if bad_at is not None:
        x[0, bad_at] = bad
    return x


@pytest.mark.parametrize("runner", list(RUNNERS))
def test_a_non_finite_position_inside_a_chunk_makes_its_logits_nan(runner: str, cpu_int8_bundle: Path,
                                                                   kernel_or_skip: Callable[..., Any]) -> None:
    for load in NEEDS_KERNELS.get(runner, ()):
        kernel_or_skip(load, f"{runner}: ")
    session, length, who, expected = RUNNERS[runner]
    pipeline = Pipeline.from_bundle(cpu_int8_bundle, session=session)
    assert getattr(pipeline, who).startswith(expected)  # the runner under test is the one that ran
    decoder = pipeline.engine.decoder
    hidden = pipeline.engine.table.shape[1]
    clean = decoder.forward(_embeds(length, hidden, None)).copy()
    assert np.isfinite(clean).all()
    for bad in (np.nan, np.inf):
        pipeline.engine.reset()
        # a middle position, not the last: only the last one's logits are computed, so nothing else would show it
        logits = decoder.forward(_embeds(length, hidden, length // 2, bad))
        assert np.isnan(logits).all(), f"{runner}, {bad}: a non-finite position left the logits finite"


def test_the_prefill_refuses_at_the_chunk_that_held_the_position(cpu_int8_bundle: Path) -> None:
    """The first chunk's NaN logits would be overwritten by the second's, which attend to the int8 codes only."""
    pipeline = Pipeline.from_bundle(cpu_int8_bundle)
    engine = pipeline.engine
    engine.prefill_chunk = 20
    ids = list(range(3, 43))  # 40 plain tokens: two chunks
    real = engine.embed
    engine.embed = lambda tokens: _with_nan(real(tokens), 7)
    with pytest.raises(ModelOutputError, match="logits hold NaN or inf"):
        engine.prefill(ids, None)
    engine.embed = real
    engine.reset()
    assert np.isfinite(engine.prefill(ids, None)).all()


def test_non_finite_image_features_are_named_as_the_vision_graphs(cpu_int8_bundle: Path,
                                                                   ecg_png: Path) -> None:
    pipeline = Pipeline.from_bundle(cpu_int8_bundle)
    vision = pipeline.engine.vision
    real = vision.run
    vision.run = lambda pixels: _with_nan(real(pixels), 0)
    with pytest.raises(ModelOutputError, match="vision graph's output holds NaN"):
        pipeline.interpret(ecg_png, max_new_tokens=2)


def _with_nan(array: np.ndarray, row: int) -> np.ndarray:
    array = np.array(array)
    array[row] = np.nan
    return array
