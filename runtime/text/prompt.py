"""The llava_v1 conversation template and the image splice, as PULSE was trained.

The template (LLaVA's `conv_vicuna_v1`, separator style TWO):

    {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:

Token ids are built the way LLaVA's `tokenizer_image_token` builds them: the
text is cut at `<image>` and each piece is tokenized on its own (SentencePiece
adds its dummy-prefix space to every piece, which is why the piece after the
image starts with "▁" + "<0x0A>"); BOS only at the very start; the image slot
is marked with IMAGE_SLOT (-200, not a vocabulary id) and replaced by the
image features at splice time. `</s>` after an answer is the EOS id, as
LLaVA's slow tokenizer produces it; text after it is a fresh piece, with the
dummy prefix ("▁USER") only if the checkpoint's tokenizer is `legacy`: vicuna
v1.5's, which LLaVA trains from, is not ("legacy": false in its
tokenizer_config.json), and gives "USER" there; LLaVA's train.py corrects its
label masks for exactly that. The template records which
(`dummy_prefix_after_eos`; export reads it from the checkpoint).

User text is always tokenized as text: a literal "</s>" typed by a user does
not become a control token (LLaVA's slow tokenizer would map it; we refuse to
let user input inject control ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pulse_edge.errors import PromptError

IMAGE_SLOT = -200
IMAGE_MARKER = "<image>"

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

DEFAULT_QUESTION = (
    "Interpret this 12-lead ECG. Describe the rhythm, rate, axis, intervals and any "
    "abnormalities, then give a final diagnosis."
)


def question_or_default(question: str | None) -> str:
    """`question`, or DEFAULT_QUESTION where it is absent or blank: what an image-only chat message asks (the API
    itself refuses a blank question: Conversation.ask)."""
    return question if question and question.strip() else DEFAULT_QUESTION


def check_text(text: str, what: str) -> str:
    """`text` if it is Unicode the tokenizer can take; else PromptError. A lone UTF-16 surrogate (JSON "\\ud800",
    or a byte that is not UTF-8 on the command line, which Python decodes to one) has no UTF-8 form."""
    if not isinstance(text, str):
        raise PromptError(f"the {what} must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the {what} is not valid text: character {e.start} ({text[e.start]!r}) is half of a "
                          "UTF-16 pair or a byte that is not UTF-8; send the text as UTF-8") from None
    return text


class TextEncoder(Protocol):
    """What the prompt needs of a tokenizer (runtime.tokenizer.Tokenizer fits)."""

    bos_id: int
    eos_id: int

    def encode(self, text: str, *, dummy_prefix: bool = True) -> list[int]: ...


@dataclass(frozen=True)
class PromptTemplate:
    """A two-separator chat template; `llava_v1` is the one PULSE uses."""

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    image_marker: str = IMAGE_MARKER
    # text after </s> starts with SentencePiece's "▁" (a `legacy` LLaMA tokenizer, and manifests written before
    # this field); False: as a non-legacy one encodes it, "</s>USER" (module doc)
    dummy_prefix_after_eos: bool = True

    def __post_init__(self) -> None:
        check_text(self.system, "system prompt")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "roles": list(self.roles), "sep": self.sep,
                "image_marker": self.image_marker, "dummy_prefix_after_eos": self.dummy_prefix_after_eos}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptTemplate:
        try:
            roles = tuple(d["roles"])
            return cls(name=str(d["name"]), system=str(d["system"]), roles=(roles[0], roles[1]),
                       sep=str(d["sep"]), image_marker=str(d.get("image_marker", IMAGE_MARKER)),
                       dummy_prefix_after_eos=bool(d.get("dummy_prefix_after_eos", True)))
        except (KeyError, IndexError, TypeError) as e:
            raise PromptError(f"prompt template is malformed ({e!r}); expected keys name, system, roles, sep") from e


LLAVA_V1 = PromptTemplate(name="llava_v1", system=LLAVA_V1_SYSTEM, roles=("USER", "ASSISTANT"), sep=" ")


@dataclass(frozen=True)
class Turn:
    """One user question and, for past turns, the assistant's answer."""

    question: str
    answer: str | None = None

    def __post_init__(self) -> None:
        check_text(self.question, "question")
        if self.answer is not None:
            check_text(self.answer, "answer in the history")


def render_text(turns: Sequence[Turn], template: PromptTemplate = LLAVA_V1) -> str:
    """The prompt as text (for display and logs); the image marker opens the first question."""
    user, assistant = template.roles
    text = template.system + template.sep
    for i, turn in enumerate(turns):
        question = f"{template.image_marker}\n{turn.question}" if i == 0 else turn.question
        text += f"{user}: {question}{template.sep}{assistant}:"
        if turn.answer is not None:
            text += f" {turn.answer}</s>"
    return text


def prompt_ids(turns: Sequence[Turn], tokenizer: TextEncoder, template: PromptTemplate = LLAVA_V1) -> list[int]:
    """Token ids of a whole conversation, with one IMAGE_SLOT before the first question.

    [BOS] enc("{system} USER: ") [IMAGE_SLOT] enc("\\n{q1} ASSISTANT: {a1}") [EOS] enc("USER: {q2} ASSISTANT:")

    Text after an EOS has the dummy prefix as the template says (`dummy_prefix_after_eos`).
    """
    if not turns:
        raise PromptError("a prompt needs at least one question")
    for turn in turns:
        if not isinstance(turn, Turn):  # a tuple, an OpenAI-style dict: Turn checks its own fields
            raise PromptError(f"a turn of the history must be a Turn(question, answer), got {type(turn).__name__}")
        if template.image_marker in turn.question:
            raise PromptError(f"the question must not contain {template.image_marker!r}: the image goes in once, "
                              "before the first question")
    if any(t.answer is None for t in turns[:-1]):
        raise PromptError("only the last turn may be unanswered")
    user, assistant = template.roles
    ids = [tokenizer.bos_id, *tokenizer.encode(f"{template.system}{template.sep}{user}: "), IMAGE_SLOT]
    for i, turn in enumerate(turns):
        head = f"\n{turn.question}" if i == 0 else f"{user}: {turn.question}"
        piece = f"{head}{template.sep}{assistant}:"
        text = piece if turn.answer is None else f"{piece} {turn.answer}"
        ids += tokenizer.encode(text, dummy_prefix=i == 0 or template.dummy_prefix_after_eos)
        if turn.answer is not None:
            ids.append(tokenizer.eos_id)
    return ids


def continuation_ids(question: str, tokenizer: TextEncoder, *, close_previous: bool,
                     template: PromptTemplate = LLAVA_V1) -> list[int]:
    """Ids that follow the model's own previous answer in a cached multi-turn chat.

    The previous answer normally ended with the model's EOS; when generation stopped on the
    token limit instead, `close_previous` adds the EOS the template expects after an answer.
    """
    if template.image_marker in check_text(question, "question"):
        raise PromptError(f"only the first question carries the image; remove {template.image_marker!r}")
    user, assistant = template.roles
    head = [tokenizer.eos_id] if close_previous else []
    return head + tokenizer.encode(f"{user}: {question}{template.sep}{assistant}:",
                                   dummy_prefix=template.dummy_prefix_after_eos)  # after the EOS, either way


def image_slot_index(ids: Sequence[int]) -> int:
    """Position of the single image slot; the splice replaces it by the image features."""
    slots = [i for i, t in enumerate(ids) if t == IMAGE_SLOT]
    if len(slots) != 1:
        raise PromptError(f"a prompt must hold exactly one image slot, found {len(slots)}")
    return slots[0]


def spliced_length(ids: Sequence[int], num_image_tokens: int) -> int:
    """Sequence length after the image slot is replaced by `num_image_tokens` embeddings."""
    return len(ids) - 1 + num_image_tokens
