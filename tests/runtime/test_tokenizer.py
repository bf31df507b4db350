"""Tokenizer: the tiny SentencePiece model, the tokenizer.json converter, the runtime tokenizer.

SentencePiece itself is the reference: the converted `tokenizers` tokenizer and
the runtime `Tokenizer` must give exactly `sp.encode(text)` and
`sp.decode(ids)`. The tiny model is trained once per module.
"""

from __future__ import annotations

import ast
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from pulse_edge.errors import CheckpointError, InputError
from pulse_edge.export.fixtures.tiny_tokenizer import ecg_report_corpus, train_tiny_tokenizer
from pulse_edge.export.model.tokenizer_convert import convert_sentencepiece, write_tokenizer_json
from pulse_edge.runtime.text.tokenizer import StreamDecoder, Tokenizer

RUNTIME_SOURCE = Path(__file__).resolve().parents[2] / "runtime" / "text" / "tokenizer.py"
HEART = "\U0001fac0"  # 🫀: not in the tiny vocabulary, four UTF-8 bytes

TEXTS = (
    "",
    " ",
    "   ",
    "\n",
    "\t",
    "\n\n",
    " \n ",
    "a    b",
    "  leading spaces",
    "trailing spaces   ",
    "Sinus rhythm with first-degree AV block",
    "ST elevation in V1-V4 (0.12 mV), QTc 412 ms, HR 72 bpm, axis -30°",
    "Atrial fibrillation with rapid ventricular response.",
    "Recorded 2024-02-29 23:59; noise ±15 µV; QRS ≥ 120 ms",
    "Options: A. Normal B. MI C. Pericarditis D. Hyperkalemia\nAnswer: B",
    "12345678901234567890",
    "3.14159 -0.5 +7 1e-3 1,000,000",
    "Patient: Zoë Müller, née Ødegård — café, naïve, Straße",
    "心电图显示窦性心律",
    "心电图 ok",
    "ЭКГ: синусовый ритм",
    "Ελληνικά: ρυθμός",
    "❤️ 🫀 👍🏽 🇨🇭",
    HEART,
    "a\u0301 combining accent",
    "</s>",
    "<s>",
    "<unk>",
    "text</s>more",
    "<s>[INST] x [/INST]",
    "▁literal lower one eighth block▁",
    "USER: ",
    "USER: <image>\nWhat is shown? ASSISTANT:",
    "\nWhat is shown? ASSISTANT:",
    " ASSISTANT: Sinus rhythm.</s>",
    "\x00\x01\x7f control characters",
    "\ufffd replacement char",
    "<0x41> looks like a byte piece",
)

# Character pools for the fuzz: ASCII, digits, whitespace, Latin-1, Greek, CJK, emoji.
FUZZ_POOLS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?()-/<>'\"",
    "0123456789",
    "     ",
    "\n\n\t",
    "".join(map(chr, range(0xA1, 0x100))),
    "".join(map(chr, range(0x391, 0x3CA))),
    "".join(map(chr, range(0x4E00, 0x4E80))),
    "".join(map(chr, range(0x1F300, 0x1F380))) + HEART,
)


def _random_text(rng: random.Random, words: list[str]) -> str:
    parts = []
    for _ in range(rng.randint(0, 12)):
        if rng.random() < 0.3:
            parts.append(rng.choice(words))
        else:
            pool = rng.choice(FUZZ_POOLS)
            parts.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 5))))
    return "".join(parts)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(model_path: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(model_path))


@pytest.fixture(scope="module")
def fast(model_path: Path) -> tokenizers.Tokenizer:
    return convert_sentencepiece(model_path)


@pytest.fixture(scope="module")
def json_path(model_path: Path) -> Path:
    return write_tokenizer_json(model_path, model_path.with_name("tokenizer.json"))


@pytest.fixture(scope="module")
def runtime(json_path: Path) -> Tokenizer:
    return Tokenizer.from_file(json_path)


def _model_proto(model_path: Path) -> sp_pb2.ModelProto:
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    return proto


def _assert_parity(text: str, sp, fast: tokenizers.Tokenizer, runtime: Tokenizer) -> None:
    expected = sp.encode(text)
    assert fast.encode(text, add_special_tokens=False).ids == expected, repr(text)
    assert runtime.encode(text) == expected, repr(text)
    assert fast.decode(expected) == sp.decode(expected), repr(text)
    assert runtime.decode(expected) == sp.decode(expected), repr(text)


# --- the tiny tokenizer ------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_varied() -> None:
    corpus = ecg_report_corpus(500, seed=3)
    assert corpus == ecg_report_corpus(500, seed=3)
    assert corpus != ecg_report_corpus(500, seed=4)
    assert len(corpus) == 500
    text = "\n".join(corpus)
    for needle in ("bpm", "QT/QTc", "°", "µV", "±", "≥", "Options: A.", "ASSISTANT:", "   ", "\t"):
        assert needle in text, needle
    assert any("\n" in line for line in corpus)


def test_training_is_fast_and_deterministic(tmp_path: Path, model_path: Path) -> None:
    start = time.perf_counter()
    again = train_tiny_tokenizer(tmp_path / "again.model")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0
    assert again.read_bytes() == model_path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.model"]
    other = train_tiny_tokenizer(tmp_path / "other.model", seed=1)
    assert other.read_bytes() != model_path.read_bytes()


def test_tiny_model_has_llama_layout(sp: spm.SentencePieceProcessor, model_path: Path) -> None:
    proto = _model_proto(model_path)
    assert sp.get_piece_size() == 1000
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 258)] == ["<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(3, 259))
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE
    assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity"
    assert proto.normalizer_spec.add_dummy_prefix
    assert not proto.normalizer_spec.remove_extra_whitespaces


# --- converter parity --------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
def test_parity_on_texts(text: str, sp, fast: tokenizers.Tokenizer, runtime: Tokenizer) -> None:
    _assert_parity(text, sp, fast, runtime)


def test_parity_fuzz(sp, fast: tokenizers.Tokenizer, runtime: Tokenizer) -> None:
    rng = random.Random(1234)
    words = " ".join(ecg_report_corpus(200, seed=9)).split(" ")
    for _ in range(400):
        _assert_parity(_random_text(rng, words), sp, fast, runtime)


def test_parity_on_corpus(sp, fast: tokenizers.Tokenizer) -> None:
    corpus = ecg_report_corpus()
    got = [e.ids for e in fast.encode_batch(corpus, add_special_tokens=False)]
    assert got == sp.encode(corpus)


def test_literal_control_text_is_plain_text(sp, runtime: Tokenizer) -> None:
    for text in ("</s>", "<s>", "<unk>", "a</s>b"):
        ids = runtime.encode(text)
        assert ids == sp.encode(text)
        assert not {0, 1, 2} & set(ids), text
        assert runtime.decode(ids) == text


def test_characters_outside_the_vocabulary_use_byte_fallback(runtime: Tokenizer) -> None:
    ids = runtime.encode(HEART)
    assert [runtime.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xAB>", "<0x80>"]
    assert runtime.decode(ids) == HEART


def test_written_json_needs_the_runtime_for_literal_control_text(json_path: Path, sp) -> None:
    # tokenizer.json cannot store `encode_special_tokens`; plain `tokenizers`
    # matches "</s>" as the control token, the runtime loader does not.
    plain = tokenizers.Tokenizer.from_file(str(json_path))
    assert 2 in plain.encode("a</s>", add_special_tokens=False).ids
    assert plain.encode("HR 72 bpm", add_special_tokens=False).ids == sp.encode("HR 72 bpm")
    assert Tokenizer.from_file(json_path).encode("a</s>") == sp.encode("a</s>")


# --- converter rejections ----------------------------------------------------------------------------


def _set_user_defined(proto: sp_pb2.ModelProto) -> None:
    proto.pieces[-1].type = sp_pb2.ModelProto.SentencePiece.USER_DEFINED


def _drop_byte_piece(proto: sp_pb2.ModelProto) -> None:
    proto.pieces[3].type = sp_pb2.ModelProto.SentencePiece.NORMAL


def _set_field(message: str, field: str, value: object) -> Callable[[sp_pb2.ModelProto], None]:
    return lambda proto: setattr(getattr(proto, message), field, value)


REJECTED_EDITS = (
    (_set_field("normalizer_spec", "remove_extra_whitespaces", True), "remove_extra_whitespaces"),
    (_set_field("normalizer_spec", "add_dummy_prefix", False), "add_dummy_prefix"),
    (_set_field("normalizer_spec", "escape_whitespaces", False), "escape_whitespaces"),
    (_set_field("normalizer_spec", "precompiled_charsmap", b"\x01\x02"), "normalisation rule"),
    (_set_field("denormalizer_spec", "precompiled_charsmap", b"\x01\x02"), "denormalisation"),
    (_set_field("trainer_spec", "byte_fallback", False), "byte_fallback"),
    (_set_field("trainer_spec", "treat_whitespace_as_suffix", True), "treat_whitespace_as_suffix"),
    (_set_field("trainer_spec", "model_type", sp_pb2.TrainerSpec.WORD), "model type is word"),
    (_set_user_defined, "user_defined"),
    (_drop_byte_piece, "byte pieces"),
)


@pytest.mark.parametrize(("edit", "reason"), REJECTED_EDITS)
def test_converter_rejects_unsupported_settings(
    edit: Callable[[sp_pb2.ModelProto], None], reason: str, model_path: Path, tmp_path: Path
) -> None:
    proto = _model_proto(model_path)
    edit(proto)
    edited = tmp_path / "edited.model"
    edited.write_bytes(proto.SerializeToString())
    with pytest.raises(CheckpointError, match=reason) as info:
        convert_sentencepiece(edited)
    assert "\n" not in str(info.value)
    assert "supported:" in str(info.value)


def test_converter_rejects_unigram_models(tmp_path: Path) -> None:
    unigram = tmp_path / "unigram.model"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(ecg_report_corpus(500)),
        model_prefix=str(tmp_path / "unigram"),
        model_type="unigram",
        vocab_size=200,
        num_threads=1,
        minloglevel=2,
    )
    with pytest.raises(CheckpointError, match="model type is unigram"):
        convert_sentencepiece(unigram)


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe not a protobuf \x00\x01"])
def test_converter_rejects_unreadable_files(content: bytes | None, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.model"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CheckpointError):
        convert_sentencepiece(path)


# --- runtime tokenizer -------------------------------------------------------------------------------


def test_runtime_attributes(runtime: Tokenizer, sp) -> None:
    assert (runtime.bos_id, runtime.eos_id, runtime.vocab_size) == (1, 2, 1000)
    assert [runtime.id_to_piece(i) for i in range(sp.get_piece_size())] == [
        sp.id_to_piece(i) for i in range(sp.get_piece_size())
    ]


def test_runtime_from_tokenizers_leaves_the_callers_object_alone(json_path: Path, sp) -> None:
    plain = tokenizers.Tokenizer.from_file(str(json_path))
    wrapped = Tokenizer.from_tokenizers(plain)
    assert wrapped.encode("</s>") == sp.encode("</s>")
    assert not plain.encode_special_tokens


def test_lone_word_boundary_pieces_decode_as_sentencepiece_does(sp, runtime: Tokenizer) -> None:
    """A generated "▁" alone (the dummy prefix SentencePiece drops only at the very start) before a word, between
    words, twice: one mutant that kept every lone "▁" survived the suite."""
    lone, first, second = sp.piece_to_id("▁"), sp.encode("ms")[-1], sp.encode("mm")[-1]
    for ids in ([lone, first], [first, lone, second], [lone, lone, first], [lone], [first, lone]):
        expected = sp.decode(ids)
        assert runtime.decode(ids) == expected, [sp.id_to_piece(i) for i in ids]
        stream = StreamDecoder(runtime)
        assert "".join(stream.push(i) for i in ids) + stream.flush() == expected
    assert sp.decode([lone, first]) == " ms" and sp.decode([first, lone, second]) == "ms  mm"  # what is tested


@pytest.mark.parametrize(("bos_id", "eos_id", "named"), [(-1, 2, "bos_id -1"), (1, 1000, "eos_id 1000"),
                                                         (1000, 2, "bos_id 1000")])
def test_bos_and_eos_must_be_ids_of_the_vocabulary(json_path: Path, bos_id: int, eos_id: int, named: str) -> None:
    """An id past the pieces (or below 0) would end every answer at once or never, with no error."""
    plain = tokenizers.Tokenizer.from_file(str(json_path))
    with pytest.raises(ValueError, match=rf"{named} is outside the vocabulary \(size 1000\)"):
        Tokenizer.from_tokenizers(plain, bos_id=bos_id, eos_id=eos_id)
    assert Tokenizer.from_tokenizers(plain, bos_id=999, eos_id=0).bos_id == 999  # both ends of the range


@pytest.mark.parametrize("content", [None, "", "{not json", '{"version": "1.0"}'])
def test_runtime_rejects_bad_tokenizer_files(content: str | None, tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as info:
        Tokenizer.from_file(path)
    assert "\n" not in str(info.value)


def test_decode_of_any_ids_matches_sentencepiece(runtime: Tokenizer, sp) -> None:
    # Generated ids need not be valid text: broken byte runs, <unk>, control
    # tokens anywhere, a byte piece before the first "▁".
    rng = random.Random(7)
    for _ in range(2000):
        ids = [rng.choice((rng.randrange(runtime.vocab_size), rng.randrange(259))) for _ in range(12)]
        ids = ids[: rng.randint(0, 12)]
        assert runtime.decode(ids) == sp.decode(ids), ids


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        ([0], " ⁇  Sinus"),  # <unk> shows as " ⁇ "; a `tokenizers` decoder skips it
        ([3 + 0x20], "  Sinus"),  # text came first, so no dummy prefix is dropped
        ([3 + 0xE2, 3 + 0x82, 3 + 0xAC, 3 + 0x80], "€\ufffd Sinus"),  # one U+FFFD per bad byte only
    ],
)
def test_decode_follows_sentencepiece_where_tokenizers_decoders_differ(
    head: list[int], expected: str, runtime: Tokenizer, sp
) -> None:
    ids = head + runtime.encode("Sinus")
    assert runtime.decode(ids) == sp.decode(ids) == expected


def test_decode_can_show_control_pieces(runtime: Tokenizer) -> None:
    ids = [runtime.bos_id, *runtime.encode("Sinus rhythm"), runtime.eos_id]
    assert runtime.decode(ids) == "Sinus rhythm"
    assert runtime.decode(ids, skip_special=False) == "<s> Sinus rhythm</s>"


# --- streaming ---------------------------------------------------------------------------------------


def _stream(runtime: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    decoder = StreamDecoder(runtime)
    return [decoder.push(i) for i in ids], decoder.flush()


def test_stream_matches_decode(runtime: Tokenizer) -> None:
    rng = random.Random(11)
    cases = [runtime.encode(text) for text in TEXTS]
    cases += [[rng.randrange(runtime.vocab_size) for _ in range(rng.randint(0, 20))] for _ in range(300)]
    cases += [[rng.randrange(3, 259) for _ in range(rng.randint(0, 20))] for _ in range(300)]
    for ids in cases:
        pushed, rest = _stream(runtime, ids)
        assert "".join(pushed) + rest == runtime.decode(ids), ids


def test_stream_holds_a_character_split_over_byte_pieces(runtime: Tokenizer) -> None:
    ids = runtime.encode(f"HR 72 {HEART} ok")
    pushed, rest = _stream(runtime, ids)
    assert "\ufffd" not in "".join(pushed)
    heart_at = pushed.index(HEART)
    assert pushed[heart_at - 3 : heart_at] == ["", "", ""]
    assert "".join(pushed) + rest == "HR 72 " + HEART + " ok"


def test_stream_strips_only_the_dummy_prefix(runtime: Tokenizer) -> None:
    for text in ("Sinus", " Sinus", "  Sinus", "\nSinus"):
        pushed, rest = _stream(runtime, [runtime.bos_id, *runtime.encode(text)])
        assert "".join(pushed) + rest == text


def test_flush_ends_an_incomplete_character_and_restarts(runtime: Tokenizer, sp) -> None:
    decoder = StreamDecoder(runtime)
    first_byte = runtime.encode(HEART)[1]
    assert decoder.push(first_byte) == ""
    assert decoder.flush() == sp.decode([first_byte]) == "\ufffd"
    restarted = "".join(decoder.push(i) for i in runtime.encode("ok")) + decoder.flush()
    assert restarted == "ok"  # a fresh stream drops the dummy prefix again


# --- leanness ----------------------------------------------------------------------------------------


def test_runtime_tokenizer_imports_nothing_heavy() -> None:
    tree = ast.parse(RUNTIME_SOURCE.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    allowed_third_party = {"numpy", "tokenizers", "pulse_edge.errors"}
    heavy = {
        name
        for name in imported
        if name.split(".")[0] not in sys.stdlib_module_names and name not in allowed_third_party
    }
    assert not heavy


def test_ids_beyond_the_vocabulary_decode_as_unknown(runtime: Tokenizer) -> None:
    """A model padded past the tokenizer's pieces must not crash decoding (or streaming)."""
    from pulse_edge.runtime.text.tokenizer import StreamDecoder

    ids = [*runtime.encode("Sinus rhythm"), runtime.vocab_size + 5]  # and the first id past it, below
    text = runtime.decode(ids)
    assert text.startswith("Sinus rhythm") and text.endswith(" \u2047 ")
    stream = StreamDecoder(runtime)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text
    assert runtime.decode([runtime.vocab_size]) == " \u2047 "  # the first id past the pieces (off by one)


def test_encoding_without_the_dummy_prefix_is_sentencepiece_without_it(model_path: Path, runtime: Tokenizer) -> None:
    """What a non-legacy LLaMA tokenizer does with text after a control token: SentencePiece with
    add_dummy_prefix off."""
    proto = _model_proto(model_path)
    proto.normalizer_spec.add_dummy_prefix = False
    bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    rng = random.Random(7)
    words = [*ecg_report_corpus(40, seed=3)[0].split(), "USER:", "ASSISTANT:", HEART, " ", "\n", "</s>"]
    texts = [*TEXTS, *(_random_text(rng, words) for _ in range(300))]
    for text in texts:
        assert runtime.encode(text, dummy_prefix=False) == bare.encode(text), text
    assert runtime.encode("USER: Rate?", dummy_prefix=False) != runtime.encode("USER: Rate?")


@pytest.mark.parametrize("legacy", [True, False])
def test_chat_prompts_match_transformers_llama_tokenizer_as_llava_splits_them(
        model_path: Path, runtime: Tokenizer, legacy: bool, tmp_path: Path) -> None:
    """prompt_ids of a replayed chat and continuation_ids of a follow-up give the ids LLaVA gives: its
    tokenizer_image_token cuts the prompt at <image> and tokenizes each piece with the checkpoint's LlamaTokenizer,
    whose `legacy` flag decides the text after </s> (PULSE's base, vicuna v1.5, is not legacy)."""
    transformers = pytest.importorskip("transformers", reason="transformers' tokenizer is the reference")
    from dataclasses import replace

    from pulse_edge.runtime.text.prompt import IMAGE_SLOT, LLAVA_V1, Turn, continuation_ids, prompt_ids, render_text

    (tmp_path / "tokenizer.model").write_bytes(model_path.read_bytes())  # alone: not beside our tokenizer.json
    reference = transformers.LlamaTokenizer.from_pretrained(tmp_path, legacy=legacy)
    template = replace(LLAVA_V1, dummy_prefix_after_eos=legacy)
    turns = [Turn("What is the rhythm?", "Sinus rhythm."), Turn("And the rate?", "About 70 bpm."), Turn("Axis?")]
    before, after = render_text(turns, template).split("<image>")
    pieces = [reference(text, add_special_tokens=False).input_ids for text in (before, after)]
    expected = [runtime.bos_id, *pieces[0], IMAGE_SLOT, *pieces[1]]  # BOS: add_bos_token, as LLaVA's config has
    assert prompt_ids(turns, runtime, template) == expected
    follow_up = reference("</s>USER: Axis? ASSISTANT:", add_special_tokens=False).input_ids
    assert continuation_ids("Axis?", runtime, close_previous=True, template=template) == follow_up
    assert runtime.id_to_piece(follow_up[1]) == ("▁USER" if legacy else "USER")


def test_the_unknown_piece_shows_as_itself_when_specials_are_kept(runtime: Tokenizer) -> None:
    assert runtime.decode([0], skip_special=False) == runtime.id_to_piece(0) == "<unk>"
