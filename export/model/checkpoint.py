"""Load a PULSE checkpoint (original LLaVA or transformers llava_next layout) into
the torch reference, streaming tensor by tensor.

The model is built with its parameters on the meta device (nothing allocated),
then each tensor is read from its safetensors shard, cast to the target dtype and
put in place: peak memory is the model in the target dtype plus one tensor, never
two copies of the model.

Vision tower resolution (LLaVA loads the tower named by `mm_vision_tower`, then
the checkpoint's own tower weights, fine-tuned in PULSE, replace it):

    architecture: --vision-tower DIR  >  mm_vision_tower as a local dir  >  KNOWN_TOWERS[name]
    weights:      the checkpoint's own tower keys  >  --vision-tower DIR  >  local mm_vision_tower dir
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from pulse_edge.errors import CheckpointError
from pulse_edge.export.model.config import KNOWN_TOWERS, PulseConfig, VisionConfig, read_config
from pulse_edge.export.model.reference import PulseReference
from pulse_edge.export.model.tokenizer_convert import vocabulary_facts
from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason
from pulse_edge.runtime.engines.memory import mem_available_bytes
from pulse_edge.runtime.text.prompt import LLAVA_V1, PromptTemplate

log = logging.getLogger(__name__)

# (prefix in the file, prefix in PulseReference), first match wins.
KEY_MAPS: dict[str, tuple[tuple[str, str], ...]] = {
    "llava": (
        ("model.vision_tower.vision_tower.vision_model.", "vision_tower."),
        ("model.mm_projector.", "mm_projector."),
        ("model.image_newline", "image_newline"),
        ("model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ),
    "llava_next": (
        # transformers >= 4.52 names
        ("model.vision_tower.vision_model.", "vision_tower."),
        ("model.vision_tower.", "vision_tower."),  # transformers 5 saves CLIP without `vision_model.`
        ("model.multi_modal_projector.linear_1.", "mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "mm_projector.2."),
        ("model.image_newline", "image_newline"),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        # older transformers names
        ("vision_tower.vision_model.", "vision_tower."),
        ("vision_tower.", "vision_tower."),
        ("multi_modal_projector.linear_1.", "mm_projector.0."),
        ("multi_modal_projector.linear_2.", "mm_projector.2."),
        ("image_newline", "image_newline"),
        ("language_model.model.", "language_model.model."),
        ("language_model.lm_head.", "language_model.lm_head."),
    ),
    "clip": (
        ("vision_model.", "vision_tower."),
        ("embeddings.", "vision_tower.embeddings."),
        ("encoder.", "vision_tower.encoder."),
        ("pre_layrnorm.", "vision_tower.pre_layrnorm."),
        ("post_layernorm.", "vision_tower.post_layernorm."),
    ),
}

# Keys that are safe to skip: buffers older transformers saved, and the text half of a CLIPModel.
IGNORED_KEYS = re.compile(
    r"(position_ids$|rotary_emb\.inv_freq$|^text_model\.|^logit_scale$|^text_projection\.|^visual_projection\.)")

SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILES = ("model.safetensors",)


@dataclass(frozen=True)
class TensorSource:
    file: Path
    key: str


def read_shard_index(index: Path) -> dict[str, Any]:
    """model.safetensors.index.json as a JSON object, or one line: cut short, not UTF-8, a list..."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{index} is not a valid shard index ({e}); re-download the checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{index} is not a valid shard index (a JSON {type(data).__name__}, not an object); "
                              "re-download the checkpoint")
    return data


def shard_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked against its index when there is one."""
    index = root / SHARD_INDEX
    if index.is_file():
        weight_map = read_shard_index(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) and n for n in weight_map.values()):
            raise CheckpointError(f"{index} is not a valid shard index (its weight_map must map tensor names to "
                                  "shard file names); re-download the checkpoint")
        files = sorted({root / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{root}: shard(s) {', '.join(missing)} listed in {SHARD_INDEX} are missing; "
                                  "re-download the checkpoint")
        return files
    singles = [root / n for n in SINGLE_FILES if (root / n).is_file()]
    if singles:
        return singles
    if list(root.glob("*.bin")):
        raise CheckpointError(f"{root}: only PyTorch .bin weights found; convert them to safetensors first")
    raise CheckpointError(f"{root}: no safetensors weights ({SHARD_INDEX} or model.safetensors)")


def map_key(key: str, layout: str) -> str | None:
    """The reference model's name for a file key; None when it is a known skippable key."""
    for prefix, target in KEY_MAPS[layout]:
        if key.startswith(prefix):
            return target + key[len(prefix):]
    if IGNORED_KEYS.search(key):
        return None
    raise KeyError(key)


def index_tensors(files: list[Path], layout: str, *, source: Path) -> dict[str, TensorSource]:
    """Map every tensor the files hold to its reference name; refuse unexpected keys."""
    found: dict[str, TensorSource] = {}
    unexpected: list[str] = []
    for file in files:
        with _open(file) as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                try:
                    name = map_key(key, layout)
                except KeyError:
                    unexpected.append(key)
                    continue
                if name is not None and not IGNORED_KEYS.search(key):
                    found[name] = TensorSource(file, key)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected weights for a {layout} checkpoint: {_first_few(unexpected)}")
    return found


def _first_few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


@contextmanager
def _open(file: Path) -> Iterator:
    """safe_open with its errors turned into one line; errors of the caller's body pass untouched."""
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from e
    with handle as f:
        yield f


def _local_dir(name: str, root: Path) -> Path | None:
    for candidate in (Path(name), root / name):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate
    return None


def _tower_config(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read as JSON ({e}); copy the vision tower's config.json again") from e


def resolve_vision(cfg: PulseConfig, root: Path, vision_tower: Path | None,
                   has_tower_weights: bool) -> tuple[PulseConfig, Path | None]:
    """The tower's architecture, and the directory its weights come from (None: the checkpoint)."""
    if vision_tower is not None and not (vision_tower / "config.json").is_file():
        raise CheckpointError(f"--vision-tower {vision_tower} has no config.json (expected a CLIP vision model dir)")
    local = vision_tower or _local_dir(cfg.vision_tower_name, root)
    if cfg.vision is None:
        if local is not None:
            vision = VisionConfig.from_hf(_tower_config(local / "config.json"), select_layer=cfg.select_layer,
                                          source=str(local / "config.json"))
        elif cfg.vision_tower_name in KNOWN_TOWERS:
            vision = VisionConfig.from_hf(KNOWN_TOWERS[cfg.vision_tower_name], select_layer=cfg.select_layer,
                                          source=cfg.vision_tower_name)
        else:
            raise CheckpointError(f"vision tower {cfg.vision_tower_name!r} is not available locally: "
                                  "pass --vision-tower DIR (a CLIP vision model directory)")
        cfg = cfg.with_vision(vision)
    if has_tower_weights and not cfg.runs_saved_tower:
        return cfg, _stock_tower_as_llava_loads_it(cfg, local)
    if has_tower_weights:
        if vision_tower is not None:
            log.info("using the vision-tower weights inside the checkpoint (fine-tuned); "
                     "--vision-tower supplies the architecture only")
        return cfg, None
    if local is None:
        raise CheckpointError(f"the checkpoint has no vision-tower weights and {cfg.vision_tower_name!r} is not "
                              "available locally: pass --vision-tower DIR")
    return cfg, local


def _stock_tower_as_llava_loads_it(cfg: PulseConfig, local: Path | None) -> Path | None:
    """A llava_llama config without unfreeze_mm_vision_tower: LLaVA runs mm_vision_tower's own weights, not the
    copy in the shards (which is the same where training kept the tower frozen, as this flag says it did). The
    stock tower where there is a local copy; else the saved copy, said."""
    if local is not None:
        try:
            tower_files(local)
        except CheckpointError as e:  # a folder of the tower's architecture only, or .bin weights: the saved copy
            log.warning("config.json does not set unfreeze_mm_vision_tower, so LLaVA runs the stock vision tower, "
                        "but %s holds no weights this export reads (%s): the copy inside the checkpoint is used "
                        "(the same weights where training kept the tower frozen)", local, e)
            return None
        log.info("config.json does not set unfreeze_mm_vision_tower: LLaVA runs the vision tower %s (%s), not the "
                 "copy inside the checkpoint, and so does this export", cfg.vision_tower_name, local)
        return local
    log.warning("config.json does not set unfreeze_mm_vision_tower: LLaVA runs the stock vision tower %r, not the "
                "copy inside the checkpoint, which is used here (the same weights where training kept the tower "
                "frozen); pass --vision-tower DIR to run the stock one as LLaVA does", cfg.vision_tower_name)
    return None


def tower_files(tower_dir: Path) -> list[Path]:
    try:
        return shard_files(tower_dir)
    except CheckpointError as e:
        raise CheckpointError(f"vision tower: {e}") from e


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create modules with their parameters on the meta device (buffers stay real).

    Reversible: the patch on nn.Module.register_parameter is removed on exit.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=False)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@dataclass(frozen=True)
class LoadedCheckpoint:
    model: PulseReference
    config: PulseConfig
    root: Path
    tokenizer_model: Path
    tower_dir: Path | None = None  # the vision tower's weights, when they came from outside the checkpoint
    template: PromptTemplate = LLAVA_V1  # as its tokenizer encodes text after </s> (read_template)

    @cached_property
    def sha256(self) -> str:
        """Hashed once per load: an export asks for it twice (the scales' check, the manifest), and the 7B's
        shards are 13 GB."""
        return checkpoint_sha256(self.root, self.tower_dir)


def load_checkpoint(root: str | os.PathLike, *, vision_tower: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                    attn_implementation: str = "sdpa") -> LoadedCheckpoint:
    """Read config, weights and tokenizer of a checkpoint into an eval-mode PulseReference."""
    root = Path(root)
    if not root.is_dir():
        state = "is not a directory" if root.exists() else "does not exist"
        raise CheckpointError(f"{root} {state}: a checkpoint is a directory holding config.json, the weights and "
                              "tokenizer.model")
    tower_dir = Path(vision_tower) if vision_tower is not None else None
    cfg = read_config(root)
    tokenizer_model = root / "tokenizer.model"
    if not tokenizer_model.is_file():
        raise CheckpointError(f"{root} has no tokenizer.model (the SentencePiece tokenizer PULSE ships with)")
    check_tokenizer(tokenizer_model, cfg)
    sources = index_tensors(shard_files(root), cfg.layout, source=root)
    has_tower = any(name.startswith("vision_tower.") for name in sources)
    cfg, weights_dir = resolve_vision(cfg, root, tower_dir, has_tower)
    if weights_dir is not None:
        sources.update(index_tensors(tower_files(weights_dir), "clip", source=weights_dir))
    with parameters_on_meta():
        try:  # each Linear's weight is allocated (never touched) before it is moved to meta
            model = PulseReference(cfg, attn_implementation=attn_implementation)
        except (MemoryError, RuntimeError) as e:
            if not isinstance(e, MemoryError) and "alloc" not in str(e):
                raise
            raise CheckpointError(f"{root}: the config's sizes (hidden {cfg.text.hidden_size}, vocab "
                                  f"{cfg.text.vocab_size}, {cfg.text.num_layers} layers) cannot even be laid out "
                                  "in this machine's memory; check config.json") from e
    check_memory(model, dtype, device)
    fill_parameters(model, sources, dtype=dtype, device=torch.device(device))
    model.drop_unused_vision_layers()
    model.to(device)  # the buffers (rotary inv_freq, position ids)
    return LoadedCheckpoint(model=model.eval(), config=cfg, root=root, tokenizer_model=tokenizer_model,
                            tower_dir=weights_dir, template=read_template(root))


def check_tokenizer(model_path: Path, cfg: PulseConfig) -> None:
    """The tokenizer is the model's: no more pieces than the config's vocabulary (an id past it was an IndexError
    traceback in the first forward), and <s> / </s> where config.json says (a mismatch failed only at the end of
    an export, after every graph was built, naming a temporary folder)."""
    pieces, bos, eos = vocabulary_facts(model_path)
    source = model_path.with_name("config.json")
    if pieces > cfg.text.vocab_size:
        raise CheckpointError(f"{model_path} has {pieces} pieces but {source}'s vocab_size is {cfg.text.vocab_size}: "
                              "they come from different models; copy the checkpoint's own tokenizer.model")
    for field, config_id, tokenizer_id in (("bos_token_id", cfg.text.bos_id, bos),
                                            ("eos_token_id", cfg.text.eos_id, eos)):
        if config_id != tokenizer_id:
            raise CheckpointError(f"{source}: {field} is {config_id} but {model_path.name} has it at "
                                  f"{tokenizer_id}; they come from different models: fix config.json or copy the "
                                  "checkpoint's own tokenizer.model")


def read_template(root: Path) -> PromptTemplate:
    """llava_v1 with text after </s> encoded as the checkpoint's tokenizer encodes it: tokenizer_config.json's
    `legacy` (runtime/text/prompt.py). Unset, or no file, is legacy, as LLaVA's transformers (4.37) reads it."""
    path = root / "tokenizer_config.json"
    if not path.is_file():
        return LLAVA_V1
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}: {str(e).splitlines()[0]}); "
                              "copy it again from the checkpoint's release") from e
    except JSON_TEXT_ERRORS as e:
        raise CheckpointError(f"{path} is not readable JSON ({json_error_reason(e)}); copy it again from the "
                              "checkpoint's release") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds no JSON object; copy it again from the checkpoint's release")
    legacy = config.get("legacy")
    if not isinstance(legacy, bool | None):
        raise CheckpointError(f"{path}: 'legacy' must be true, false or absent, got {legacy!r}")
    _check_special_tokens(config, path)
    return replace(LLAVA_V1, dummy_prefix_after_eos=legacy is not False)


# LlamaTokenizer's defaults, which the runtime's llava_v1 prompt is built as (BOS first, no EOS). LLaVA's own code
# follows the tokenizer (tokenizer_image_token keeps a BOS only where the tokenizer added one: LLaVA/llava/mm_utils.py
# in PULSE's repository), so a checkpoint with other settings was trained and evaluated on other prompts
SPECIAL_TOKENS_ADDED = {"add_bos_token": True, "add_eos_token": False}


def _check_special_tokens(config: dict, path: Path) -> None:
    for key, wanted in SPECIAL_TOKENS_ADDED.items():
        value = config.get(key, wanted)
        if value is not wanted:
            raise CheckpointError(f"{path}: {key} is {json.dumps(value)}, but pulse-edge builds the llava_v1 "
                                  f"prompt with LlamaTokenizer's default, {json.dumps(wanted)}: this checkpoint "
                                  "would be prompted unlike its training; export one whose tokenizer keeps the "
                                  "default")


def fill_parameters(model: nn.Module, sources: dict[str, TensorSource], *, dtype: torch.dtype,
                    device: torch.device) -> None:
    """Replace each meta parameter by its tensor from the files, one tensor at a time."""
    expected = dict(model.named_parameters())
    unexpected = [src.key for name, src in sources.items() if name not in expected]
    if unexpected:
        raise CheckpointError(f"unexpected weights for this model's config: {_first_few(unexpected)}")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, src in sources.items():
        by_file.setdefault(src.file, []).append((name, src.key))
    for file, items in by_file.items():
        with _open(file) as f:
            for name, key in items:
                _place(model, name, f.get_tensor(key), expected[name].shape, dtype, device)
    _tie_or_fail(model)


def _place(model: nn.Module, name: str, tensor: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
           device: torch.device) -> None:
    if tensor.shape != shape:
        raise CheckpointError(f"weight {name}: shape {tuple(tensor.shape)} in the checkpoint, "
                              f"{tuple(shape)} expected from its config")
    if not tensor.dtype.is_floating_point:  # .to(dtype) would turn codes into weights, and the reference with them
        raise CheckpointError(f"weight {name} is stored as {tensor.dtype}, not a float type; the checkpoint is "
                              "damaged or quantized (pulse-edge reads fp32, fp16 or bf16 weights)")
    placed = tensor.to(device=device, dtype=dtype)
    if not _finite(placed):  # else every graph check fails later, blaming the bundle it wrote
        if not _finite(tensor):
            raise CheckpointError(f"weight {name} holds NaN or infinite values: the checkpoint is damaged; "
                                  "download or copy it again")
        raise CheckpointError(f"weight {name} overflows {dtype} (its largest magnitude is "
                              f"{float(tensor.abs().max()):.3g}); load it with --dtype fp32 or bf16")
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    module._parameters[leaf] = nn.Parameter(placed, requires_grad=False)


def _finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in `tensor`. A NaN or an infinity makes the sum one, so the sum (16 ms for the 7B's token
    table in bf16, here) stands for the elementwise test (0.7 s there, 30-40 s over the 7B) except where it is not
    finite: then the elementwise test says whether the sum only overflowed (fp16's range is 65504)."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _tie_or_fail(model: nn.Module) -> None:
    lm = model.language_model
    if lm.lm_head.weight.device.type == "meta" and lm.config.tie_word_embeddings:
        lm.lm_head.weight = lm.get_input_embeddings().weight
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"the checkpoint lacks weights: {_first_few(missing)}")


def check_memory(model: nn.Module, dtype: torch.dtype, device: str | torch.device) -> None:
    """Refuse up front when the weights cannot fit in this machine's available memory."""
    if torch.device(device).type != "cpu":
        return
    need = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    available = mem_available_bytes()
    if available is not None and need > available:
        raise CheckpointError(f"the weights need {need / 2**30:.1f} GiB in {dtype} but only "
                              f"{available / 2**30:.1f} GiB is available; use --dtype bf16 or fp16")


def checkpoint_sha256(root: Path, tower_dir: Path | None = None) -> str:
    """sha256 over config.json and the weight shards: what bundles and scales files are bound to. `tower_dir`:
    where the vision tower's weights came from when the checkpoint lacks them (LLaVA-1.6 checkpoints name their
    CLIP tower and ship without it): its config and shards count too, or scales calibrated with one tower would
    be taken for an export with another."""
    digest = hashlib.sha256()
    tower = [tower_dir / "config.json", *tower_files(tower_dir)] if tower_dir is not None else []
    for path in [root / "config.json", *shard_files(root), *tower]:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()
