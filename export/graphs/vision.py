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
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import MappingProxyType

import onnx
import torch
from torch import nn

from pulse_edge.export.model.config import VisionConfig
from pulse_edge.export.model.reference import PulseReference
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.bundle.manifest import GraphSpec, TensorSpec
from pulse_edge.staging import Interrupted, interrupt_requested

INPUT_NAME = names.PIXEL_VALUES
OUTPUT_NAME = names.IMAGE_FEATURES
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
                        external_data_threshold: int = EXTERNAL_DATA_THRESHOLD) -> GraphSpec:
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
        try:
            program = torch.onnx.export(
                module, (example,), dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: tiles}}, optimize=True,
                verbose=False)
        except Exception as e:
            # torch.onnx wraps what it catches in its own errors (a ConversionError asking for a bug report),
            # an interruption it caught included: a signal that came during the export is the cause
            signum = interrupt_requested()
            if signum is not None:
                raise Interrupted(signum) from e
            raise
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


def describe_vision_graph(path: Path) -> GraphSpec:
    """What the manifest records about a vision graph, read from the file itself."""
    proto = onnx.load(str(path), load_external_data=False)
    external = _external_data_file(proto)
    files = [path.name, *([external] if external else [])]
    return GraphSpec(file=path.name, engine="onnx", precision=graph_precision(proto),
                     inputs=tuple(_io(v) for v in proto.graph.input), outputs=tuple(_io(v) for v in proto.graph.output),
                     sizes={f: (path.parent / f).stat().st_size for f in files}, external_data=external,
                     opset=graph_opset(proto), ir_version=proto.ir_version, fusions=contrib_op_counts(proto))


def _io(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    shape = tuple(d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in tensor.shape.dim)
    return TensorSpec(value.name, onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name, shape)


def _external_data_file(proto: onnx.ModelProto) -> str | None:
    locations = {entry.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for entry in t.external_data if entry.key == "location"}
    if len(locations) > 1:
        raise ValueError(f"the graph's weights are spread over several files: {sorted(locations)}")
    return locations.pop() if locations else None


def has_float8(proto: onnx.ModelProto) -> bool:
    return any(t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in proto.graph.initializer)


def graph_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
