"""The torch reference model: PULSE exactly as LLaVA-1.6 runs it.

    tiles [K, 3, 336, 336]
      -> CLIP ViT (first `layers_used` layers; hidden_states[select_layer])   [K, 577, 1024]
      -> drop CLS                                                             [K, 576, 1024]
      -> mlp2x_gelu projector: Linear, GELU(erf), Linear                      [K, 576, 4096]
      -> merge: flat (PULSE)            -> [K * 576, 4096]
                spatial_unpad (1.6/HF)  -> [576 + h' * (w' + 1), 4096]  (image_newline per row)
      -> splice into the token embeddings at the image slot                   [1, L, 4096]
      -> LLaMA decoder -> logits

It is built from transformers' CLIP and LLaMA blocks; the layout (truncation,
merge, splice) is implemented here because transformers' LlavaNext classes
always unpad, which is not PULSE's flat layout. This model is the oracle every
export and quantization is validated against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from pulse_edge.errors import PromptError
from pulse_edge.export.model.config import PulseConfig
from pulse_edge.runtime.image.preprocess import select_best_resolution, unpad_crop
from pulse_edge.runtime.text.prompt import IMAGE_SLOT, image_slot_index


def llama_config(cfg: PulseConfig, attn_implementation: str = "sdpa") -> LlamaConfig:
    t = cfg.text
    config = LlamaConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size, num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads, vocab_size=t.vocab_size,
        rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=t.tie_word_embeddings, bos_token_id=t.bos_id, eos_token_id=t.eos_id,
        hidden_act="silu", attention_bias=False, mlp_bias=False,
    )
    config._attn_implementation = attn_implementation
    return config


def clip_config(cfg: PulseConfig, attn_implementation: str = "sdpa") -> CLIPVisionConfig:
    v = cfg.vision
    if v is None:
        raise ValueError("the vision tower's architecture must be resolved before the model is built")
    config = CLIPVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
        hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps,
    )
    config._attn_implementation = attn_implementation
    return config


class PulseReference(nn.Module):
    """Vision tower + projector + decoder; parameter names are pulse-edge's internal ones."""

    def __init__(self, cfg: PulseConfig, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.text.hidden_size
        self.vision_tower = CLIPVisionModel(clip_config(cfg, attn_implementation))
        self.mm_projector = nn.Sequential(nn.Linear(cfg.mm_hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.language_model = LlamaForCausalLM(llama_config(cfg, attn_implementation))
        if cfg.image.merge == "spatial_unpad":
            self.image_newline = nn.Parameter(torch.zeros(hidden))
        else:
            self.register_parameter("image_newline", None)

    def drop_unused_vision_layers(self) -> None:
        """Keep only the layers whose output LLaVA reads (23 of 24 for select_layer -2)."""
        layers = self.vision_tower.encoder.layers
        keep = self.cfg.vision.layers_used
        self.vision_tower.encoder.layers = nn.ModuleList(list(layers)[:keep])

    @property
    def dtype(self) -> torch.dtype:
        return self.mm_projector[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.mm_projector[0].weight.device

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[K, 3, t, t] -> [K, (t/p)^2, H]: the tower's select layer, patch tokens only, projected."""
        if len(self.vision_tower.encoder.layers) != self.cfg.vision.layers_used:
            raise RuntimeError("call drop_unused_vision_layers() after loading the weights")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.vision_tower(pixel_values=pixel_values).last_hidden_state  # [K, 1 + P, Hv]
        return self.mm_projector(hidden[:, 1:])  # [K, P, H]

    def merge(self, features: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """[K, P, H] -> [T, H] by the checkpoint's merge rule."""
        if self.cfg.image.merge == "flat":
            return features.flatten(0, 1)  # base image first, then tiles row-major
        return unpad_merge(features, image_size, self.cfg, self.image_newline)

    def embed(self, ids: Sequence[int], image_features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings with the image features spliced in at the slot: [1, L, H]."""
        embed_tokens = self.language_model.get_input_embeddings()
        if image_features is None:
            if IMAGE_SLOT in ids:
                raise PromptError("the prompt has an image slot but no image was given")
            return embed_tokens(torch.tensor([list(ids)], device=self.device))
        slot = image_slot_index(ids)
        before = embed_tokens(torch.tensor(list(ids[:slot]), device=self.device))  # [S0, H]
        after = embed_tokens(torch.tensor(list(ids[slot + 1:]), device=self.device))  # [S1, H]
        return torch.cat([before, image_features.to(before.dtype), after], dim=0)[None]  # [1, L, H]


def unpad_merge(features: torch.Tensor, image_size: tuple[int, int], cfg: PulseConfig,
                image_newline: torch.Tensor) -> torch.Tensor:
    """LLaVA-1.6 `spatial_unpad`: tiles re-assembled into one feature map, the padding
    rows/columns removed, one `image_newline` at the end of each row, base tokens first."""
    layout = cfg.image
    side = layout.tile_size // layout.patch_size
    width, height = select_best_resolution(image_size, layout.grid_pinpoints)
    cols, rows = width // layout.tile_size, height // layout.tile_size
    base, tiles = features[0], features[1:]  # [P, H], [rows*cols, P, H]
    grid = tiles.reshape(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3)  # [H, rows, side, cols, side]
    grid = grid.reshape(grid.shape[0], rows * side, cols * side)  # [H, rows*side, cols*side]
    kept_rows, kept_cols = unpad_crop(image_size, cols * side, rows * side, layout.unpad)  # the checkpoint's rule
    grid = grid[:, kept_rows, kept_cols]  # [H, h', w']
    newline = image_newline[:, None, None].expand(grid.shape[0], grid.shape[1], 1).to(grid.dtype)
    grid = torch.cat([grid, newline], dim=-1)  # [H, h', w' + 1]
    return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)], dim=0)  # [P + h'(w'+1), H]

