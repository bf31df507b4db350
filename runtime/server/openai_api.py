"""OpenAI's chat-completions format, as far as one ECG and PULSE's template can honour it.

    {"model", "messages": [system?, user(text + image_url), assistant, user, ...], "stream", "temperature", ...}
        -> ChatRequest(system, history [Turn], question, image bytes, sampling, max_tokens, ...)

Rules: exactly one image per conversation, as a `data:` URI in the first user message (the server fetches no
URL; the content is sniffed, not trusted from the MIME type); the last message is the user's question; earlier
user/assistant pairs become answered turns; system (or developer) messages before the first user message
replace PULSE's system prompt. The fields a request may hold are listed (HONOURED, BOOKKEEPING): any other,
OpenAI's not implemented here (`stop`, `n` > 1, penalties, tools, logprobs, response formats) or another
server's (vLLM's `top_k`, `repetition_penalty`...), is refused, never silently ignored; bookkeeping ones
(`user`, `metadata`, `store`...) change no answer and are ignored. Omitted sampling parameters mean greedy,
up to 1024 tokens: the paper's evaluation setting, not OpenAI's temperature 1.
"""

from __future__ import annotations

import base64
import binascii
import math
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pulse_edge.choices import SEED_RANGE
from pulse_edge.runtime.generation.result import GenerationResult
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.server.errors import SHUTTING_DOWN, ApiError
from pulse_edge.runtime.text.prompt import Turn, question_or_default

DEFAULT_MAX_TOKENS = 1024
SYSTEM_ROLES = ("system", "developer")
# OpenAI's finish reasons for the runtime's stop reasons (the context running out is a length limit too).
FINISH_REASONS: Mapping[str, str] = {"eos": "stop", "max_new_tokens": "length", "context_full": "length"}
# The fields this server reads, and those that change no answer; every other field is refused (an allow-list: a
# client written for another server sends parameters no list of refusals would foresee).
STREAM_OPTIONS = frozenset({"include_usage"})
HONOURED = frozenset({"model", "messages", "stream", "stream_options", "temperature", "top_p", "seed", "max_tokens",
                      "max_completion_tokens", "return_token_ids"})
BOOKKEEPING = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
                         "safety_identifier"})
# OpenAI's parameters this server does not implement -> the value that means "not used" (clients send those).
UNSUPPORTED: Mapping[str, Any] = {
    "n": 1, "stop": None, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "logprobs": False,
    "top_logprobs": None, "tools": None, "tool_choice": None, "functions": None, "function_call": None,
    "response_format": None, "audio": None, "modalities": None, "prediction": None,
}


@dataclass(frozen=True)
class ChatRequest:
    system: str | None
    history: tuple[Turn, ...]
    question: str
    image: bytes
    sampling: SamplingParams
    max_tokens: int
    stream: bool
    include_usage: bool
    return_token_ids: bool  # an extension (as vLLM names it): the generated ids in the choice


def parse_chat_request(body: Any, model_id: str) -> ChatRequest:
    if not isinstance(body, Mapping):
        raise ApiError("bad_request", "the request body must be a JSON object")
    _check_model(body.get("model"), model_id)
    _refuse_unsupported(body)
    system, turns, image = _read_messages(body.get("messages"))
    # an image-only (or blank) message asks the default question, replayed turns included: the answer in the
    # history was given to it, and replayed as a blank question the prompt would not be the one it answered
    turns = [replace(t, question=question_or_default(t.question)) for t in turns]
    *history, last = turns
    if last.answer is not None:
        raise ApiError("bad_request", "the last message must be the user's question", param="messages")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, Mapping):
        raise ApiError("bad_request", "stream_options must be an object", param="stream_options")
    if stream_options and not _flag(body, "stream"):  # as OpenAI answers it: read by no whole answer
        raise ApiError("bad_request", "stream_options is only read with stream: true; leave it out",
                       param="stream_options")
    if unknown := sorted(set(stream_options) - STREAM_OPTIONS):
        raise ApiError("bad_request", f"stream_options {unknown} are not supported by this server (it reads "
                       f"{', '.join(sorted(STREAM_OPTIONS))}); leave them out", param="stream_options")
    return ChatRequest(system=system, history=tuple(history), question=last.question,
                       image=image, sampling=sampling_params(body), max_tokens=max_tokens(body),
                       stream=_flag(body, "stream"), include_usage=_flag(stream_options, "include_usage"),
                       return_token_ids=_flag(body, "return_token_ids"))


# image_url's detail values that ask for what the model always does (its full anyres grid); None: not given
FULL_DETAIL = (None, "auto", "high")


def _check_model(model: Any, model_id: str) -> None:
    if model is not None and model != model_id:
        raise ApiError("not_found", f"model {model!r} is not served here; this server serves {model_id!r}",
                       param="model")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    for name, value in body.items():
        if name in HONOURED or name in BOOKKEEPING:
            continue
        if name not in UNSUPPORTED or value not in (UNSUPPORTED[name], None):
            raise ApiError("bad_request", f"{name!r} is not supported by this server; leave it out", param=name)


def _read_messages(messages: Any) -> tuple[str | None, list[Turn], bytes]:
    """(system text, turns, image) from OpenAI messages; consecutive messages of one role are joined."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("bad_request", "messages must be a non-empty list", param="messages")
    system: list[str] = []
    turns: list[Turn] = []
    images: list[tuple[int, bytes]] = []
    for i, message in enumerate(messages):
        role, text = _message(message, i, images)
        if role in SYSTEM_ROLES:
            if turns:
                raise ApiError("bad_request", f"messages[{i}]: system messages must come before the first user "
                               "message", param="messages")
            system.append(text)
        elif role == "user":
            turns = _add_user(turns, text)
        elif not turns:
            raise ApiError("bad_request", f"messages[{i}]: an assistant message needs a user message before it",
                           param="messages")
        else:
            last = turns[-1]
            turns[-1] = Turn(last.question, text if last.answer is None else f"{last.answer}\n{text}")
    if not turns:
        raise ApiError("bad_request", "messages hold no user message", param="messages")
    return ("\n".join(system) if system else None), turns, _the_image(images, messages)


def _add_user(turns: list[Turn], text: str) -> list[Turn]:
    if turns and turns[-1].answer is None:  # consecutive user messages make one question
        return [*turns[:-1], Turn("\n".join(t for t in (turns[-1].question, text) if t))]
    return [*turns, Turn(text)]


def _message(message: Any, i: int, images: list[tuple[int, bytes]]) -> tuple[str, str]:
    if not isinstance(message, Mapping):
        raise ApiError("bad_request", f"messages[{i}] must be an object", param="messages")
    role = message.get("role")
    if role not in (*SYSTEM_ROLES, "user", "assistant"):
        raise ApiError("bad_request", f"messages[{i}]: role {role!r} is not supported (system, developer, user, "
                       "assistant)", param="messages")
    content = message.get("content")
    if isinstance(content, str):
        return role, content
    if not isinstance(content, list):
        raise ApiError("bad_request", f"messages[{i}]: content must be a string or a list of parts",
                       param="messages")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            images.append((i, _image_bytes(part.get("image_url"), i)))
        else:
            raise ApiError("bad_request", f"messages[{i}]: a {role} message part must be text"
                           + (" or image_url" if role == "user" else ""), param="messages")
    return role, "\n".join(texts)


def _image_bytes(image_url: Any, i: int) -> bytes:
    url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
    detail = image_url.get("detail") if isinstance(image_url, Mapping) else None
    if detail not in FULL_DETAIL:  # OpenAI's "low" is one small tile: not what PULSE was trained to read
        raise ApiError("bad_request", f"messages[{i}]: image_url detail {detail!r} is not supported: PULSE reads "
                       "every ECG at full resolution (the original and 4 tiles); use 'auto' or 'high', or leave it "
                       "out", param="messages")
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError("bad_request", f"messages[{i}]: image_url must be a data: URI "
                       "(data:image/png;base64,...); this server fetches no URL", param="messages")
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise ApiError("bad_request", f"messages[{i}]: the image data URI must be base64-encoded", param="messages")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError("bad_request", f"messages[{i}]: the image data URI is not valid base64",
                       param="messages") from e


def _the_image(images: list[tuple[int, bytes]], messages: Sequence[Any]) -> bytes:
    if len(images) != 1:
        found = "no image" if not images else f"{len(images)} images"
        raise ApiError("bad_request", f"a conversation needs exactly one ECG image (an image_url part), found "
                       f"{found}", param="messages")
    index, data = images[0]
    first_user = next(i for i, m in enumerate(messages) if m.get("role") == "user")
    if index != first_user:
        raise ApiError("bad_request", f"the ECG image must be in the first user message (messages[{first_user}]), "
                       f"not messages[{index}]", param="messages")
    return data


def number_field(body: Mapping[str, Any], name: str, default: float | None, what: str = "a number") -> float | None:
    """A finite JSON number, or `default` when absent or null; an integer too large for a float is no number."""
    value = body.get(name)
    if value is None:
        return default
    try:
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:  # 10**400: JSON allows it, a float does not
        number = math.nan
    if not math.isfinite(number):
        raise ApiError("bad_request", f"{name} must be {what}", param=name)
    return number


def sampling_params(body: Mapping[str, Any]) -> SamplingParams:
    temperature = number_field(body, "temperature", 0.0)
    top_p = number_field(body, "top_p", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise ApiError("bad_request", f"temperature must be in [0, 2] (0 = greedy), got {temperature}",
                       param="temperature")
    if not 0.0 < top_p <= 1.0:
        raise ApiError("bad_request", f"top_p must be in (0, 1], got {top_p}", param="top_p")
    seed = body.get("seed")
    low, high = SEED_RANGE
    if seed is None:
        seed = secrets.randbelow(high + 1)  # as OpenAI: no seed, no reproducibility promise
    elif isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        raise ApiError("bad_request", f"seed must be an integer in [{low}, {high}]", param="seed")
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed)


def max_tokens(body: Mapping[str, Any]) -> int:
    both = body.get("max_tokens"), body.get("max_completion_tokens")
    if None not in both and both[0] != both[1]:  # OpenAI's old name and its new one: which was meant is unknown
        raise ApiError("bad_request", f"max_tokens ({both[0]!r}) and max_completion_tokens ({both[1]!r}) differ; "
                       "give one", param="max_completion_tokens")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError("bad_request", f"{name} must be a positive integer", param=name)
    return value


def _flag(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise ApiError("bad_request", f"{name} must be true or false", param=name)
    return value


@dataclass(frozen=True)
class Reply:
    """What every response or chunk of one completion shares."""

    id: str
    created: int
    model: str
    fingerprint: str

    @classmethod
    def new(cls, model: str, fingerprint: str) -> Reply:
        return cls(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model, fingerprint=fingerprint)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def completion(self, result: GenerationResult, *, token_ids: bool, notes: Sequence[str] = ()) -> dict[str, Any]:
        """`notes`: what was done to the input on its way to the model (an extension, as `infer --json` has it)."""
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": result.text},
                                  "finish_reason": finish_reason(result), "logprobs": None}
        if token_ids:
            choice["token_ids"] = list(result.token_ids)
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage(result), "notes": list(notes)}

    def chunk(self, delta: Mapping[str, Any], finish_reason: str | None = None,
              notes: Sequence[str] | None = None, token_ids: Sequence[int] | None = None) -> dict[str, Any]:
        """A stream's chunk; its last (with the finish reason) carries the `notes`, and the generated ids where
        return_token_ids asked for them."""
        choice: dict[str, Any] = {"index": 0, "delta": dict(delta), "finish_reason": finish_reason, "logprobs": None}
        if token_ids is not None:
            choice["token_ids"] = list(token_ids)
        extra = {} if notes is None else {"notes": list(notes)}
        return {**self._head("chat.completion.chunk"), "choices": [choice], **extra}

    def usage_chunk(self, result: GenerationResult) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage(result)}


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's finish reason; a generation that was cut short (the server is closing) has none: 503."""
    if result.stop_reason not in FINISH_REASONS:
        raise ApiError("unavailable", SHUTTING_DOWN)
    return FINISH_REASONS[result.stop_reason]


def usage(result: GenerationResult) -> dict[str, int]:
    """Prompt tokens are positions, the 2880 image tokens included; completion tokens count the EOS too."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens}
