"""Reading an answer out of a model's response: the paper's rules (compat) and stricter ones.

compat reproduces the paper's evaluation script rule for rule, flaws included:
label codes are case-sensitive *substrings* ("NORM" is found inside "ABNORMAL",
"ST" inside "STTC"); option letters are looked for as "A." ... "H." anywhere
(so "PAC." yields C), and after "Answer:" the first letter *in alphabetical
order* that occurs anywhere (so "Answer: Because ..." yields B).

strict matches codes and options as whole words (no letter or digit on either
side), takes the *first* standalone option letter by position, only accepts
letters valid for the subset, and reports an answer it cannot read as None
instead of guessing. It reads label codes through the runtime's findings
(runtime/findings/): a label is read when a statement of the answer maps to it,
written as its code ("LBBB") or in words ("left bundle branch block"), and not
when the answer denies it ("no AF"). So `eval` and every `infer --json` result
see the same labels in the same text.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pulse_edge.calibration.datasets.ecgbench.subsets import CODE15_WHOLE
from pulse_edge.runtime.findings import labels_in, word_pattern

COMPAT_LETTERS = "ABCDEFGH"  # the paper looks for these whatever the number of options
ANSWER_TAG = "Answer:"
OPTION_TAG = "The correct option is "
ECGQA_OPTIONS_TAG = "Options:"
ECGQA_INSTRUCTION = "Only answer based on the given Options without any explanation."
_NORM, _ABNORMAL = CODE15_WHOLE


# --- label codes ---------------------------------------------------------------------------------

def labels_compat(text: str, labels: Sequence[str]) -> list[str]:
    """Every label whose code occurs in `text` (case-sensitive substring)."""
    return [label for label in labels if label in text]


def labels_strict(text: str, labels: Sequence[str]) -> list[str]:
    """Every label that a statement of `text` maps to (its code as a whole word, or its words), unless denied."""
    return labels_in(text, labels)


def code15_gold(answer: str, labels: Sequence[str], *, strict: bool) -> list[str]:
    """[NORM] / [ABNORMAL] when the answer is exactly that word, else the label codes in it."""
    value = answer.strip() if strict else answer
    if value in CODE15_WHOLE:
        return [value]
    return (labels_strict if strict else labels_compat)(answer, labels)


def code15_compat(text: str, labels: Sequence[str]) -> list[str]:
    """After the last "Answer:": NORM if "NORM" occurs and "ABNORMAL" does not, ABNORMAL if it
    occurs, then the label codes. "ABNORMAL" contains "NORM": only the order of the tests keeps
    an abnormal answer from being read as normal."""
    part = text.split(ANSWER_TAG)[-1]
    found = labels_compat(part, labels)
    if _NORM in part and _ABNORMAL not in part:
        return [_NORM, *found]
    if _ABNORMAL in part:
        return [_ABNORMAL, *found]
    return found


def code15_strict(text: str, labels: Sequence[str]) -> list[str]:
    part = text.split(ANSWER_TAG)[-1]
    return labels_in(part, CODE15_WHOLE) + labels_in(part, labels)


# --- option letters ------------------------------------------------------------------------------

def choice_compat(text: str) -> str | None:
    """The paper's `extract`: None when nothing is found (the caller then draws a random letter)."""
    if text in COMPAT_LETTERS and len(text) == 1:
        return text
    for letter in COMPAT_LETTERS:
        if letter + "." in text:
            return letter
    if OPTION_TAG in text:
        after = text.split(OPTION_TAG)[-1]
        # the paper indexes [0] and would crash on an empty tail; an empty tail reads as nothing
        return after[0] if after[:1] and after[0] in COMPAT_LETTERS else None
    if ANSWER_TAG in text:
        answer = text.split(ANSWER_TAG)[-1].strip()
        return next((letter for letter in COMPAT_LETTERS if letter in answer), None)
    return None


def choice_strict(text: str, letters: str) -> str | None:
    """A lone letter; else the last "correct option is X"; else the first standalone letter after
    the last "Answer:"; else the first "X." / "(X)" / "X)" by position. Only `letters` count."""
    stripped = text.strip()
    alone = re.fullmatch(r"\(?([A-Z])\)?[.):]?", stripped)
    if alone:
        return alone.group(1) if alone.group(1) in letters else None
    stated = re.findall(r"(?i:correct (?:option|answer) is)\s*:?\s*\(?([A-Z])(?![A-Za-z0-9])", text)
    if stated:
        return stated[-1] if stated[-1] in letters else None
    if ANSWER_TAG in text:
        after = text.split(ANSWER_TAG)[-1]
        found = re.search(rf"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])", after)
        if found:
            return found.group(1)
    marked = re.search(rf"(?<![A-Za-z0-9])(?:\(([{letters}])\)|([{letters}])[.)])", text)
    return (marked.group(1) or marked.group(2)) if marked else None


# --- ECG-QA --------------------------------------------------------------------------------------

def ecgqa_candidates(prompt: str) -> list[str]:
    """The options listed in the question: after the last "Options:", instruction removed, split on ","."""
    options = prompt.split(ECGQA_OPTIONS_TAG)[-1].replace(ECGQA_INSTRUCTION, "")
    return [c.strip() for c in options.split(",")]


def ecgqa_compat(text: str, candidates: Sequence[str], text_key: str) -> list[str]:
    """The candidates named in the response. The paper lower-cases the candidate only when the
    answer came in a `text` field; from a `response` field the candidate keeps its case and so
    never matches an option written with capitals."""
    lowered = text.lower()
    if text_key == "text":
        return [c for c in candidates if c.lower() in lowered]
    return [c for c in candidates if c in lowered]


def ecgqa_compat_correct(predicted: Sequence[str], gold: str | tuple[str, ...]) -> bool:
    """The paper compares `set("".join(predicted))` with `set(gold)`: for a text answer that is
    the set of its *characters*. A list answer is joined first, so the same character rule
    applies (the paper's data held text; `set()` of a list would compare words with letters)."""
    gold_text = "".join(gold) if isinstance(gold, tuple) else gold
    return set("".join(predicted)) == set(gold_text)


def ecgqa_strict(text: str, candidates: Sequence[str]) -> set[str]:
    """The distinct non-empty candidates named as whole phrases (any case), lower-cased."""
    options = {c.lower() for c in candidates if c.strip()}
    return {c for c in options if word_pattern(c, ignore_case=True).search(text)}


def ecgqa_gold_strict(gold: str | tuple[str, ...]) -> set[str]:
    """The gold options, lower-cased; a text answer listing several is split on "," like the options."""
    parts = gold if isinstance(gold, tuple) else tuple(gold.split(","))
    return {p.strip().lower() for p in parts if p.strip()}
