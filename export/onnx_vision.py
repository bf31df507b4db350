"""The bundle's vision graph: the CLIP tower (truncated to the layers LLaVA reads)
and the mlp2x_gelu projector in one ONNX graph, with its parity check.

    pixel_values  float32 [tiles, 3, T, T]                       (T = 336)
      -> Cast to float16                                         (fp16 graphs only)
      -> Conv T/14 patches, + CLS, + positions, LayerNorm         [tiles, 1 + P, Hv]
      -> N x encoder layer (pre-LN):                              (N = layers_used, 23 for PULSE)
           LayerNorm -> Attention(heads) -> +res -> LayerNorm -> fc1 -> QuickGelu -> fc2 -> +res
           optimized: SkipLayerNormalization + com.microsoft Attention + QuickGelu
      -> Slice: drop CLS                                          [tiles, P, Hv]   (P = (T/14)^2 = 576)
      -> MatMul -> Gelu(erf) -> MatMul                            [tiles, P, H]    (optimized: BiasGelu)
      -> Cast to float32                                          (fp16 graphs only)
    image_features float32 [tiles, P, H]

The interface is float32 for every precision, so the runtime feeds and reads the
same arrays whatever the bundle holds; axis 0 ("tiles") is dynamic.

Exporter: torch's dynamo exporter (`torch.onnx.export(..., dynamo=True)`, needs
onnxscript). Both exporters give a correct dynamic-tiles graph, but the dynamo one
pins the output to [tiles, 576, H] (the TorchScript one leaves axis 1 symbolic),
emits half the nodes (no Shape/Gather/Unsqueeze chains), and is the one torch
keeps developing (the TorchScript exporter is deprecated since torch 2.9).

Fusions: ORT's transformer optimizer with model_type "clip" fuses each encoder
layer into SkipLayerNormalization + Attention + QuickGelu and the projector's bias
and GELU into BiasGelu (real shape: 23 Attention, 23 QuickGelu, 45 SkipLayerNorm,
1 BiasGelu; 729 nodes -> 201). Its CLIP attention matcher needs the eager pattern
(MatMul -> Mul(scale) -> Softmax -> MatMul); SDPA exports as two sqrt-scale Muls on
q and k and is not matched, so the export runs with eager attention (`export_mode`,
reversible). model_type "vit" (BERT's matcher) fuses no attention. The fused graph
uses com.microsoft ops: ORT only, TensorRT cannot parse it.

Measured (4 sessions open, one warm-up each, 5 rounds; median and min-max of one
`session.run`, ms), real shape (CLIP ViT-L/14-336 truncated to 23 layers + projector
to H 4096, random weights, zeros as input), ORT 1.31.1 CPU EP, default session
options, AMD EPYC Zen 5 VM with 2 vCPUs (AVX-512), 2026-11-21. Run A: fixed order
each round; run B: `time_vision_graphs` (order rotated per round). Both while no
other job ran on the VM (four runs that shared it had medians up to 2.5x higher):

    graph             run A: 1 tile    5 tiles            run B: 1 tile   5 tiles
    fp32 plain         912 (862-987)    4506 (4430-4671)    881 (877-889)   4347 (4253-4436)
    fp32 optimized     924 (894-1010)   4647 (4456-4744)    903 (901-909)   4487 (4351-4545)
    fp16 plain         939 (913-1030)   4820 (4515-5149)    922 (916-978)   4485 (4451-4718)
    fp16 optimized     924 (893-1149)   4669 (4560-4803)    961 (921-1019)  4543 (4438-4747)

On this CPU the fusions do not pay: fp32 plain is 1-3 % faster in both runs, fp16
is split. ORT's own load-time passes already give the plain graph QuickGelu,
BiasGelu, FusedMatMul (MatMul + scale) and LayerNorm kernels, and GEMMs are ~90 %
of the kernel time in both graphs (ORT profiler: MatMul nodes in the plain graph;
MatMul nodes plus the Attention op, which holds the QKV projection, in the fused
one), so fusing the glue between them saves nothing measurable. Hence
`optimize=False` by default: the plain graph is the faster one here and runs on
every EP and in TensorRT. `optimize=True` is for an ORT CUDA EP bundle, where the
fused Attention runs ORT's flash / memory-efficient kernels; not measured here (no
GPU), so measure it there before making it the default.

fp16 on the CPU EP runs, but mostly not in fp16: x86 MLAS lacks fp16 MatMul,
Attention, QuickGelu, Softmax and Gelu kernels, so ORT wraps them in Casts and runs
them in fp32 (profiled: every MatMul and Attention took float inputs; only
(Skip)LayerNormalization, Transpose, Reshape and Concat ran in float16). Weights and
the activations between nodes are still rounded to fp16, so a CPU check covers
fp16 storage; fp16 accumulation is exercised only on a GPU.

Peak RSS of a real-shape export (process total, including the 1.2 GB fp32 model in
memory): fp32 plain 2.1 GiB, fp32 optimized 8.9 GiB, fp16 plain 2.8 GiB, fp16
optimized 5.9 GiB; the optimizer holds the loaded graph plus its fused copies.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from pulse_edge.calibration.recipes import FP8_MIN_OPSET
from pulse_edge.export.config import VisionConfig
from pulse_edge.export.reference import PulseReference
from pulse_edge.runtime.preprocess import ImageLayout

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_features"
TILES_AXIS = "tiles"
# opset 20: torch 2.13's default, the first with Gelu as one op; LayerNormalization needs >= 17.
OPSET = 20
# ORT 1.31 refuses IR versions it does not know (IR 14 is refused). The exporter writes 10 today;
# the clamp keeps a newer onnx_ir from breaking the bundle.
MAX_IR_VERSION = 10
# Beyond this many weight bytes the weights go to `<file_name>.data` (protobuf caps a file at 2 GB).
EXTERNAL_DATA_THRESHOLD = 100 * 2**20
CONTRIB_DOMAIN = "com.microsoft"
PRECISIONS = MappingProxyType({"fp32": torch.float32, "fp16": torch.float16})
CPU = ("CPUExecutionProvider",)


@dataclass(frozen=True)
class Tolerance:
    """A graph passes when max|ort - ref| / max|ref| <= max_rel_err and every tile's cosine >= min_cosine."""

    max_rel_err: float
    min_cosine: float


# fp32: only summation order differs (fused attention, MLAS GEMMs vs torch SDPA); real shape: 1.1e-6.
FP32_TOLERANCE = Tolerance(max_rel_err=1e-4, min_cosine=0.99999)
# fp16: weights and activations rounded to 11 bits through 23 layers (real shape on the CPU EP: 1.6e-3, 0.999999).
FP16_TOLERANCE = Tolerance(max_rel_err=2e-2, min_cosine=0.999)
# Quantized graphs: the parity check catches a broken graph (wrong scale, layout, packing), not quantization
# error, which the fidelity report measures on held-out ECGs and --accuracy-gate judges. Bounds set from the
# tiny model's measured errors with margin (see tests/test_quantized_export.py).
QUANT_TOLERANCES = {"int8": Tolerance(max_rel_err=0.15, min_cosine=0.99),
                    "int4": Tolerance(max_rel_err=0.5, min_cosine=0.9),
                    "fp8": Tolerance(max_rel_err=0.15, min_cosine=0.99)}
# A float graph against a bf16 reference (a model too big for fp32 here): the oracle's own rounding dominates.
# bf16 keeps 8 mantissa bits to fp16's 11. Measured: real width, 2 layers, bf16 vs fp32 torch reference:
# rel err 0.006; the full 7B (32 layers): the fp32 AND the fp16 graph both sit 0.0173-0.0179 from the bf16
# reference after 5/64-position prefills (they agree with each other far more closely: the error is the
# oracle's), 0.022 after 2950 positions, cosine >= 0.99978 everywhere.
BF16_REFERENCE_TOLERANCE = Tolerance(max_rel_err=5e-2, min_cosine=0.999)
TOLERANCES = MappingProxyType({"fp32": FP32_TOLERANCE, "fp16": FP16_TOLERANCE,
                               "bf16_reference": BF16_REFERENCE_TOLERANCE, **QUANT_TOLERANCES})


class VisionGraph(nn.Module):
    """Tower + projector with the graph's interface: float32 in, float32 out, compute in `dtype`."""

    def __init__(self, vision_tower: nn.Module, mm_projector: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.vision_tower = vision_tower
        self.mm_projector = mm_projector
        self.compute_dtype = dtype

    @classmethod
    def from_reference(cls, model: PulseReference, dtype: torch.dtype) -> VisionGraph:
        """Shares the model's modules when the dtype matches; otherwise works on a cast copy."""
        if len(model.vision_tower.encoder.layers) != model.cfg.vision.layers_used:
            raise RuntimeError("call drop_unused_vision_layers() before exporting")
        tower, projector = model.vision_tower, model.mm_projector
        if model.dtype != dtype:
            tower, projector = copy.deepcopy(tower).to(dtype), copy.deepcopy(projector).to(dtype)
        return cls(tower, projector, dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The same computation as PulseReference.vision_features; validation checks the two agree.
        hidden = self.vision_tower(pixel_values=pixel_values.to(self.compute_dtype)).last_hidden_state
        return self.mm_projector(hidden[:, 1:]).to(torch.float32)

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())


@contextmanager
def export_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and eager attention for the export; both restored on exit.

    Eager attention is numerically the same computation as SDPA, and it is the
    pattern ORT's CLIP attention fusion recognises.
    """
    modes = {m: m.training for m in module.modules()}
    configs = {id(m.config): (m.config, m.config._attn_implementation)
               for m in module.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")}
    for config, _ in configs.values():
        config._attn_implementation = "eager"
    module.eval()
    try:
        yield
    finally:
        for config, attn in configs.values():
            config._attn_implementation = attn
        for m, training in modes.items():
            m.training = training


def export_vision_graph(model: PulseReference, out_dir: Path, *, precision: str = "fp32",
                        file_name: str = "vision.onnx", optimize: bool = False,
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> dict[str, Any]:
    """Write `out_dir/file_name` (+ `file_name.data` for large weights) and describe it.

    `optimize` applies ORT's CLIP fusions; when none match, the plain graph is kept
    and the description says `optimized: False`. Written in a temporary folder inside
    `out_dir` and moved into place at the end, so a failed export leaves no half-written graph.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vision = model.cfg.vision
    module = VisionGraph.from_reference(model, PRECISIONS[precision])
    external = module.weight_bytes() > external_data_threshold
    with tempfile.TemporaryDirectory(prefix=".vision-export-", dir=out_dir) as tmp:
        plain = Path(tmp) / "plain" / file_name
        _export_plain(module, plain, image_size=vision.image_size, external=external)
        del module  # frees an fp16 copy before the optimizer loads the graph
        result = plain
        if optimize:
            fused = Path(tmp) / "fused" / file_name
            if _fuse(plain, fused, vision, external=external):
                result = fused
        install_graph(result, out_dir / file_name)
    return describe_vision_graph(out_dir / file_name)


def _export_plain(module: VisionGraph, path: Path, *, image_size: int, external: bool) -> None:
    path.parent.mkdir(parents=True)
    example = torch.zeros(2, 3, image_size, image_size)  # 2, not 1: torch.export specialises size-1 dims
    tiles = torch.export.Dim(TILES_AXIS, min=1)
    with export_mode(module), torch.no_grad():
        program = torch.onnx.export(
            module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes={"pixel_values": {0: tiles}}, optimize=True,
            verbose=False)
    # The graph uses nothing newer than IR 10 (standard opset-20 ops, float32/float16 only).
    program.model.ir_version = min(program.model.ir_version, MAX_IR_VERSION)
    program.save(path, external_data=external)


def _fuse(plain: Path, out: Path, vision: VisionConfig, *, external: bool) -> dict[str, int]:
    """ORT's CLIP fusions; writes `out` and returns the fused op counts, or {} when nothing fused.

    opt_level 0: only the Python fusions. ORT's own graph passes run again at every
    session load, for the EP actually used; baking them in would tie the file to the CPU EP.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(plain), model_type="clip", num_heads=vision.num_heads,
                           hidden_size=vision.hidden_size, opt_level=0)
    counts = contrib_op_counts(fused.model)
    if counts:
        out.parent.mkdir(parents=True)
        fused.model.ir_version = min(fused.model.ir_version, MAX_IR_VERSION)
        fused.save_model_to_file(str(out), use_external_data_format=external)
    return counts


def install_graph(src: Path, target: Path) -> None:
    """Move the graph and its data file into place, removing a stale data file of an earlier export.

    onnx writes the data file 0600; a bundle is shared like any model store, so both get the umask's modes.
    """
    umask = os.umask(0)
    os.umask(umask)
    for suffix in ("", ".data"):
        source, destination = Path(f"{src}{suffix}"), Path(f"{target}{suffix}")
        destination.unlink(missing_ok=True)
        if source.exists():
            source.replace(destination)
            destination.chmod(0o666 & ~umask)


def contrib_op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    """{op_type: count} of ORT's fused (com.microsoft) nodes."""
    return dict(sorted(Counter(n.op_type for n in proto.graph.node if n.domain == CONTRIB_DOMAIN).items()))


def graph_precision(proto: onnx.ModelProto) -> str:
    """fp16 when the weights are float16, else fp32."""
    halves = any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    return "fp16" if halves else "fp32"


def describe_vision_graph(path: Path) -> dict[str, Any]:
    """What the manifest records about a vision graph, read from the file itself."""
    proto = onnx.load(str(path), load_external_data=False)
    fusions = contrib_op_counts(proto)
    return {
        "file": path.name, "external_data": _external_data_file(proto), "precision": graph_precision(proto),
        "inputs": [_io(v) for v in proto.graph.input], "outputs": [_io(v) for v in proto.graph.output],
        "optimized": bool(fusions), "fusions": fusions, "opset": _opset(proto), "ir_version": proto.ir_version,
    }


def _io(value: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor = value.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim]
    return {"name": value.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, "shape": shape}


def _external_data_file(proto: onnx.ModelProto) -> str | None:
    locations = {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    if len(locations) > 1:
        raise ValueError(f"the graph's weights are spread over several files: {sorted(locations)}")
    return locations.pop() if locations else None


def _has_float8(proto: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in proto.graph.initializer)


def _opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def random_pixel_values(tiles: int, layout: ImageLayout, seed: int) -> np.ndarray:
    """CLIP-normalised uniform noise [tiles, 3, T, T]: the value range real tiles have."""
    rng = np.random.default_rng([seed, tiles])
    pixels = rng.random((tiles, 3, layout.tile_size, layout.tile_size), dtype=np.float32)
    mean = np.asarray(layout.image_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(layout.image_std, dtype=np.float32)[:, None, None]
    return (pixels - mean) / std


def validate_vision_graph(model: PulseReference, onnx_path: Path, *, tile_counts: tuple[int, ...] = (1, 5),
                          seed: int = 0, providers: list[str] | None = None,
                          tolerance: Tolerance | None = None) -> dict[str, Any]:
    """Compare the graph in ORT with the torch reference in fp32; pass=False is the caller's to act on.

    The tolerance defaults to the graph's float precision; a quantized graph's caller passes its own.
    """
    proto = onnx.load(str(onnx_path), load_external_data=False)
    precision = graph_precision(proto)
    tolerance = tolerance or TOLERANCES[precision]
    reference = _fp32_reference(model)
    options = ort.SessionOptions()
    if _opset(proto) >= FP8_MIN_OPSET and _has_float8(proto):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see export/onnx_quant.py
    session = ort.InferenceSession(str(onnx_path), options, providers=list(providers or CPU))
    shapes = []
    for tiles in tile_counts:
        pixels = random_pixel_values(tiles, model.cfg.image, seed)
        with torch.no_grad():
            ref = reference(torch.from_numpy(pixels)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0]
        shapes.append({"tiles": tiles, **compare_features(ref, got, tolerance)})
    source = "vision_features" if model.dtype == torch.float32 else f"fp32 copy of the {model.dtype} weights"
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


def time_vision_graphs(paths: Mapping[str, Path], *, tile_counts: Sequence[int] = (1, 5), rounds: int = 5,
                       providers: list[str] | None = None) -> dict[str, dict[int, dict[str, float]]]:
    """Wall time (ms) of one `session.run`: {name: {tiles: {median, min, max}}} over `rounds`.

    All sessions stay open and every round runs each graph once per tile count, in an
    order rotated per round, so load from other processes spreads over all graphs
    instead of landing on whichever ran last; the ratios are what carries over to
    other machines, not the absolute times.
    """
    sessions = [(name, ort.InferenceSession(str(path), providers=list(providers or CPU)))
                for name, path in paths.items()]
    size = sessions[0][1].get_inputs()[0].shape[-1]
    inputs = {tiles: np.zeros((tiles, 3, size, size), dtype=np.float32) for tiles in tile_counts}
    for _, session in sessions:
        for pixels in inputs.values():
            session.run([OUTPUT_NAME], {INPUT_NAME: pixels})  # warm-up: allocations, prepacking
    samples: dict[tuple[str, int], list[float]] = {(n, t): [] for n, _ in sessions for t in tile_counts}
    for index in range(rounds):
        shift = index % len(sessions)
        for name, session in sessions[shift:] + sessions[:shift]:
            for tiles in tile_counts:
                start = time.perf_counter()
                session.run([OUTPUT_NAME], {INPUT_NAME: inputs[tiles]})
                samples[(name, tiles)].append((time.perf_counter() - start) * 1e3)
    return {name: {t: {"median": statistics.median(samples[(name, t)]), "min": min(samples[(name, t)]),
                       "max": max(samples[(name, t)])} for t in tile_counts} for name, _ in sessions}
