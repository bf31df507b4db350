"""A recipe and a scales file turned into graphs: the decoder's LinearPlan and the vision graph's rewrite.

The decoder is built quantized from the start (the builder emits each MatMul by
its site's scheme). The vision graph comes from torch's exporter, whose weight
initializers carry generated names; each MatMul is matched to its site by the
bytes of its weight (the exporter stores W^T exactly), then rewritten:

    x ─ MatMul(W) ─ y    ->    the scheme's nodes (see export/graphs/quant_ops.py)
    x ─ MatMul(W) ─ Add(b) ─ y    ->    w8a8u8 with b as MatMulIntegerToFloat's bias (one pass fewer)
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from pulse_edge.calibration.calibrate import SMOOTH_SITES
from pulse_edge.calibration.observe import packed_weight, site_modules
from pulse_edge.calibration.quant_math import smooth_scales
from pulse_edge.calibration.recipes import Recipe, decoder_sites
from pulse_edge.calibration.scales import Scales
from pulse_edge.errors import ConfigError
from pulse_edge.export.graphs.decoder import DecoderShape, LinearPlan
from pulse_edge.export.graphs.quant_ops import FP8_MIN_OPSET, Emitted, MatMulSpec, emit_matmul
from pulse_edge.export.graphs.vision import EXTERNAL_DATA_THRESHOLD, graph_opset, install_graph
from pulse_edge.export.model.reference import PulseReference

log = logging.getLogger(__name__)

QDQ_SCHEMES = ("w8a8", "fp8", "w8a8u8")  # schemes with a calibrated activation range
BIAS_SCHEMES = ("w8a8u8",)  # emitters that add a Linear's bias themselves (MatMulIntegerToFloat's bias input)


def check_scales(recipe: Recipe, scales: Scales) -> None:
    """Refuse scales searched for another int4 block size than the one asked for."""
    if recipe.int4_awq and scales.awq_block_size != recipe.block_size:
        have, want = scales.awq_block_size, recipe.block_size
        raise ConfigError(f"the scales' AWQ search assumed int4 blocks of {have}; pass --block-size {have} or "
                          f"re-run pulse-edge calibrate with --block-size {want}")


def decoder_plan(model: PulseReference, recipe: Recipe, scales: Scales, shape: DecoderShape) -> LinearPlan:
    schemes = {site: recipe.scheme(site) for site in decoder_sites(shape.layers)}
    input_scales = {site: s for site, scheme in schemes.items()
                    if (s := _input_scale(model, recipe, scales, site, scheme, shape)) is not None}
    amax = {site: _act_amax(scales, site, scheme, input_scales.get(site)) for site, scheme in schemes.items()
            if scheme in QDQ_SCHEMES}
    return LinearPlan(schemes=schemes, act_amax=amax, input_scales=input_scales, block_size=recipe.block_size,
                      accuracy_level=recipe.accuracy_level)


def _input_scale(model: PulseReference, recipe: Recipe, scales: Scales, site: str, scheme: str,
                 shape: DecoderShape) -> np.ndarray | None:
    """SmoothQuant scales for W8A8 qkv / gate_up; AWQ scales for int4 layer sites; None elsewhere."""
    stats = scales.site(site)
    if site.endswith(".o") and shape.heads != shape.kv_heads:
        return None  # o's input scale folds into v's rows only when every head has its own v
    if _activations_quantized(scheme, recipe) and recipe.smooth and site.rsplit(".", 1)[-1] in SMOOTH_SITES:
        if recipe.smooth_alpha is None:
            return stats.smooth  # None where no alpha beat plain W8A8 on the samples
        return smooth_scales(stats.absmax, packed_weight(model, site), recipe.smooth_alpha)
    if scheme == "w4" and recipe.int4_awq:
        return stats.awq
    return None


def _activations_quantized(scheme: str, recipe: Recipe) -> bool:
    """W8A8, and int8 weights at MatMulNBits accuracy level 4, which quantizes the activations to int8 per
    block at run time: an outlier channel then sets its block's scale, so smoothing pays there too
    (bench outliers, tiny model with 80x channels: logit cosine 0.9924 without, see docs/performance.md)."""
    return scheme == "w8a8" or (scheme == "w8" and recipe.accuracy_level == 4)


def _act_amax(scales: Scales, site: str, scheme: str, input_scale: np.ndarray | None) -> float:
    stats = scales.site(site)
    if input_scale is None:
        table = stats.amax_fp8 if scheme == "fp8" else stats.amax
        return float(table.get(scales.method, table.get("mse")))  # no E4M3 "entropy": see calibration/scales.py
    if stats.smooth is not None and np.array_equal(input_scale, stats.smooth):
        return float(stats.smooth_amax[scales.method])
    return float(np.max(stats.absmax / input_scale))  # an alpha given on the command line: exact max of x / s


def _fingerprint(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def vision_site_fingerprints(model: PulseReference, dtype: type = np.float32) -> dict[str, str]:
    """{sha1 of W^T as float32: site} for the tower's and projector's Linears, rounded to the graph's float
    `dtype` first (an fp16 graph holds fp16(W)^T); two sites with identical weights could not be told apart in
    the graph, so they are refused rather than guessed."""
    found: dict[str, str] = {}
    for site, module in site_modules(model).items():
        if site.startswith(("vision.", "projector.")):
            key = _fingerprint(module.weight.detach().float().numpy().T.astype(dtype))
            if key in found:
                raise ConfigError(f"{site} and {found[key]} have identical weights: their MatMuls in the vision "
                                  "graph cannot be told apart; keep them at fp (--keep vision)")
            found[key] = site
    return found


def quantize_vision_graph(path: Path, model: PulseReference, recipe: Recipe, scales: Scales, *,
                          emit: Callable[[str, MatMulSpec], Emitted] = emit_matmul,
                          dtype: type = np.float32) -> dict[str, int]:
    """Rewrite the float vision graph at `path` in place; returns {scheme: MatMul count}.

    `emit` writes one site's nodes (ORT's forms by default); `dtype` is the graph's float type."""
    proto = onnx.load(str(path))
    sites = vision_site_fingerprints(model, dtype)
    inits = {init.name: init for init in proto.graph.initializer}
    nodes, counts, dropped, added, matched = [], Counter(), set(), [], set()
    opset = graph_opset(proto)
    biases = _bias_adds(proto, inits)
    folded: set[int] = set()  # ids of the bias Adds folded into the quantized MatMul before them
    for node in proto.graph.node:
        if id(node) in folded:
            continue
        site = _matched_site(node, inits, sites)
        matched.add(site)
        scheme = recipe.scheme(site) if site else "fp"
        if scheme == "fp":
            nodes.append(node)
            counts["fp"] += node.op_type == "MatMul" and node.input[1] in inits
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        amax = scales.amax(site, fp8=scheme == "fp8")
        add = biases.get(node.output[0]) if scheme in BIAS_SCHEMES else None
        if add is not None:
            folded.add(id(add[0]))
            dropped.add(add[1])
        out = add[0].output[0] if add else node.output[0]
        emitted = emit(scheme, MatMulSpec(site=site, x=node.input[0], y=out, weight=weight, act_amax=amax,
                                          block_size=recipe.block_size, accuracy_level=recipe.accuracy_level,
                                          opset=opset, bias=add[2] if add else None))
        nodes.extend(emitted.nodes)
        added += [numpy_helper.from_array(a, n) for n, a in {**emitted.arrays, **emitted.raw}.items()]
        dropped.add(node.input[1])
        counts[scheme] += 1
    wanted = {site for site in sites.values() if recipe.scheme(site) != "fp"}
    missing = sorted(wanted - matched)
    if missing:
        raise ConfigError(f"the vision graph has no MatMul with the weights of {', '.join(missing[:3])}"
                          f"{' ...' if len(missing) > 3 else ''}: the exporter changed its graph; keep the vision "
                          "graph at fp (--keep vision) and report this")
    _replace(proto, nodes, dropped, added, fp8="fp8" in counts)
    _save(proto, path)
    return dict(counts)


def _bias_adds(proto: onnx.ModelProto, inits: dict[str, onnx.TensorProto],
               ) -> dict[str, tuple[onnx.NodeProto, str, np.ndarray]]:
    """{MatMul output: (the Add that is its only consumer, its bias's name, the bias [N])} for Adds of a 1-D
    initializer: the exporter writes every Linear as MatMul + Add(bias); a scheme that takes a bias folds the
    Add away."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = {}
    for name, users in consumers.items():
        if len(users) != 1 or users[0].op_type != "Add" or len(users[0].input) != 2:
            continue
        other = users[0].input[1] if users[0].input[0] == name else users[0].input[0]
        if other in inits and len(inits[other].dims) == 1:
            found[name] = (users[0], other, numpy_helper.to_array(inits[other]).astype(np.float32))
    return found


def _matched_site(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto], sites: dict[str, str]) -> str | None:
    if node.op_type != "MatMul" or node.input[1] not in inits:
        return None
    return sites.get(_fingerprint(numpy_helper.to_array(inits[node.input[1]])))


def _replace(proto: onnx.ModelProto, nodes: list[onnx.NodeProto], dropped: set[str], added: list[onnx.TensorProto],
             *, fp8: bool) -> None:
    kept = [init for init in proto.graph.initializer if init.name not in dropped]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    del proto.graph.initializer[:]
    proto.graph.initializer.extend([*kept, *added])
    if fp8:
        for opset in proto.opset_import:
            if opset.domain in ("", "ai.onnx"):
                opset.version = max(opset.version, FP8_MIN_OPSET)


def _save(proto: onnx.ModelProto, path: Path) -> None:
    """Write beside the old graph, then move both files into place (never a half-written graph)."""
    external = sum(init.ByteSize() for init in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    with tempfile.TemporaryDirectory(prefix=".vision-quant-", dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        onnx.save_model(proto, str(staged), save_as_external_data=external, location=f"{path.name}.data")
        install_graph(staged, path)
