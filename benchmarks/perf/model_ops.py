"""The linear-layer work of a PULSE-shaped model, from its checkpoint's config: what the compute fractions count.

    decoder, per prompt position:  2 x layers x (H (N + 2 KVN) D + N D H + 2 H I + I H)       (qkv, o, gate_up, down)
    vision, per tile:              2 x layers_used x T x (4 Hv^2 + 2 Hv Iv) + 2 x (T - 1) x (Hv H + H H)
                                   (T = (image / patch)^2 + 1 tokens; the projector's two Linears on all but CLS)

Attention's own products (QK^T, PV), the norms and lm_head (one position) are left out: they are
extra work a fraction of the GEMM peak charges to the measured time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelOps:
    decoder_ops_per_position: float
    vision_ops_per_tile: float

    def prefill(self, positions: int) -> float:
        return self.decoder_ops_per_position * positions

    def vision(self, tiles: int) -> float:
        return self.vision_ops_per_tile * tiles

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    return ModelOps(decoder_ops_per_position=decoder, vision_ops_per_tile=vision)
