"""The runtime tokenizer: SentencePiece semantics on top of a `tokenizers` tokenizer.json.

Encoding is `tokenizers`' (the tokenizer.json written by
`pulse_edge.export.model.tokenizer_convert` gives SentencePiece's ids exactly).
Decoding is done here, piece by piece, following SentencePiece's decoder rule
for rule, so that the same code serves a whole sequence (`Tokenizer.decode`)
and a stream of generated ids (`StreamDecoder`):

* control pieces (<s>, </s>) are invisible; <unk> shows as " ⁇ ";
* "▁" becomes a space, and the first "▁" of the first visible piece (the
  dummy prefix) is dropped, once;
* runs of byte pieces <0xXX> are decoded as UTF-8, character by character; a
  byte that cannot be part of a valid character becomes U+FFFD.

Lean: imports only the standard library, `tokenizers` and `pulse_edge.errors`.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import tokenizers

from pulse_edge.errors import InputError

_SPACE = "▁"
_REPLACEMENT = "\ufffd"
# What SentencePiece's decoder shows for <unk> (its default `unk_surface`).
_UNK_SURFACE = " \u2047 "
_BYTE_PIECE = re.compile(r"<0x([0-9A-F]{2})>")
# (mask, value, length): a lead byte `b` with `b & mask == value` starts a
# character of `length` bytes. Same classes as SentencePiece's UTF-8 decoder.
_UTF8_LEADS = ((0x80, 0x00, 1), (0xE0, 0xC0, 2), (0xF0, 0xE0, 3), (0xF8, 0xF0, 4))


def _char_length(lead: int) -> int:
    """Length of the character `lead` starts, 0 when it cannot start one."""
    return next((length for mask, value, length in _UTF8_LEADS if lead & mask == value), 0)


def _is_character(chunk: bytes) -> bool:
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _could_become_character(prefix: bytes) -> bool:
    """Whether more bytes could still turn `prefix` into a valid character."""
    try:
        codecs.getincrementaldecoder("utf-8")().decode(prefix, final=False)
    except UnicodeDecodeError:
        return False
    return True


def _take_characters(pending: bytearray, *, final: bool) -> str:
    """Decode and remove the decided characters at the front of `pending`.

    Like SentencePiece, each byte that does not start a valid character is one
    U+FFFD. Unless `final`, an incomplete character at the end that more bytes
    could still complete is left in `pending`.
    """
    out: list[str] = []
    pos = 0
    while pos < len(pending):
        length = _char_length(pending[pos])
        chunk = bytes(pending[pos : pos + length])
        if length and len(chunk) == length and _is_character(chunk):
            out.append(chunk.decode("utf-8"))
            pos += length
        elif length and len(chunk) < length and not final and _could_become_character(chunk):
            break
        else:
            out.append(_REPLACEMENT)
            pos += 1
    del pending[:pos]
    return "".join(out)


@dataclass(frozen=True)
class _Pieces:
    """What decoding needs to know about each id."""

    pieces: tuple[str, ...]
    byte_values: Mapping[int, int]
    controls: frozenset[int]
    unk_id: int | None


class _DecodeState:
    """SentencePiece's decoder, fed one id at a time."""

    def __init__(self, table: _Pieces, *, skip_special: bool) -> None:
        self._table = table
        self._skip_special = skip_special
        self._pending = bytearray()
        self._started = False  # some text has come out
        self._may_strip = True  # SentencePiece's `is_bos_ws`: the dummy prefix is still ahead
        self._stripped = False  # the previous piece had its dummy prefix dropped

    def feed(self, token_id: int) -> str:
        byte = self._table.byte_values.get(token_id)
        if byte is not None:
            self._pending.append(byte)
            return self._emit(_take_characters(self._pending, final=False))
        text = self._emit(_take_characters(self._pending, final=True))
        if self._stripped or self._started:
            self._may_strip = False
        surface, self._stripped = self._surface(token_id)
        return text + self._emit(surface)

    def finish(self) -> str:
        return self._emit(_take_characters(self._pending, final=True))

    def _emit(self, text: str) -> str:
        self._started = self._started or bool(text)
        return text

    def _surface(self, token_id: int) -> tuple[str, bool]:
        """The text of a non-byte piece, and whether its dummy prefix was dropped."""
        if not 0 <= token_id < len(self._table.pieces):
            # A model's vocabulary can be padded past the tokenizer's (llava-hf: 32064 rows for
            # 32002 pieces); such an id reads as unknown rather than crashing a running cart.
            return _UNK_SURFACE, False
        piece = self._table.pieces[token_id]
        if token_id in self._table.controls:
            return ("" if self._skip_special else piece), False
        if token_id == self._table.unk_id:
            return (_UNK_SURFACE if self._skip_special else piece), False
        stripped = self._may_strip and piece.startswith(_SPACE)
        if stripped:
            piece = piece[len(_SPACE) :]
        return piece.replace(_SPACE, " "), stripped


def _without_dummy_prefix(tok: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """`tok` with the "▁" its normalizer prepends left out (export/model/tokenizer_convert.py writes
    Sequence[Prepend("▁"), Replace(" ", "▁")]); the rest of its encoding is the same."""
    spec = json.loads(tok.to_str())
    steps = (spec.get("normalizer") or {}).get("normalizers") or []
    if not steps or steps[0] != {"type": "Prepend", "prepend": _SPACE}:
        raise InputError("the tokenizer's normalizer does not start by prepending '▁' (the dummy prefix), so text "
                         "cannot be encoded without it; re-export the bundle with this pulse-edge")
    spec["normalizer"]["normalizers"] = steps[1:]
    bare = tokenizers.Tokenizer.from_str(json.dumps(spec))
    bare.encode_special_tokens = True  # as for `tok`: not stored in tokenizer.json
    return bare


def _piece_table(tok: tokenizers.Tokenizer) -> _Pieces:
    vocab = tok.get_vocab(with_added_tokens=True)
    pieces = [""] * len(vocab)
    for piece, index in vocab.items():
        if not 0 <= index < len(pieces):
            raise InputError(f"tokenizer ids are not contiguous: {piece!r} has id {index} of {len(vocab)}")
        pieces[index] = piece
    byte_values: dict[int, int] = {}
    for index, piece in enumerate(pieces):
        match = _BYTE_PIECE.fullmatch(piece)
        if match:
            byte_values[index] = int(match.group(1), 16)
    unk_token = getattr(tok.model, "unk_token", None)
    unk_id = vocab.get(unk_token) if unk_token else None
    specials = {index for index, added in tok.get_added_tokens_decoder().items() if added.special}
    return _Pieces(
        pieces=tuple(pieces),
        byte_values=MappingProxyType(byte_values),
        controls=frozenset(specials - {unk_id}),
        unk_id=unk_id,
    )


class Tokenizer:
    """LLaMA/SentencePiece tokenizer: encode without BOS/EOS, decode like SentencePiece."""

    def __init__(self, tok: tokenizers.Tokenizer, *, bos_id: int, eos_id: int) -> None:
        """Wrap `tok` as is; use `from_file` or `from_tokenizers` instead."""
        self._tok = tok
        # tokenizer.json cannot store this flag: without it the literal text
        # "</s>" would become id 2, which SentencePiece never does.
        self._tok.encode_special_tokens = True
        self._table = _piece_table(tok)
        self.vocab_size = len(self._table.pieces)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} {value} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self._bare: tokenizers.Tokenizer | None = None  # the same without the dummy prefix, made when first asked

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json; BOS/EOS are its <s> and </s> pieces."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"tokenizer file not found: {path}")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exception for malformed JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InputError(f"cannot read tokenizer file {path}: {reason}") from exc
        bos_id, eos_id = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        if bos_id is None or eos_id is None:
            raise InputError(f"tokenizer file {path} has no <s>/</s> pieces; expected a LLaMA tokenizer")
        return cls(tok, bos_id=bos_id, eos_id=eos_id)

    @classmethod
    def from_tokenizers(cls, tok: tokenizers.Tokenizer, *, bos_id: int = 1, eos_id: int = 2) -> Tokenizer:
        """Wrap a copy of an in-memory `tokenizers.Tokenizer` (the caller's object is not changed)."""
        return cls(tokenizers.Tokenizer.from_str(tok.to_str()), bos_id=bos_id, eos_id=eos_id)

    def encode(self, text: str, *, dummy_prefix: bool = True) -> list[int]:
        """SentencePiece's `encode(text)`: dummy prefix, no BOS/EOS; one call is one chunk.

        `dummy_prefix=False`: no "▁" is put before the text, as a LLaMA tokenizer that is not `legacy` (transformers)
        encodes text that follows a control token: "</s>USER" gives "USER", not "▁USER"."""
        if dummy_prefix:
            return self._tok.encode(text, add_special_tokens=False).ids
        if self._bare is None:
            self._bare = _without_dummy_prefix(self._tok)
        return self._bare.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = True) -> str:
        """SentencePiece's `decode(ids)`; with `skip_special=False` control pieces show as text."""
        state = _DecodeState(self._table, skip_special=skip_special)
        return "".join(state.feed(i) for i in ids) + state.finish()

    def id_to_piece(self, i: int) -> str:
        """The piece string of id `i` (e.g. "▁Sinus", "<0x0A>", "</s>")."""
        return self._table.pieces[i]

    def _decode_state(self) -> _DecodeState:
        return _DecodeState(self._table, skip_special=True)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive, for streaming to stdout.

    Each `push` returns only text that later ids cannot change: nothing while a
    multi-byte character is still arriving as byte pieces. Concatenating every
    `push` and the final `flush` gives exactly `tokenizer.decode(ids)`. Each
    push costs O(1): at most three pending bytes are kept, never the history.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._state = tokenizer._decode_state()

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ("" if none yet)."""
        return self._state.feed(token_id)

    def flush(self) -> str:
        """End the stream: return what is left, and start afresh for a new stream."""
        rest = self._state.finish()
        self._state = self._tokenizer._decode_state()
        return rest
