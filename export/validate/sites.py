"""Site parity: every MatMul and folded norm of a quantized graph, fed the graph's own input.

    graph + extra outputs: each site's input x and output y (the nodes export/graphs/quant_ops.py
      emitted for it: the first takes x, the last gives y), each decoder norm's input and output
      -> one ORT run on a short input (the vision graph: 1 tile; the decoder: a prefill, then one
         decode step on its cache), in the session settings validation uses
      -> per site: y_graph against the emulated site on x_graph (export/validate/emulate.py)
         per norm:  its output against the emulated norm (the folded gamma) on its input

End-to-end parity compares whole outputs, where an activation that ORT rounds up and torch down (their
float accumulation orders differ) travels through the later layers; here each MatMul sees exactly the
input the graph gave it, so only accumulation order separates the two sides and the bound
(TOLERANCES["site"]) is fp32-tight. A wrong scale, zero point, block layout, or an input scale folded on
one side only (the weights but not the norm, or the reverse) is off by orders of magnitude more, at the
site that has it, and the report names that site.

The probe graph is written beside the graph (its external data is found by relative path) under a
hidden name and removed after the run.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper
from torch import nn

from pulse_edge.calibration.observe import site_name
from pulse_edge.calibration.recipes import decoder_sites
from pulse_edge.export.validate.emulate import EmulatedLinear
from pulse_edge.export.validate.tolerances import Tolerance
from pulse_edge.export.validate.vision import random_pixel_values
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, KVLayout
from pulse_edge.runtime.engines.ort import SessionConfig, make_session

VISION_PREFIXES = ("vision.", "projector.")
PROBE_POSITIONS = 16  # the prefill; then one decode step (MatMul kernels have separate M = 1 paths)
# A decoder site's modules in a LlamaForCausalLM layer, in the order the graph packs their columns.
DECODER_SITE_MODULES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"), "down": ("mlp.down_proj",),
})
# The decoder graph's folded norms (export/graphs/decoder.py names) and the layer's module for each.
DECODER_NORMS: Mapping[str, str] = MappingProxyType({"input_norm": "input_layernorm",
                                                     "post_norm": "post_attention_layernorm"})


@dataclass(frozen=True)
class Probe:
    """A site or norm of the graph: the tensor it reads and the tensor it writes."""

    name: str
    x: str
    y: str


def site_probe(proto: onnx.ModelProto, site: str) -> Probe | None:
    """The site's emitted nodes are named `{site}/...`: the first reads x, the last writes y."""
    nodes = [n for n in proto.graph.node if n.name.startswith(f"{site}/")]
    return Probe(site, nodes[0].input[0], nodes[-1].output[0]) if nodes else None


def norm_probe(proto: onnx.ModelProto, name: str) -> Probe | None:
    """A decoder norm: SkipSimplifiedLayerNormalization normalises its sum (output 3), the first layer's
    SimplifiedLayerNormalization its input."""
    node = next((n for n in proto.graph.node if n.name.startswith(f"{name}/")), None)
    if node is None:
        return None
    x = node.output[3] if node.op_type == "SkipSimplifiedLayerNormalization" else node.input[0]
    return Probe(name, x, node.output[0])


@contextmanager
def probe_session(path: Path, tensors: Sequence[str], config: SessionConfig,
                  graph_limit: str | None) -> Iterator[Any]:
    """An ORT session of the graph at `path` with `tensors` as extra outputs (all float32)."""
    proto = onnx.load(str(path), load_external_data=False)
    present = {o.name for o in proto.graph.output}
    for name in dict.fromkeys(t for t in tensors if t not in present):
        proto.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    probe = path.parent / f".{path.stem}.probe.onnx"
    try:
        onnx.save_model(proto, str(probe))
        yield make_session(probe, config, graph_limit=graph_limit)
    finally:
        probe.unlink(missing_ok=True)


def compare(site: str, run: str, got: np.ndarray, ref: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    got64, ref64 = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    if got64.shape != ref64.shape:
        return {"site": site, "run": run, "max_rel_err": float("inf"), "cosine": -1.0, "pass": False,
                "error": f"shape {list(got.shape)}, expected {list(ref.shape)}"}
    max_rel = float(np.max(np.abs(got64 - ref64)) / max(float(np.max(np.abs(ref64))), np.finfo(np.float64).tiny))
    norms = float(np.linalg.norm(got64) * np.linalg.norm(ref64))
    cosine = float(got64 @ ref64 / norms) if norms else float(not got64.any() and not ref64.any())
    ok = bool(np.isfinite(got64).all()) and max_rel <= tol.max_rel_err and cosine >= tol.min_cosine
    return {"site": site, "run": run, "max_rel_err": max_rel, "cosine": cosine, "pass": ok}


def _emulated(modules: Sequence[nn.Module], x: np.ndarray) -> np.ndarray:
    """The emulated site on the graph's input: each module's MatMul (EmulatedLinear) or norm, columns packed."""
    with torch.inference_mode():
        xt = torch.from_numpy(np.ascontiguousarray(x))
        parts = [m.site_output(xt) if isinstance(m, EmulatedLinear) else m(xt) for m in modules]
    return torch.cat([p.float() for p in parts], dim=-1).numpy()


def _check(probes: Mapping[Probe, Sequence[nn.Module]], runs: Mapping[str, Mapping[str, np.ndarray]],
           tol: Tolerance) -> list[dict[str, Any]]:
    return [compare(probe.name, run, out[probe.y], _emulated(modules, out[probe.x]), tol)
            for run, out in runs.items() for probe, modules in probes.items()]


def _report(rows: list[dict[str, Any]], tol: Tolerance, **extra: Any) -> dict[str, Any]:
    return {"tolerance": asdict(tol), **extra, "checks": rows, "pass": all(r["pass"] for r in rows),
            "max_rel_err": max((r["max_rel_err"] for r in rows), default=0.0),
            "min_cosine": min((r["cosine"] for r in rows), default=1.0)}


def vision_sites(model: nn.Module, bundle: Path, spec: GraphSpec, config: SessionConfig, tol: Tolerance, *,
                 seed: int = 0) -> dict[str, Any]:
    """Each quantized MatMul of the vision graph on one tile; `model` is inside emulated_reference."""
    proto = onnx.load(str(bundle / spec.file), load_external_data=False)
    emulated = {site: m for n, m in model.named_modules() if isinstance(m, EmulatedLinear)
                and (site := site_name(n)) and site.startswith(VISION_PREFIXES)}
    probes = {p: [emulated[site]] for site in emulated if (p := site_probe(proto, site)) is not None}
    missing = sorted(set(emulated) - {p.name for p in probes})
    if not emulated:  # the recipe keeps the whole vision graph at fp: nothing of it is quantized
        return _report([], tol)
    pixels = random_pixel_values(1, model.cfg.image, seed)
    with probe_session(bundle / spec.file, [t for p in probes for t in (p.x, p.y)], config,
                       spec.opt_level_limit) as session:
        outputs = [o.name for o in session.get_outputs()]
        run = dict(zip(outputs, session.run(outputs, {names.PIXEL_VALUES: pixels}), strict=True))
    rows = _check(probes, {"1 tile": run}, tol)
    rows += [{"site": site, "run": "-", "max_rel_err": float("inf"), "cosine": -1.0, "pass": False,
              "error": "no such MatMul in the graph"} for site in missing]
    return _report(rows, tol)


def _decoder_probes(proto: onnx.ModelProto, lm: nn.Module) -> dict[Probe, list[nn.Module]]:
    layers = len(lm.model.layers)
    probes: dict[Probe, list[nn.Module]] = {}
    for site in decoder_sites(layers):
        if site == "lm_head":
            modules = [lm.lm_head]
        else:
            _, i, part = site.split(".")
            modules = [lm.model.layers[int(i)].get_submodule(m) for m in DECODER_SITE_MODULES[part]]
        probe = site_probe(proto, site)
        if probe is None:
            raise ValueError(f"the decoder graph has no nodes for site {site}")
        probes[probe] = modules
    for i in range(layers):
        for graph_name, module in DECODER_NORMS.items():
            probe = norm_probe(proto, f"layers.{i}.{graph_name}")
            if probe is None:
                raise ValueError(f"the decoder graph has no norm layers.{i}.{graph_name}")
            probes[probe] = [lm.model.layers[i].get_submodule(module)]
    return probes


def _decoder_runs(session: Any, kv: KVLayout, prefill: np.ndarray, step: np.ndarray) -> dict[str, dict[str, Any]]:
    """A prefill from an empty cache, then one decode step on the cache it wrote."""
    outputs = [o.name for o in session.get_outputs()]
    past = {n: np.zeros((1, kv.kv_heads, kv.max_length, kv.head_dim), np.dtype(kv.dtype))
            for n in names.kv_names(kv.layers, "past")}
    runs: dict[str, dict[str, Any]] = {}
    for label, embeds, start in ((f"prefill {prefill.shape[1]}", prefill, 0), ("decode", step, prefill.shape[1])):
        total = start + embeds.shape[1]
        feeds = {names.INPUTS_EMBEDS: embeds, **past, names.SEQLENS_K: np.array([total - 1], np.int32),
                 names.TOTAL_SEQUENCE_LENGTH: np.array(total, np.int32)}
        runs[label] = dict(zip(outputs, session.run(outputs, feeds), strict=True))
        past = {p: runs[label][q] for p, q in zip(names.kv_names(kv.layers, "past"),
                                                   names.kv_names(kv.layers, "present"), strict=True)}
    return runs


def decoder_sites_parity(lm: nn.Module, bundle: Path, spec: GraphSpec, kv: KVLayout, config: SessionConfig,
                         tol: Tolerance, *, positions: int = PROBE_POSITIONS, seed: int = 0) -> dict[str, Any]:
    """Each MatMul site and folded norm of the decoder graph; `lm` is inside emulated_reference."""
    proto = onnx.load(str(bundle / spec.file), load_external_data=False)
    probes = _decoder_probes(proto, lm)
    table = lm.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], (positions + 1,), generator=torch.Generator().manual_seed(seed))
    embeds = table[ids].detach().float().numpy()[None]  # [1, positions + 1, H]: real token embeddings
    with probe_session(bundle / spec.file, [t for p in probes for t in (p.x, p.y)], config,
                       spec.opt_level_limit) as session:
        runs = _decoder_runs(session, kv, embeds[:, :positions], embeds[:, positions:])
    return _report(_check(probes, runs, tol), tol, positions=positions)
