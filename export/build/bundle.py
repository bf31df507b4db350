"""`pulse-edge export`: a checkpoint in, a validated bundle out (docs/architecture.md, the bundle).

    checkpoint ─ load (reference) ─┬─ vision.onnx   (tower + projector)     ─┐
                                   ├─ decoder.onnx  (built from the weights) ├─ validate ─ manifest.json ─ rename
                                   ├─ prefill.onnx  (CPU recipes: int8 GEMMs)│
                                   ├─ embed_tokens.npy                       │
                                   └─ tokenizer.json (from tokenizer.model) ─┘

Everything is written into a hidden temporary directory beside the target and
renamed into place only after validation passed: an interrupted or failed
export leaves nothing half-written under the bundle's name.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pulse_edge import __version__
from pulse_edge.calibration.fidelity import AccuracyGate
from pulse_edge.calibration.recipes import RECIPES, make_recipe
from pulse_edge.choices import EXPORT_PRECISIONS, EXPORT_TARGETS, KV_CACHES, TRT_OPS
from pulse_edge.errors import ConfigError, ModelOutputError, PulseEdgeError
from pulse_edge.export.build import tensorrt as trt_build
from pulse_edge.export.build.memory import (
    FLOAT_BASE,
    check_disk_space,
    check_validation_memory,
    reference_dtype,
    validation_session,
)
from pulse_edge.export.build.native import drop_native_index, index_graph, native_parity
from pulse_edge.export.build.segments import (
    bound_text,
    cut_graph,
    decode_segments_parity,
    drop_segments,
    segments_parity,
)
from pulse_edge.export.build.tensorrt import check_trt_options
from pulse_edge.export.graphs.decoder import FLOAT_PLAN, DecoderShape, LinearPlan, build_decoder
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.graphs.prefill import build_prefill, kv_scales_for, prefill_plan
from pulse_edge.export.graphs.vision import export_vision_graph
from pulse_edge.export.model.checkpoint import LoadedCheckpoint, load_checkpoint
from pulse_edge.export.model.tokenizer_convert import write_tokenizer_json
from pulse_edge.export.quant.context import (
    QuantContext,
    QuantSettings,
    check_gate,
    prepare_quantization,
)
from pulse_edge.export.validate.emulate import emulated_reference
from pulse_edge.export.validate.fidelity import fidelity_report, recommended_fidelity
from pulse_edge.export.validate.held_out import held_out_samples, synthetic_held_out
from pulse_edge.export.validate.kv_caches import fp16_kv_cache
from pulse_edge.export.validate.parity import (
    ValidationPlan,
    case_runs,
    validate_decoder,
    validate_embedding,
    validate_greedy,
    within,
)
from pulse_edge.export.validate.sites import decoder_sites_parity, vision_sites
from pulse_edge.export.validate.tolerances import tolerance_level
from pulse_edge.export.validate.vision import compare_features, validate_vision_graph
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.integrity import bundle_file_records
from pulse_edge.runtime.bundle.manifest import (
    CalibrationSpec,
    EmbeddingSpec,
    FileRecord,
    GraphSpec,
    KVLayout,
    Manifest,
    SourceSpec,
    TextSpec,
    read_manifest,
)
from pulse_edge.runtime.bundle.verified import forget, stamp
from pulse_edge.runtime.engines.ort import SessionConfig, graph_config_entries, session_settings
from pulse_edge.runtime.image.preprocess import PROMPT_MARGIN, image_token_count, min_context
from pulse_edge.runtime.text.tokenizer import Tokenizer
from pulse_edge.staging import staged_directory

log = logging.getLogger(__name__)

GREEDY_PAGES = ((2200, 1700), (1400, 700))  # a letter print (2880 image tokens), a half-page strip (1728)
# Quantized recipes' embedding table is fp16: a lookup reads a few rows, and the 7B table drops from 524 to
# 262 MB (their graphs keep fp32 for what they leave unquantized: export/build/memory.py, FLOAT_BASE).
TABLE_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.float16, "int4": np.float16, "fp8": np.float16}
GREEDY_QUESTIONS = ("What is the rhythm?", "Interpret this ECG.")
# the merge is also checked on a portrait print (a page scanned upright): spatial_unpad trims rows for a wide
# image and columns for a tall one, and the greedy pages are both wide
PORTRAIT_PAGE = (1700, 2200)


class ExportValidationError(PulseEdgeError):
    """An exported graph disagrees with its reference (fp32, or the emulated recipe) beyond its tolerance."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"
    max_context: int | None = None
    vision_tower: Path | None = None
    plan: ValidationPlan = field(default_factory=ValidationPlan)
    quant: QuantSettings | None = None  # int8 / int4 / fp8: the recipe, scales and gate
    reference: torch.dtype | None = None  # the torch reference's dtype; None: fp32 when it fits (reference_dtype)
    target: str = "ort"  # "tensorrt": standard-ONNX fp16 graphs (export/build/tensorrt.py)
    trt_ops: str = "native"  # --target tensorrt: the decoder's form (export/graphs/trt_decoder.py)
    kv_cache: str | None = None  # a float precision's cache: "float" (None) or "fp16"; a quantized one: its recipe's
    held_out: int = 4  # samples of the fidelity report of a float bundle with an fp16 cache
    gate: AccuracyGate | None = None  # a float bundle with an fp16 cache: refused below it (quantized: QuantSettings)

    def __post_init__(self) -> None:
        if self.precision not in EXPORT_PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {', '.join(EXPORT_PRECISIONS)}")
        quantized = self.precision in RECIPES
        if quantized != (self.quant is not None) or (self.quant and self.quant.recipe.name != self.precision):
            raise ConfigError(f"precision {self.precision} needs {'a' if quantized else 'no'} quantization recipe")
        if self.target not in EXPORT_TARGETS or self.trt_ops not in TRT_OPS:
            raise ConfigError(f"target {self.target!r} / trt ops {self.trt_ops!r} are not among "
                              f"{', '.join(EXPORT_TARGETS)} / {', '.join(TRT_OPS)}")
        if self.target == "tensorrt":
            check_trt_options(self.precision, self.quant.recipe.decoder if self.quant else None)
        elif self.trt_ops != "native":
            raise ConfigError("--trt-ops chooses the form of a TensorRT-ready decoder: it goes with --target tensorrt")
        if self.kv_cache not in (None, *KV_CACHES) or (quantized and self.kv_cache is not None):  # int8: below
            raise ConfigError(f"kv cache {self.kv_cache!r}: a float precision's is float or fp16; a quantized "
                              "precision's is its recipe's")
        if self.kv_cache == "int8":
            raise ConfigError("--kv-cache int8 stores keys and values on calibrated per-channel scales: it goes with "
                              "--precision int8 or int4 (an fp32 export can keep an fp16 cache: --kv-cache fp16)")

    @classmethod
    def for_precision(cls, precision: str, **kwargs: Any) -> ExportOptions:
        """Options with the target's default recipe when `precision` is a quantized one."""
        int8_decoder = "w8a8" if kwargs.get("target") == "tensorrt" else "weight-only"
        quant = (QuantSettings(make_recipe(precision, int8_decoder=int8_decoder, target=kwargs.get("target", "ort")))
                 if precision in RECIPES else None)
        return cls(precision=precision, quant=kwargs.pop("quant", quant), **kwargs)

    @property
    def float_base(self) -> str:
        """The float type of what the recipe leaves unquantized."""
        return trt_build.FLOAT_BASE if self.target == "tensorrt" else FLOAT_BASE[self.precision]

    @property
    def cache_type(self) -> str:
        """How the KV cache is stored: KV_CACHES' names."""
        return self.quant.recipe.kv_cache if self.quant else self.kv_cache or "float"

    @property
    def fp16_cache(self) -> bool:
        """An fp16 cache in fp32 graphs (export/graphs/kv_cache.py); elsewhere fp16 is the float cache already."""
        return self.cache_type == "fp16" and self.float_base == "fp32"


def export_bundle(checkpoint: str | Path, out: str | Path, options: ExportOptions | None = None) -> Path:
    """Export, validate, then move the bundle into place; refuses to overwrite a non-empty directory."""
    out = Path(out)
    with staged_directory(out, what="bundle") as work:
        try:
            _export_into(Path(checkpoint), work, options or ExportOptions())
        finally:
            forget(work)  # validation's loads stamped the staging folder: its stamps go before the folder does
    stamp(out, read_manifest(out).files)  # hashed by this export: the first load need not hash it again
    return out


def _export_into(checkpoint: Path, work: Path, options: ExportOptions) -> None:
    log.info("loading the checkpoint %s", checkpoint)
    loaded = load_checkpoint(checkpoint, vision_tower=options.vision_tower,
                             dtype=options.reference or reference_dtype(checkpoint))
    max_context = _max_context(loaded, options.max_context)
    recipe = options.quant.recipe if options.quant else None
    params, prefill_graph = sum(p.numel() for p in loaded.model.parameters()), bool(recipe and recipe.prefill)
    check_validation_memory(loaded, params, max_context, precision=options.precision, kv_cache=options.cache_type,
                            prefill_graph=prefill_graph)
    check_disk_space(work, params, precision=options.precision, prefill_graph=prefill_graph)
    model = loaded.model
    shape = DecoderShape.from_config(loaded.config, max_length=max_context)
    write_tokenizer_json(loaded.tokenizer_model, work / names.TOKENIZER_FILE)
    quant = (prepare_quantization(loaded, Tokenizer.from_file(work / names.TOKENIZER_FILE), options.quant, work)
             if options.quant else None)
    graphs, plan = _write_graphs(loaded, work, options, quant, shape)
    vision = graphs[names.VISION]
    table = model.language_model.get_input_embeddings().weight.detach().float().numpy()
    np.save(work / names.EMBEDDING_FILE, table.astype(TABLE_DTYPES[options.precision]))
    if model.image_newline is not None:  # spatial_unpad: the runtime's merge ends each feature row with it
        np.save(work / names.NEWLINE_FILE, model.image_newline.detach().float().numpy())
    calibration = quant.manifest_entry(plan, vision.matmul_schemes) if quant else None
    log.info("hashing the bundle's files")
    files = bundle_file_records(work)  # before validation, whose candidate runtime checks them
    manifest = _manifest(loaded, options, graphs, max_context, calibration=calibration, files=files)
    manifest.write(work)  # the candidate runtime reads it during validation
    stamp(work, files)  # just hashed: validation's loads check the sample, not every byte again
    validation, fidelity, manifest = _validate(loaded, work, manifest, options, quant, plan)
    if quant and fidelity is not None:
        fidelity = {**fidelity, "recommended": recommended_fidelity(options.precision, fidelity["summary"])}
    elif fidelity is not None:  # a float bundle's smaller cache: its cost beside the parity record
        validation = {**validation, "fidelity": fidelity}
    calibration = quant.manifest_entry(plan, vision.matmul_schemes, fidelity) if quant else None
    replace(manifest, validation=validation, calibration=calibration).write(work)
    if not validation["pass"]:
        raise ExportValidationError(f"the exported graphs disagree with {validation['reference']} beyond the "
                                    f"{validation['tolerance_level']} parity bounds ({failure_summary(validation)}); "
                                    "nothing was written")
    if quant and fidelity is not None:
        check_gate(quant.settings.gate, fidelity)  # a refusal is its own one line: no warning before it
        _warn_below_recommended(options.precision, fidelity["recommended"])
    elif fidelity is not None:
        check_gate(options.gate, fidelity, what="this bundle with an fp16 KV cache",
                   fix="export it with --kv-cache float")


def _write_graphs(loaded: LoadedCheckpoint, work: Path, options: ExportOptions, quant: QuantContext | None,
                  shape: DecoderShape) -> tuple[dict[str, GraphSpec], LinearPlan]:
    """The bundle's graphs by name for the target: ORT's fused forms (with the CPU recipes' prefill graph and
    int8 KV cache), or standard ONNX for TensorRT."""
    log.info("exporting the vision graph (%s, for %s)", options.precision, options.target)
    if options.target == "tensorrt":
        vision = trt_build.write_vision(loaded, work, quant)
        log.info("building the decoder graph (%s, %d layers, %s ops)", options.precision, shape.layers,
                 options.trt_ops)
        decoder, plan = trt_build.write_decoder(loaded, work, shape, quant, label=options.precision,
                                                ops=options.trt_ops)
        return {names.VISION: vision, names.DECODER: decoder}, plan
    model, base = loaded.model, options.float_base
    vision = export_vision_graph(model, work, precision=base)
    if quant:
        vision = quant.quantize_vision(loaded, work, vision)
    log.info("building the decoder graph (%s, %d layers)", options.precision, shape.layers)
    plan = quant.decoder_plan(loaded, shape) if quant else FLOAT_PLAN
    kv = kv_scales_for(quant.recipe, quant.scales, shape, plan) if quant else None
    decoder = build_decoder(model.language_model, shape, work, precision=base, plan=plan, label=options.precision,
                            kv=kv, fp16_cache=options.fp16_cache)
    graphs = {names.VISION: vision, names.DECODER: decoder}
    if quant and quant.recipe.prefill:
        log.info("building the prefill graph (%s decoder layers)", quant.recipe.prefill)
        graphs[names.PREFILL] = build_prefill(model.language_model, shape, work, quant.recipe, plan, kv,
                                              label=options.precision, fp16_cache=options.fp16_cache)
        if kv is not None:
            graphs[names.PREFILL] = cut_graph(work, names.PREFILL, graphs[names.PREFILL], shape)
    if kv is not None:  # the decode steps' attention over the same cache: the decode kernel's
        graphs[names.DECODER] = cut_graph(work, names.DECODER, graphs[names.DECODER], shape)
        if quant:  # and the whole step on pulse-edge's kernels, where its weights are MatMulNBits
            graphs[names.DECODER] = index_graph(work, graphs[names.DECODER])
    return graphs, plan


def _warn_below_recommended(precision: str, recommended: dict[str, Any]) -> None:
    """One loud line when the recipe's fidelity is below its recommended level; the bundle is kept."""
    if recommended["below"]:
        log.warning("warning: this %s bundle's fidelity against fp32 is below the level recommended for %s (%s; "
                    "recommended %s): its answers may depart from the fp32 model's; the report is in "
                    "manifest.json (calibration.fidelity); --accuracy-gate refuses such bundles",
                    precision, precision, "; ".join(recommended["below"]), recommended["levels"])


def failure_summary(validation: dict[str, Any]) -> str:
    """The failed checks with their worst numbers, short enough for one line; a failed site first (it names
    the MatMul or norm that is wrong)."""
    parts = []
    table = validation.get("embedding", {"pass": True})
    if not table["pass"]:
        parts.append(f"the token table: {table.get('rows_differing', 'all')} of {table['rows']} rows differ from the "
                     f"checkpoint's (first: {table.get('first_differing_row')})")
    prefill_sites = (validation["decoder"].get("prefill_graph") or {}).get("sites", {})
    for graph, sites in (("vision", validation.get("sites", {}).get("vision", {})),
                         ("decoder", validation.get("sites", {}).get("decoder", {})), ("prefill graph", prefill_sites)):
        for check in sites.get("checks", []):
            if not check["pass"]:
                parts.append(f"{graph} {check['site']} ({check['run']}) on the graph's own input: rel err "
                             f"{check['max_rel_err']:.2g}, cosine {check['cosine']:.6f}")
    for shape in validation["vision"].get("shapes", []):
        if not shape["pass"]:
            parts.append(f"vision {shape['tiles']} tiles: rel err {shape['max_rel_err']:.2g}, "
                         f"cosine {shape['cosine']:.6f}")
    for merged in validation["vision"].get("merge", []):
        if not merged["pass"]:
            parts.append(f"merged image features of a {merged['image_size'][0]}x{merged['image_size'][1]} print: "
                         f"rel err {merged['max_rel_err']:.2g}")
    native = validation["decoder"].get("native_decode")
    decoders = [("decoder", validation["decoder"]), ("prefill graph", validation["decoder"].get("prefill_graph")),
                ("decode segments with the decode kernel", validation["decoder"].get("decode_segments")),
                ("native decode step", native if native and not native["pass"] else None)]  # else dropped, not refused
    for what, record in decoders:
        for case in record["cases"] if record else []:
            for how, rows in _failed_runs(case, record["tolerance"]):
                worst = max(rows, key=lambda s: s["max_rel_err"])
                parts.append(f"{what} after a {case['prefill_length']}-position prefill{how}: rel err "
                             f"{worst['max_rel_err']:.2g}, cosine {worst['cosine']:.6f} (its bound: "
                             f"{bound_text(record['tolerance'])})")
    decode = validation["decoder"].get("decode_segments")
    segments = validation["decoder"].get("prefill_segments") or {}
    prefill_graph = validation["decoder"].get("prefill_graph")
    for what, record in (("decoder", validation["decoder"]), ("prefill graph", prefill_graph),
                         ("decode segments", decode), ("prefill segments", segments), ("native decode step", native)):
        if record and not record["cases"]:
            parts.append(f"{what}: no prompt length to validate at (the cache holds too few positions)")
    for what, record in (("decode segments", decode), ("native decode step", native)):
        if record and record["kernel_call_rel_err"] > record["kernel_wrong_call_rel_err"]:
            parts.append(f"the CPU decode-attention kernel in the {what}: a call off its float32 twin by "
                         f"{record['kernel_call_rel_err']:.2g} on the same inputs")
    for run in validation["greedy"]["runs"]:
        if run["first_divergence"] is not None and validation["greedy"]["required_equal"]:
            parts.append(f"greedy tokens differ from token {run['first_divergence']}")
    for case in segments.get("cases", []) if not segments.get("pass", True) else []:  # else dropped: _validate
        if not case["pass"]:  # the cut itself
            twin = case["prefill_twin"]
            parts.append(f"prefill segments with the kernel's float32 twin after {case['prefill_length']} positions "
                         f"in two chunks: rel err {twin['max_rel_err']:.2g}, cosine {twin['cosine']:.6f} (wrong "
                         f"below cosine {segments['wrong_cut_cosine']})")
        if case["kernel_call_rel_err"] > segments["kernel_wrong_call_rel_err"]:
            parts.append(f"the CPU attention kernel after {case['prefill_length']} positions: a call off its float32 "
                         f"twin by {case['kernel_call_rel_err']:.2g} on the same inputs, beyond its bf16 rounding")
    return "; ".join(parts[:3]) + (f"; +{len(parts) - 3} more" if len(parts) > 3 else "")


# Fidelity measures a quantized bundle as `pulse-edge infer` serves it: the runtime's default session, which
# prepacks weights. That matters beyond speed: MatMulNBits quantizes activations to int8 blocks (accuracy
# level 4) only on prepacked weights, and computes with float activations without (see
# export/validate/emulate.py). `emulate` lets an fp8 bundle run on the CPU EP.
FIDELITY_SESSION = SessionConfig(emulate=True)


def _max_context(loaded: LoadedCheckpoint, asked: int | None) -> int:
    """The KV length: at most the model's positions, at least the smallest image plus a short exchange."""
    limit, least = loaded.config.text.max_position_embeddings, min_context(loaded.config.image)
    value = limit if asked is None else asked
    if not least <= value <= limit:
        raise ConfigError(f"--max-context must be between {least} (the smallest image's tokens and "
                          f"{PROMPT_MARGIN} for the exchange) and the model's {limit}, got {value}")
    return value


def _validate(loaded: LoadedCheckpoint, work: Path, manifest: Manifest, options: ExportOptions,
              quant: QuantContext | None, plan: LinearPlan
              ) -> tuple[dict[str, Any], dict[str, Any] | None, Manifest]:
    """Parity of every graph with its reference (pass/fail), then, for a quantized bundle or an fp16 cache, its
    fidelity against fp32 (as served: after prefill segments the kernel is not accurate enough for are dropped)."""
    validation = bundle_parity(loaded, work, manifest, options, quant, plan)
    segments = validation["decoder"].get("prefill_segments")
    if segments and segments["pass"] and not (segments["twin_pass"] and segments["kernel_pass"]):  # rounding, not wrong
        manifest = drop_segments(work, manifest, segments)
    native = validation["decoder"].get("native_decode")
    if native and native["pass"] and not native["kept"]:  # the step right, its rounding too coarse here
        manifest = drop_native_index(work, manifest, native)
    # the candidate runtime then serves as the written bundle will (the native decode step only where its
    # validation is recorded and kept: runtime/engines/native.py)
    manifest = replace(manifest, validation=validation)
    manifest.write(work)
    wanted = quant is not None or options.fp16_cache
    return validation, (_fidelity(loaded, work, manifest, quant, options.held_out) if wanted else None), manifest


def bundle_parity(loaded: LoadedCheckpoint, bundle: Path, manifest: Manifest, options: ExportOptions,
                  quant: QuantContext | None, plan: LinearPlan) -> dict[str, Any]:
    """Is the graph right? Each graph of `bundle` against its reference; the record's "pass" is the verdict.

    A float graph's reference is the torch model; a quantized graph's is the same model computing the same
    recipe (export/validate/emulate.py), so a graph is refused for being wrong, never for the recipe's own
    error (that is fidelity's question)."""
    from pulse_edge.export.model.torch_backend import TorchPipeline
    from pulse_edge.runtime.text.tokenizer import Tokenizer

    model, reference_dtype = loaded.model, loaded.model.dtype
    # a bf16 oracle is itself ~2e-2 off at 32 layers (see BF16_REFERENCE_TOLERANCE). The vision graph is
    # always checked against an fp32 copy of its tower.
    level = tolerance_level(options.precision, fp32_reference=reference_dtype == torch.float32,
                            fp16_cache=options.fp16_cache)
    tensorrt = options.target == "tensorrt"
    if tensorrt and reference_dtype == torch.float32:
        level = trt_build.parity_level(options.precision)
    reference = TorchPipeline(loaded, Tokenizer.from_file(bundle / manifest.tokenizer))
    session = trt_build.validation_session() if tensorrt else validation_session(options.precision)
    label = (f"the emulated {options.precision} reference" if quant else "the torch reference") + (
        " with an fp16 KV cache" if options.fp16_cache else "")
    forms = ({"vision_qdq": trt_build.qdq_form(bundle / manifest.graphs[names.VISION].file),
              "decoder_qdq": trt_build.qdq_form(bundle / manifest.graphs[names.DECODER].file)} if tensorrt else {})
    kv = _kv_scales(loaded, manifest, quant) if quant else None  # both decoder graphs' cache
    emulation = (emulated_reference(model, quant.recipe, quant.scales, plan, prepacked=session.prepack, kv=kv,
                                    **forms) if quant else nullcontext())
    whole = replace(session, decode_attention="graph")  # the decode graph itself; its segments checked below
    with emulation, _cache_emulation(model, options.fp16_cache):  # the cache's hooks go on the swapped Linears
        parity = _parity(loaded, bundle, manifest, options, level, reference, whole)
    parity["embedding"] = validate_embedding(model.language_model, bundle, manifest.embedding)
    parity["pass"] = bool(parity["pass"] and parity["embedding"]["pass"])
    if manifest.graphs[names.DECODER].segments and quant:
        decoder = parity["decoder"]
        decoder["decode_segments"] = decode_segments_parity(loaded, bundle, manifest, options.plan, quant, plan, kv,
                                                            level, session)
        decoder["pass"] = bool(decoder["pass"] and decoder["decode_segments"]["pass"])
        parity["pass"] = bool(parity["pass"] and decoder["pass"])
    if manifest.graphs[names.DECODER].native_index and quant:
        decoder = parity["decoder"]
        # its activations are quantized (per block, as on prepacked weights): codes flip under float order as the
        # prefill graph's per-token ones do, so its end-to-end bound is the prefill graph's (export/build/native.py)
        native_level = tolerance_level(options.precision, fp32_reference=reference_dtype == torch.float32,
                                       graph="prefill")
        decoder["native_decode"] = native_parity(loaded, bundle, manifest, options.plan, quant, plan, kv,
                                                 native_level, session)
        decoder["pass"] = bool(decoder["pass"] and decoder["native_decode"]["pass"])
        parity["pass"] = bool(parity["pass"] and decoder["pass"])
    if names.PREFILL in manifest.graphs and quant:
        decoder = parity["decoder"]
        prefill_level = tolerance_level(options.precision, fp32_reference=reference_dtype == torch.float32,
                                        graph="prefill")
        decoder["prefill_graph"] = _prefill_parity(loaded, bundle, manifest, options, quant, plan, kv, prefill_level,
                                                   session)
        decoder["pass"] = bool(decoder["pass"] and decoder["prefill_graph"]["pass"])
        if manifest.graphs[names.PREFILL].segments:
            decoder["prefill_segments"] = segments_parity(loaded, bundle, manifest, options.plan, quant, plan, kv,
                                                           prefill_level, session)
            decoder["pass"] = bool(decoder["pass"] and decoder["prefill_segments"]["pass"])
        parity["pass"] = bool(parity["pass"] and decoder["pass"])
    return {"reference_dtype": str(reference_dtype).removeprefix("torch."), "reference": label,
            "tolerance_level": level, **parity,
            "ort_session": session_settings(session, manifest.graphs[names.DECODER].opt_level_limit,
                                            shapes_vary=True)}


def _cache_emulation(model: Any, fp16_cache: bool) -> Any:
    """The reference caching as an fp32 graph's fp16 cache does (export/validate/kv_caches.py), or as it is."""
    return fp16_kv_cache(model.language_model) if fp16_cache else nullcontext()


def _kv_scales(loaded: LoadedCheckpoint, manifest: Manifest, quant: QuantContext) -> KVScales | None:
    """The int8 KV cache's scales as the graphs hold them (None for a float cache)."""
    shape = DecoderShape.from_config(loaded.config, max_length=manifest.kv.max_length)
    return kv_scales_for(quant.recipe, quant.scales, shape, quant.decoder_plan(loaded, shape))


def _prefill_parity(loaded: LoadedCheckpoint, bundle: Path, manifest: Manifest, options: ExportOptions,
                    quant: QuantContext, plan: LinearPlan, kv: KVScales | None, level: str,
                    session: SessionConfig) -> dict[str, Any]:
    """The prefill graph alone (same interface as the decoder graph) against the reference computing the
    prefill graph's own schemes (export/graphs/prefill.py: the decode plan's folds, the prefill scheme): end to
    end under `level`, and every MatMul site and folded norm on the graph's own input."""
    log.info("validating the prefill graph at prefill lengths %s and its sites", list(options.plan.prefill_lengths))
    own = prefill_plan(quant.recipe, plan, manifest.kv.layers)
    lm, spec = loaded.model.language_model, manifest.graphs[names.PREFILL]
    with emulated_reference(loaded.model, quant.recipe, quant.scales, own, prepacked=session.prepack,
                            kv=kv, quantized_self=False), _cache_emulation(loaded.model, options.fp16_cache):
        report = validate_decoder(lm, bundle, spec, manifest.kv, precision=level, plan=options.plan, session=session,
                                  graph=names.PREFILL)
        sites = decoder_sites_parity(lm, bundle, spec, manifest.kv, session, options.plan.tolerances["site"])
    return {**report, "tolerance_level": level, "sites": sites, "pass": bool(report["pass"] and sites["pass"])}


def _fidelity(loaded: LoadedCheckpoint, work: Path, manifest: Manifest, quant: QuantContext | None,
              held_out: int) -> dict[str, Any]:
    """Is the recipe good enough? The bundle as served against the fp32 reference on held-out samples (the
    calibration's own data where there is one, else `held_out` synthetic ones)."""
    from pulse_edge.export.model.torch_backend import TorchPipeline
    from pulse_edge.runtime.pipeline import Pipeline
    from pulse_edge.runtime.text.tokenizer import Tokenizer

    reference = TorchPipeline(loaded, Tokenizer.from_file(work / manifest.tokenizer))
    # a float bundle (an fp16 cache's cost) keeps its weights mapped, as its validation does: prepacking would
    # copy every fp32 weight into anonymous memory (28 GB for the 7B) and changes no float MatMul's numbers
    session = FIDELITY_SESSION if quant else validation_session(manifest.precision)
    served = Pipeline.from_bundle(work, session=session)
    length = manifest.kv.max_length
    held = (held_out_samples(quant, loaded, reference.tokenizer, length) if quant
            else synthetic_held_out(held_out, loaded, reference.tokenizer, length))
    float_bytes = sum(p.numel() for p in loaded.model.parameters()) * 4
    fidelity = fidelity_report(reference, served, held.samples, held.prepared, float_bytes=float_bytes)
    limit = manifest.graphs[names.DECODER].opt_level_limit
    return {**fidelity, "held_out_left_out": held.left_out, "prefilled_by": served.prefilled_by,
            "decoded_by": served.decoded_by, "ort_session": session_settings(session, limit, shapes_vary=True)}


def _parity(loaded: LoadedCheckpoint, work: Path, manifest: Manifest, options: ExportOptions, level: str,
            reference: Any, session: SessionConfig) -> dict[str, Any]:
    """The vision graph at 1 and 5 tiles, the merged features of whole prints, the decoder at the planned
    prefills and decode steps, greedy generation, and (quantized) every site on the graphs' own inputs, each
    against whatever `loaded.model` computes now."""
    from pulse_edge.runtime.ecg.render import render_ecg
    from pulse_edge.runtime.ecg.synthetic import synthesize_ecg
    from pulse_edge.runtime.pipeline import Pipeline

    model = loaded.model
    room = manifest.kv.max_length - PROMPT_MARGIN
    pages = [p for p in GREEDY_PAGES if image_token_count(p, manifest.image) <= room][:1] or [GREEDY_PAGES[-1]]
    log.info("validating the vision graph against the %s reference", str(model.dtype).removeprefix("torch."))
    quantized = options.quant is not None
    vision_level = f"{options.precision} vision" if quantized else options.precision
    if options.target == "tensorrt":
        vision_level = trt_build.parity_level(options.precision, vision=True)
    vision = validate_vision_graph(model, work / manifest.graphs[names.VISION].file,
                                   tolerance=options.plan.tolerances[vision_level],
                                   reference=f"emulated {options.precision}" if quantized else None,
                                   entries=graph_config_entries(manifest.graphs[names.VISION]))
    log.info("validating the decoder graph at prefill lengths %s", list(options.plan.prefill_lengths))
    decoder = validate_decoder(model.language_model, work, manifest.graphs[names.DECODER], manifest.kv,
                               precision=level, plan=options.plan, session=session)
    report: dict[str, Any] = {"vision": vision, "decoder": decoder}
    # The site probes read the ONNX Runtime forms' node names and feeds (export/validate/sites.py); a
    # TensorRT-ready graph is judged end to end against the same emulated reference.
    if quantized and options.target != "tensorrt":
        log.info("validating every MatMul site and folded norm on the graphs' own inputs")
        report["sites"] = _site_parity(model, work, manifest, options.plan.tolerances["site"], session)
    images = [render_ecg(synthesize_ecg(rhythm, seed=7), width_px=pages[0][0], height_px=pages[0][1])
              for rhythm in ("sinus", "afib")]
    pairs = [(image, question) for image in images for question in GREEDY_QUESTIONS][:options.plan.greedy_runs]
    candidate = Pipeline.from_bundle(work, session=session)
    log.info("validating greedy generation on %d rendered ECG(s) of %dx%d", len(pairs), *pages[0])
    # the cache does not touch the vision graph: its merge is judged as the float graph's (or the bf16 oracle's)
    float_level = tolerance_level(options.precision, fp32_reference=model.dtype == torch.float32)
    merge_tolerance = options.plan.tolerances[vision_level if quantized else float_level]
    portrait = ([render_ecg(synthesize_ecg("sinus", seed=8), width_px=PORTRAIT_PAGE[0], height_px=PORTRAIT_PAGE[1])]
                if image_token_count(PORTRAIT_PAGE, manifest.image) <= room else [])
    vision["merge"] = [_merge_parity(model, candidate, image, merge_tolerance) for image in [*images, *portrait]]
    vision["pass"] = bool(vision.get("pass") and all(m["pass"] for m in vision["merge"]))
    # Greedy tokens must be equal only for fp32: elsewhere one near-tie flips them legitimately (recorded).
    try:
        report["greedy"] = validate_greedy(reference, candidate, pairs, tokens=options.plan.greedy_tokens,
                                           require_equal=level == "fp32")
    except ModelOutputError as e:  # the bundle's own NaN is a failed run inside; this one is the reference's
        raise ExportValidationError(_reference_overflow(options)) from e
    return {**report, "pass": all(bool(part.get("pass")) for part in report.values())}


def _reference_overflow(options: ExportOptions) -> str:
    """Why nothing was written when the reference running the bundle's recipe computed NaN or inf."""
    cause = (": an fp16 KV cache holds values up to 65504, and this checkpoint's keys or values exceed it; export "
             "with --kv-cache float" if options.fp16_cache else
             ": the checkpoint's weights or the recipe overflow; check the checkpoint (pulse-edge infer --backend "
             "torch) or choose another --precision")
    return (f"the torch reference running this bundle's recipe computed NaN or inf logits on a validation print, so "
            f"the {options.precision} bundle cannot answer it either{cause}; nothing was written")


def _failed_runs(case: dict[str, Any], tolerance: dict[str, float]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The run of a decoder case that broke its bound: the one-pass run, else ("in two chunks") the chunked one (a
    graph wrong in one pass is wrong in two as well: said once)."""
    failed = [(how, rows) for how, rows in case_runs(case) if not all(within(s, tolerance) for s in rows)]
    return failed[:1]


def _site_parity(model: Any, work: Path, manifest: Manifest, tolerance: Any, session: SessionConfig) -> dict[str, Any]:
    vision = vision_sites(model, work, manifest.graphs[names.VISION], session, tolerance)
    decoder = decoder_sites_parity(model.language_model, work, manifest.graphs[names.DECODER], manifest.kv, session,
                                   tolerance)
    return {"vision": vision, "decoder": decoder, "pass": vision["pass"] and decoder["pass"]}


def _merge_parity(model: Any, candidate: Any, image: Any, tolerance: Any) -> dict[str, Any]:
    """The runtime's merged image features (vision graph + its numpy merge) against the reference's
    merge on a whole print: greedy tokens of a tiny random model can miss a merge bug (a zeroed
    image_newline left them unchanged), a feature comparison cannot."""
    from pulse_edge.runtime.image.preprocess import preprocess

    pre = preprocess(image, candidate.manifest.image)
    with torch.inference_mode():
        features = model.vision_features(torch.from_numpy(pre.pixel_values)).float()
        ref = model.merge(features, image.size).float().numpy()  # [T, H]
    if not np.isfinite(ref).all():  # the checkpoint's own overflow: the runtime's "bundle may be damaged" misled
        raise ExportValidationError("the torch reference's vision features hold NaN or inf on a validation print: "
                                    "the checkpoint's weights overflow; check it (pulse-edge infer --backend torch) "
                                    "or copy it again; nothing was written")
    got = candidate.engine.image_features(pre)
    return {"image_size": list(image.size), **compare_features(ref[None], got[None], tolerance)}


def _manifest(loaded: LoadedCheckpoint, options: ExportOptions, graphs: dict[str, GraphSpec],
              max_context: int, calibration: CalibrationSpec | None, files: dict[str, FileRecord]) -> Manifest:
    cfg = loaded.config
    text = cfg.text
    table_dtype = np.dtype(TABLE_DTYPES[options.precision]).name
    kv_dtype = graphs[names.DECODER].tensor(names.past_name(0, "key")).dtype  # the graph's own cache type
    return Manifest(
        version=names.MANIFEST_VERSION, precision=options.precision, graphs=graphs,
        kv=KVLayout(layers=text.num_layers, kv_heads=text.num_kv_heads, head_dim=text.head_dim,
                    dtype=kv_dtype, max_length=max_context, scales="per_channel" if kv_dtype == "int8" else None),
        text=TextSpec(hidden_size=text.hidden_size, vocab_size=text.vocab_size, bos_id=text.bos_id,
                      eos_id=text.eos_id, max_position_embeddings=text.max_position_embeddings),
        embedding=EmbeddingSpec(file=names.EMBEDDING_FILE, dtype=table_dtype,
                                shape=(text.vocab_size, text.hidden_size)),
        image=cfg.image, prompt=loaded.template, tokenizer=names.TOKENIZER_FILE,
        source=SourceSpec(checkpoint=str(loaded.root.resolve()), layout=cfg.layout,
                          sha256=loaded.sha256, vision_tower=cfg.vision_tower_name),
        created_by=f"pulse-edge {__version__}", calibration=calibration,
        image_newline=names.NEWLINE_FILE if loaded.model.image_newline is not None else None, files=files,
    )
