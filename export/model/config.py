"""A checkpoint's config.json, parsed into one frozen description of the model.

Two layouts are read:

- `llava`: the original LLaVA format PULSE-7B ships in (`model_type: llava_llama`,
  LLaMA fields at the top level, `mm_*` fields for the vision side, the tower named
  by `mm_vision_tower`). Grid pinpoints are (width, height), as LLaVA reads them.
- `llava_next`: transformers' format (`model_type: llava_next`, `text_config`,
  `vision_config`). Its pinpoints are (height, width), as transformers reads them;
  they are swapped on the way in, so `ImageLayout` always holds (width, height).
  transformers always unpads and inserts `image_newline`, so that is its merge.

Every setting pulse-edge does not implement is refused here with one line that
names the allowed values, before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pulse_edge.errors import CheckpointError
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.runtime.image.preprocess import CLIP_MEAN, CLIP_STD, ImageLayout, min_context

SUPPORTED = {
    "model_type": ("llava_llama", "llava_next"),
    "mm_projector_type": ("mlp2x_gelu",),
    "mm_patch_merge_type": ("flat", "spatial_unpad"),
    "image_aspect_ratio": ("anyres",),
    "mm_vision_select_feature": ("patch",),
    "vision_feature_select_strategy": ("default",),
    "projector_hidden_act": ("gelu",),
    "text_model_type": ("llama",),
    "hidden_act": ("silu",),
}
VISION_ACTIVATIONS = ("quick_gelu", "gelu")  # CLIP towers' hidden_act (transformers' ACT2FN names)
# Upper bounds on a config's sizes, far above any LLaVA's (PULSE: hidden 4096, 32 layers, vocab 32000, 4096
# positions; its tower 1024 wide, 24 layers): a damaged or absurd value (hidden_size 10**9, 10**7 layers) is one
# line here rather than an allocation failure, or millions of modules built, before the memory check can run.
SIZE_LIMITS = MappingProxyType({
    "hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10, "vocab_size": 1 << 20,
    "max_position_embeddings": 1 << 20, "image_size": 1 << 12, "patch_size": 1 << 10, "mm_hidden_size": 1 << 16,
})

# The vision towers LLaVA-1.6 names, with their architecture (facts from their
# public configs), so a checkpoint that carries the tower's weights but only
# names its architecture can be built without the hub.
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 336, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
    "openai/clip-vit-large-patch14": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "image_size": 224, "patch_size": 14, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    },
}


def positive_int(d: Mapping[str, Any], key: str, *, source: str, default: int | None = None) -> int:
    """An integer field >= 1 (a count or a size); missing, null, fractional or out of range is one line."""
    if key not in d and default is None:
        raise CheckpointError(f"{source}: the config lacks {key!r}")
    value, limit = d.get(key, default), SIZE_LIMITS.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: {key} must be an integer >= 1, got {value!r}")
    if limit is not None and value > limit:
        raise CheckpointError(f"{source}: {key} {value} is beyond any LLaVA model's (at most {limit}); the config "
                              "is damaged: copy config.json again")
    return value


def positive_float(d: Mapping[str, Any], key: str, default: float, *, source: str) -> float:
    value = d.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise CheckpointError(f"{source}: {key} must be a number > 0, got {value!r}")
    return float(value)


def _divides(part: str, whole: str, part_value: int, whole_value: int, source: str) -> None:
    if whole_value % part_value:
        raise CheckpointError(f"{source}: {whole} {whole_value} is not a multiple of {part} {part_value}")


def check_allowed(key: str, value: Any, *, source: str) -> None:
    allowed = SUPPORTED[key]
    if value not in allowed:
        raise CheckpointError(
            f"{source}: {key} = {value!r} is not supported; pulse-edge runs {', '.join(map(repr, allowed))}")


@dataclass(frozen=True)
class TextConfig:
    """The LLaMA decoder (Vicuna-7B for PULSE)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    bos_id: int = 1
    eos_id: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, source: str) -> TextConfig:
        check_allowed("hidden_act", d.get("hidden_act", "silu"), source=source)
        rope = d.get("rope_parameters") or {}
        if d.get("rope_scaling") or rope.get("rope_type", "default") != "default":
            raise CheckpointError(f"{source}: RoPE scaling is not supported (PULSE uses plain RoPE)")
        heads = positive_int(d, "num_attention_heads", source=source)
        kv_heads = positive_int(d, "num_key_value_heads", source=source) if d.get("num_key_value_heads") else heads
        hidden = positive_int(d, "hidden_size", source=source)
        _divides("num_attention_heads", "hidden_size", heads, hidden, source)
        _divides("num_key_value_heads", "num_attention_heads", kv_heads, heads, source)
        return cls(
            hidden_size=hidden, intermediate_size=positive_int(d, "intermediate_size", source=source),
            num_layers=positive_int(d, "num_hidden_layers", source=source), num_heads=heads, num_kv_heads=kv_heads,
            vocab_size=positive_int(d, "vocab_size", source=source),
            rms_norm_eps=positive_float(d, "rms_norm_eps", 1e-6, source=source),
            rope_theta=positive_float({"rope_theta": rope.get("rope_theta", d.get("rope_theta", 10000.0))},
                                      "rope_theta", 10000.0, source=source),
            max_position_embeddings=positive_int(d, "max_position_embeddings", source=source, default=4096),
            tie_word_embeddings=_flag(d, "tie_word_embeddings", source),
            bos_id=_token_id(d, "bos_token_id", 1, source), eos_id=_token_id(d, "eos_token_id", 2, source),
        )


def _vision_act(d: Mapping[str, Any], source: str) -> str:
    value = d.get("hidden_act", "quick_gelu")
    if value not in VISION_ACTIVATIONS:
        raise CheckpointError(f"{source}: the vision tower's hidden_act = {value!r} is not supported; pulse-edge "
                              f"runs {', '.join(map(repr, VISION_ACTIVATIONS))}")
    return str(value)


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT tower; `select_layer` indexes its hidden states as LLaVA does (-2)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2

    @property
    def layers_used(self) -> int:
        """How many encoder layers the features need: hidden_states[k] is the output of layer k."""
        n = self.num_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 1 <= n <= self.num_layers:
            raise CheckpointError(f"vision select layer {self.select_layer} is out of range for "
                                  f"{self.num_layers} layers")
        return n

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], *, select_layer: int, source: str) -> VisionConfig:
        if "vision_config" in d:  # a full CLIPModel config
            d = d["vision_config"]
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source}: the vision-tower config must be an object, got {type(d).__name__}")
        heads, hidden = (positive_int(d, k, source=source) for k in ("num_attention_heads", "hidden_size"))
        _divides("num_attention_heads", "hidden_size", heads, hidden, source)
        return cls(
            hidden_size=hidden, intermediate_size=positive_int(d, "intermediate_size", source=source),
            num_layers=positive_int(d, "num_hidden_layers", source=source), num_heads=heads,
            image_size=positive_int(d, "image_size", source=source),
            patch_size=positive_int(d, "patch_size", source=source),
            hidden_act=_vision_act(d, source),
            layer_norm_eps=positive_float(d, "layer_norm_eps", 1e-5, source=source), select_layer=select_layer,
        )


@dataclass(frozen=True)
class PulseConfig:
    """Everything about a checkpoint that the reference model and the exporter need."""

    layout: str  # "llava" | "llava_next"
    text: TextConfig
    vision: VisionConfig | None  # None until the tower's architecture is resolved
    vision_tower_name: str
    mm_hidden_size: int
    image: ImageLayout
    select_layer: int = -2
    # Whether the checkpoint's own code runs the tower weights saved in it: transformers always; LLaVA only where
    # config.json sets unfreeze_mm_vision_tower (else it builds the tower late and loads mm_vision_tower's stock
    # weights over whatever the shards hold). checkpoint.resolve_vision follows it.
    runs_saved_tower: bool = True

    def with_vision(self, vision: VisionConfig) -> PulseConfig:
        if vision.hidden_size != self.mm_hidden_size:
            raise CheckpointError(f"the vision tower's width {vision.hidden_size} does not match the projector "
                                  f"input mm_hidden_size {self.mm_hidden_size}")
        if vision.image_size != self.image.tile_size or vision.patch_size != self.image.patch_size:
            expected = f"{self.image.tile_size}/{self.image.patch_size}"
            raise CheckpointError(f"the vision tower takes {vision.image_size}px images in {vision.patch_size}px "
                                  f"patches, but the image layout expects {expected}")
        return replace(self, vision=vision)


def read_config(checkpoint: Path) -> PulseConfig:
    """Parse `checkpoint/config.json` in either layout (the vision side may stay unresolved)."""
    path = checkpoint / "config.json"
    if not path.is_file():
        if (checkpoint / "manifest.json").is_file():
            raise CheckpointError(f"{checkpoint} is a pulse-edge bundle, not a checkpoint: this command reads the "
                                  "checkpoint a bundle is exported from (config.json, weights, tokenizer.model)")
        raise CheckpointError(f"{checkpoint} is not a checkpoint: it has no config.json (a checkpoint holds "
                              "config.json, the weights and tokenizer.model)")
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e})") from e
    except JSON_TEXT_ERRORS as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({json_error_reason(e)}); copy config.json again") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} holds a JSON {type(d).__name__}, not a config object; the checkpoint is "
                              "damaged: copy config.json again")
    model_type = d.get("model_type")
    check_allowed("model_type", model_type, source=str(path))
    parse = _parse_llava if model_type == "llava_llama" else _parse_llava_next
    return _check_positions(parse(d, str(path)), path)


def _check_positions(cfg: PulseConfig, path: Path) -> PulseConfig:
    """The model's positions hold its smallest image and an exchange, or it answers nothing (found only after the
    weights were read, and blamed on an --max-context the user never gave)."""
    least = min_context(cfg.image)
    if cfg.text.max_position_embeddings < least:
        raise CheckpointError(f"{path}: max_position_embeddings {cfg.text.max_position_embeddings} cannot hold the "
                              f"smallest image of its image_grid_pinpoints and an exchange ({least} positions); the "
                              "config is damaged or not a LLaVA-1.6 one: copy config.json again")
    return cfg


def _flag(d: Mapping[str, Any], key: str, source: str) -> bool:
    """A true/false field: the string "false" was True to bool()."""
    value = d.get(key)
    if value is None:  # absent or null: transformers' default
        return False
    if not isinstance(value, bool):
        raise CheckpointError(f"{source}: {key} must be true or false, got {value!r}")
    return value


def _token_id(d: Mapping[str, Any], key: str, default: int, source: str) -> int:
    value = d.get(key) or default  # LLaVA configs often carry null ids
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{source}: {key} must be a token id >= 0, got {value!r}")
    return value


def _pixels(value: Any) -> int:
    """A pinpoint side: a whole number of pixels (JSON may write 672.0), never a truncated 672.5, a bool or text."""
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        raise ValueError(value)
    return int(value)


def _pinpoints(raw: Any, *, swap: bool, source: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((_pixels(a), _pixels(b)) for a, b in raw)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: image_grid_pinpoints must be a list of [w, h] pairs of whole pixels, "
                              f"got {raw!r}") from e
    return tuple((b, a) for a, b in pairs) if swap else pairs


def _parse_llava(d: Mapping[str, Any], source: str) -> PulseConfig:
    for key in ("mm_projector_type", "mm_patch_merge_type", "image_aspect_ratio", "mm_vision_select_feature"):
        default = {"mm_patch_merge_type": "flat", "mm_vision_select_feature": "patch"}.get(key)
        check_allowed(key, d.get(key, default), source=source)
    if d.get("mm_use_im_start_end") or d.get("mm_use_im_patch_token"):
        raise CheckpointError(f"{source}: mm_use_im_start_end / mm_use_im_patch_token are not supported "
                              "(PULSE uses neither)")
    if "mm_vision_tower" not in d or "mm_hidden_size" not in d:
        raise CheckpointError(f"{source}: a llava_llama config needs mm_vision_tower and mm_hidden_size")
    select_layer = d.get("mm_vision_select_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):
        raise CheckpointError(f"{source}: mm_vision_select_layer must be one layer index, got {select_layer!r}")
    tile = _tile_size(d.get("mm_vision_tower"))
    image = ImageLayout(tile_size=tile, patch_size=14,
                        grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints"), swap=False, source=source),
                        image_mean=CLIP_MEAN, image_std=CLIP_STD, merge=d.get("mm_patch_merge_type", "flat"),
                        unpad="llava")  # LLaVA's own unpad_image runs this layout
    return PulseConfig(layout="llava", text=TextConfig.from_hf(d, source=source), vision=None,
                       vision_tower_name=str(d["mm_vision_tower"]),
                       mm_hidden_size=positive_int(d, "mm_hidden_size", source=source),
                       image=image, select_layer=select_layer,
                       runs_saved_tower=bool(d.get("unfreeze_mm_vision_tower", False)))


def _tile_size(tower_name: Any) -> int:
    """Tile size before the tower is resolved; corrected by `with_vision` if the tower says otherwise."""
    known = KNOWN_TOWERS.get(str(tower_name))
    return int(known["image_size"]) if known else 336


def _parse_llava_next(d: Mapping[str, Any], source: str) -> PulseConfig:
    text_d, vision_d = d.get("text_config") or {}, d.get("vision_config") or {}
    for key, value in (("text_config", text_d), ("vision_config", vision_d)):
        if not isinstance(value, Mapping):
            raise CheckpointError(f"{source}: {key} must be an object, got {type(value).__name__}")
    check_allowed("text_model_type", text_d.get("model_type", "llama"), source=source)
    check_allowed("vision_feature_select_strategy", d.get("vision_feature_select_strategy", "default"), source=source)
    check_allowed("projector_hidden_act", d.get("projector_hidden_act", "gelu"), source=source)
    select_layer = d.get("vision_feature_layer", -2)
    if isinstance(select_layer, bool) or not isinstance(select_layer, int):  # true was layer 1
        raise CheckpointError(f"{source}: vision_feature_layer must be one layer index, got {select_layer!r}")
    vision = VisionConfig.from_hf(vision_d, select_layer=select_layer, source=source)
    image = ImageLayout(tile_size=vision.image_size, patch_size=vision.patch_size,
                        grid_pinpoints=_pinpoints(d.get("image_grid_pinpoints"), swap=True, source=source),
                        image_mean=CLIP_MEAN, image_std=CLIP_STD, merge="spatial_unpad")
    cfg = PulseConfig(layout="llava_next", text=TextConfig.from_hf(text_d, source=source), vision=None,
                      vision_tower_name=str(vision_d.get("_name_or_path", "llava_next.vision_config")),
                      mm_hidden_size=vision.hidden_size, image=image, select_layer=select_layer)
    return cfg.with_vision(vision)
