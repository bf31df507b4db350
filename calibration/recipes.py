"""Precision recipes: which scheme each linear layer ("site") of a bundle gets.

The recipes table is in docs/architecture.md (precision recipes).

A site is one MatMul of a bundle's graphs, named the same way by calibration,
export and the fidelity report:

    vision.layers.{i}.{q,k,v,o,fc1,fc2}   CLIP encoder layer i
    projector.0, projector.2              the mlp2x_gelu projector's two Linears
    layers.{i}.{qkv,o,gate_up,down}       decoder layer i (q/k/v and gate/up are packed: one input each)
    lm_head

Schemes:

    fp     the bundle's float baseline (fp32 on CPU)
    w8     int8 weights, block-wise (MatMulNBits bits=8); at accuracy level 4 (the default, and the only
           fast int8 path in ORT's CPU EP) MLAS also quantizes the activations per block at run time,
           so SmoothQuant scales are folded in here too
    w4     int4 weights, block-wise (MatMulNBits bits=4), RTN or AWQ scaling; at accuracy level 4 the
           activations are quantized per block at run time too (AWQ's scales also tame them)
    w8a8   int8 weights per output channel, int8 activations with a calibrated per-tensor
           scale (Q/DQ; ORT runs it as MatMulIntegerToFloat); SmoothQuant in the decoder
    fp8    E4M3 weights per output channel and activations per tensor (Q/DQ, for TensorRT on
           compute capability >= 8.9; ORT's CPU EP only emulates it, for validation)
    w8a8u8 w8a8 as ORT's CPU EP runs it (uint8 activations, MatMulIntegerToFloat with the Linear's bias): the
           CPU recipes' vision graph
    w8a8dyn  int8 weights per output channel, activations quantized per token at run time (no calibrated
           range): the CPU's fastest int8 GEMM (AMX where the CPU has it). The CPU recipes' prefill graph
           runs every decoder layer site in it; the decode graph keeps the weight-only scheme, which
           streams the fewest bytes per token.

A recipe also says how the KV cache is stored (`kv_cache`: the graphs' float type, fp16, or int8 with calibrated
per-channel scales, calibration/kv.py) and whether the bundle gets a prefill graph (`prefill`: its scheme, or None).

`keep` names sites, prefixes ("layers.0", "projector", "lm_head") or whole graphs
("vision" = tower and projector, "decoder") that stay at fp: mixed precision for
the layers that quantize worst.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from pulse_edge.choices import BLOCK_SIZES, INT4_METHODS, INT8_DECODER_MODES, KV_CACHES
from pulse_edge.errors import ConfigError

SCHEMES = ("fp", "w8", "w4", "w8a8", "fp8", "w8a8dyn", "w8a8u8")
INT8_DECODER_SCHEMES = MappingProxyType(dict(zip(INT8_DECODER_MODES, ("w8", "w8a8"), strict=True)))
# MatMulNBits accuracy_level: 0 computes in fp32 after dequantizing, 4 quantizes the activations to int8 per
# block at run time and uses integer dot products. Measured on this 2-core Zen 5 (ORT 1.31, K 4096, N 11008,
# one token): bits 8 at level 0 took 53-64 ms (no fast kernel) vs 0.45-0.63 ms at level 4; bits 4: 0.72 ms
# vs 0.15 ms. Level 4 is the only usable one for int8 here.
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FP8_COMPUTE_CAPABILITY = "8.9"


def _check(value: Any, allowed: tuple[Any, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class Recipe:
    """What `export --precision P` does, with its knobs."""

    name: str
    vision: str
    decoder: str
    block_size: int = 128
    int4_method: str = "awq"
    smooth_alpha: float | None = None  # None: chosen per site on the calibration samples
    smooth: bool = True  # False: plain W8A8 (the baseline SmoothQuant is measured against)
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL
    keep: tuple[str, ...] = ()
    kv_cache: str = "float"
    prefill: str | None = None  # the prefill graph's scheme for the decoder layer sites; None: no such graph

    def __post_init__(self) -> None:
        for what, value in (("vision scheme", self.vision), ("decoder scheme", self.decoder)):
            _check(value, SCHEMES, what)
        _check(self.kv_cache, KV_CACHES, "KV cache")
        if self.prefill is not None:
            _check(self.prefill, SCHEMES, "prefill scheme")
        _check(self.int4_method, INT4_METHODS, "int4 method")
        _check(self.block_size, BLOCK_SIZES, "block size")
        _check(self.accuracy_level, ACCURACY_LEVELS, "MatMulNBits accuracy level")
        if self.smooth_alpha is not None and not 0.0 <= self.smooth_alpha <= 1.0:
            raise ConfigError(f"smooth alpha must be in [0, 1] or 'auto', got {self.smooth_alpha}")

    def scheme(self, site: str) -> str:
        """The scheme of one site: `keep` wins (a site, a prefix, or a whole graph), then the graph's scheme."""
        graph = "vision" if site.startswith(("vision.", "projector.")) else "decoder"
        if any(k == graph or site == k or site.startswith(f"{k}.") for k in self.keep):
            return "fp"
        return self.vision if graph == "vision" else self.decoder

    def prefill_scheme(self, site: str) -> str:
        """A site's scheme in the prefill graph: the prefill scheme for the decoder layers the recipe quantizes;
        lm_head (one position) and the sites kept at fp as in the decode graph."""
        decode = self.scheme(site)
        return self.prefill if self.prefill and decode != "fp" and site != "lm_head" else decode

    @property
    def int4_awq(self) -> bool:
        return self.decoder == "w4" and self.int4_method == "awq"

    @property
    def compute_capability(self) -> str | None:
        """The least GPU compute capability the bundle needs (None: any, CPU included)."""
        return FP8_COMPUTE_CAPABILITY if "fp8" in (self.vision, self.decoder) else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vision": self.vision, "decoder": self.decoder, "block_size": self.block_size,
                "int4_method": self.int4_method, "smooth": self.smooth, "smooth_alpha": self.smooth_alpha,
                "accuracy_level": self.accuracy_level, "keep": list(self.keep), "kv_cache": self.kv_cache,
                "prefill": self.prefill}


RECIPES: Mapping[str, Recipe] = MappingProxyType({
    "int8": Recipe("int8", vision="w8a8u8", decoder="w8", kv_cache="int8", prefill="w8a8dyn"),
    "int4": Recipe("int4", vision="w8a8u8", decoder="w4", kv_cache="int8", prefill="w8a8dyn"),
    "fp8": Recipe("fp8", vision="fp8", decoder="fp8"),
})


def make_recipe(precision: str, *, int8_decoder: str = "weight-only", int4_method: str = "awq",
                block_size: int = 128, smooth_alpha: float | None = None, smooth: bool = True,
                accuracy_level: int = DEFAULT_ACCURACY_LEVEL, keep: tuple[str, ...] = (),
                kv_cache: str | None = None, prefill: bool = True, target: str = "ort") -> Recipe:
    """The recipe for a quantized `--precision`, with the CLI's knobs applied (`kv_cache` None: the recipe's;
    `prefill` False: no prefill graph). For `target` tensorrt the ORT CPU parts give way to standard forms."""
    _check(precision, tuple(RECIPES), "quantized precision")
    _check(int8_decoder, INT8_DECODER_MODES, "int8 decoder mode")
    base = RECIPES[precision] if target == "ort" else _standard_form(RECIPES[precision], kv_cache)
    decoder = INT8_DECODER_SCHEMES[int8_decoder] if precision == "int8" else base.decoder
    return replace(base, decoder=decoder, int4_method=int4_method, block_size=block_size,
                   smooth_alpha=smooth_alpha, smooth=smooth, accuracy_level=accuracy_level, keep=tuple(keep),
                   kv_cache=kv_cache or base.kv_cache, prefill=base.prefill if prefill else None)


# ORT CPU schemes and the standard (Q/DQ) scheme a TensorRT-ready graph writes in their place.
STANDARD_SCHEMES = MappingProxyType({"w8a8u8": "w8a8", "w8a8dyn": "w8a8"})


def _standard_form(base: Recipe, kv_cache: str | None) -> Recipe:
    """A recipe for standard-ONNX graphs (--target tensorrt): Q/DQ vision, no prefill graph, a float KV cache (fp16
    there, so --kv-cache fp16 asks for what it gets)."""
    if kv_cache == "int8":
        raise ConfigError("--kv-cache int8 is the ORT CPU cache (GroupQueryAttention's quantized cache): "
                          "--target tensorrt keeps a float (fp16) cache")
    return replace(base, vision=STANDARD_SCHEMES.get(base.vision, base.vision), kv_cache="float", prefill=None)


def check_keep(keep: tuple[str, ...], sites: list[str]) -> None:
    """Every --keep entry must name a graph, a site or a prefix of one: a typo must not quantize it all."""
    for entry in keep:
        if entry not in ("vision", "decoder") and not any(s == entry or s.startswith(f"{entry}.") for s in sites):
            examples = ", ".join(["vision", "decoder", "lm_head", "projector", "layers.0", sites[0]])
            raise ConfigError(f"--keep {entry!r} names no layer of this model (e.g. {examples})")


def parse_keep(text: str | None) -> tuple[str, ...]:
    """`--keep lm_head,layers.0,projector` -> ("lm_head", "layers.0", "projector")."""
    return tuple(part.strip() for part in (text or "").split(",") if part.strip())


def decoder_sites(layers: int) -> list[str]:
    return [f"layers.{i}.{part}" for i in range(layers) for part in ("qkv", "o", "gate_up", "down")] + ["lm_head"]


def vision_sites(layers: int) -> list[str]:
    parts = ("q", "k", "v", "o", "fc1", "fc2")
    return [f"vision.layers.{i}.{p}" for i in range(layers) for p in parts] + ["projector.0", "projector.2"]
