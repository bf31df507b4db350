"""What export validation must catch beyond the one-pass graph checks: a wrong token table, and a graph that is
right in one pass but wrong for a chunk at a nonzero position (how the runtime sends long prompts and follow-ups)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pulse_edge.export.model.torch_backend import TorchPipeline, prefill
from pulse_edge.export.validate.parity import ValidationPlan, _decoder_cases, validate_embedding
from pulse_edge.export.validate.tolerances import TOLERANCES
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import read_manifest


def test_the_bundles_token_table_is_checked_row_for_row(tiny_bundle: Path, tiny_pipeline: TorchPipeline,
                                                         tmp_path: Path) -> None:
    lm, spec = tiny_pipeline.model.language_model, read_manifest(tiny_bundle).embedding
    record = validate_embedding(lm, tiny_bundle, spec, rows_per_read=100)
    assert record == {"rows": spec.shape[0], "rows_differing": 0, "first_differing_row": None, "pass": True}
    assert read_manifest(tiny_bundle).validation["embedding"]["pass"] is True  # recorded by export
    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    table = np.load(bundle / names.EMBEDDING_FILE)
    np.save(bundle / names.EMBEDDING_FILE, np.roll(table, 1, axis=0))  # every id one row off
    shifted = validate_embedding(lm, bundle, spec, rows_per_read=100)
    assert not shifted["pass"] and shifted["rows_differing"] == spec.shape[0] and shifted["first_differing_row"] == 0
    table[777, 3] = np.nextafter(table[777, 3], np.float32(np.inf))  # one value, one ulp
    np.save(bundle / names.EMBEDDING_FILE, table)
    assert validate_embedding(lm, bundle, spec)["first_differing_row"] == 777


class _Reference:
    """The torch model as a decoder engine; `forget_chunks` answers a chunk after the first as if it were the start
    of the prompt (a cache stored at the wrong positions): right in one pass, wrong in two."""

    def __init__(self, lm: torch.nn.Module, forget_chunks: bool) -> None:
        self.lm, self.forget, self.cache = lm, forget_chunks, None
        self.kv = SimpleNamespace(max_length=4096)

    def reset(self) -> None:
        self.cache = None

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            restart = self.cache is None or (self.forget and embeds.shape[1] > 1)
            logits, self.cache = prefill(self.lm, torch.from_numpy(embeds), None if restart else self.cache)
        return logits.float().numpy()


def test_a_graph_wrong_only_for_a_later_chunk_fails_validation(tiny_pipeline: TorchPipeline) -> None:
    lm, tol = tiny_pipeline.model.language_model, TOLERANCES["fp32"]
    plan = ValidationPlan(prefill_lengths=(5, 64, 600), decode_steps=2)
    right = _decoder_cases(lm, _Reference(lm, forget_chunks=False), plan, tol)
    assert right["pass"] and [c["chunked"]["chunks"] for c in right["cases"][:2]] == [[2, 3], [32, 32]]
    assert "chunked" not in right["cases"][2]  # over CHUNKED_MAX_POSITIONS: one pass only
    assert all(len(c["chunked"]["decode"]) == 1 for c in right["cases"][:2])
    wrong = _decoder_cases(lm, _Reference(lm, forget_chunks=True), plan, tol)
    assert not wrong["pass"]
    assert all(c["prefill"]["max_rel_err"] < 1e-5 for c in wrong["cases"])  # the one-pass checks cannot see it
    assert [c["chunked"]["pass"] for c in wrong["cases"][:2]] == [False, False]


class _WrongWhenDecoding(_Reference):
    """Right for every prefill, one pass or chunked; the logits of a single-position run negated (a decode step
    whose cache read or position is wrong)."""

    def forward(self, embeds: np.ndarray) -> np.ndarray:
        logits = super().forward(embeds)
        return -logits if embeds.shape[1] == 1 else logits


def test_a_graph_wrong_only_in_its_decode_steps_fails_validation(tiny_pipeline: TorchPipeline) -> None:
    """Each decode step is judged, after the one-pass prefill and after the chunked one (a verdict on the prefill
    row alone survived the mutation round)."""
    lm, tol = tiny_pipeline.model.language_model, TOLERANCES["fp32"]
    plan = ValidationPlan(prefill_lengths=(5, 600), decode_steps=2)
    wrong = _decoder_cases(lm, _WrongWhenDecoding(lm, forget_chunks=False), plan, tol)
    assert not wrong["pass"] and [c["pass"] for c in wrong["cases"]] == [False, False]
    assert all(c["prefill"]["max_rel_err"] < 1e-5 for c in wrong["cases"])  # every prefill right
    chunked = wrong["cases"][0]["chunked"]
    assert chunked["prefill"]["max_rel_err"] < 1e-5 and not chunked["pass"]  # only its decode step is wrong


def test_the_refusal_names_the_run_that_failed_once(tiny_pipeline: TorchPipeline) -> None:
    from pulse_edge.export.build.bundle import failure_summary

    lm, tol = tiny_pipeline.model.language_model, TOLERANCES["fp32"]
    plan = ValidationPlan(prefill_lengths=(5,), decode_steps=1)
    decoder = _decoder_cases(lm, _Reference(lm, forget_chunks=True), plan, tol)
    validation = {"vision": {}, "decoder": decoder, "greedy": {"runs": [], "required_equal": False}}
    summary = failure_summary(validation)
    assert summary.startswith("decoder after a 5-position prefill in two chunks (2+3): rel err ") and summary.count(
        "decoder after") == 1, summary


def test_a_graph_passes_only_within_both_bounds_and_its_error_is_relative_to_the_reference() -> None:
    from pulse_edge.export.validate.parity import _passes, compare_logits

    tol = TOLERANCES["fp32"]
    assert not _passes({"max_rel_err": 0.0, "cosine": 0.5}, tol)  # pointing elsewhere, however small the error
    assert not _passes({"max_rel_err": 1.0, "cosine": 1.0}, tol)
    assert _passes({"max_rel_err": tol.max_rel_err, "cosine": tol.min_cosine}, tol)
    ref = np.array([1.0, -4.0, 2.0])
    assert compare_logits(2 * ref, ref)["max_rel_err"] == 1.0  # |2r - r| / max|r|: over the reference's scale


class _Greedy:
    def __init__(self, tokens: list[int] | None) -> None:
        self.tokens = tokens

    def generate(self, image: object, question: str, max_new_tokens: int) -> SimpleNamespace:
        from pulse_edge.errors import ModelOutputError

        if self.tokens is None:
            raise ModelOutputError("the decoder's logits are not finite (NaN)")
        return SimpleNamespace(token_ids=self.tokens[:max_new_tokens])


def test_greedy_validation_fails_a_bundle_that_breaks_or_stops_early_whatever_the_precision() -> None:
    from pulse_edge.export.validate.parity import validate_greedy

    ref, pairs = _Greedy([5, 6, 7, 8]), [(None, "Rhythm?")]
    broken = validate_greedy(ref, _Greedy(None), pairs, tokens=4, require_equal=False)
    assert broken["pass"] is False and "not finite" in broken["runs"][0]["error"]  # NaN logits fail int8 too
    early = validate_greedy(ref, _Greedy([5, 6]), pairs, tokens=4, require_equal=True)  # an early end of text
    assert early["runs"][0]["first_divergence"] == 2 and not early["all_equal"] and early["pass"] is False
    assert validate_greedy(ref, _Greedy([5, 6]), pairs, tokens=4, require_equal=False)["pass"] is True
    assert validate_greedy(ref, _Greedy([5, 6, 7, 8]), pairs, tokens=4, require_equal=True)["pass"] is True


def test_a_planned_length_the_cache_cannot_hold_is_recorded_and_none_at_all_fails(tiny_pipeline: TorchPipeline
                                                                                   ) -> None:
    """A length that does not fit is named in the record, not dropped (the record listed only what ran), and a
    validation that ran no length at all does not pass (it passed: all() of nothing)."""
    lm, tol = tiny_pipeline.model.language_model, TOLERANCES["fp32"]
    engine = _Reference(lm, forget_chunks=False)
    engine.kv.max_length = 64
    some = _decoder_cases(lm, engine, ValidationPlan(prefill_lengths=(5, 62, 64), decode_steps=2), tol)
    assert some["pass"] and [c["prefill_length"] for c in some["cases"]] == [5]
    assert [s["prefill_length"] for s in some["skipped"]] == [62, 64] and "cache's 64" in some["skipped"][0]["why"]
    none = _decoder_cases(lm, engine, ValidationPlan(prefill_lengths=(100,), decode_steps=2), tol)
    assert none["cases"] == [] and not none["pass"]


def test_a_step_whose_kl_is_nan_makes_the_recorded_worst_kl_nan() -> None:
    """Python's max() skips a NaN that is not first: the manifest's max_kl read finite over a step with none."""
    import math

    from pulse_edge.export.validate.fidelity import summarise_steps

    row = {"cosine": 1.0, "rel_err": 0.0, "sqnr_db": 60.0, "top1_equal": True}
    summary = summarise_steps([{**row, "kl": 0.01}, {**row, "kl": math.nan}])
    assert math.isnan(summary["max_kl"]) and math.isnan(summary["kl"])
