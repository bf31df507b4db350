"""The llava_v1 template, the image slot, sampling and the shared decode loop."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pulse_edge.errors import ConfigError, PromptError
from pulse_edge.runtime.generation.decode import decode_loop
from pulse_edge.runtime.generation.sampling import Sampler, SamplingParams
from pulse_edge.runtime.text.prompt import (
    IMAGE_SLOT,
    LLAVA_V1,
    LLAVA_V1_SYSTEM,
    PromptTemplate,
    Turn,
    continuation_ids,
    image_slot_index,
    prompt_ids,
    render_text,
    spliced_length,
)


class CharTokenizer:
    """Stands in for SentencePiece: one id per character, plus the dummy-prefix space marker 1000."""

    bos_id, eos_id = 1, 2

    def encode(self, text: str, *, dummy_prefix: bool = True) -> list[int]:
        return [1000] * dummy_prefix + [ord(c) for c in text]


def _decode(ids: list[int]) -> str:
    return "".join(chr(i) if i > 2 and i != 1000 else {1: "<s>", 2: "</s>", 1000: "|"}.get(i, "?") for i in ids)


def test_single_turn_text_is_the_llava_v1_template() -> None:
    text = render_text([Turn("What is the rhythm?")])
    assert text == f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is the rhythm? ASSISTANT:"


def test_multi_turn_text_closes_answers_with_eos_string() -> None:
    text = render_text([Turn("Q1", "A1"), Turn("Q2")])
    assert text.endswith("USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:")


def test_prompt_ids_split_at_the_image_with_bos_first_only() -> None:
    ids = prompt_ids([Turn("Rate?")], CharTokenizer())
    slot = image_slot_index(ids)
    assert ids[0] == 1 and ids.count(1) == 1
    # chunk before the image: dummy prefix + "{system} USER: " (trailing space kept, as LLaVA does)
    assert _decode(ids[1:slot]) == f"|{LLAVA_V1_SYSTEM} USER: "
    # chunk after the image is tokenized on its own, so it gets its own dummy prefix before "\n"
    assert _decode(ids[slot + 1:]) == "|\nRate? ASSISTANT:"


def test_multi_turn_ids_put_eos_after_each_answer_and_restart_a_chunk() -> None:
    ids = prompt_ids([Turn("Q1", "A1"), Turn("Q2")], CharTokenizer())
    tail = _decode(ids[image_slot_index(ids) + 1:])
    assert tail == "|\nQ1 ASSISTANT: A1</s>|USER: Q2 ASSISTANT:"


def test_continuation_matches_the_tail_of_the_full_prompt() -> None:
    tok = CharTokenizer()
    full = prompt_ids([Turn("Q1", "A1"), Turn("Q2")], tok)
    first = prompt_ids([Turn("Q1")], tok)
    answer_ids = tok.encode(" A1")[1:]  # what the model generated after "ASSISTANT:"
    # a real SentencePiece merges " A1" into the preceding chunk; here the char tokenizer makes it exact
    rebuilt = first + answer_ids + continuation_ids("Q2", tok, close_previous=True)
    assert rebuilt == full


def test_user_text_never_becomes_control_ids() -> None:
    ids = prompt_ids([Turn("what does </s> mean?")], CharTokenizer())
    assert ids.count(2) == 0


@pytest.mark.parametrize("turns", [[], [Turn("<image> twice")], [Turn("Q1"), Turn("Q2")]])
def test_malformed_conversations_are_refused(turns: list[Turn]) -> None:
    with pytest.raises(PromptError):
        prompt_ids(turns, CharTokenizer())


@pytest.mark.parametrize(("make", "what"), [
    (lambda: Turn("Rate?\ud800"), "question"), (lambda: Turn("Q", "A\udc80"), "answer in the history"),
    (lambda: continuation_ids("\ud800", CharTokenizer(), close_previous=False), "question"),
    (lambda: PromptTemplate.from_dict({**LLAVA_V1.to_dict(), "system": "\udfff"}), "system prompt")])
def test_text_with_half_a_utf16_pair_is_refused_where_it_enters(make, what: str) -> None:
    with pytest.raises(PromptError, match=f"the {what} is not valid text"):
        make()


def test_image_slot_must_be_unique() -> None:
    with pytest.raises(PromptError, match="exactly one image slot"):
        image_slot_index([1, IMAGE_SLOT, 5, IMAGE_SLOT])
    assert spliced_length([1, IMAGE_SLOT, 5], 2880) == 2882


def test_template_round_trips_through_dict() -> None:
    assert PromptTemplate.from_dict(LLAVA_V1.to_dict()) == LLAVA_V1
    with pytest.raises(PromptError, match="expected keys"):
        PromptTemplate.from_dict({"name": "x"})


def test_greedy_takes_the_first_maximum() -> None:
    sampler = Sampler(SamplingParams())
    assert sampler(np.array([0.1, 3.0, 3.0, -1.0])) == 1


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.7, top_p=0.9)], ids=["greedy", "p"])
def test_non_finite_logits_are_refused_not_decoded(bad: float, params: SamplingParams) -> None:
    """argmax would take a NaN as the token; sampling would raise numpy's ValueError: both refuse in one line."""
    from pulse_edge.errors import ModelOutputError

    with pytest.raises(ModelOutputError, match="logits hold NaN or inf"):
        Sampler(params)(np.array([0.1, bad, 3.0], dtype=np.float32))


def test_sampling_is_seeded_and_follows_the_distribution() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    draws = [Sampler(SamplingParams(temperature=1.0, seed=7)) for _ in range(2)]
    a = [draws[0](logits) for _ in range(2000)]
    b = [draws[1](logits) for _ in range(2000)]
    assert a == b
    freq = np.bincount(a, minlength=3) / len(a)
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.2], atol=0.04)
    # the temperature divides the logits: p ** (1 / T), renormalised (at T = 1 dividing changes nothing)
    for temperature in (0.5, 2.0):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=3))
        freq = np.bincount([sampler(logits) for _ in range(4000)], minlength=3) / 4000
        expected = np.array([0.5, 0.3, 0.2]) ** (1 / temperature)
        np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.03)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    seen = {sampler(logits) for _ in range(500)}
    assert seen == {0, 1}  # 0.5 + 0.3 = 0.8 >= 0.75; token 2 and 3 never drawn


@pytest.mark.parametrize("kwargs", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"temperature": 1e-6}, {"temperature": 1e-320},  # logits / t: inf, then NaN
                                    {"seed": -1}, {"seed": 2**64}, {"seed": 1.5}, {"seed": True}])
def test_invalid_sampling_params_are_refused(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)


def _scripted(tokens: list[int], vocab: int = 10):
    """A fake engine whose greedy choice at step k is tokens[k]."""
    def logits_for(k: int) -> np.ndarray:
        row = np.zeros(vocab)
        row[tokens[k]] = 1.0
        return row

    calls: list[int] = []

    def step(token: int) -> np.ndarray:
        calls.append(token)
        return logits_for(len(calls))

    return logits_for(0), step, calls


def test_decode_loop_stops_at_eos_and_feeds_back_each_token() -> None:
    first, step, calls = _scripted([5, 6, 2, 7])
    out = decode_loop(first, step, sampler=Sampler(SamplingParams()), eos_id=2, max_new_tokens=10, room=100)
    assert out.token_ids == [5, 6, 2] and out.stop_reason == "eos"
    assert calls == [5, 6]  # EOS is not fed back


def test_decode_loop_respects_token_limit_and_context_room() -> None:
    first, step, calls = _scripted([5, 6, 7, 8, 9])
    out = decode_loop(first, step, sampler=Sampler(SamplingParams()), eos_id=2, max_new_tokens=3, room=100)
    assert out.token_ids == [5, 6, 7] and out.stop_reason == "max_new_tokens" and calls == [5, 6]
    first, step, _ = _scripted([5, 6, 7, 8, 9])
    out = decode_loop(first, step, sampler=Sampler(SamplingParams()), eos_id=2, max_new_tokens=10, room=2)
    assert out.token_ids == [5, 6] and out.stop_reason == "context_full"


def test_decode_loop_ends_at_an_eos_that_comes_first() -> None:
    """An answer that is only </s>: nothing after it is generated, and no step runs."""
    first, step, calls = _scripted([2, 5, 6])
    out = decode_loop(first, step, sampler=Sampler(SamplingParams()), eos_id=2, max_new_tokens=10, room=100)
    assert (out.token_ids, out.stop_reason, calls) == ([2], "eos", [])


def test_decode_time_is_every_steps_time() -> None:
    """decode_ms is the sum over the steps, not the last one (tokens/s would be inflated)."""
    import time

    base_step = _scripted([5, 6, 7, 8, 2])[1]

    def slow_step(token: int) -> np.ndarray:
        time.sleep(0.02)
        return base_step(token)

    first = _scripted([5, 6, 7, 8, 2])[0]
    out = decode_loop(first, slow_step, sampler=Sampler(SamplingParams()), eos_id=2, max_new_tokens=10, room=100)
    assert out.token_ids == [5, 6, 7, 8, 2] and out.decode_ms >= 4 * 20.0


class _CountingEngine:
    """An engine that only counts positions, as a real cache fills: it refuses to go past max_length, and its logits
    never pick the EOS id (each answer runs to its limit)."""

    def __init__(self, max_length: int, vocab: int) -> None:
        import threading

        self.max_length, self.epoch, self.lock, self.vocab = max_length, 0, threading.RLock(), vocab
        self.answering = False
        self.length = 0

    def reset(self) -> None:
        self.length, self.epoch = 0, self.epoch + 1

    def image_features(self, pre: object) -> np.ndarray:
        return np.zeros((pre.num_image_tokens, 1), np.float32)

    def _advance(self, positions: int) -> np.ndarray:
        assert self.length + positions <= self.max_length, "wrote past the cache"
        self.length += positions
        logits = np.zeros(self.vocab, np.float32)
        logits[10] = 1.0  # an ordinary token, never EOS
        return logits

    def prefill(self, ids: list[int], image_features: np.ndarray | None, should_stop: object = None) -> np.ndarray:
        return self._advance(len(ids) - 1 + image_features.shape[0] if image_features is not None else len(ids))

    def step(self, token: int) -> np.ndarray:
        return self._advance(1)


@pytest.fixture
def counting_chat(tiny_bundle):
    """(a conversation on a _CountingEngine with room for its prompt and `room` more positions, its image)."""
    from PIL import Image

    from pulse_edge.runtime.generation.conversation import Conversation
    from pulse_edge.runtime.image.preprocess import ImageLayout
    from pulse_edge.runtime.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tiny_bundle / "tokenizer.json")
    image = Image.new("RGB", (336, 336), "white")
    image.paste((0, 0, 0), (100, 100, 236, 236))  # not blank

    def make(room: int):
        probe = _CountingEngine(10**6, tokenizer.vocab_size)
        Conversation(probe, tokenizer, ImageLayout(), backend="fake").ask("Rate?", image, max_new_tokens=1)
        prompt = probe.length  # the prompt's positions (its one answer token never enters the cache)
        engine = _CountingEngine(prompt + room, tokenizer.vocab_size)
        return Conversation(engine, tokenizer, ImageLayout(), backend="fake"), engine, image

    return make


def test_a_prompt_that_fills_the_context_is_refused_in_one_line(counting_chat) -> None:
    """room 0: decode_loop got no room and returned no token; the answer's last token was then an IndexError."""
    chat, engine, image = counting_chat(0)
    with pytest.raises(PromptError, match="but the context holds"):
        chat.ask("Rate?", image, max_new_tokens=4)
    assert engine.length == 0


def test_an_answer_that_fills_the_context_stops_there_never_past_it(counting_chat) -> None:
    chat, engine, image = counting_chat(5)
    result = chat.ask("Rate?", image, max_new_tokens=50)
    assert result.stop_reason == "context_full" and engine.length <= engine.max_length
    assert result.generated_tokens == 5  # one per position left; the last one never enters the cache
    assert result.timings.decode_tokens_per_s == pytest.approx((5 - 1) / (result.timings.decode_ms / 1e3))


def test_a_follow_up_to_a_full_context_says_so_not_to_shorten_the_question(counting_chat) -> None:
    """After a context_full stop no question fits: the advice to shorten it could not work."""
    chat, _, image = counting_chat(5)
    assert chat.ask("Rate?", image, max_new_tokens=50).stop_reason == "context_full"
    with pytest.raises(PromptError, match=r"this conversation has filled the context \(\d+ of \d+ positions\): no "
                                          "follow-up fits; start a new conversation"):
        chat.ask("?", max_new_tokens=2)
    chat, _, image = counting_chat(60)  # room for a short follow-up: a long one is told to shorten
    chat.ask("Rate?", image, max_new_tokens=2)
    with pytest.raises(PromptError, match="shorten the question or start a new conversation"):
        chat.ask("Describe every lead. " * 40, max_new_tokens=2)


def test_no_history_is_an_empty_one(counting_chat) -> None:
    chat, _, image = counting_chat(200)
    assert chat.ask("Rate?", image, history=None, max_new_tokens=2).generated_tokens == 2  # was a TypeError


@pytest.mark.parametrize(("ask", "words"), [
    (lambda chat, image: chat.ask("Rate?", image, history=[("q", "a")]), "must be a Turn(question, answer), got tuple"),
    (lambda chat, image: chat.ask("Rate?", image, history=[{"role": "user"}]), "got dict"),
    (lambda chat, image: chat.ask("Rate?", image, history=["q"]), "got str")])
def test_a_history_of_another_shape_is_a_prompt_error(counting_chat, ask, words: str) -> None:
    """An AttributeError from deep inside the prompt builder ("'tuple' object has no attribute 'question'")."""
    chat, engine, image = counting_chat(200)
    with pytest.raises(PromptError, match=re.escape(words)):
        ask(chat, image)
    assert engine.length == 0


def test_a_system_prompt_that_is_not_text_is_a_prompt_error(tiny_bundle) -> None:
    from pulse_edge.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_bundle(tiny_bundle)
    with pytest.raises(PromptError, match="the system prompt must be text \\(str\\), got int"):
        pipeline.chat(system=5)
    pipeline.close()


def test_a_follow_up_cannot_bring_a_history(counting_chat) -> None:
    from pulse_edge.runtime.text.prompt import Turn

    chat, _, image = counting_chat(200)
    chat.ask("Rate?", image, max_new_tokens=2)
    with pytest.raises(PromptError, match="cannot bring a history"):
        chat.ask("And the axis?", history=[Turn("q", "a")], max_new_tokens=2)


def test_a_template_from_before_the_field_reads_text_after_eos_with_the_dummy_prefix() -> None:
    """Manifests written before dummy_prefix_after_eos existed were exported with "</s>▁USER" (the legacy encoding
    they ran with): read without the field, they keep it, so their chats do not drift from what was validated."""
    from pulse_edge.runtime.text.prompt import PromptTemplate

    old = {"name": "llava_v1", "system": "A chat.", "roles": ["USER", "ASSISTANT"], "sep": " "}
    assert PromptTemplate.from_dict(old).dummy_prefix_after_eos is True
    assert PromptTemplate.from_dict({**old, "dummy_prefix_after_eos": False}).dummy_prefix_after_eos is False


def test_a_question_from_inside_a_running_answer_is_refused_and_the_answer_is_untouched(counting_chat) -> None:
    """The engine's lock is re-entrant: a cart that asked the same pipeline a side question from its on_text
    passed it, reset the cache, and the running answer went on decoding on the other question's cache."""
    from pulse_edge.runtime.generation.conversation import Conversation
    from pulse_edge.runtime.image.preprocess import ImageLayout

    chat, engine, image = counting_chat(50)
    refused: list[Exception] = []

    def side_question(piece: str) -> None:
        for ask in (lambda: Conversation(engine, chat.tokenizer, ImageLayout(), backend="fake"),
                    lambda: chat.ask("And the axis?")):
            try:
                ask()
            except ConfigError as e:
                refused.append(e)

    epoch = engine.epoch
    answer = chat.ask("Rate?", image, max_new_tokens=6, on_text=side_question)
    assert refused and all("inside its own on_text or should_stop" in str(e) for e in refused)
    assert engine.epoch == epoch and not engine.answering  # never reset under the answer
    assert engine.length == answer.prompt_tokens + answer.generated_tokens - 1  # its own positions only
    assert chat.ask("And the axis?", max_new_tokens=2).generated_tokens == 2  # usable after it


@pytest.mark.parametrize("option", ["on_text", "should_stop"])
def test_a_callback_that_is_not_a_function_is_refused_before_the_prefill(option: str, counting_chat) -> None:
    chat, engine, image = counting_chat(50)
    with pytest.raises(ConfigError, match=f"{option} must be a function"):
        chat.ask("Rate?", image, max_new_tokens=2, **{option: "print"})
    assert engine.length == 0  # nothing prefilled


def test_numpy_numbers_are_sampling_parameters() -> None:
    """np.int64(3) as a seed and np.float32(0.9) as top_p were refused ("must be a number") where np.float64 passed."""
    params = SamplingParams(temperature=np.float32(0.5), top_p=np.float32(0.9), seed=np.int64(3))
    assert (params.temperature, params.top_p, params.seed) == (0.5, pytest.approx(0.9), 3)
    assert type(params.top_p) is float and type(params.seed) is int  # JSON-able as the batch records them
    for bad in ({"seed": np.float64(3.0)}, {"top_p": np.bool_(True)}, {"seed": True}, {"top_p": 10**400},
                {"temperature": 10**400}):  # past float's range: an OverflowError traceback
        with pytest.raises(ConfigError):
            SamplingParams(**bad)


def test_a_stop_asked_at_once_reads_neither_the_image_nor_the_prompt(counting_chat) -> None:
    """A cart's stop button pressed as the answer began still cost the vision graph and the first prompt chunk."""
    from pulse_edge.errors import GenerationStopped

    chat, engine, image = counting_chat(50)
    seen = []
    engine.image_features = lambda pre: seen.append(pre) or pytest.fail("the vision graph ran")
    with pytest.raises(GenerationStopped, match="before the image was read"):
        chat.ask("Rate?", image, max_new_tokens=4, should_stop=lambda: True)
    assert engine.length == 0 and not seen


def test_a_pipeline_is_a_key_and_says_what_it_is_in_a_line(tiny_bundle) -> None:
    """A dataclass's generated __eq__ made it unhashable ({pipe: ...} raised TypeError) and its repr 7,444
    characters (the manifest, the tokenizer, the engine)."""
    from pulse_edge.runtime.pipeline import Pipeline

    with Pipeline.from_bundle(tiny_bundle) as pipeline:
        assert {pipeline: 1}[pipeline] == 1
        assert repr(pipeline) == f"Pipeline(bundle={str(tiny_bundle)!r}, backend='ort', precision='fp32')"


def test_the_system_prompt_is_llavas_conv_vicuna_v1_verbatim() -> None:
    """The prompt PULSE was trained on: tests compared against LLAVA_V1_SYSTEM itself, so an edit passed them."""
    from pulse_edge.runtime.text.prompt import LLAVA_V1_SYSTEM

    assert LLAVA_V1_SYSTEM == ("A chat between a curious human and an artificial intelligence assistant. The "
                               "assistant gives helpful, detailed, and polite answers to the human's questions.")


def test_top_p_keeps_the_nucleus_in_its_proportions_and_stops_at_p_exactly() -> None:
    """The nucleus renormalised, not flattened (only which tokens appear was tested); where the mass reaches top_p
    exactly, the smaller set, as transformers' TopPLogitsWarper keeps it."""
    from pulse_edge.runtime.generation.sampling import _top_p_filter

    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.75, seed=0))
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    drawn = np.bincount([sampler(logits) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(drawn, [0.625, 0.375, 0, 0], atol=0.03)
    assert _top_p_filter(np.array([0.5, 0.25, 0.25]), 0.5).tolist() == [1.0, 0.0, 0.0]


def test_a_seed_is_numpys_default_rng_stream_and_a_low_temperature_does_not_overflow() -> None:
    """A seed's meaning holds across releases (only "same seed, same draws" was tested); temperature 0.01 on logits
    30 apart overflowed exp without the max subtracted, and the NaN probabilities made the draw raise."""
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    rng = np.random.default_rng(0)
    uniform = np.log(np.full(4, 0.25))
    assert [sampler(uniform) for _ in range(20)] == [int(rng.choice(4, p=[0.25] * 4)) for _ in range(20)]
    assert Sampler(SamplingParams(temperature=0.01, seed=0))(np.array([30.0, 20.0, 0.0], np.float32)) == 0


def test_a_token_limit_equal_to_the_room_left_is_the_token_limit() -> None:
    """Not "context_full" (whose note says the context is full): the limit asked is what stopped it."""
    from pulse_edge.runtime.generation.result import decode_rate

    out = decode_loop(np.eye(10)[5], lambda token: np.eye(10)[5], sampler=Sampler(SamplingParams()), eos_id=2,
                      max_new_tokens=3, room=3)
    assert out.stop_reason == "max_new_tokens"
    assert decode_rate(3, 0.0) == 0.0  # no decode time is no rate, never a division by zero
