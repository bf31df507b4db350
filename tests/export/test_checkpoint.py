"""Checkpoint loading in both layouts, the vision-tower rules, and one clear error per unsupported setting."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pulse_edge.errors import CheckpointError
from pulse_edge.export.fixtures.tiny import TOWER_DIR, TinySpec, make_tiny_checkpoint
from pulse_edge.export.model.checkpoint import checkpoint_sha256, load_checkpoint, read_template


def _params(root: Path, **kwargs) -> dict[str, torch.Tensor]:
    return dict(load_checkpoint(root, **kwargs).model.named_parameters())


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(root: Path, **changes) -> None:
    path = root / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_tiny_checkpoint_has_the_original_llava_layout(tiny_checkpoint: Path) -> None:
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["mm_patch_merge_type"] == "flat"
    assert cfg["image_grid_pinpoints"] == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) >= 2, "the tiny checkpoint should be sharded like the real one"
    for key in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                "lm_head.weight", "model.mm_projector.0.weight", "model.mm_projector.2.bias",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight"):
        assert key in index, key
    assert (tiny_checkpoint / "tokenizer.model").is_file()


def test_loaded_model_keeps_only_the_vision_layers_llava_reads(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    vision = loaded.config.vision
    assert vision.num_layers == 3 and vision.select_layer == -2
    assert len(loaded.model.vision_tower.encoder.layers) == 2  # hidden_states[-2] = output of layer 2 of 3
    assert loaded.model.image_newline is None  # flat merge has no image_newline


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_load_in_each_dtype(tiny_checkpoint: Path, dtype: torch.dtype) -> None:
    params = _params(tiny_checkpoint, dtype=dtype)
    assert {p.dtype for p in params.values()} == {dtype}
    assert not any(p.device.type == "meta" for p in params.values())


def test_separate_tower_needs_vision_tower_dir(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = make_tiny_checkpoint(tmp_path / "sep", TinySpec(tower="separate"))
    with pytest.raises(CheckpointError, match="--vision-tower"):
        load_checkpoint(root)
    tower = _copy(root / TOWER_DIR, tmp_path / "tower")
    shutil.rmtree(root / TOWER_DIR)
    # same seed, same weights: loading the tower from outside equals the tower-inside checkpoint
    sep, inside = _params(root, vision_tower=tower), _params(tiny_checkpoint)
    assert sep.keys() == inside.keys()
    for name in inside:
        torch.testing.assert_close(sep[name], inside[name], rtol=0, atol=0)


def test_vision_tower_dir_takes_precedence_over_the_named_tower(tmp_path: Path) -> None:
    root = make_tiny_checkpoint(tmp_path / "sep", TinySpec(tower="separate"))
    _edit_config(root, mm_vision_tower=TOWER_DIR)  # now the config names a local tower too
    other = _copy(root / TOWER_DIR, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    key = "vision_model.pre_layrnorm.weight"
    weights[key] = torch.full_like(weights[key], 3.0)
    save_file(weights, str(other / "model.safetensors"))
    named = _params(root)["vision_tower.pre_layrnorm.weight"]
    given = _params(root, vision_tower=other)["vision_tower.pre_layrnorm.weight"]
    assert not torch.equal(named, given) and torch.all(given == 3.0)


def test_a_tower_llava_does_not_unfreeze_comes_from_mm_vision_tower_as_llava_loads_it(
        tmp_path: Path, tiny_checkpoint: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without unfreeze_mm_vision_tower LLaVA builds the tower late and loads mm_vision_tower's weights over the
    copy in the shards: a checkpoint whose copy differs ran another tower here than in LLaVA, in silence."""
    from pulse_edge.export.model import checkpoint

    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    stock = make_tiny_checkpoint(tmp_path / "sep", TinySpec(tower="separate", seed=7)) / TOWER_DIR
    shutil.rmtree(root / TOWER_DIR)
    _copy(stock, root / TOWER_DIR)  # mm_vision_tower names this folder: the stock tower, other weights
    key = "vision_tower.pre_layrnorm.weight"
    saved = _params(root)[key]  # unfreeze_mm_vision_tower true (LLaVA-1.6's): the copy in the shards
    _edit_config(root, unfreeze_mm_vision_tower=False)
    loaded = load_checkpoint(root)
    assert loaded.tower_dir == root / TOWER_DIR  # the stock tower's weights; the bundle's identity hashes them
    ran = dict(loaded.model.named_parameters())[key]
    assert torch.equal(ran, load_file(str(stock / "model.safetensors"))["vision_model.pre_layrnorm.weight"])
    assert not torch.equal(ran, saved)
    # no copy of the stock tower here, or one without weights this export reads: the saved one, said
    monkeypatch.setattr(logging.getLogger("pulse_edge"), "propagate", True)  # a CLI test in this process cut it
    with caplog.at_level("WARNING"):
        assert checkpoint._stock_tower_as_llava_loads_it(loaded.config, None) is None
    assert "pass --vision-tower DIR to run the stock one as LLaVA does" in caplog.text
    (root / TOWER_DIR / "model.safetensors").unlink()  # the architecture only (a .bin copy reads the same)
    with caplog.at_level("WARNING"):
        assert load_checkpoint(root).tower_dir is None
    assert "holds no weights this export reads" in caplog.text


def test_the_checkpoint_identity_covers_a_tower_from_outside_it(tmp_path: Path) -> None:
    """LLaVA-1.6 checkpoints ship without their CLIP tower: scales calibrated with one tower must not be taken
    for an export with another, so the identity scales and bundles are bound to hashes the tower's files too."""
    root = make_tiny_checkpoint(tmp_path / "sep", TinySpec(tower="separate"))
    tower = _copy(root / TOWER_DIR, tmp_path / "tower")
    other = _copy(root / TOWER_DIR, tmp_path / "other")
    weights = load_file(str(other / "model.safetensors"))
    key = "vision_model.pre_layrnorm.weight"
    save_file({**weights, key: weights[key] + 1.0}, str(other / "model.safetensors"))
    with_tower, with_other = (load_checkpoint(root, vision_tower=t) for t in (tower, other))
    assert with_tower.tower_dir == tower and with_tower.sha256 != with_other.sha256
    assert load_checkpoint(root, vision_tower=tower).sha256 == with_tower.sha256  # stable
    inside = load_checkpoint(make_tiny_checkpoint(tmp_path / "in", TinySpec()))
    assert inside.tower_dir is None and inside.sha256 == checkpoint_sha256(inside.root)


def _llava_next_from_transformers(original: Path, out: Path) -> Path:
    """Save the same weights with transformers' own LlavaNext classes: an independent writer."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    cfg = json.loads((original / "config.json").read_text())
    tower = json.loads((original / TOWER_DIR / "config.json").read_text())
    text_keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings")
    hf_cfg = LlavaNextConfig(
        text_config={"model_type": "llama", **{k: cfg[k] for k in text_keys}},
        vision_config=tower, image_grid_pinpoints=[[h, w] for w, h in cfg["image_grid_pinpoints"]],
        image_token_index=cfg["vocab_size"], vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    model = LlavaNextForConditionalGeneration(hf_cfg)
    renames = {"model.mm_projector.0.": "model.multi_modal_projector.linear_1.",
               "model.mm_projector.2.": "model.multi_modal_projector.linear_2.",
               "model.vision_tower.vision_tower.vision_model.": "model.vision_tower.",
               "model.image_newline": "model.image_newline", "model.": "model.language_model.",
               "lm_head.": "lm_head."}
    state = {}
    for shard in sorted(original.glob("*.safetensors")):
        for key, value in load_file(str(shard)).items():
            old = next(p for p in renames if key.startswith(p))
            state[renames[old] + key[len(old):]] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    model.save_pretrained(out)
    shutil.copy(original / "tokenizer.model", out / "tokenizer.model")
    return out


@pytest.fixture(scope="module")
def unpad_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("pair")
    original = make_tiny_checkpoint(base / "orig", TinySpec(seed=3, merge="spatial_unpad"))
    return original, _llava_next_from_transformers(original, base / "next")


def test_both_layouts_load_into_identical_parameters(unpad_pair: tuple[Path, Path]) -> None:
    original, hf = unpad_pair
    a, b = _params(original), _params(hf)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("size", [(2200, 1700), (1700, 2200), (3000, 800), (500, 400)])
def test_llava_next_merge_matches_transformers(unpad_pair: tuple[Path, Path], size: tuple[int, int]) -> None:
    """Our spatial_unpad merge (with image_newline) equals transformers' LlavaNext on the same tiles."""
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration

    from pulse_edge.runtime.image.preprocess import preprocess

    _, hf_dir = unpad_pair
    ours = load_checkpoint(hf_dir)
    assert ours.config.layout == "llava_next" and ours.config.image.merge == "spatial_unpad"
    pre = preprocess(Image.new("RGB", size, (200, 180, 170)), ours.config.image)
    pixels = torch.from_numpy(pre.pixel_values)
    with torch.inference_mode():
        merged = ours.model.merge(ours.model.vision_features(pixels), pre.image_size)
        hf = LlavaNextForConditionalGeneration.from_pretrained(hf_dir).eval()
        expected = hf.model.get_image_features(pixels[None], image_sizes=torch.tensor([[size[1], size[0]]]),
                                               vision_feature_layer=-2,
                                               vision_feature_select_strategy="default").pooler_output[0]
    assert merged.shape[0] == pre.num_image_tokens
    torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-5)


def test_pulse_config_merges_flat(tiny_checkpoint: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    features = torch.randn(5, 576, loaded.config.text.hidden_size)
    merged = loaded.model.merge(features, (2200, 1700))
    assert merged.shape == (2880, loaded.config.text.hidden_size)
    torch.testing.assert_close(merged[:576], features[0])  # base image first
    torch.testing.assert_close(merged[576 * 3:576 * 4], features[3])  # then tiles in order


@pytest.mark.parametrize(("change", "message"), [
    ({"mm_projector_type": "linear"}, "mm_projector_type = 'linear' is not supported"),
    ({"mm_patch_merge_type": "spatial"}, "mm_patch_merge_type = 'spatial' is not supported"),
    ({"image_aspect_ratio": "pad"}, "image_aspect_ratio = 'pad' is not supported"),
    ({"model_type": "llava_mistral"}, "model_type = 'llava_mistral' is not supported"),
    ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ({"hidden_size": 96}, "shape"),
    ({"image_grid_pinpoints": [[336.5, 672]]}, "pairs of whole pixels"),  # never truncated to 336
    ({"image_grid_pinpoints": [[True, 672]]}, "pairs of whole pixels"),
])
def test_unsupported_settings_get_one_clear_error(tmp_path: Path, tiny_checkpoint: Path, change: dict,
                                                  message: str) -> None:
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    _edit_config(root, **change)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(root)
    assert "\n" not in str(info.value)


def test_whole_float_pinpoints_are_read_as_pixels(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    held = json.loads((root / "config.json").read_text())["image_grid_pinpoints"]
    _edit_config(root, image_grid_pinpoints=[[float(w), float(h)] for w, h in held])
    assert load_checkpoint(root).config.image.grid_pinpoints == tuple(tuple(pair) for pair in held)


def test_missing_shard_is_named(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    victim = sorted(root.glob("model-*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}.*missing"):
        load_checkpoint(root)


def test_unexpected_keys_are_listed(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    save_file({"model.mystery_adapter.weight": torch.zeros(2)}, str(root / "extra.safetensors"))
    index_path = root / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.mystery_adapter.weight"] = "extra.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected weights.*mystery_adapter"):
        load_checkpoint(root)


@pytest.mark.parametrize(("value", "dtype", "words"), [
    (float("nan"), None, "holds NaN or infinite values: the checkpoint is damaged"),
    (float("inf"), None, "holds NaN or infinite values: the checkpoint is damaged"),
    (1e6, torch.float16, r"overflows torch.float16 \(its largest magnitude is 1e\+06\); load it with --dtype fp32"),
])
def test_weights_that_are_not_finite_are_the_checkpoints_fault(tmp_path: Path, tiny_checkpoint: Path, value: float,
                                                              dtype: torch.dtype | None, words: str) -> None:
    """Loaded as they were, the export failed at its end naming its own temporary folder and "re-export the
    bundle" as the fix (found in review)."""
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = sorted(root.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    key = next(k for k, t in tensors.items() if t.dtype.is_floating_point and t.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = value
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(root, **({"dtype": dtype} if dtype is not None else {}))


@pytest.mark.parametrize("keep", [100, -100])
def test_truncated_shard_is_refused(tmp_path: Path, tiny_checkpoint: Path, keep: int) -> None:
    """Cut inside the header, or inside the tensor data (an interrupted download)."""
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    shard = sorted(root.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=f"{shard.name} is not a readable safetensors file"):
        load_checkpoint(root)


@pytest.mark.parametrize(("content", "after_eos"), [
    (None, True),  # no file: transformers reads an unset flag as legacy
    ({"tokenizer_class": "LlamaTokenizer"}, True),
    ({"legacy": True}, True),
    ({"legacy": False}, False),  # vicuna v1.5's, as the tiny checkpoint ships it
    ({"legacy": False, "add_bos_token": True, "add_eos_token": False}, False),  # LlamaTokenizer's defaults
])
def test_the_template_follows_the_checkpoints_tokenizer_config(tmp_path: Path, content: dict | None,
                                                               after_eos: bool) -> None:
    if content is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(content))
    assert read_template(tmp_path).dummy_prefix_after_eos is after_eos


@pytest.mark.parametrize(("text", "words"), [
    ('{"legacy": "false"}', "'legacy' must be true, false or absent, got 'false'"),
    ("[1]", "holds no JSON object"),
    ('{"legacy": fal', "is not readable JSON"),
    # the runtime's prompt always opens with BOS and adds no EOS: a tokenizer that differs is refused, not ignored
    ('{"add_bos_token": false}', "add_bos_token is false, but pulse-edge builds the llava_v1 prompt with "
                                     "LlamaTokenizer's default, true"),
    ('{"add_eos_token": true}', "add_eos_token is true, but pulse-edge builds the llava_v1 prompt with "
                                     "LlamaTokenizer's default, false"),
    ('{"add_bos_token": "true"}', 'add_bos_token is "true"'),
])
def test_a_damaged_tokenizer_config_is_one_line(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(words)) as info:
        read_template(tmp_path)
    assert "\n" not in str(info.value)


def test_the_tiny_checkpoint_loads_with_a_non_legacy_template(tiny_checkpoint: Path) -> None:
    assert load_checkpoint(tiny_checkpoint).template.dummy_prefix_after_eos is False


@pytest.mark.parametrize("victim", ["config.json", "tokenizer.model"])
def test_missing_files_are_named(tmp_path: Path, tiny_checkpoint: Path, victim: str) -> None:
    root = _copy(tiny_checkpoint, tmp_path / "ckpt")
    (root / victim).unlink()
    with pytest.raises(CheckpointError, match=victim):
        load_checkpoint(root)


@pytest.mark.slow
def test_full_shape_checkpoint_loads_within_24_gib(tmp_path: Path) -> None:
    """Write random weights of the real 7B shapes, load them in bf16 and run the model once
    (loading alone is lazy: safetensors maps the files), then report peak memory."""
    import resource

    from PIL import Image

    from pulse_edge.runtime.image.preprocess import preprocess

    root = make_tiny_checkpoint(tmp_path / "full", TinySpec(full_shape=True, dtype=torch.bfloat16))
    loaded = load_checkpoint(root, dtype=torch.bfloat16)
    model = loaded.model
    n_params = sum(p.numel() for p in model.parameters())
    pre = preprocess(Image.new("RGB", (336, 336), "white"), loaded.config.image)
    with torch.inference_mode():
        features = model.vision_features(torch.from_numpy(pre.pixel_values[:1]))  # one tile: [1, 576, 4096]
        logits = model.language_model(inputs_embeds=model.embed([1, -200, 5], features[0])).logits
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nfull-shape: {n_params / 1e9:.2f} B parameters in bf16, peak RSS {peak_gib:.1f} GiB "
          "(write + load + one forward)")
    assert logits.shape == (1, 578, 32000) and torch.isfinite(logits).all()
    assert 7.0e9 < n_params < 7.2e9
    assert peak_gib < 24


def test_a_sum_that_overflows_is_no_infinite_weight() -> None:
    """The finite test is a sum first: where only the sum overflows (fp16's range is 65504), the elementwise test
    decides, and the weights load."""
    from pulse_edge.export.model.checkpoint import _finite

    big = torch.full((4,), 60000.0, dtype=torch.float16)
    assert not bool(torch.isfinite(big.sum())) and _finite(big)
    assert not _finite(torch.tensor([1.0, float("inf")], dtype=torch.float16))


def test_a_null_tie_word_embeddings_is_transformers_default(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """null is "not set", as transformers reads it; only a value of another type is refused."""
    import shutil

    from pulse_edge.export.model.config import read_config

    checkpoint = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    config = checkpoint / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "tie_word_embeddings": None}))
    assert read_config(checkpoint).text.tie_word_embeddings is False
