"""Export-time validation: each graph against the torch reference, and greedy generation end to end.

Decoder parity runs at several shapes: prefills from a few tokens to a
2880-image-token prompt, then decode steps at short and long context, feeding
both sides the reference's own greedy tokens so that one early flip cannot
hide later differences. The numbers go into the manifest; a failed check stops
the export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import LlamaForCausalLM

from pulse_edge.calibration.fidelity import first_divergence
from pulse_edge.errors import ModelOutputError
from pulse_edge.export.model.torch_backend import decode_one_token, prefill
from pulse_edge.export.validate.tolerances import TOLERANCES, Tolerance
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.arrays import open_npy
from pulse_edge.runtime.bundle.manifest import EmbeddingSpec, GraphSpec, KVLayout
from pulse_edge.runtime.engines.ort import PREFILL_GRAPH_MIN_POSITIONS, SessionConfig, decoder_engine
from pulse_edge.runtime.kernels.attention import CheckedAttention, TwinAttention


@dataclass(frozen=True)
class ValidationPlan:
    prefill_lengths: tuple[int, ...] = (5, 64, 2950)  # 2950 ~ a 2880-image-token prompt
    decode_steps: int = 4
    greedy_tokens: int = 16
    greedy_runs: int = 4  # (image, question) pairs
    seed: int = 0
    # The bounds each check is judged by; a measurement (benchmarks/studies/parity.py) passes looser ones to
    # record the errors of a graph whatever they are.
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: TOLERANCES)

    @classmethod
    def quick(cls) -> ValidationPlan:
        """For the full 7B on a small CPU: a long fp32 prefill there takes many minutes."""
        return cls(prefill_lengths=(5, 64), decode_steps=2, greedy_tokens=4, greedy_runs=1)


def compare_logits(got: np.ndarray, ref: np.ndarray) -> dict[str, float | bool]:
    got, ref = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    max_abs = float(np.max(np.abs(got - ref)))
    cosine = float(got @ ref / (np.linalg.norm(got) * np.linalg.norm(ref) + 1e-30))
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / float(np.max(np.abs(ref)) + 1e-30),
            "cosine": cosine, "argmax_equal": bool(np.argmax(got) == np.argmax(ref))}


def _passes(stats: dict[str, Any], tol: Tolerance) -> bool:
    return stats["max_rel_err"] <= tol.max_rel_err and stats["cosine"] >= tol.min_cosine


def _sample_embeds(lm: LlamaForCausalLM, length: int, generator: torch.Generator) -> torch.Tensor:
    """Real token embeddings (random ids) so activations have the scale the model sees."""
    table = lm.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (length,), generator=generator)
    return table[ids].float()[None]  # [1, L, H]


def validate_embedding(lm: LlamaForCausalLM, bundle: Path, spec: EmbeddingSpec, rows_per_read: int = 4096
                       ) -> dict[str, Any]:
    """The bundle's token table as the runtime maps it (runtime/bundle/arrays.py) against the reference's cast to
    the table's dtype, row for row and bit for bit: every graph check feeds torch's own table, so a shifted or
    mis-read table would pass them all and answer from the wrong tokens."""
    table, ref = open_npy(bundle / spec.file), lm.get_input_embeddings().weight
    if table.shape != tuple(ref.shape):
        return {"rows": int(ref.shape[0]), "shape": list(table.shape), "pass": False}
    differing = []
    for start in range(0, table.shape[0], rows_per_read):
        want = ref[start:start + rows_per_read].detach().float().cpu().numpy().astype(table.dtype)
        got = np.asarray(table[start:start + rows_per_read])
        differing += (start + np.flatnonzero(np.any(got.view(np.uint8) != want.view(np.uint8), axis=1))).tolist()
    return {"rows": int(table.shape[0]), "rows_differing": len(differing),
            "first_differing_row": differing[0] if differing else None, "pass": not differing}


def validate_decoder(lm: LlamaForCausalLM, bundle: Path, spec: GraphSpec, kv: KVLayout, *, precision: str,
                     plan: ValidationPlan, session: SessionConfig | None = None,
                     graph: str = names.DECODER) -> dict[str, Any]:
    """Prefill and decode parity of the decoder graph at each planned length, under plan.tolerances[precision].

    `lm` is the reference the graph must match: the fp32 (or bf16) model for a float graph, the model inside
    export/validate/emulate.emulated_reference for a quantized one. The default session does not prepack: the
    weights stay mapped from the file, so the reference and the graph fit side by side (see
    export/build/bundle.validation_session). `graph`: which graph `spec` is; it runs whole, never in segments."""
    engine = decoder_engine(bundle, spec, kv, lm.config.vocab_size, session or SessionConfig(prepack=False),
                            graph=graph)
    return _decoder_cases(lm, engine, plan, plan.tolerances[precision])


def validate_segmented_decode(lm: LlamaForCausalLM, bundle: Path, spec: GraphSpec, kv: KVLayout, *, precision: str,
                              plan: ValidationPlan, session: SessionConfig) -> dict[str, Any]:
    """The decode graph's segments with the decode kernel (runtime/engines/segmented.py) against `lm`, the
    reference computing the decode graph's recipe with each input attending to its own keys and values as stored
    (+-127, the kernel's reading), at the planned lengths as validate_decoder checks the whole graph: the
    segments run every input here, the prefill included (no prefill graph is opened). The kernel computes in
    float32, so it is held to the graph's own bound; "kernel_call_rel_err" is its worst call against its float32
    twin on the same inputs."""
    engine = decoder_engine(bundle, spec, kv, lm.config.vocab_size, replace(session, decode_attention="kernel"))
    if engine.decode_segments is None:
        raise RuntimeError("the decoder engine did not open the decode segments: nothing would be validated")
    checked = CheckedAttention(engine.decode_segments.kernel)
    engine.decode_segments.kernel = checked
    report = _decoder_cases(lm, engine, plan, plan.tolerances[precision])
    return {**report, "kernel_call_rel_err": checked.worst}


def validate_native_decode(lm: LlamaForCausalLM, bundle: Path, spec: GraphSpec, kv: KVLayout, *, precision: str,
                           plan: ValidationPlan, session: SessionConfig) -> dict[str, Any]:
    """The native decode step (runtime/engines/native.py) against `lm`, as validate_segmented_decode checks the
    segments: every input through the step (the prefill included), the same reference and bound (the step stores
    as the segments do and computes in float32 what MatMulNBits computes); "kernel_call_rel_err" is the worst
    attention call against its float32 twin."""
    # the step under validation: not yet validated, asked for outright (and not warned about)
    engine = decoder_engine(bundle, spec, kv, lm.config.vocab_size,
                            replace(session, decode_step="native", decode_attention="auto"), native_validated=True)
    if engine.native is None:
        raise RuntimeError("the decoder engine did not open the native decode step: nothing would be validated")
    checked = CheckedAttention(engine.native.kernels.attention)
    engine.native.kernels = replace(engine.native.kernels, attention=checked)
    report = _decoder_cases(lm, engine, plan, plan.tolerances[precision])
    return {**report, "kernel_call_rel_err": checked.worst}


# Planned lengths up to this are also prefilled in two chunks, the second at a nonzero position, as the runtime
# sends a long prompt (in 512- or 2048-position chunks) and a chat's follow-up: a graph that stores or attends
# wrongly only there would pass the one-pass cases. Any length shows such a fault; short ones cost little.
CHUNKED_MAX_POSITIONS = 512


def _decoder_cases(lm: LlamaForCausalLM, engine: Any, plan: ValidationPlan, tol: Tolerance) -> dict[str, Any]:
    """Each planned prefill length that leaves room for the decode steps: the prefill's logits and each greedy
    step's against the reference's; up to CHUNKED_MAX_POSITIONS, the same prefill in two chunks then the first
    step too ("chunked")."""
    generator = torch.Generator().manual_seed(plan.seed)
    table = lm.get_input_embeddings().weight
    cases, skipped = [], []
    for length in plan.prefill_lengths:
        if length + plan.decode_steps >= engine.kv.max_length:
            # recorded, not dropped: a report listing only the lengths that ran reads as if all had
            skipped.append({"prefill_length": length, "why": f"{length} positions and {plan.decode_steps} decode "
                            f"steps do not fit the cache's {engine.kv.max_length}"})
            continue
        engine.reset()
        embeds = _sample_embeds(lm, length, generator)
        with torch.inference_mode():
            ref, cache = prefill(lm, embeds.to(table.dtype))
            refs, tokens = [ref.float().numpy()], []
            got = engine.forward(embeds.numpy())
            steps = [compare_logits(got, refs[0])]
            for _ in range(plan.decode_steps):
                tokens.append(int(torch.argmax(ref)))
                ref = decode_one_token(lm, tokens[-1], cache)
                refs.append(ref.float().numpy())
                got = engine.forward(table[tokens[-1]].float().numpy()[None, None])
                steps.append(compare_logits(got, refs[-1]))
            case = {"prefill_length": length, "prefill": steps[0], "decode": steps[1:],
                    "pass": all(_passes(s, tol) for s in steps)}
            if 2 <= length <= CHUNKED_MAX_POSITIONS:
                case["chunked"] = _chunked_case(lm, engine, embeds.to(table.dtype), plan.decode_steps > 0, tol)
                case["pass"] = case["pass"] and case["chunked"]["pass"]
        cases.append(case)
    # no planned length fits the cache: nothing ran, so nothing passed
    return {"tolerance": asdict(tol), "cases": cases, "skipped": skipped,
            "pass": bool(cases) and all(c["pass"] for c in cases)}


def case_runs(case: Mapping[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The runs of one decoder case, each named for a message and with its compared logit rows: in one pass
    (""), then, where checked, in two chunks."""
    runs = [("", [case["prefill"], *case["decode"]])]
    if chunked := case.get("chunked"):
        runs.append((" in two chunks ({}+{})".format(*chunked["chunks"]), [chunked["prefill"], *chunked["decode"]]))
    return runs


def case_checks(case: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every compared logit row of one decoder case (case_runs' rows, in order)."""
    return [row for _, rows in case_runs(case) for row in rows]


def within(stats: Mapping[str, Any], tolerance: Mapping[str, float]) -> bool:
    """`_passes` for a tolerance as the record holds it (asdict of a Tolerance)."""
    return _passes(stats, Tolerance(**tolerance))


def _chunked_case(lm: LlamaForCausalLM, engine: Any, embeds: torch.Tensor, step: bool, tol: Tolerance
                  ) -> dict[str, Any]:
    """The prefill of `embeds` [1, L, H] in two chunks (the second at position L // 2), then (`step`) one decode
    step, on both sides: the reference chunked too, so that a recipe whose cache stores the first chunk rounded
    (an int8 cache) is held to what it computes, not to the one-pass logits."""
    first = embeds.shape[1] // 2
    table = lm.get_input_embeddings().weight
    with torch.inference_mode():
        _, cache = prefill(lm, embeds[:, :first])
        ref, cache = prefill(lm, embeds[:, first:], cache)
        refs = [ref.float().numpy()]
        token = int(torch.argmax(ref))
        if step:
            refs.append(decode_one_token(lm, token, cache).float().numpy())
        engine.reset()
        engine.forward(embeds[:, :first].float().numpy())
        got = [engine.forward(embeds[:, first:].float().numpy()).copy()]  # the engine reuses its logits buffer
        if step:
            got.append(engine.forward(table[token].float().numpy()[None, None]))
    checks = [compare_logits(g, r) for g, r in zip(got, refs, strict=True)]
    return {"chunks": [first, embeds.shape[1] - first], "prefill": checks[0], "decode": checks[1:],
            "pass": all(_passes(c, tol) for c in checks)}


def validate_segmented_prefill(lm: LlamaForCausalLM, bundle: Path, segmented: GraphSpec, kv: KVLayout, *,
                               precision: str, plan: ValidationPlan, session: SessionConfig) -> dict[str, Any]:
    """The prefill graph's segments (runtime/engines/segmented.py) against `lm`, the reference computing the
    prefill's recipe with the chunk attending to its own keys and values as cached (the kernel's reading).

    Each planned length of >= 2 x PREFILL_GRAPH_MIN_POSITIONS positions (that length where the plan has none)
    goes in two chunks (the second attends over the first from the cache), twice: with the kernel's float32
    twin between the segments, which checks the cut itself (to float rounding, as the whole graph is checked),
    and with the kernel (its bf16 q and weights on top). "pass" is the twin's verdict under `precision`'s
    bound (is the cut right?); "kernel_vs_twin" what the kernel's rounding alone moves the logits by, and
    "kernel_call_rel_err" the worst kernel call against the twin on the same inputs (export/build/
    segments.py decides on both)."""
    tol = plan.tolerances[precision]
    # the prefill graph as the engine's main graph too (as its own parity opens it): no decode graph loaded beside
    # the reference, and the segments map the same weights file (shared pages with mapped weights)
    engine = decoder_engine(bundle, segmented, kv, lm.config.vocab_size, session, prefill=segmented,
                            graph=names.PREFILL)
    if engine.segmented is None:
        raise RuntimeError("the decoder engine did not open the prefill segments: nothing would be validated")
    served = engine.segmented.kernel
    checked = CheckedAttention(served)
    attention = {"prefill": checked, "prefill_twin": TwinAttention()}
    generator = torch.Generator().manual_seed(plan.seed)
    table = lm.get_input_embeddings().weight
    shortest = 2 * PREFILL_GRAPH_MIN_POSITIONS  # two chunks, each long enough for the prefill path
    planned = [n for n in plan.prefill_lengths if shortest <= n < kv.max_length]
    lengths = planned or ([shortest] if shortest < kv.max_length else [])
    cases = []
    for length in lengths:
        embeds = _sample_embeds(lm, length, generator)
        first = length // 2
        with torch.inference_mode():
            ref, _ = prefill(lm, embeds.to(table.dtype))
        case: dict[str, Any] = {"prefill_length": length, "chunks": [first, length - first]}
        logits = {}
        for key, kernel in attention.items():
            engine.segmented.kernel = kernel
            engine.reset()
            engine.forward(embeds[:, :first].numpy())
            logits[key] = engine.forward(embeds[:, first:].numpy()).copy()
            case[key] = compare_logits(logits[key], ref.float().numpy())
        case["kernel_vs_twin"] = compare_logits(logits["prefill"], logits["prefill_twin"])
        case["kernel_call_rel_err"], checked.worst = checked.worst, 0.0  # the worst call against the twin
        case["pass"] = _passes(case["prefill_twin"], tol)
        cases.append(case)
    return {"tolerance": asdict(tol), "cases": cases, "pass": bool(cases) and all(c["pass"] for c in cases),
            "kernel": f"{served.kind.what} (runtime/kernels)"}  # the variant that ran: its rounding was measured


def validate_greedy(reference: Any, candidate: Any, pairs: Sequence[tuple[Any, str]], *,
                    tokens: int, require_equal: bool) -> dict[str, Any]:
    """Greedy generation of the torch reference and of the bundle's runtime on the same (image, question)s."""
    runs = []
    for image, question in pairs:
        ref = reference.generate(image, question, max_new_tokens=tokens).token_ids
        try:
            got, error = candidate.generate(image, question, max_new_tokens=tokens).token_ids, None
        except ModelOutputError as e:  # the bundle computed NaN or inf: failed whatever the precision allows
            got, error = [], str(e)
        same = [x == y for x, y in zip(ref, got, strict=False)] or [ref == got]
        runs.append({"question": question, "tokens": len(ref), "first_divergence": first_divergence(ref, got),
                     "agreement": float(np.mean(same)), "error": error})
    equal = all(r["first_divergence"] is None for r in runs)
    broken = any(r["error"] for r in runs)
    return {"runs": runs, "all_equal": equal, "required_equal": require_equal,
            "pass": not broken and (equal or not require_equal)}
