"""A conversation (runtime/generation/conversation.py) on a scripted engine: what each prefill is fed, the streamed
text, the timings, the sampling settings and the context's limits. The torch reference shares this code, so a
comparison with it cannot see these (a sixth mutation round: each test here failed on a mutant that every other
test passed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from pulse_edge.errors import PromptError
from pulse_edge.export.fixtures.tiny_tokenizer import train_tiny_tokenizer
from pulse_edge.export.model.tokenizer_convert import write_tokenizer_json
from pulse_edge.runtime.generation.conversation import Conversation
from pulse_edge.runtime.generation.sampling import SamplingParams
from pulse_edge.runtime.image.preprocess import ImageLayout
from pulse_edge.runtime.text.prompt import continuation_ids
from pulse_edge.runtime.text.tokenizer import Tokenizer


class ScriptedEngine:
    """Answers the ids of `script` in turn (the last one repeats; None: a flat row, every token equally likely),
    records what each prefill got, and spends `vision_s` on the image."""

    def __init__(self, vocab: int, script: Sequence[int | None], *, max_length: int = 10**6,
                 vision_s: float = 0.0) -> None:
        self.vocab, self.script, self.vision_s = vocab, list(script), vision_s
        self.max_length, self.epoch, self.length, self.answering = max_length, 0, 0, False
        self.lock = threading.RLock()
        self.prefills: list[list[int]] = []
        self._said = 0

    def reset(self) -> None:
        self.length, self.epoch = 0, self.epoch + 1

    def image_features(self, preprocessed) -> np.ndarray:
        time.sleep(self.vision_s)
        return np.zeros((preprocessed.num_image_tokens, 1), np.float32)

    def prefill(self, ids, features, should_stop=None) -> np.ndarray:
        self.prefills.append(list(ids))
        self.length += len(ids) - 1 + (features.shape[0] if features is not None else 1)
        return self._next()

    def step(self, token: int) -> np.ndarray:
        self.length += 1
        return self._next()

    def _next(self) -> np.ndarray:
        token = self.script[min(self._said, len(self.script) - 1)]
        self._said += 1
        row = np.zeros(self.vocab, np.float32)
        if token is not None:
            row[token] = 1.0
        return row


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    model = train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    return Tokenizer.from_file(write_tokenizer_json(model, model.with_name("tokenizer.json")))


def _print() -> Image.Image:
    image = Image.new("RGB", (336, 336), "white")
    image.paste((0, 0, 0), (100, 100, 236, 236))  # not blank; 3 tiles: 1728 image tokens
    return image


def _chat(engine: ScriptedEngine, tok: Tokenizer) -> Conversation:
    return Conversation(engine, tok, ImageLayout(), backend="fake")


@pytest.mark.parametrize("ends_with_eos", [True, False])  # the answer ends, or the token limit cuts it
def test_a_follow_up_feeds_the_answers_last_token_then_the_template(tok: Tokenizer, ends_with_eos: bool) -> None:
    """The answer's *first* token fed back instead passed every test: every later answer read a wrong context."""
    script = [11, 12, tok.eos_id] if ends_with_eos else [11, 12, 13, 14, 15, 16]
    engine = ScriptedEngine(tok.vocab_size, script)
    chat = _chat(engine, tok)
    first = chat.ask("Rate?", _print(), max_new_tokens=5)
    second = chat.ask("Axis?", max_new_tokens=2)
    tail = continuation_ids("Axis?", tok, close_previous=not ends_with_eos)
    assert engine.prefills[1] == [first.token_ids[-1], *tail]
    assert (tail[0] == tok.eos_id) is not ends_with_eos  # a cut answer is closed with </s> first
    assert second.prompt_tokens == len(tail)


def test_the_streamed_text_is_the_answers_even_when_it_ends_inside_a_character(tok: Tokenizer) -> None:
    """A token limit inside a multi-byte character: the stream lacked the final U+FFFD the text has."""
    ids = [tok._table.pieces.index("<0xE2>"), tok._table.pieces.index("<0x82>")]
    streamed: list[str] = []
    result = _chat(ScriptedEngine(tok.vocab_size, ids), tok).ask("Rate?", _print(), max_new_tokens=2,
                                                                on_text=streamed.append)
    assert result.text and "".join(streamed) == result.text


def test_time_to_first_token_counts_the_vision_tower(tok: Tokenizer) -> None:
    timings = _chat(ScriptedEngine(tok.vocab_size, [10], vision_s=0.2), tok).ask(
        "Rate?", _print(), max_new_tokens=1).timings
    assert timings.time_to_first_token_ms >= timings.vision_ms >= 200


def test_the_sampling_asked_is_the_sampling_used(tok: Tokenizer) -> None:
    """On flat logits greedy always takes id 0; a seeded temperature draws others."""
    engine = ScriptedEngine(tok.vocab_size, [None])
    ids = _chat(engine, tok).ask("Rate?", _print(), max_new_tokens=8,
                                 sampling=SamplingParams(temperature=1.0, seed=1)).token_ids
    assert ids != [0] * len(ids)


def test_an_image_as_long_as_the_context_is_blamed_on_the_image(tok: Tokenizer) -> None:
    """Not "shorten the question", which cannot help."""
    engine = ScriptedEngine(tok.vocab_size, [10], max_length=1728)
    with pytest.raises(PromptError, match="the image needs 1728 tokens but the context holds 1728"):
        _chat(engine, tok).ask("Rate?", _print(), max_new_tokens=2)


def test_a_context_without_room_for_the_shortest_follow_up_says_it_is_full(tok: Tokenizer) -> None:
    """At the boundary exactly: "filled the context", not "shorten the question"."""
    probe = ScriptedEngine(tok.vocab_size, [10])
    _chat(probe, tok).ask("Rate?", _print(), max_new_tokens=2)
    least = len(continuation_ids("?", tok, close_previous=True)) + 1  # and the answer's last token
    engine = ScriptedEngine(tok.vocab_size, [10], max_length=probe.length + least)  # one short of a "?"
    chat = _chat(engine, tok)
    assert chat.ask("Rate?", _print(), max_new_tokens=2).stop_reason == "max_new_tokens"
    with pytest.raises(PromptError, match="filled the context"):
        chat.ask("Axis?", max_new_tokens=1)


def test_the_scripted_engine_is_what_the_conversation_expects(tok: Tokenizer) -> None:
    """The stand-in answers like an engine: a whole first answer, its tokens in script order."""
    result = _chat(ScriptedEngine(tok.vocab_size, [11, 12, tok.eos_id]), tok).ask("Rate?", _print(),
                                                                                  max_new_tokens=5)
    assert result.token_ids == [11, 12, tok.eos_id] and result.stop_reason == "eos"
