"""The linear-layer work of a PULSE-shaped model, from its checkpoint's config: what the compute fractions count.

    decoder, per prompt position:  2 x layers x (H (N + 2 KVN) D + N D H + 2 H I + I H)       (qkv, o, gate_up, down)
    vision, per tile:              2 x layers_used x T x (4 Hv^2 + 2 Hv Iv) + 2 x (T - 1) x (Hv H + H H)
                                   (T = (image / patch)^2 + 1 tokens; the projector's two Linears on all but CLS)

Attention's own products (QK^T, PV), the norms and lm_head (one position) are left out: they are
extra work a fraction of the GEMM peak charges to the measured time.

A bundle is counted from its own graphs (bundle_ops), so a cart without the checkpoint gets the same figures:
every product with a constant weight, K x N multiply-adds per position (the lm_head, the logits' product, left out);
a tile's vision products on all T tokens, the projector's on the CLS token too (0.01% more than above at
PULSE's shape).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pulse_edge.benchmarks.common.ort_trace import GEMM_ROLES, PASS_THROUGH, role_of
from pulse_edge.runtime.bundle import names
from pulse_edge.runtime.image.preprocess import ImageLayout, tile_count

WEIGHT_INPUT = {"QLinearMatMul": 3, "QGemm": 3}  # where each product's weight comes in; the others: input 1


@dataclass(frozen=True)
class ModelOps:
    decoder_ops_per_position: float
    vision_ops_per_tile: float  # 0: no vision graph to count
    image: ImageLayout | None = None  # how many tiles an image takes (None: unknown, no vision work counted)

    def prefill(self, positions: int) -> float:
        return self.decoder_ops_per_position * positions

    def vision(self, tiles: int) -> float:
        return self.vision_ops_per_tile * tiles

    def tiles(self, image_size: tuple[int, int]) -> int | None:
        """The tiles the vision tower runs for an image of `image_size` (width, height)."""
        return tile_count(image_size, self.image) if self.image is not None and self.vision_ops_per_tile else None

    def to_dict(self) -> dict[str, Any]:
        return {"decoder_ops_per_position": self.decoder_ops_per_position,
                "vision_ops_per_tile": self.vision_ops_per_tile}


def model_ops(checkpoint: Path) -> ModelOps:
    from pulse_edge.export.model.checkpoint import resolve_vision
    from pulse_edge.export.model.config import read_config

    cfg, _ = resolve_vision(read_config(checkpoint), checkpoint, None, has_tower_weights=True)
    t, v = cfg.text, cfg.vision
    d = t.head_dim
    per_layer = t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * d + t.num_heads * d * t.hidden_size \
        + 3 * t.hidden_size * t.intermediate_size
    decoder = 2.0 * t.num_layers * per_layer
    vision = 0.0
    if v is not None:
        tokens = (v.image_size // v.patch_size) ** 2 + 1
        tower = 2.0 * v.layers_used * tokens * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
        projector = 2.0 * (tokens - 1) * (v.hidden_size * t.hidden_size + t.hidden_size ** 2)
        vision = tower + projector
    return ModelOps(decoder_ops_per_position=decoder, vision_ops_per_tile=vision, image=cfg.image)


def ops_of(model_dir: Path) -> ModelOps | None:
    """A bundle's work from its graphs, a checkpoint's from its config; None: a bundle of engines (no ONNX)."""
    return bundle_ops(model_dir) if (model_dir / "manifest.json").is_file() else model_ops(model_dir)


def bundle_ops(bundle: Path) -> ModelOps | None:
    from pulse_edge.runtime.bundle.manifest import read_manifest

    manifest = read_manifest(bundle)
    files = {name: bundle / spec.file for name, spec in manifest.graphs.items() if name in ("decoder", "vision")}
    if "decoder" not in files or any(path.suffix != ".onnx" for path in files.values()):
        return None
    image = manifest.image
    tokens = (image.tile_size // image.patch_size) ** 2 + 1
    vision = 2.0 * tokens * graph_linear_macs(files["vision"]) if "vision" in files else 0.0
    return ModelOps(decoder_ops_per_position=2.0 * graph_linear_macs(files["decoder"]), vision_ops_per_tile=vision,
                    image=image)


def graph_linear_macs(path: Path) -> int:
    """Multiply-adds per position of an ONNX graph's products with a constant weight: K x N each, MatMulNBits from
    its K and N attributes, the others from their weight's dims (through a Q/DQ weight's DequantizeLinear). The
    product the `logits` output comes from (the lm_head: one position) is left out; products of two activations
    (attention) have no constant weight. ORT's fused `Attention` op (packed QKV weights, from its offline
    optimizer) is not counted: the export never writes it. Needs the onnx package (the export extra)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dims = {t.name: tuple(t.dims) for t in graph.initializer}
    producer = {out: n for n in graph.node for out in n.output}

    def source(name: str, depth: int = 0) -> tuple[str, Any]:
        """The initializer or node a tensor comes from, through PASS_THROUGH nodes (a Cast, a DequantizeLinear)."""
        node = producer.get(name)
        through = node is not None and (node.op_type in PASS_THROUGH or node.name == names.POISON_ADD)
        if name in dims or not through or depth > 4:
            return name, node
        return source(node.input[0], depth + 1)

    lm_head = source(names.LOGITS)[1]
    total = 0
    for node in graph.node:
        if role_of(node.op_type) not in GEMM_ROLES or node is lm_head:
            continue
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            total += attrs["K"] * attrs["N"]
            continue
        weight = source(node.input[WEIGHT_INPUT.get(node.op_type, 1)])[0]
        total += math.prod(dims[weight]) if weight in dims else 0
    return total
