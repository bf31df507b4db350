"""Random PULSE-shaped checkpoints for trying every command without the 14 GB weights.

`make_tiny_checkpoint` writes a small model (tiny CLIP + tiny LLaMA) in the
original LLaVA layout PULSE ships in: `config.json` with `model_type:
llava_llama` and the `mm_*` fields, sharded safetensors with the original key
names plus their index, and a SentencePiece `tokenizer.model` trained here on
ECG-report-like text. `full_shape=True` writes the real 7B shapes instead
(Vicuna-7B + CLIP ViT-L/14-336), tensor by tensor, shard by shard, so memory
stays at about one shard. The same weights can be written in transformers'
`llava_next` layout (the loader's other format).

Weights are random, scaled so that activations keep unit scale through the
layers and the logits are decisive (greedy choices are not near-ties); they say
nothing about accuracy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pulse_edge.errors import ConfigError
from pulse_edge.export.checkpoint import KEY_MAPS, parameters_on_meta
from pulse_edge.export.config import PulseConfig, TextConfig, VisionConfig
from pulse_edge.export.reference import PulseReference
from pulse_edge.export.staging import staged_directory
from pulse_edge.export.tiny_tokenizer import train_tiny_tokenizer
from pulse_edge.runtime.preprocess import CLIP_MEAN, CLIP_STD, PULSE_PINPOINTS, ImageLayout

TOWER_DIR = "clip-vision-tower"
SEPARATE_TOWER_NAME = "pulse-edge/tiny-clip-vit-336"
FULL_TOWER_NAME = "openai/clip-vit-large-patch14-336"

TINY_TEXT = {"hidden_size": 64, "intermediate_size": 176, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4}
TINY_VISION = {"hidden_size": 48, "intermediate_size": 96, "num_layers": 3, "num_heads": 4}
FULL_TEXT = {"hidden_size": 4096, "intermediate_size": 11008, "num_layers": 32, "num_heads": 32, "num_kv_heads": 32}
FULL_VISION = {"hidden_size": 1024, "intermediate_size": 4096, "num_layers": 24, "num_heads": 16}
FULL_VOCAB = 32000
TOWER_CHOICES = ("inside", "separate")
LAYOUT_CHOICES = ("llava", "llava_next")
MERGE_CHOICES = ("flat", "spatial_unpad")


@dataclass(frozen=True)
class TinySpec:
    """What to write; `full_shape` switches to the real PULSE-7B dimensions."""

    seed: int = 0
    merge: str = "flat"
    tower: str = "inside"
    layout: str = "llava"
    full_shape: bool = False
    dtype: torch.dtype = torch.float32
    shard_bytes: int = 5 * 2**30
    layers: int | None = None  # decoder layers; e.g. the real width with 2 layers for benchmarks
    outliers: int = 0  # hidden dims given outlier activations (see inject_outliers), picked with `seed`
    outlier_scale: float = 50.0

    def __post_init__(self) -> None:
        for name, value, allowed in (("merge", self.merge, MERGE_CHOICES), ("tower", self.tower, TOWER_CHOICES),
                                     ("layout", self.layout, LAYOUT_CHOICES)):
            if value not in allowed:
                raise ConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.layout == "llava_next" and self.merge != "spatial_unpad":
            raise ConfigError("the llava_next layout always unpads: use merge spatial_unpad")
        if self.layout == "llava_next" and self.tower != "inside":
            raise ConfigError("the llava_next layout always carries its vision tower inside")
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"layers must be >= 1, got {self.layers}")
        if self.outliers < 0:
            raise ConfigError(f"outliers must be >= 0, got {self.outliers}")
        _check_outlier_scale(self.outlier_scale)


def model_config(spec: TinySpec, vocab_size: int) -> PulseConfig:
    text = dict(FULL_TEXT if spec.full_shape else TINY_TEXT)
    if spec.layers is not None:
        text["num_layers"] = spec.layers
    vision = FULL_VISION if spec.full_shape else TINY_VISION
    tower_name = FULL_TOWER_NAME if spec.full_shape else (TOWER_DIR if spec.tower == "inside" else SEPARATE_TOWER_NAME)
    return PulseConfig(
        layout=spec.layout,
        text=TextConfig(vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=4096, **text),
        vision=VisionConfig(image_size=336, patch_size=14, select_layer=-2, **vision),
        vision_tower_name=tower_name, mm_hidden_size=vision["hidden_size"],
        image=ImageLayout(tile_size=336, patch_size=14, grid_pinpoints=PULSE_PINPOINTS, image_mean=CLIP_MEAN,
                          image_std=CLIP_STD, merge=spec.merge),
    )


def parameter_shapes(cfg: PulseConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the reference model's parameters, without allocating them."""
    with parameters_on_meta():
        model = PulseReference(cfg, attn_implementation="eager")
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Unit-scale-preserving random values: N(0, 1/fan_in) for matrices, ~1 for norm gains."""
    if name.endswith(("layernorm.weight", "layrnorm.weight", "norm.weight", "layer_norm1.weight",
                      "layer_norm2.weight")):
        return (1.0 + 0.05 * torch.randn(shape, generator=generator)).to(dtype)
    if len(shape) == 1:
        return (0.02 * torch.randn(shape, generator=generator)).to(dtype)
    if "embed_tokens" in name or "position_embedding" in name:
        return torch.randn(shape, generator=generator).to(dtype)
    fan_in = math.prod(shape[1:])
    return (torch.randn(shape, generator=generator) / math.sqrt(fan_in)).to(dtype)


def file_key(name: str, layout: str) -> str:
    """The inverse of the loader's key map: the file's name for a reference parameter."""
    for file_prefix, model_prefix in KEY_MAPS[layout]:
        if name.startswith(model_prefix):
            return file_prefix + name[len(model_prefix):]
    raise KeyError(name)


def tensors(spec: TinySpec, cfg: PulseConfig, *, include_tower: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """(reference name, tensor) pairs, each from its own seeded generator so order does not matter."""
    keep = cfg.vision.num_layers  # the file holds the whole tower, as real checkpoints do
    for index, (name, shape) in enumerate(parameter_shapes(cfg).items()):
        if name.startswith("vision_tower.") and not include_tower:
            continue
        if ".encoder.layers." in name and int(name.split(".encoder.layers.")[1].split(".")[0]) >= keep:
            continue
        generator = torch.Generator().manual_seed(spec.seed * 100_003 + index)
        yield name, random_tensor(name, shape, generator, spec.dtype)


def write_shards(items: Iterator[tuple[str, torch.Tensor]], out: Path, *, shard_bytes: int,
                 prefix: str = "model") -> None:
    """Write safetensors shards of at most `shard_bytes` plus their index, holding one shard at a time."""
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        path = out / f"{prefix}-{len(written) + 1:05d}.partial"
        save_file(shard, str(path), metadata={"format": "pt"})
        written.append((path, list(shard)))

    for key, tensor in items:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = tensor
        size += nbytes
        total += nbytes
    flush()
    weight_map: dict[str, str] = {}
    for i, (path, keys) in enumerate(written, start=1):
        final = f"{prefix}-{i:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / final)
        weight_map.update(dict.fromkeys(keys, final))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))


def llava_config_dict(cfg: PulseConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json in the original LLaVA layout, with the fields PULSE-7B's config carries."""
    t = cfg.text
    return {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size, "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps, "rope_theta": t.rope_theta, "rope_scaling": None,
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": False,
        "bos_token_id": t.bos_id, "eos_token_id": t.eos_id, "pad_token_id": 0, "attention_bias": False,
        "torch_dtype": _dtype_name(dtype), "use_cache": True,
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": [list(p) for p in cfg.image.grid_pinpoints],
        "mm_patch_merge_type": cfg.image.merge, "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": cfg.mm_hidden_size, "mm_vision_tower": cfg.vision_tower_name,
        "mm_vision_select_layer": cfg.select_layer, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
        "tokenizer_model_max_length": t.max_position_embeddings, "tokenizer_padding_side": "right",
        "unfreeze_mm_vision_tower": True,
    }


def llava_next_config_dict(cfg: PulseConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json in transformers' llava_next layout (pinpoints as [height, width])."""
    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["LlavaNextForConditionalGeneration"], "model_type": "llava_next",
        "image_grid_pinpoints": [[h, w] for w, h in cfg.image.grid_pinpoints],
        "vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu", "image_token_index": t.vocab_size, "torch_dtype": _dtype_name(dtype),
        "tie_word_embeddings": False,
        "text_config": {
            "model_type": "llama", "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
            "num_key_value_heads": t.num_kv_heads, "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta, "max_position_embeddings": t.max_position_embeddings,
            "hidden_act": "silu", "bos_token_id": t.bos_id, "eos_token_id": t.eos_id,
        },
        "vision_config": _clip_config_dict(v),
    }


def _clip_config_dict(v: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "clip_vision_model", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "image_size": v.image_size,
        "patch_size": v.patch_size, "hidden_act": v.hidden_act, "layer_norm_eps": v.layer_norm_eps,
        "num_channels": 3,
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_tiny_checkpoint(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a checkpoint directory; written to a temporary sibling and renamed at the end."""
    out = Path(out_dir)
    with staged_directory(out, what="checkpoint") as work:
        _write_checkpoint(work, spec or TinySpec())
    return out


def _write_checkpoint(work: Path, spec: TinySpec) -> None:
    tokenizer = train_tiny_tokenizer(work / "tokenizer.model", seed=spec.seed)
    vocab = FULL_VOCAB if spec.full_shape else _sp_vocab_size(tokenizer)
    cfg = model_config(spec, vocab)
    inside = spec.tower == "inside"
    named = tensors(spec, cfg, include_tower=inside)
    if spec.outliers:
        dims = pick_outlier_dims(cfg.text.hidden_size, spec.outliers, seed=spec.seed)
        named = ((n, outlier_scaled(n, t, dims, spec.outlier_scale)) for n, t in named)
    layout_tensors = ((file_key(n, spec.layout), t) for n, t in named)
    write_shards(layout_tensors, work, shard_bytes=spec.shard_bytes if spec.full_shape else 512 * 2**10)
    config = (llava_config_dict if spec.layout == "llava" else llava_next_config_dict)(cfg, spec.dtype)
    (work / "config.json").write_text(json.dumps(config, indent=2))
    if not spec.full_shape and spec.layout == "llava":
        _write_tower_dir(work / TOWER_DIR, spec, cfg)


def _write_tower_dir(tower: Path, spec: TinySpec, cfg: PulseConfig) -> None:
    """A CLIP vision model directory in transformers' format (keys `vision_model.*`), with the
    same random tower weights that go inside the checkpoint."""
    tower.mkdir()
    items = ((file_key(n, "clip"), t) for n, t in tensors(spec, cfg, include_tower=True)
             if n.startswith("vision_tower."))
    save_file(dict(items), str(tower / "model.safetensors"), metadata={"format": "pt"})
    (tower / "config.json").write_text(json.dumps(_clip_config_dict(cfg.vision), indent=2))


def _sp_vocab_size(model_path: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_path)).get_piece_size()


# --- outlier channels ----------------------------------------------------------------------------------------
# Trained LLMs have a few hidden dims whose normalised activations are tens of times larger
# than the rest; they are what makes per-tensor activation quantization hard. Random weights
# have none, so a quantizer tested on them looks better than it is. The transform below puts
# such dims in without changing the function: RMSNorm's gain on dim d is multiplied by k and
# the matching input column of every linear layer that reads that norm is divided by k.


def _scale_gain(tensor: torch.Tensor, dims: list[int], scale: float) -> torch.Tensor:
    out = tensor.float().clone()
    out[dims] *= scale
    return out.to(tensor.dtype)


def _scale_input_columns(tensor: torch.Tensor, dims: list[int], scale: float) -> torch.Tensor:
    out = tensor.float().clone()
    out[:, dims] /= scale
    return out.to(tensor.dtype)


# Decoder parameter-name suffix -> how its hidden-dim axis changes; each norm with the layers that read it.
_OUTLIER_RULES: tuple[tuple[str, Callable[[torch.Tensor, list[int], float], torch.Tensor]], ...] = (
    ("input_layernorm.weight", _scale_gain),
    ("self_attn.q_proj.weight", _scale_input_columns),
    ("self_attn.k_proj.weight", _scale_input_columns),
    ("self_attn.v_proj.weight", _scale_input_columns),
    ("post_attention_layernorm.weight", _scale_gain),
    ("mlp.gate_proj.weight", _scale_input_columns),
    ("mlp.up_proj.weight", _scale_input_columns),
)


def _check_outlier_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ConfigError(f"outlier scale must be a positive number, got {scale}")


def pick_outlier_dims(hidden_size: int, dims: Sequence[int] | int, *, seed: int = 0) -> list[int]:
    """Sorted hidden dims: `dims` itself (checked), or that many drawn with `seed`."""
    if isinstance(dims, int):
        if not 0 < dims <= hidden_size:
            raise ConfigError(f"the number of outlier dims must be between 1 and {hidden_size}, got {dims}")
        return sorted(torch.randperm(hidden_size, generator=torch.Generator().manual_seed(seed))[:dims].tolist())
    picked = sorted(int(d) for d in dims)
    if not picked or len(set(picked)) != len(picked) or not 0 <= picked[0] <= picked[-1] < hidden_size:
        raise ConfigError(f"outlier dims must be distinct and within 0..{hidden_size - 1}, got {list(dims)}")
    return picked


def outlier_scaled(name: str, tensor: torch.Tensor, dims: list[int], scale: float) -> torch.Tensor:
    """`tensor` with the outlier transform applied if `name` is a decoder layer's norm or q/k/v/gate/up
    weight (reference names, `language_model.` prefix optional); any other tensor is returned as is."""
    # The CLIP tower's layers also have self_attn.q_proj: only the decoder's layers qualify.
    if not name.removeprefix("language_model.").startswith("model.layers."):
        return tensor
    rule = next((fn for suffix, fn in _OUTLIER_RULES if name.endswith(suffix)), None)
    return tensor if rule is None else rule(tensor, dims, scale)


def inject_outliers(model: PulseReference, dims: Sequence[int] | int, scale: float = 50.0, seed: int = 0) -> list[int]:
    """Give every decoder layer's q/k/v and gate/up inputs outlier dims `scale` times larger, in place.

    `dims`: the hidden dims, or how many to draw with `seed`. The model's outputs stay the same
    up to float rounding (exactly so where `scale` is a power of two). Returns the dims, sorted.
    """
    _check_outlier_scale(scale)
    lm = model.language_model
    picked = pick_outlier_dims(lm.config.hidden_size, dims, seed=seed)
    with torch.no_grad():
        for name, param in lm.named_parameters():
            data = param.data
            changed = outlier_scaled(name, data, picked, scale)
            if changed is not data:
                data.copy_(changed)
    return picked
