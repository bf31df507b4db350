"""Activation statistics at every quantizable site, collected with forward pre-hooks on the torch reference.

Each ECG sample runs the whole model as the runtime would: vision tower and
projector on the sample's tiles, the flat merge, the image features spliced
into the prompt's embeddings, and one teacher-forced decoder pass over the
conversation (question and answer), so the decoder sees image tokens and ECG
text together. A hook sees each Linear's input x [..., K] and updates:

    AbsHistogram   per-tensor |x| histogram -> activation ranges (minmax / percentile / entropy / mse)
    ChannelStats   per-input-channel absmax and mean |x| -> SmoothQuant and AWQ scales
    RowReservoir   a seeded uniform sample of rows -> the alpha searches (decoder sites only)

q/k/v (and gate/up) read the same input; the decoder packs them into one MatMul, so one
hook on q_proj (gate_proj) observes the packed site.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from pulse_edge.calibration.histogram import AbsHistogram, ChannelStats, RowReservoir
from pulse_edge.calibration.samples import PreparedSample
from pulse_edge.export.model.reference import PulseReference

# module name (regex) -> site name template; q_proj stands for the packed qkv, gate_proj for gate_up.
SITE_PATTERNS: Mapping[str, str] = MappingProxyType({
    r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.q_proj": "vision.layers.{}.q",
    r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.k_proj": "vision.layers.{}.k",
    r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.v_proj": "vision.layers.{}.v",
    r"vision_tower\.encoder\.layers\.(\d+)\.self_attn\.out_proj": "vision.layers.{}.o",
    r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc1": "vision.layers.{}.fc1",
    r"vision_tower\.encoder\.layers\.(\d+)\.mlp\.fc2": "vision.layers.{}.fc2",
    r"mm_projector\.(0|2)": "projector.{}",
    r"language_model\.model\.layers\.(\d+)\.self_attn\.q_proj": "layers.{}.qkv",
    r"language_model\.model\.layers\.(\d+)\.self_attn\.o_proj": "layers.{}.o",
    r"language_model\.model\.layers\.(\d+)\.mlp\.gate_proj": "layers.{}.gate_up",
    r"language_model\.model\.layers\.(\d+)\.mlp\.down_proj": "layers.{}.down",
    r"language_model\.lm_head": "lm_head",
})
DEFAULT_RESERVOIR_ROWS = 256
LM_HEAD = "lm_head"


def site_name(module_name: str) -> str | None:
    """The site a Linear module's input belongs to, or None for Linears that share another's input."""
    for pattern, template in SITE_PATTERNS.items():
        match = re.fullmatch(pattern, module_name)
        if match:
            return template.format(*match.groups())
    return None


def site_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """{site: the Linear whose input is observed}, in module order."""
    found = {}
    for name, module in model.named_modules():
        site = site_name(name)
        if site is not None and isinstance(module, nn.Linear):
            found[site] = module
    return found


@dataclass
class SiteObserver:
    histogram: AbsHistogram
    channels: ChannelStats
    reservoir: RowReservoir | None

    def update(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu().numpy()  # [R, K]
        self.histogram.update(rows)
        self.channels.update(rows)
        if self.reservoir is not None:
            self.reservoir.update(rows)


def make_observers(model: nn.Module, *, reservoir_rows: int = DEFAULT_RESERVOIR_ROWS,
                   seed: int = 0) -> dict[str, SiteObserver]:
    """An observer per site; decoder layer sites also keep sample rows for the SmoothQuant/AWQ searches
    (lm_head and the vision sites are not searched, so they keep none)."""
    observers = {}
    for i, site in enumerate(site_modules(model)):
        reservoir = RowReservoir(reservoir_rows, seed=seed + i) if site.startswith("layers.") else None
        observers[site] = SiteObserver(AbsHistogram(), ChannelStats(), reservoir)
    return observers


@contextmanager
def observing(model: nn.Module, observers: Mapping[str, SiteObserver]) -> Iterator[None]:
    """Hooks in place for the block; removed on exit, even on error."""
    modules = site_modules(model)
    handles = [modules[site].register_forward_pre_hook(_hook(obs)) for site, obs in observers.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(observer: SiteObserver):
    def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        observer.update(args[0])
    return hook


def run_sample(model: PulseReference, sample: PreparedSample) -> torch.Tensor:
    """One teacher-forced pass of a prepared sample; returns the final hidden states [1, L, H] (lm_head's input).

    lm_head itself is not run: its [L, V] logits would cost more than a decoder layer (32000 x 4096 per
    position), and calibration needs only its input.
    """
    with torch.inference_mode():
        features = model.vision_features(torch.from_numpy(sample.pixel_values))  # [tiles, P, H]
        merged = model.merge(features, sample.image_size)  # [T, H]
        embeds = model.embed(sample.input_ids, merged)  # [1, L, H]
        return model.language_model.model(inputs_embeds=embeds).last_hidden_state


def observe(model: PulseReference, samples: Sequence[PreparedSample], observers: Mapping[str, SiteObserver],
            *, progress: bool = False) -> None:
    """Run every sample with the hooks in place."""
    hooked = {site: obs for site, obs in observers.items() if site != LM_HEAD}
    with observing(model, hooked):
        for i, sample in enumerate(samples):
            hidden = run_sample(model, sample)
            if LM_HEAD in observers:
                observers[LM_HEAD].update(hidden)
            if progress:
                print(f"  calibrated on sample {i + 1}/{len(samples)} ({sample.source}/{sample.task})", flush=True)


PACKED_PARTS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "qkv": ("q_proj", "k_proj", "v_proj"), "gate_up": ("gate_proj", "up_proj")})


def packed_weight(model: PulseReference, site: str) -> np.ndarray:
    """The site's MatMul weight [K, N] as the bundle's graph holds it (q|k|v and gate|up packed)."""
    first = site_modules(model)[site]
    parts = PACKED_PARTS.get(site.rsplit(".", 1)[-1])
    linears: list[nn.Linear] = [first]
    if parts is not None:
        name = next(n for n, m in model.named_modules() if m is first)
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        linears = [getattr(parent, part) for part in parts]
    return np.concatenate([lin.weight.detach().float().numpy() for lin in linears], axis=0).T
