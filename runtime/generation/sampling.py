"""Next-token choice from one row of logits: greedy, temperature, top-p.

Shared by every backend, so the torch reference and the ONNX runtime pick
tokens by the very same rule. Works on float logits of shape [V] in numpy;
the cost is one pass over 32000 floats per token, negligible against decode.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from pulse_edge.choices import SEED_RANGE
from pulse_edge.errors import ConfigError, ModelOutputError

MIN_TEMPERATURE = 1e-4  # logits of up to ~1e4 over it stay far inside float64's range


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy (the paper's evaluation setting)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):  # a string or None failed inside a comparison, as a TypeError
            value = getattr(self, name)
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            try:
                object.__setattr__(self, name, float(value))  # numpy's too (np.float32(0.9)): a plain float
            except OverflowError:  # an int past float's range (10**400)
                raise ConfigError(f"{name} must be a number within float's range, got an integer of "
                                  f"{len(str(abs(value)))} digits") from None
        if isinstance(self.seed, numbers.Integral) and not isinstance(self.seed, bool | np.bool_):
            object.__setattr__(self, "seed", int(self.seed))  # np.int64(3) as 3
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if 0.0 < self.temperature < MIN_TEMPERATURE:  # logits / 5e-324 is inf: the softmax of infs is NaN
            raise ConfigError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}, got "
                              f"{self.temperature:g}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        low, high = SEED_RANGE
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not low <= self.seed <= high:
            raise ConfigError(f"seed must be an integer in [{low}, {high}], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_logits(logits: np.ndarray) -> None:
    """Refuse non-finite logits: argmax would pick the first NaN as a token and answer garbage in silence.
    4 us for 32000 logits here."""
    if not np.isfinite(logits).all():
        raise ModelOutputError("the model's logits hold NaN or inf, so no answer is given: the bundle may be "
                               "damaged (run `pulse-edge verify MODEL`) or its precision overflowed on this input")


class Sampler:
    """Stateful only in its random generator, so a seed gives a reproducible run."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        logits = np.asarray(logits).reshape(-1)  # [V]
        check_logits(logits)
        if self.params.greedy:
            return int(np.argmax(logits))
        probs = _softmax(logits.astype(np.float64) / self.params.temperature)
        if self.params.top_p < 1.0:
            probs = _top_p_filter(probs, self.params.top_p)
        return int(self._rng.choice(probs.shape[0], p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = np.exp(x - np.max(x))
    return z / z.sum()


def _top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p, side="left")) + 1
    kept = np.zeros_like(probs)
    kept[order[:keep]] = probs[order[:keep]]
    return kept / kept.sum()
