"""The emulated reference: the torch reference computing a quantized bundle's own recipe.

A quantized graph's parity ("is the graph right?") is judged against this reference, not against
fp32; how far the recipe itself lands from fp32 is the fidelity report's question
(export/validate/fidelity.py). Inside `with emulated_reference(...)`, every MatMul site of the
recipe runs as the graph runs it, and the rest of the model (norms, attention, rotary, GELU) stays
the torch reference's own fp32 code:

    W [K, N] float32, from the checkpoint
      -> input scales folded as the decoder graph folds them (LinearPlan: SmoothQuant / AWQ):
           input norm gamma / s_qkv;  q, k, v rows * s_qkv;  v columns / s_o;  o rows * s_o
           post norm gamma / s_gu;    gate, up rows * s_gu;  up columns / s_down;  down rows * s_down
      -> the scheme's codes and scales from calibration/quant_math.py (the functions the graph writer
         calls), block codes read back from the packed bytes as MatMulNBits reads them
    x [..., K] -> the scheme's activation rule (ACTIVATIONS) -> x_q
    y = x_q @ (codes * scales) (+ bias), float32

The activation rules are ONNX Runtime's CPU EP's (each checked on single nodes against ORT in
tests/export/test_emulate.py):

    w8 / w4 at accuracy level 4,  MLAS quantizes every row of x per block of the weight's block size
    weights prepacked             along K (QuantizeARow_CompInt8): amax = max |x| of the block,
                                  scale = amax / 127, q = round_half_even(x * (127 / amax)), no zero
                                  point; the int8 dot products are exact, so y = (q * scale) @ W_q.
    w8 / w4 otherwise             x stays float32: with prepacking off (session.disable_prepacking,
                                  how export validates: the weights stay mapped) MatMulNBits
                                  dequantizes the weights and runs a float GEMM whatever the level
                                  (measured, ORT 1.32); levels 0-3 on x86 have no other path.
    w8a8                          QuantizeLinear with the graph's per-tensor scale amax / 127 and
                                  zero point 0: q = clamp(round_half_even(x / scale) + 0, -128, 127)
                                  (ORT fuses the pattern into MatMulIntegerToFloat: the same values)
    fp8                           QuantizeLinear to float8e4m3fn with saturate=1: x / scale rounded to
                                  nearest even, clamped to +-448
    w8a8u8                        w8a8's codes stored as uint8 around 128 (QuantizeLinear with zero
                                  point 128, then MatMulIntegerToFloat): the same values as w8a8
    w8a8dyn                       per row (token): s = max(max x, -min x) * (1/127) as a product,
                                  floored at 1e-30; q = clamp(round_half_even(x / s) + 128, 0, 255) - 128

Why the folds are restated here rather than read back from the graph: a graph that folds a scale
into the weights but not out of the norm (or the reverse) must disagree with this reference. The
codes are produced by the same quant_math functions: a graph writer that scales, transposes or
offsets them differs from what the recipe says they are.

Memory: the codes are held as int8 (float8 for fp8), one byte per weight, and dequantized per call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from pulse_edge.calibration.observe import site_name
from pulse_edge.calibration.quant_math import (
    E4M3_MAX,
    INT8_QMAX,
    quantize_blockwise,
    quantize_fp8_per_channel,
    quantize_int8_per_channel,
    signed_block_codes,
    to_float8_e4m3,
)
from pulse_edge.calibration.recipes import Recipe
from pulse_edge.calibration.scales import Scales
from pulse_edge.export.graphs.decoder import LinearPlan
from pulse_edge.export.graphs.kv_cache import KVScales
from pulse_edge.export.graphs.quant_ops import DYNAMIC_SCALE_FLOOR, UINT8_ZERO
from pulse_edge.export.validate.kv_caches import INT8_RANGE, int8_kv_cache
from pulse_edge.runtime.kernels.linear import activation_blocks

ACTIVATION_ZERO_POINT = 0  # the recipes quantize activations symmetrically
MLAS_INT8_LEVEL = 4  # MatMulNBits accuracy level at which MLAS quantizes the activations (CompInt8)
BLOCK_BITS = MappingProxyType({"w8": 8, "w4": 4})
CALIBRATED_SCHEMES = ("w8a8", "fp8", "w8a8u8")  # a per-tensor activation scale from calibration
BIAS_IN_OP = ("w8a8u8",)  # MatMulIntegerToFloat adds the Linear's bias (export/graphs/quant_ops.py)


# ONNX Runtime's CPU QuantizeLinear on a float16 input divides x / scale in float32 up to opset 21 and in
# float16 from opset 23 (measured, ORT 1.32, on single nodes: tests/export/test_emulate.py); the two give
# different codes for ~0.5% (fp8) to ~2% (int8) of the values.
QUOTIENT_IN_INPUT_TYPE_OPSET = 23


@dataclass(frozen=True)
class QDQForm:
    """How a graph's Q/DQ computes: the float type its scales are stored in and the one QuantizeLinear divides
    x / scale in. float32 for both in the ONNX Runtime forms (export/graphs/quant_ops.py)."""

    scale: type = np.float32
    quotient: type = np.float32

    @classmethod
    def fp16(cls, opset: int) -> QDQForm:
        """An fp16 graph (export/graphs/qdq_ops.py): fp16 scales; the quotient as QuantizeLinear at `opset`."""
        return cls(np.float16, np.float16 if opset >= QUOTIENT_IN_INPUT_TYPE_OPSET else np.float32)


FP32_QDQ = QDQForm()


@dataclass(frozen=True)
class SiteRecipe:
    """What one graph MatMul computes: its scheme, the activation parameters the graph holds, and whether the
    session prepacks its weights (MatMulNBits quantizes activations only then, see above)."""

    scheme: str
    act_amax: float | None = None  # w8a8 / fp8: the calibrated clip the graph's scale is made from
    block_size: int = 128
    accuracy_level: int = 4
    prepacked: bool = True
    qdq: QDQForm = FP32_QDQ  # the TensorRT-ready graphs' fp16 Q/DQ: QDQForm.fp16(opset)

    def __post_init__(self) -> None:
        if self.scheme not in WEIGHTS:
            raise ValueError(f"no emulation for scheme {self.scheme!r} (have {', '.join(WEIGHTS)})")
        if self.scheme in CALIBRATED_SCHEMES and self.act_amax is None:
            raise ValueError(f"{self.scheme} needs the calibrated activation clip")


def activation_scale(amax: float, qmax: float, dtype: type = np.float32) -> float:
    """The per-tensor scale a Q/DQ graph stores for a clip of `amax`, in the graph's scale type (float32 in
    export/graphs/quant_ops.py, float16 in export/graphs/qdq_ops.py)."""
    return float(np.asarray(max(amax, 1e-12) / qmax, dtype=dtype))


# ----------------------------------------------------------------------------- activations
# numpy float32 throughout: each operation is the one the kernel performs (a true division where ORT
# divides, a product by the reciprocal where MLAS multiplies), so equal inputs give equal codes.


def _float(x: np.ndarray, site: SiteRecipe) -> np.ndarray:
    return x


def _mlas_int8_blocks(x: np.ndarray, site: SiteRecipe) -> np.ndarray:
    """x [..., K] as MLAS hands it to the int8 kernel at accuracy level 4, back in float32."""
    if site.accuracy_level != MLAS_INT8_LEVEL or not site.prepacked:
        return x
    q, scale = activation_blocks(x, site.block_size)  # the kernel's own rule (runtime/kernels/linear.py)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., :x.shape[-1]]


def _quotient(x: np.ndarray, scale: np.float32, site: SiteRecipe) -> np.ndarray:
    """x / scale as QuantizeLinear computes it: in the graph's Q/DQ type, back in float32."""
    dtype = site.qdq.quotient
    return (x.astype(dtype, copy=False) / dtype(scale)).astype(np.float32, copy=False)


def _int8_per_tensor(x: np.ndarray, site: SiteRecipe) -> np.ndarray:
    scale = np.float32(activation_scale(float(site.act_amax), INT8_QMAX, site.qdq.scale))
    q = np.clip(np.rint(_quotient(x, scale, site)) + ACTIVATION_ZERO_POINT, *INT8_RANGE)
    return ((q - ACTIVATION_ZERO_POINT) * scale).astype(np.float32)


def _int8_per_token(x: np.ndarray, site: SiteRecipe) -> np.ndarray:
    """w8a8dyn: the graph's ReduceMax/ReduceMin, Max, Mul by 1/127 and a per-row QuantizeLinear at 128."""
    amax = np.maximum(x.max(axis=-1, keepdims=True), -x.min(axis=-1, keepdims=True))  # [..., 1]
    scale = np.maximum(amax * np.float32(1.0 / INT8_QMAX), np.float32(DYNAMIC_SCALE_FLOOR))
    q = np.clip(np.rint(x / scale) + UINT8_ZERO, 0, 255) - UINT8_ZERO
    return (q * scale).astype(np.float32)


def _fp8_per_tensor(x: np.ndarray, site: SiteRecipe) -> np.ndarray:
    scale = np.float32(activation_scale(float(site.act_amax), E4M3_MAX, site.qdq.scale))
    return to_float8_e4m3(_quotient(x, scale, site)).astype(np.float32) * scale  # nearest even, saturating


ACTIVATIONS: Mapping[str, Callable[[np.ndarray, SiteRecipe], np.ndarray]] = MappingProxyType({
    "fp": _float, "w8": _mlas_int8_blocks, "w4": _mlas_int8_blocks, "w8a8": _int8_per_tensor,
    "fp8": _fp8_per_tensor, "w8a8u8": _int8_per_tensor, "w8a8dyn": _int8_per_token,
})


# ----------------------------------------------------------------------------- weights
# Each rule returns (codes [nb, bs, N], scales broadcastable to it); the weight is codes * scales,
# reshaped to [nb * bs, N] and cut to K rows. Per-channel schemes are one block of K rows.


def _fp_weight(w: np.ndarray, site: SiteRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(w))[None], torch.ones(1, 1, 1)


def _block_weight(w: np.ndarray, site: SiteRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    bq = quantize_blockwise(w, BLOCK_BITS[site.scheme], site.block_size)
    codes = signed_block_codes(bq).astype(np.int8).transpose(1, 2, 0)  # [N, nb, bs] -> [nb, bs, N]
    scales = np.asarray(bq.scales, np.float32).reshape(bq.n, bq.n_blocks).T[:, None, :]  # [nb, 1, N]
    return torch.from_numpy(np.ascontiguousarray(codes)), torch.from_numpy(np.ascontiguousarray(scales))


def _int8_weight(w: np.ndarray, site: SiteRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_int8_per_channel(w)
    return torch.from_numpy(q)[None], torch.from_numpy(scale.astype(np.float32))[None, None]


def _fp8_weight(w: np.ndarray, site: SiteRecipe) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = quantize_fp8_per_channel(w)
    codes = torch.from_numpy(np.ascontiguousarray(q).view(np.uint8)).view(torch.float8_e4m3fn)
    return codes[None], torch.from_numpy(scale.astype(np.float32))[None, None]


WEIGHTS: Mapping[str, Callable[[np.ndarray, SiteRecipe], tuple[torch.Tensor, torch.Tensor]]] = MappingProxyType({
    "fp": _fp_weight, "w8": _block_weight, "w4": _block_weight, "w8a8": _int8_weight, "fp8": _fp8_weight,
    "w8a8u8": _int8_weight, "w8a8dyn": _int8_weight,
})


class EmulatedLinear(nn.Module):
    """y = activation(x) @ (codes * scales) + bias: one graph MatMul as ORT's CPU EP computes it.

    It stands in for `linear` and shares its parameters: `bias` is added as the graph adds it, `weight` is
    not computed with (the folded, quantized `weight` [K, N] is) but stays readable for code that asks a
    layer for its dtype or device (PulseReference.dtype)."""

    def __init__(self, weight: np.ndarray, linear: nn.Linear, site: SiteRecipe) -> None:
        super().__init__()
        self.site = site
        self.in_features, self.out_features = weight.shape  # weight [K, N], y = x @ weight
        codes, scales = WEIGHTS[site.scheme](np.asarray(weight, np.float32), site)
        # rounded to the type the graph stores them in
        scales = torch.from_numpy(scales.numpy().astype(site.qdq.scale).astype(np.float32))
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.weight, self.bias = linear.weight, linear.bias

    def dequantized(self) -> torch.Tensor:
        """The weight the graph computes with, float32 [K, N]."""
        weight = self.codes.float() * self.scales.float()  # [nb, bs, N]
        return weight.reshape(-1, self.out_features)[: self.in_features]

    def site_output(self, x: torch.Tensor) -> torch.Tensor:
        """What the graph's site writes: the product, plus the bias where the op adds it (w8a8u8)."""
        y = self.product(x)
        return y + self.bias.float() if self.site.scheme in BIAS_IN_OP and self.bias is not None else y

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """The graph's MatMul alone (no bias): activation(x) @ weight, float32 [..., N]."""
        x_q = ACTIVATIONS[self.site.scheme](x.detach().float().cpu().numpy(), self.site)
        return torch.from_numpy(np.ascontiguousarray(x_q)).to(self.codes.device) @ self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.product(x)
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(x.dtype)


# ----------------------------------------------------------------------------- swapping


@contextmanager
def swapped(root: nn.Module, replacements: Mapping[str, nn.Module | nn.Parameter]) -> Iterator[None]:
    """Put each replacement at its dotted path under `root` for the duration; the originals come back."""
    saved: list[tuple[nn.Module, str, object]] = []
    try:
        for path, new in replacements.items():
            parent_path, _, name = path.rpartition(".")
            parent = root.get_submodule(parent_path)
            saved.append((parent, name, getattr(parent, name)))
            setattr(parent, name, new)
        yield
    finally:
        for parent, name, old in reversed(saved):
            setattr(parent, name, old)


def _t(linear: nn.Linear) -> np.ndarray:
    """A torch Linear's weight [out, in] as the graph's MatMul weight [in, out], float32."""
    return linear.weight.detach().float().numpy().T


def _gamma(norm: nn.Module, scale: np.ndarray) -> nn.Parameter:
    """An RMSNorm weight divided by the next site's input scale, float32 as the graph stores it (also for a
    bf16 model: rounding it back to bf16 would differ from the graph by bf16's step)."""
    folded = norm.weight.detach().float().numpy() / scale
    return nn.Parameter(torch.from_numpy(folded), requires_grad=False)


def _site(plan: LinearPlan, site: str, prepacked: bool, qdq: QDQForm) -> SiteRecipe:
    return SiteRecipe(scheme=plan.scheme(site), act_amax=plan.act_amax.get(site), block_size=plan.block_size,
                      accuracy_level=plan.accuracy_level, prepacked=prepacked, qdq=qdq)


def decoder_layer_swaps(layer: nn.Module, i: int, plan: LinearPlan, prepacked: bool,
                        qdq: QDQForm = FP32_QDQ) -> dict[str, nn.Module | nn.Parameter]:
    """Layer i's norms and Linears as the decoder graph computes them (paths relative to the layer)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, inner = attn.q_proj.in_features, mlp.down_proj.in_features
    s_qkv, s_gu = plan.scale(f"layers.{i}.qkv", hidden), plan.scale(f"layers.{i}.gate_up", hidden)
    s_o, s_down = plan.scale(f"layers.{i}.o", attn.o_proj.in_features), plan.scale(f"layers.{i}.down", inner)
    qkv, o, gate_up, down = (_site(plan, f"layers.{i}.{part}", prepacked, qdq)
                             for part in ("qkv", "o", "gate_up", "down"))
    v = _t(attn.v_proj) * s_qkv[:, None]
    if f"layers.{i}.o" in plan.input_scales:  # o's input is v's output: heads == kv_heads (LinearPlan.check)
        v /= s_o[None, :]
    up = _t(mlp.up_proj) * s_gu[:, None]
    up /= s_down[None, :]
    return {
        "input_layernorm.weight": _gamma(layer.input_layernorm, s_qkv),
        "self_attn.q_proj": EmulatedLinear(_t(attn.q_proj) * s_qkv[:, None], attn.q_proj, qkv),
        "self_attn.k_proj": EmulatedLinear(_t(attn.k_proj) * s_qkv[:, None], attn.k_proj, qkv),
        "self_attn.v_proj": EmulatedLinear(v, attn.v_proj, qkv),
        "self_attn.o_proj": EmulatedLinear(_t(attn.o_proj) * s_o[:, None], attn.o_proj, o),
        "post_attention_layernorm.weight": _gamma(layer.post_attention_layernorm, s_gu),
        "mlp.gate_proj": EmulatedLinear(_t(mlp.gate_proj) * s_gu[:, None], mlp.gate_proj, gate_up),
        "mlp.up_proj": EmulatedLinear(up, mlp.up_proj, gate_up),
        "mlp.down_proj": EmulatedLinear(_t(mlp.down_proj) * s_down[:, None], mlp.down_proj, down),
    }


def decoder_swaps(lm: nn.Module, plan: LinearPlan, *, prepacked: bool,
                  qdq: QDQForm = FP32_QDQ) -> dict[str, nn.Module | nn.Parameter]:
    """Every decoder site of a LlamaForCausalLM under `plan` (paths relative to `lm`)."""
    swaps: dict[str, nn.Module | nn.Parameter] = {}
    for i, layer in enumerate(lm.model.layers):
        layer_swaps = decoder_layer_swaps(layer, i, plan, prepacked, qdq)
        swaps.update({f"model.layers.{i}.{k}": v for k, v in layer_swaps.items()})
    swaps["lm_head"] = EmulatedLinear(_t(lm.lm_head), lm.lm_head, _site(plan, "lm_head", prepacked, qdq))
    return swaps


def vision_swaps(module: nn.Module, recipe: Recipe, scales: Scales,
                 qdq: QDQForm = FP32_QDQ) -> dict[str, nn.Module]:
    """The tower's and projector's quantized Linears (paths relative to `module`, a PulseReference or a
    VisionGraph: both hold `vision_tower` and `mm_projector`), with the clips the vision rewrite uses."""
    swaps: dict[str, nn.Module] = {}
    for name, linear in module.named_modules():
        site = site_name(name)
        if site is None or not site.startswith(("vision.", "projector.")) or not isinstance(linear, nn.Linear):
            continue
        scheme = recipe.scheme(site)
        if scheme == "fp":
            continue
        amax = scales.amax(site, fp8=scheme == "fp8")
        swaps[name] = EmulatedLinear(_t(linear), linear, SiteRecipe(scheme=scheme, act_amax=amax,
                                                                         block_size=recipe.block_size,
                                                                         accuracy_level=recipe.accuracy_level,
                                                                         qdq=qdq))
    return swaps


@contextmanager
def emulated_reference(model: nn.Module, recipe: Recipe, scales: Scales, plan: LinearPlan, *, prepacked: bool,
                       vision_qdq: QDQForm = FP32_QDQ, decoder_qdq: QDQForm = FP32_QDQ, kv: KVScales | None = None,
                       quantized_self: bool = True, symmetric: bool | None = None) -> Iterator[None]:
    """The PulseReference `model` computing the recipe's vision graph and decoder graph, as ORT's CPU EP runs
    them in a session that does (or does not) prepack weights, until the block ends. The Q/DQ forms are each
    graph's (QDQForm.fp16 for the TensorRT-ready graphs, export/build/tensorrt.py); `kv`, an int8 KV cache's
    scales (then `quantized_self` and `symmetric` as Int8KVCache says)."""
    decoder = {f"language_model.{k}": v for k, v in decoder_swaps(model.language_model, plan, prepacked=prepacked,
                                                                  qdq=decoder_qdq).items()}
    with ExitStack() as stack:
        stack.enter_context(swapped(model, {**vision_swaps(model, recipe, scales, vision_qdq), **decoder}))
        if kv is not None:
            stack.enter_context(int8_kv_cache(model.language_model, kv, quantized_self=quantized_self,
                                              symmetric=symmetric))
        yield
