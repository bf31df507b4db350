"""What one generation returns, the same for every backend (`infer --json` prints it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Timings:
    """Wall-clock milliseconds per stage; decode rate excludes the first (prefill) token."""

    preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    decode_ms: float
    decode_tokens_per_s: float
    time_to_first_token_ms: float


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]
    image_tokens: int
    # positions this question added to the cache, image tokens included; a follow-up's do not count the previous
    # answer's last token (fed to the cache now, counted in that answer's generated_tokens), so a conversation's
    # prompt_tokens and generated_tokens add up to the positions it used
    prompt_tokens: int
    generated_tokens: int  # the eos too, when the answer ended with one
    stop_reason: str  # "eos" | "max_new_tokens" | "context_full" | "cancelled"
    timings: Timings
    backend: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_rate(tokens_after_first: int, decode_ms: float) -> float:
    """Tokens per second over the decode steps; 0 when there were none."""
    return 1000.0 * tokens_after_first / decode_ms if tokens_after_first and decode_ms > 0 else 0.0
