"""The decode loop every backend shares: sample, stop, time.

A backend supplies the logits of the prefill's last position and a `step`
function (one token in, next logits out, KV cache kept by the backend); the
loop owns the stopping rules so that backends cannot disagree on them.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.generation.sampling import Sampler

Step = Callable[[int], np.ndarray]  # token id -> logits [V] for the next position
StopCheck = Callable[[], bool]  # True once the caller no longer wants the answer (e.g. its client went away)


@dataclass(frozen=True)
class DecodeOutcome:
    token_ids: list[int]
    stop_reason: str  # "eos" | "max_new_tokens" | "context_full" | "cancelled"
    decode_ms: float  # time spent in the steps after the first token


def check_token_limit(max_new_tokens: object) -> int:
    """`max_new_tokens` if it is a whole number >= 1 (0, a negative, a float or NaN would answer nothing)."""
    try:  # any integer type (numpy's too); not a bool, a float or NaN
        count = None if isinstance(max_new_tokens, bool) else operator.index(max_new_tokens)  # type: ignore[arg-type]
    except TypeError:
        count = None
    if count is None or count < 1:
        raise ConfigError(f"max_new_tokens must be a whole number >= 1, got {max_new_tokens!r}")
    return count


def decode_loop(first_logits: np.ndarray, step: Step, *, sampler: Sampler, eos_id: int, max_new_tokens: int,
                room: int, on_token: Callable[[int], None] | None = None,
                should_stop: StopCheck | None = None) -> DecodeOutcome:
    """Generate up to `max_new_tokens`, or until EOS, or until `room` positions are used.

    `room` is how many positions the context has left after the prompt; each generated
    token that is fed back takes one. `should_stop` is asked before every step (the costly
    part); when it says yes the loop ends with "cancelled", always after at least one token.
    """
    tokens: list[int] = []
    logits = first_logits
    decode_s = 0.0
    limit = min(max_new_tokens, room)
    while len(tokens) < limit:
        token = sampler(logits)
        tokens.append(token)
        if on_token is not None:
            on_token(token)
        if token == eos_id:
            return DecodeOutcome(tokens, "eos", decode_s * 1000.0)
        if len(tokens) == limit:
            break
        if should_stop is not None and should_stop():
            return DecodeOutcome(tokens, "cancelled", decode_s * 1000.0)
        start = time.perf_counter()
        logits = step(token)
        decode_s += time.perf_counter() - start
    reason = "max_new_tokens" if limit == max_new_tokens else "context_full"
    return DecodeOutcome(tokens, reason, decode_s * 1000.0)
