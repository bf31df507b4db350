"""Swap the fused projector into a model, and back.

`fuse_projector(model)` replaces `model.mm_projector` (nn.Sequential(Linear, GELU, Linear), as in
export.reference.PulseReference) by a FusedProjector built from *the same* child modules: no weight
is copied or changed, state_dict keys stay `mm_projector.0.weight` ..., `model.mm_projector[0].weight`
still answers PulseReference.dtype/.device, and `unfuse_projector(model)` puts a plain nn.Sequential
of those children back. Quantized variants keep their int8/fp8 copies as non-persistent buffers
(outside the state_dict); they are snapshots: re-fuse after changing the float weights, and fuse after
the model has its final dtype (`.half()` would cast fp8 buffers and fp32 scales too).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from pulse_edge.errors import ConfigError
from pulse_edge.kernels.dispatch import Choice, choose
from pulse_edge.kernels.projector import mlp2x_gelu, run_fp8, run_int8
from pulse_edge.kernels.quant import Fp8Weights, Int8Weights, quantize_projector_fp8, quantize_projector_int8

_NOT_MLP2X_GELU = "model.mm_projector is not mlp2x_gelu (Linear, GELU with approximate='none', Linear)"


def check_mlp2x_gelu(projector: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two Linear layers of an mlp2x_gelu projector; ConfigError for any other shape of projector."""
    parts = list(projector.children()) if isinstance(projector, nn.Sequential) else []
    kinds = [type(p) for p in parts]
    if kinds != [nn.Linear, nn.GELU, nn.Linear] or parts[1].approximate != "none":
        raise ConfigError(f"{_NOT_MLP2X_GELU}: {projector.__class__.__name__} of {[k.__name__ for k in kinds]}")
    fc1, fc2 = parts[0], parts[2]
    if fc1.bias is None or fc2.bias is None:
        raise ConfigError(f"{_NOT_MLP2X_GELU}: the Linear layers have no bias")
    return fc1, fc2


class FusedProjector(nn.Sequential):
    """mlp2x_gelu through pulse_edge.kernels.projector; the children are the original modules."""

    def __init__(self, original: nn.Sequential, precision: str = "native", impl: str = "auto",
                 calibration: torch.Tensor | None = None) -> None:
        fc1, fc2 = check_mlp2x_gelu(original)
        super().__init__(*original.children())
        self.precision, self.impl = precision, impl
        quantized = _quantize(precision, fc1, fc2, calibration)
        self._quant_type = type(quantized)
        for field in _fields(quantized):
            self.register_buffer(f"q_{field}", getattr(quantized, field), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FORWARD[self.precision](self, x)

    def _native(self, x: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = self[0], self[2]
        return mlp2x_gelu(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, impl=self.impl)

    def _quantized_weights(self) -> Int8Weights | Fp8Weights:
        # read from the buffers, which .to(device) moves along with the model
        return self._quant_type(**{field: getattr(self, f"q_{field}") for field in _fields(self._quant_type)})

    def _int8(self, x: torch.Tensor) -> torch.Tensor:
        return run_int8(x, self._quantized_weights(), impl=self.impl)

    def _fp8(self, x: torch.Tensor) -> torch.Tensor:
        return run_fp8(x, self._quantized_weights(), impl=self.impl)


def _fields(quantized: object) -> list[str]:
    return [f.name for f in dataclasses.fields(quantized)] if dataclasses.is_dataclass(quantized) else []


_FORWARD: dict[str, Callable[[FusedProjector, torch.Tensor], torch.Tensor]] = {
    "native": FusedProjector._native, "int8": FusedProjector._int8, "fp8": FusedProjector._fp8,
}


def _quantize(precision: str, fc1: nn.Linear, fc2: nn.Linear,
              calibration: torch.Tensor | None) -> Int8Weights | Fp8Weights | None:
    if precision not in _FORWARD:
        raise ConfigError(f"projector precision {precision!r} is not one of {', '.join(_FORWARD)}")
    if precision == "fp8" and calibration is None:
        raise ConfigError("the fp8 projector needs calibration features (vision-tower outputs of ECG tiles) "
                          "for its activation scales")
    quantizers: dict[str, Callable[[], Int8Weights | Fp8Weights | None]] = {
        "native": lambda: None,
        "int8": lambda: quantize_projector_int8(fc1, fc2),
        "fp8": lambda: quantize_projector_fp8(fc1, fc2, calibration),
    }
    return quantizers[precision]()


def fuse_projector(model: nn.Module, *, precision: str = "native", impl: str = "auto",
                   calibration: torch.Tensor | None = None) -> FusedProjector:
    """Put a FusedProjector in place of `model.mm_projector` (re-fusing an already fused one); returns it."""
    current = model.mm_projector
    plain = nn.Sequential(*current.children()) if isinstance(current, FusedProjector) else current
    fused = FusedProjector(plain, precision=precision, impl=impl, calibration=calibration)
    model.mm_projector = fused
    return fused


def unfuse_projector(model: nn.Module) -> nn.Sequential:
    """Put a plain nn.Sequential of the same modules back (a no-op on an unfused model); returns it."""
    current = model.mm_projector
    if isinstance(current, FusedProjector):
        model.mm_projector = nn.Sequential(*current.children())
    return model.mm_projector


def projector_choice(device: torch.device, dtype: torch.dtype) -> Choice:
    """Whether the torch backend should fuse the projector of a model on `device` in `dtype`, and why."""
    return choose("auto", device, dtype, "native")
