"""One conversation about one ECG image, for any engine that keeps its own KV cache.

    first turn: preprocess -> engine.image_features -> engine.prefill(prompt ids + image) -> decode
    next turns: engine.prefill(last answer token + "USER: {q} ASSISTANT:") -> decode   (cache kept)

The engine (torch reference or ONNX Runtime) only runs the model; the
preprocessing, the prompt, the context checks, the stop rules and the timings
live here, so every backend answers by the same rules.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from pulse_edge.errors import ConfigError, GenerationStopped, PromptError
from pulse_edge.runtime.generation.decode import StopCheck, check_token_limit, decode_loop
from pulse_edge.runtime.generation.result import GenerationResult, Timings, decode_rate
from pulse_edge.runtime.generation.sampling import Sampler, SamplingParams
from pulse_edge.runtime.image.preprocess import ImageLayout, Preprocessed, preprocess
from pulse_edge.runtime.inputs.images import accept_image
from pulse_edge.runtime.text.prompt import LLAVA_V1, PromptTemplate, Turn, continuation_ids, prompt_ids, spliced_length
from pulse_edge.runtime.text.tokenizer import StreamDecoder, Tokenizer


class Engine(Protocol):
    """What a backend provides: image features, and a decoder that appends to its own cache."""

    max_length: int
    epoch: int  # how many times the cache was reset: a conversation owns it while no newer one has reset it
    lock: AbstractContextManager[Any]  # held by a conversation for its reset and for each whole question
    answering: bool  # a question is being answered (set and read under the lock: the same thread, re-entering)

    @property
    def length(self) -> int: ...

    def reset(self) -> None: ...  # empties the cache and adds 1 to epoch

    def image_features(self, pre: Preprocessed) -> Any: ...

    def prefill(self, ids: Sequence[int], image_features: Any | None,
                should_stop: StopCheck | None = None) -> np.ndarray: ...

    def step(self, token: int) -> np.ndarray: ...


@dataclass
class _Prompt:
    ids: list[int]
    pre: Preprocessed | None
    positions: int  # what it takes in the cache
    counted: int  # its prompt_tokens: a follow-up's first id is the previous answer's, counted there


class Conversation:
    """Ask about an image, then follow up; the engine's cache carries the history between turns."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, layout: ImageLayout, *, backend: str,
                 template: PromptTemplate = LLAVA_V1) -> None:
        self.engine, self.tokenizer, self.layout = engine, tokenizer, layout
        self.template, self.backend = template, backend
        self._pending: int | None = None  # the last generated token, not yet in the cache
        self._last_stop = "eos"
        self._opened = False  # the image and first question are in the cache
        self._broken: str | None = None  # why an earlier ask stopped with its positions half in the cache
        with engine.lock:  # not while another thread's conversation is mid-answer on this engine's cache
            _refuse_reentry(engine)
            engine.reset()
            self._epoch = engine.epoch  # a later conversation on this engine (pipeline.generate, chat) resets it

    def ask(self, question: str, image: Image.Image | None = None, *, max_new_tokens: int = 1024,
            sampling: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
            history: Sequence[Turn] = (), should_stop: StopCheck | None = None) -> GenerationResult:
        """The first question needs the image; follow-ups must not pass one.

        `history`: answered turns that come before `question` (first question only: a client replaying a
        whole chat, as OpenAI-style clients do). `should_stop`: see `decode_loop`. Thread-safe: a question holds
        the engine (its cache) from its first check to its last token; another thread's waits.
        """
        if not isinstance(question, str):  # checked before the cache moves: a bad argument never breaks the chat
            raise PromptError(f"the question must be text (str), got {type(question).__name__}")
        if not question.strip():  # nothing asked: never answered as if something were (nor the default, in silence)
            raise PromptError("the question is blank; ask something, or leave the question out of generate() and "
                              "interpret() for a full interpretation")
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise ConfigError(f"sampling must be a SamplingParams (or None: greedy), got {type(sampling).__name__}")
        for name, callback in (("on_text", on_text), ("should_stop", should_stop)):  # before the prefill's seconds
            if callback is not None and not callable(callback):
                raise ConfigError(f"{name} must be a function (or None), got {type(callback).__name__}")
        with self.engine.lock:  # a close asked meanwhile happens as the lock is let go (runtime/engines)
            _refuse_reentry(self.engine)
            try:
                self.engine.answering = True  # inside the try: a signal cannot land between it and the reset
                return self._ask(question, image, max_new_tokens=max_new_tokens, sampling=sampling,
                                 on_text=on_text, history=history or (), should_stop=should_stop)
            finally:
                self.engine.answering = False

    def _ask(self, question: str, image: Image.Image | None, *, max_new_tokens: int,
             sampling: SamplingParams | None, on_text: Callable[[str], None] | None, history: Sequence[Turn],
             should_stop: StopCheck | None) -> GenerationResult:
        t0 = time.perf_counter()
        check_token_limit(max_new_tokens)
        if self.engine.epoch != self._epoch:  # its cache now holds another conversation's ECG: never answer on it
            raise PromptError("this conversation's cache was taken by a newer conversation on the same model "
                              "(chat(), generate() and interpret() each start one): ask in a new conversation")
        if self._broken is not None:  # its cache holds part of a question or answer the conversation never recorded
            raise PromptError(f"an earlier question of this conversation stopped partway ({self._broken}), leaving "
                              "the cache out of step with it: ask in a new conversation")
        prompt = (self._follow_up(question, image, history) if self._opened
                  else self._first_prompt(question, image, history))
        t1 = time.perf_counter()
        if should_stop is not None and should_stop():  # a stop asked at once costs no vision graph (seconds)
            raise GenerationStopped("stopped before the image was read")
        features = self.engine.image_features(prompt.pre) if prompt.pre is not None else None  # the cache unmoved
        t2 = time.perf_counter()
        try:  # from here on the cache moves: a failure leaves it holding what this conversation never saw
            logits = self.engine.prefill(prompt.ids, features, should_stop=should_stop)
            self._opened = True
            t3 = time.perf_counter()
            stream = StreamDecoder(self.tokenizer)
            outcome = decode_loop(logits, self.engine.step, sampler=Sampler(sampling or SamplingParams()),
                                  eos_id=self.tokenizer.eos_id, max_new_tokens=max_new_tokens,
                                  room=self.engine.max_length - self.engine.length,
                                  on_token=_streamer(stream, on_text, self.tokenizer.eos_id), should_stop=should_stop)
            if on_text is not None and (tail := stream.flush()):
                on_text(tail)
        except BaseException as e:  # Ctrl-C included: the cache is as far as the interrupted step got
            self._broken = type(e).__name__
            raise
        self._pending, self._last_stop = outcome.token_ids[-1], outcome.stop_reason
        tokens = outcome.token_ids
        timings = Timings(preprocess_ms=(t1 - t0) * 1e3, vision_ms=(t2 - t1) * 1e3, prefill_ms=(t3 - t2) * 1e3,
                          decode_ms=outcome.decode_ms, decode_tokens_per_s=decode_rate(len(tokens) - 1,
                                                                                       outcome.decode_ms),
                          time_to_first_token_ms=(t3 - t0) * 1e3)
        return GenerationResult(
            text=self.tokenizer.decode([t for t in tokens if t != self.tokenizer.eos_id]), token_ids=tokens,
            image_tokens=prompt.pre.num_image_tokens if prompt.pre else 0, prompt_tokens=prompt.counted,
            generated_tokens=len(tokens), stop_reason=outcome.stop_reason, timings=timings, backend=self.backend)

    def _first_prompt(self, question: str, image: Image.Image | None, history: Sequence[Turn]) -> _Prompt:
        if image is None:
            raise PromptError("the first question of a conversation needs the ECG image")
        pre = preprocess(accept_image(image), self.layout)  # size limits, RGBA onto white (as a file's)
        ids = prompt_ids([*history, Turn(question)], self.tokenizer, self.template)
        positions = spliced_length(ids, pre.num_image_tokens)
        prompt = _Prompt(ids=ids, pre=pre, positions=positions, counted=positions)
        self._check_room(prompt, image_tokens=pre.num_image_tokens)
        return prompt

    def _follow_up(self, question: str, image: Image.Image | None, history: Sequence[Turn]) -> _Prompt:
        if image is not None:
            raise PromptError("a follow-up question cannot bring a new image: start a new conversation")
        if history:
            raise PromptError("a follow-up question cannot bring a history: the conversation keeps its own")
        ids = continuation_ids(question, self.tokenizer, close_previous=self._last_stop != "eos",
                               template=self.template)
        counted = len(ids)
        ids = [self._pending, *ids] if self._pending is not None else ids
        prompt = _Prompt(ids=ids, pre=None, positions=len(ids), counted=counted)
        self._check_room(prompt, image_tokens=0)
        return prompt

    def _check_room(self, prompt: _Prompt, *, image_tokens: int) -> None:
        limit, used = self.engine.max_length, self.engine.length
        if image_tokens >= limit:
            raise PromptError(f"the image needs {image_tokens} tokens but the context holds {limit}; "
                              "use a model exported with a longer context")
        if used + prompt.positions >= limit and used and used + self._least_follow_up() >= limit:
            raise PromptError(f"this conversation has filled the context ({used} of {limit} positions): no "
                              "follow-up fits; start a new conversation")  # "shorten the question" could not help
        if used + prompt.positions >= limit:
            what = "the prompt" if used == 0 else "this follow-up"
            raise PromptError(f"{what} takes {prompt.positions} positions ({image_tokens} for the image, "
                              f"{used} already used) but the context holds {limit}; shorten the question"
                              + ("" if used == 0 else " or start a new conversation"))


    def _least_follow_up(self) -> int:
        """The positions of the shortest follow-up there is: the turn's template around a one-letter question."""
        ids = continuation_ids("?", self.tokenizer, close_previous=self._last_stop != "eos", template=self.template)
        return len(ids) + (self._pending is not None)


def _refuse_reentry(engine: Engine) -> None:
    """The lock is re-entrant: a question asked from inside a running answer's own callback (on_text, should_stop),
    on the same thread, would pass it, reset or fill the cache, and the running answer would go on decoding on
    that foreign cache: a wrong answer with no error."""
    if engine.answering:
        raise ConfigError("this model is answering a question on this thread: it cannot be asked from inside its own "
                          "on_text or should_stop; ask after that answer returns (or on another pipeline)")


def _streamer(stream: StreamDecoder, on_text: Callable[[str], None] | None, eos_id: int) -> Callable[[int], None]:
    def emit(token: int) -> None:
        if on_text is not None and token != eos_id and (piece := stream.push(token)):
            on_text(piece)

    return emit
