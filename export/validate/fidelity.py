"""The fidelity report of a quantized bundle: each graph against the fp32 torch reference on held-out ECG samples.

    held-out sample ─┬─ vision: torch features vs the bundle's vision graph        cosine, rel err, SQNR
                     ├─ decoder: the same (reference) embeddings into both, prefill the question,
                     │   then teacher-force the sample's answer tokens             cosine, rel err, SQNR, KL
                     │   (the image features are the reference's, so this isolates the decoder)
                     └─ greedy: torch pipeline vs bundle pipeline, end to end      agreement, first divergence
    + size on disk per file

The summary holds the numbers `--accuracy-gate` checks: cosine / rel_err / sqnr_db /
kl of the decoder's logits (mean over steps and samples), vision_cosine, and the
greedy agreement. `recommended_fidelity` compares it with the recipe's recommended
level (export/validate/tolerances.py RECOMMENDED_FIDELITY): below it export warns,
it never refuses (that is --accuracy-gate's job).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pulse_edge.calibration.datasets.calibration_sample import CalibrationSample
from pulse_edge.calibration.fidelity import AccuracyGate, greedy_agreement, logit_kl, tensor_fidelity
from pulse_edge.calibration.samples import PreparedSample
from pulse_edge.export.model.torch_backend import TorchPipeline, decode_one_token, prefill
from pulse_edge.export.validate.tolerances import RECOMMENDED_FIDELITY
from pulse_edge.runtime.bundle.manifest import Manifest
from pulse_edge.runtime.pipeline import Pipeline
from pulse_edge.runtime.text.prompt import Turn, prompt_ids, question_or_default

DECODE_STEPS = 8
GREEDY_TOKENS = 16


def _mean(values: Sequence[float], *, skip_inf: bool = False) -> float:
    """A NaN anywhere makes the mean NaN (so every gate on it fails); `skip_inf` only for SQNR, whose
    +inf means "no error at all" on that step and would otherwise hide the other steps' figures."""
    values = [float(v) for v in values if not (skip_inf and v == float("inf"))]
    return float(np.mean(values)) if values else float("inf")


def vision_fidelity(reference: TorchPipeline, candidate: Pipeline, samples: Sequence[PreparedSample]) -> dict[str, Any]:
    rows = []
    for sample in samples:
        with torch.inference_mode():
            ref = reference.model.vision_features(torch.from_numpy(sample.pixel_values)).float().numpy()
        got = candidate.engine.vision.run(sample.pixel_values)
        rows.append({"id": sample.id, "tiles": int(sample.pixel_values.shape[0]), **tensor_fidelity(got, ref)})
    return {"samples": rows, "cosine": _mean([r["cosine"] for r in rows]),
            "rel_err": _mean([r["rel_err"] for r in rows]),
            "sqnr_db": _mean([r["sqnr_db"] for r in rows], skip_inf=True)}


def _question_length(sample: CalibrationSample, tokenizer: Any) -> int:
    """Ids up to the first answer: the prefill; the answer's ids are then teacher-forced."""
    return len(prompt_ids([Turn(sample.turns[0][0])], tokenizer))


@dataclass(frozen=True)
class Trace:
    """One held-out sample's decoder inputs and the reference's logits: the prefill, then each forced token."""

    id: str
    prefill: np.ndarray  # [1, S, H] float32: the question's embeddings with the reference's image features
    forced: list[int]  # the sample's own next tokens, teacher-forced
    logits: list[np.ndarray]  # [V] per step: after the prefill, then after each forced token


def reference_trace(reference: TorchPipeline, sample: CalibrationSample, prep: PreparedSample,
                    steps: int = DECODE_STEPS) -> Trace:
    model, lm = reference.model, reference.model.language_model
    with torch.inference_mode():
        features = model.merge(model.vision_features(torch.from_numpy(prep.pixel_values)), prep.image_size)
        embeds = model.embed(prep.input_ids, features).float()  # [1, L, H]
        question = _question_length(sample, reference.tokenizer)
        split = question - 1 + prep.image_tokens  # the image slot became image_tokens positions
        forced = list(prep.input_ids[question:question + steps])
        ref, cache = prefill(lm, embeds[:, :split].to(model.dtype))
        logits = [ref.float().numpy().copy()]
        for token in forced:
            logits.append(decode_one_token(lm, token, cache).float().numpy().copy())
    return Trace(sample.id, embeds[:, :split].numpy(), forced, logits)


def compare_trace(trace: Trace, decoder: Any, embed: Callable[[int], np.ndarray]) -> list[dict[str, Any]]:
    """The candidate decoder on the same prefill embeddings; the forced tokens go through `embed(token)`, the
    candidate's own lookup ([H]; a bundle's table may be fp16), as they would when it serves."""
    decoder.reset()
    got = [decoder.forward(trace.prefill).copy()]
    got += [decoder.forward(embed(token)[None, None]).copy() for token in trace.forced]
    return [{"id": trace.id, "step": step, "kl": logit_kl(r[None], g[None]),
             "top1_equal": bool(np.argmax(g) == np.argmax(r)), **tensor_fidelity(g, r)}
            for step, (g, r) in enumerate(zip(got, trace.logits, strict=True))]


def summarise_steps(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    return {"steps": list(rows), "cosine": _mean([r["cosine"] for r in rows]),
            "min_cosine": min(r["cosine"] for r in rows), "rel_err": _mean([r["rel_err"] for r in rows]),
            "sqnr_db": _mean([r["sqnr_db"] for r in rows], skip_inf=True), "kl": _mean([r["kl"] for r in rows]),
            "max_kl": float(np.max([r["kl"] for r in rows])), "top1": _mean([float(r["top1_equal"]) for r in rows])}


def decoder_fidelity(reference: TorchPipeline, candidate: Pipeline, samples: Sequence[CalibrationSample],
                     prepared: Sequence[PreparedSample], *, steps: int = DECODE_STEPS) -> dict[str, Any]:
    engine = candidate.engine
    rows = []
    for sample, prep in zip(samples, prepared, strict=True):
        trace = reference_trace(reference, sample, prep, steps)
        rows += compare_trace(trace, engine.decoder, lambda token: engine.embed([token])[0])
    engine.reset()
    return summarise_steps(rows)


def greedy_fidelity(reference: TorchPipeline, candidate: Pipeline, samples: Sequence[CalibrationSample], *,
                    tokens: int = GREEDY_TOKENS) -> dict[str, Any]:
    runs = []
    for sample in samples:
        # a sample whose prompt is the image alone: any question serves a comparison, and the API refuses a blank one
        image, question = sample.load_image(), question_or_default(sample.turns[0][0])
        ref = reference.generate(image, question, max_new_tokens=tokens).token_ids
        got = candidate.generate(image, question, max_new_tokens=tokens).token_ids
        runs.append({"id": sample.id, **greedy_agreement(ref, got)})
    return {"runs": runs, "agreement": _mean([r["agreement"] for r in runs])}


def disk_sizes(bundle: Path, manifest: Manifest) -> dict[str, int]:
    sizes = {name: int(size) for graph in manifest.graphs.values() for name, size in graph.sizes.items()}
    sizes[manifest.embedding.file] = (bundle / manifest.embedding.file).stat().st_size
    return {**sizes, "total": sum(sizes.values())}


def fidelity_report(reference: TorchPipeline, candidate: Pipeline, samples: Sequence[CalibrationSample],
                    prepared: Sequence[PreparedSample], *, float_bytes: int) -> dict[str, Any]:
    """Everything above for `samples`; `float_bytes` is the fp32 bundle's weight size, for the ratio."""
    vision = vision_fidelity(reference, candidate, prepared)
    decoder = decoder_fidelity(reference, candidate, samples, prepared)
    greedy = greedy_fidelity(reference, candidate, samples)
    sizes = disk_sizes(candidate.bundle, candidate.manifest)
    summary = {"vision_cosine": vision["cosine"], "cosine": decoder["cosine"], "rel_err": decoder["rel_err"],
               "sqnr_db": decoder["sqnr_db"], "kl": decoder["kl"], "agreement": greedy["agreement"],
               "size_ratio": sizes["total"] / max(float_bytes, 1)}
    return {"held_out": [s.id for s in samples], "summary": summary, "vision": vision, "decoder": decoder,
            "greedy": greedy, "sizes": sizes, "float_bytes": float_bytes}


def recommended_fidelity(precision: str, summary: dict[str, Any]) -> dict[str, Any]:
    """{"levels": the recipe's recommended bounds, "below": one line per bound the summary misses}."""
    levels = RECOMMENDED_FIDELITY[precision]
    return {"levels": levels, "below": AccuracyGate.from_string(levels).check(summary)}
