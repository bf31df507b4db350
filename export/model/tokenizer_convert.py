"""Convert a LLaMA-style SentencePiece BPE `tokenizer.model` into a `tokenizers` tokenizer.

The result encodes to exactly the ids of `SentencePieceProcessor.encode(text)`
(no BOS/EOS) and decodes exactly as `SentencePieceProcessor.decode(ids)`, so the
lean runtime can drop sentencepiece. How SentencePiece's BPE encoder works, and
how each part maps onto `tokenizers`:

* Normalisation (identity rule): prepend one "▁" to every non-empty input (the
  dummy prefix) and replace each ASCII space with "▁". Nothing else changes.
* The whole normalised string is one word: it is split into characters, and
  the adjacent pair whose concatenation is a piece with the highest score is
  merged, leftmost first on ties, until no pair is a piece. A `tokenizers` BPE
  does the same with merge ranks, so every split of every piece into two
  pieces becomes a merge, ranked by the score of the piece it makes.
* Characters that are not pieces become their UTF-8 bytes, `<0xXX>` pieces.
* Control pieces (<s>, </s>) never come out of text: the literal "</s>" is
  ordinary text. They are registered as special tokens (so decode can skip
  them) and `encode_special_tokens` is set so `tokenizers` does not match them
  in text. That flag is not saved in tokenizer.json; the runtime sets it again.
* Decoding: "▁" becomes a space, runs of byte pieces become UTF-8, and one
  leading space (the dummy prefix) is dropped.

Anything this mapping cannot reproduce exactly (unigram models, other
normalisers, user-defined or unused pieces, ...) is rejected with a
`CheckpointError` rather than converted approximately.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

from pulse_edge.errors import CheckpointError

_SPACE = "▁"
_PieceType = sp_pb2.ModelProto.SentencePiece.Type
_SUPPORTED = (
    "supported: LLaMA-style SentencePiece BPE (byte_fallback, identity normalisation, "
    "add_dummy_prefix, remove_extra_whitespaces=false)"
)

# One entry per setting the converter depends on: (is it wrong?, what is wrong).
# Each message is completed with `_SUPPORTED` into a single line.
_MODEL_CHECKS: tuple[tuple[Callable[[sp_pb2.ModelProto], bool], Callable[[sp_pb2.ModelProto], str]], ...] = (
    (
        lambda m: m.trainer_spec.model_type != sp_pb2.TrainerSpec.BPE,
        lambda m: f"model type is {sp_pb2.TrainerSpec.ModelType.Name(m.trainer_spec.model_type).lower()}",
    ),
    (
        lambda m: bool(m.normalizer_spec.precompiled_charsmap),
        lambda m: f"normalisation rule is {m.normalizer_spec.name!r}, not 'identity'",
    ),
    (
        lambda m: bool(m.denormalizer_spec.precompiled_charsmap),
        lambda m: f"it has a denormalisation rule ({m.denormalizer_spec.name!r})",
    ),
    (lambda m: m.normalizer_spec.remove_extra_whitespaces, lambda m: "remove_extra_whitespaces is true"),
    (lambda m: not m.normalizer_spec.add_dummy_prefix, lambda m: "add_dummy_prefix is false"),
    (lambda m: not m.normalizer_spec.escape_whitespaces, lambda m: "escape_whitespaces is false"),
    (lambda m: m.trainer_spec.treat_whitespace_as_suffix, lambda m: "treat_whitespace_as_suffix is true"),
    (lambda m: not m.trainer_spec.byte_fallback, lambda m: "byte_fallback is false"),
)

# Piece types the encoder can produce or skip exactly. USER_DEFINED pieces are
# matched atomically before BPE and UNUSED pieces are re-split after it; a
# `tokenizers` BPE can do neither the way SentencePiece does.
_ALLOWED_PIECE_TYPES = frozenset({_PieceType.NORMAL, _PieceType.UNKNOWN, _PieceType.CONTROL, _PieceType.BYTE})
_BYTE_PIECES = frozenset(f"<0x{value:02X}>" for value in range(256))


def _reject(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"cannot convert tokenizer {path}: {problem}; {_SUPPORTED}")


def vocabulary_facts(model_path: Path) -> tuple[int, int, int]:
    """(pieces, <s> id, </s> id) of a SentencePiece model, as its trainer spec records them."""
    proto = _load_model(model_path)
    return len(proto.pieces), proto.trainer_spec.bos_id, proto.trainer_spec.eos_id


def _load_model(model_path: Path) -> sp_pb2.ModelProto:
    try:
        data = Path(model_path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read tokenizer {model_path}: {exc.strerror or exc}") from exc
    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises its own DecodeError type per backend
        raise CheckpointError(f"tokenizer {model_path} is not a SentencePiece model: {exc}") from exc
    if not proto.pieces:
        raise CheckpointError(f"tokenizer {model_path} is not a SentencePiece model: it has no pieces")
    return proto


def _check_settings(proto: sp_pb2.ModelProto, path: Path) -> None:
    for is_wrong, describe in _MODEL_CHECKS:
        if is_wrong(proto):
            raise _reject(path, describe(proto))


def _check_pieces(proto: sp_pb2.ModelProto, path: Path) -> None:
    for index, piece in enumerate(proto.pieces):
        if piece.type not in _ALLOWED_PIECE_TYPES:
            kind = _PieceType.Name(piece.type).lower()
            raise _reject(path, f"piece {index} {piece.piece!r} is of type {kind}")
    byte_pieces = {p.piece for p in proto.pieces if p.type == _PieceType.BYTE}
    if byte_pieces != _BYTE_PIECES:
        raise _reject(path, f"it has {len(byte_pieces)} byte pieces, not the 256 <0x00>..<0xFF>")
    if sum(p.type == _PieceType.UNKNOWN for p in proto.pieces) != 1:
        raise _reject(path, "it does not have exactly one <unk> piece")
    _check_characters(proto, path)


def _check_characters(proto: sp_pb2.ModelProto, path: Path) -> None:
    # SentencePiece merges any two symbols whose concatenation is a piece, even
    # a character that is not a piece itself; a `tokenizers` BPE turns such a
    # character into bytes first, so a piece containing it would be lost.
    # SentencePiece's trainer never makes such pieces; hand-edited models can.
    normal = {p.piece for p in proto.pieces if p.type == _PieceType.NORMAL}
    for piece in normal:
        missing = [char for char in piece if char not in normal]
        if missing:
            raise _reject(path, f"piece {piece!r} contains {missing[0]!r}, which is not a piece itself")


def _vocab(proto: sp_pb2.ModelProto) -> dict[str, int]:
    return {piece.piece: index for index, piece in enumerate(proto.pieces)}


def _merges(proto: sp_pb2.ModelProto) -> list[tuple[str, str]]:
    """Every (left, right) whose concatenation is a normal piece, best score first.

    Ties (pieces with equal scores, or one piece reachable by several splits)
    are ordered by piece id, then by where the split falls, so the result is
    deterministic; SentencePiece's trainer gives each piece its own score.
    """
    normal = {p.piece for p in proto.pieces if p.type == _PieceType.NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    for index, piece in enumerate(proto.pieces):
        if piece.type != _PieceType.NORMAL:
            continue
        text = piece.piece
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-piece.score, index, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _special_tokens(proto: sp_pb2.ModelProto) -> list[AddedToken]:
    special_types = (_PieceType.CONTROL, _PieceType.UNKNOWN)
    return [
        AddedToken(p.piece, special=True, normalized=False) for p in proto.pieces if p.type in special_types
    ]


def _unk_piece(proto: sp_pb2.ModelProto) -> str:
    return next(p.piece for p in proto.pieces if p.type == _PieceType.UNKNOWN)


def _build(proto: sp_pb2.ModelProto) -> Tokenizer:
    model = models.BPE(
        vocab=_vocab(proto),
        merges=_merges(proto),
        unk_token=_unk_piece(proto),
        byte_fallback=True,
        fuse_unk=False,
    )
    tokenizer = Tokenizer(model)
    # Prepend only touches non-empty input, as SentencePiece encodes "" to [].
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)]
    )
    # Fuse before Strip: Strip works per token, and only the first space of the
    # whole text is the dummy prefix.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.add_special_tokens(_special_tokens(proto))
    tokenizer.encode_special_tokens = True
    return tokenizer


def convert_sentencepiece(model_path: Path) -> Tokenizer:
    """A `tokenizers.Tokenizer` with the same ids as the SentencePiece model at `model_path`.

    Raises `CheckpointError` for a file that is not a supported SentencePiece BPE model.
    """
    model_path = Path(model_path)
    proto = _load_model(model_path)
    _check_settings(proto, model_path)
    _check_pieces(proto, model_path)
    return _build(proto)


def write_tokenizer_json(model_path: Path, out_path: Path) -> Path:
    """Convert `model_path` (tokenizer.model) and save it as `out_path` (tokenizer.json)."""
    out_path = Path(out_path)
    convert_sentencepiece(model_path).save(str(out_path))
    return out_path
