"""The fidelity report's held-out samples against the bundle's context (export/validate/held_out.py): a sample whose
image and question do not fit is left out and named, not run into the engine's refusal after the whole export."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from pulse_edge.calibration.calibrate import choose_samples
from pulse_edge.calibration.datasets.synthetic import PRINT_SIZES
from pulse_edge.export.validate import held_out
from pulse_edge.export.validate.held_out import GREEDY_ROOM, HeldOut, held_out_samples, synthetic_held_out
from pulse_edge.runtime.image.preprocess import image_token_count, min_context
from pulse_edge.runtime.text.prompt import spliced_length


def _positions(held: HeldOut) -> list[int]:
    return [spliced_length(p.input_ids, p.image_tokens) for p in held.prepared]


def test_synthetic_held_out_prints_are_drawn_to_fit_the_shortest_context(tiny_pipeline) -> None:
    loaded, tokenizer = tiny_pipeline.loaded, tiny_pipeline.tokenizer
    full = synthetic_held_out(4, loaded, tokenizer, 4096)
    assert len(full.samples) == 4 and not full.left_out
    assert max(p.image_tokens for p in full.prepared) == 2880  # a letter print among them
    shortest = min_context(loaded.config.image)
    short = synthetic_held_out(4, loaded, tokenizer, shortest)
    assert [s.id for s in short.samples] == [s.id for s in full.samples] and not short.left_out  # the same records
    narrow = min(PRINT_SIZES, key=lambda size: image_token_count(size, loaded.config.image))
    assert {(s.synthetic.width_px, s.synthetic.height_px) for s in short.samples} == {narrow}
    assert max(_positions(short)) <= shortest - GREEDY_ROOM


def test_held_out_data_samples_that_do_not_fit_are_left_out_then_replaced(tiny_pipeline, monkeypatch) -> None:
    loaded, tokenizer = tiny_pipeline.loaded, tiny_pipeline.tokenizer
    ctx = SimpleNamespace(scales=SimpleNamespace(samples={"data": "synthetic:8", "ids": []}),
                          settings=SimpleNamespace(held_out=8))
    some = held_out_samples(ctx, loaded, tokenizer, 2400)  # letter prints (2880 tokens) cannot fit, strips can
    assert some.samples and some.left_out and len(some.samples) + len(some.left_out) == 8
    assert "the first question need" in some.left_out[0]["why"] and max(_positions(some)) <= 2400 - GREEDY_ROOM
    assert {p.image_tokens for p in held_out_samples(ctx, loaded, tokenizer, 4096).prepared} >= {2880}

    def letters_only(options, exclude=()):  # data of letter prints only (as ECGInstruct's are)
        drawn = choose_samples(options, exclude=exclude)
        if options.data == "synthetic":
            return drawn
        return [replace(s, synthetic=replace(s.synthetic, width_px=2200, height_px=1700)) for s in drawn]

    monkeypatch.setattr(held_out, "choose_samples", letters_only)
    ctx.settings.held_out = 2
    none = held_out_samples(ctx, loaded, tokenizer, 2400)  # none of the data fits: synthetic ones that do
    assert len(none.samples) == 2 and {p.image_tokens for p in none.prepared} == {1728}
    assert max(_positions(none)) <= 2400 - GREEDY_ROOM


def test_a_context_too_short_for_any_print_is_one_clear_error(tiny_pipeline) -> None:
    from pulse_edge.errors import ConfigError

    with pytest.raises(ConfigError, match=r"no held-out sample fits the 1000-position context .*--max-context"):
        synthetic_held_out(2, tiny_pipeline.loaded, tiny_pipeline.tokenizer, 1000)


def test_held_out_from_synthetic_calibration_in_the_shortest_context(tiny_pipeline) -> None:
    """An export that calibrated on synthetic ECGs draws its held-out ones from the same pool: where none of
    them fits, the synthetic draw on the narrow page (it came back empty, and the report crashed on min())."""
    loaded, tokenizer = tiny_pipeline.loaded, tiny_pipeline.tokenizer
    ctx = SimpleNamespace(scales=SimpleNamespace(samples={"data": "synthetic", "ids": []}),
                          settings=SimpleNamespace(held_out=1))
    shortest = min_context(loaded.config.image)
    held = held_out_samples(ctx, loaded, tokenizer, shortest)
    assert len(held.samples) == 1 and max(_positions(held)) <= shortest - GREEDY_ROOM
