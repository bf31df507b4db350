"""Find the statements of the vocabulary in a generated answer, leaving out what the text denies.

    "Sinus rhythm. No atrial fibrillation; possible LVH."  ->  SR (stated), LVH (possible); never AFIB

A statement is a whole-word match of a concept's phrases (any case) or codes (exact case); where matches
overlap, the longest wins ("incomplete right bundle branch block" is IRBBB, not RBBB). The text is cut
into clauses at sentence punctuation and at "but", "however", ...; a mention is

- left out when a negation comes before it in its clause ("no", "not", "without", "negative for", "no longer",
  ...), when a negation follows it ("AF is absent", "... not seen", "criteria not met", "STEMI mimic"), when
  "non-" or "pseudo-" prefixes it, when "history of" governs it (that statement only: "history of AF, now in
  sinus rhythm" states SR), or when its clause is a question;
- kept as "possible" when a hedge comes before it ("possible", "suggestive of", "cannot rule out",
  "differential includes", ...), when "?" is glued to it ("?LVH"), when a hedge follows it ("... cannot be
  excluded", "... doubtful"), and when it is one side of "vs" / "or" ("AF vs flutter" states neither); a hedge
  that runs on into the next statement is that one's ("sinus rhythm, possible LVH");
- kept as "stated" otherwise.

Negation reaches to the end of the clause, commas included ("no ST elevation, LBBB" drops both): a missed
statement is a smaller harm than a finding the text does not state. A concept mentioned several times is
reported once, by its first stated mention (else its first possible one).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pulse_edge.runtime.findings.vocabulary import CONCEPTS, Concept

CERTAINTIES = ("stated", "possible")
_LEFT, _RIGHT = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])"
# A "?" ends a question unless a word follows it at once ("?LVH": a query of that one statement).
# where a sentence ends: '.', '!' or '?' before whitespace or the end of the text (not "0.12 s"), or a line break
_SENTENCE_END = re.compile(r"(?<!\bvs)(?<!\bVs)(?<!\bVS)\.(?=\s|$)|[!?](?=\s|$)|\n")
# (the '.' of "vs." ends no clause: "AF vs. flutter" split in two stated both sides)
_BOUNDARY = re.compile(
    r"(?<!\bvs)\.(?!\d)|[;:!](?!\d)|\?(?![A-Za-z])|\n"
    r"|(?<![A-Za-z])(?:but|however|although|though|whereas|except|apart from"
    r"|aside from)(?![A-Za-z])", re.IGNORECASE)
# Also a finding ruled out or unlikely, or one no longer there.
_NEGATION_BEFORE = re.compile(
    r"(?<![A-Za-z])(?:no(?!\s*[,.;:!?])|not|without|negative for|absence of|free of|ruled out|rules out|never"
    r"|neither|nor|rather than|instead of|unlikely to (?:be|represent)|low likelihood of|no longer)(?![A-Za-z])",
    re.IGNORECASE)
# What only the statement right after it is: a history ("history of AF, now in sinus rhythm" states SR, and
# "history of hypertension, sinus rhythm" too), or a query ("?LVH, RBBB": LVH possible, RBBB stated).
_HISTORY_OF = re.compile(r"(?:(?<![A-Za-z])(?:a |past |prior )?history of|(?<![A-Za-z])h/o)\s+(?:[A-Za-z-]+\s+){0,2}$",
                         re.IGNORECASE)
# Negation words that do not deny what follows them.
_PSEUDO_NEGATION = re.compile(
    r"(?<![A-Za-z])(?:not only|not necessarily|no (?:significant |interval )?changes?)(?![A-Za-z])", re.IGNORECASE)
_UNSURE = (r"(?:(?:cannot|can't|can not|could not|couldn't|does not|doesn't|did not|do not|unable to) (?:be )?"
           r"(?:ruled out|rule out|excluded?)|not (?:be )?(?:ruled out|excluded))")
_HEDGE_BEFORE = re.compile(
    rf"(?<![A-Za-z])(?:{_UNSURE}|possibl[ey]|probabl[ey]|likely|suspected|suspicious (?:for|of)"
    r"|suggest(?:s|ive of|ing)?|consider|questionable|borderline|equivocal|may (?:be|represent|indicate|reflect)"
    r"|might|could (?:be|represent)|doubtful|query|differential(?: diagnosis)?(?: includes?| of)?"
    r"|(?:can|may|could) (?:mimic|mask|obscure)(?: or (?:mimic|mask|obscure))?"
    r"|rule out|r/o)(?![A-Za-z])", re.IGNORECASE)
# Up to four words between a statement and what follows it: "AF and flutter are absent" must deny AF even where
# "flutter" alone is no statement of the vocabulary. The price: "AF, P waves are absent" drops AF too (a missed
# statement is the smaller harm, as for the negation's reach above).
_FILLER = r"^[\s,]*(?:[\w/+-]+[\s,]+){0,4}?"
_VERB = r"(?:(?:is|are|was|were|has been|have been|appears?|seems?)\s+)?"
_NEGATION_AFTER = re.compile(
    rf"{_FILLER}{_VERB}(?:not (?:seen|present|identified|observed|evident|detected|noted|found|visible|apparent"
    r"|shown|demonstrated)|no longer (?:seen|present|evident|visible)|absent|ruled out|excluded|unlikely|resolved"
    r"|criteria (?:are |were )?not met)(?![A-Za-z])"
    r"(?![\s,]+(?:on|in|from|compared (?:to|with)) (?:the )?(?:prior|previous|old|earlier))",  # "not seen on the
    re.IGNORECASE)  # prior ECG": new, not denied
_HEDGE_AFTER = re.compile(
    rf"{_FILLER}{_VERB}(?:{_UNSURE}|possible|suspected|likely|questionable|not certain|doubtful)(?![A-Za-z])",
    re.IGNORECASE)
# "STEMI mimic", "LBBB mimicker": the statement names what it is not (never "LBBB, which can mimic MI")
_MIMIC = re.compile(r"^[\s-]*mimic(?:s|ker)?(?![A-Za-z])[\s,]*$", re.IGNORECASE)
_CONJUNCTION = re.compile(r"^[\s,/]*(?:(?:and|or|nor|and/or)[\s,]*)?$", re.IGNORECASE)
# "AF vs flutter", "AF or flutter": a differential; neither is stated
_ALTERNATIVE = re.compile(r"^[\s,]*(?:vs\.?|versus|or)[\s,]*$", re.IGNORECASE)


def word_pattern(phrase: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """`phrase` (literal text) as a whole word: no letter or digit on either side. The scorer's rule."""
    return re.compile(_LEFT + re.escape(phrase) + _RIGHT, re.IGNORECASE if ignore_case else 0)


@dataclass(frozen=True)
class Finding:
    """One statement of the vocabulary found in a text, with the span that states it."""

    code: str  # the concept's key (runtime/findings/vocabulary.py)
    name: str
    category: str
    snomed_ct: str | None
    scp_ecg: str | None
    labels: dict[str, str]  # ECGBench label space -> label
    text: str  # the matched span, as written
    start: int  # character offsets of the span in the text
    end: int
    certainty: str  # "stated" | "possible"

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "name": self.name, "category": self.category, "snomed_ct": self.snomed_ct,
                "scp_ecg": self.scp_ecg, "labels": dict(self.labels), "text": self.text, "start": self.start,
                "end": self.end, "certainty": self.certainty}


@dataclass(frozen=True)
class _Matcher:
    concept: Concept
    patterns: tuple[re.Pattern[str], ...]


@dataclass
class _Mention:
    start: int
    end: int
    concept: Concept
    negated: bool = False
    hedged: bool = False


# "non-sinus rhythm", "non-ischemic", "pseudo-infarct": the prefix says the opposite of the statement
_NOT_PREFIXED = r"(?<![Nn]on-)(?<![Nn]on )(?<![Pp]seudo-)(?<![Pp]seudo )(?<!NON-)"


def _matcher(concept: Concept) -> _Matcher:
    patterns = []
    if concept.phrases:
        patterns.append(re.compile(f"{_LEFT}{_NOT_PREFIXED}(?:{'|'.join(concept.phrases)}){_RIGHT}", re.IGNORECASE))
    if concept.codes:
        patterns.append(re.compile(f"{_LEFT}{_NOT_PREFIXED}(?:{'|'.join(concept.codes)}){_RIGHT}"))
    return _Matcher(concept, tuple(patterns))


_MATCHERS: tuple[_Matcher, ...] = tuple(_matcher(c) for c in CONCEPTS)


def finished_sentences(text: str) -> str:
    """`text` up to the end of its last finished sentence (a '.', '!' or '?' before a space or the end, or a
    line break); "" where none is finished."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def extract_findings(text: str) -> list[Finding]:
    """The vocabulary's statements that `text` makes, in order of first mention; none that it denies."""
    mentions = _mentions(text)
    for clause in _clauses(text):
        _judge_clause(text, clause, [m for m in mentions if clause[0] <= m.start < clause[1]])
    chosen: dict[str, _Mention] = {}
    for mention in mentions:
        if mention.negated:
            continue
        previous = chosen.get(mention.concept.key)
        if previous is None or (previous.hedged and not mention.hedged):
            chosen[mention.concept.key] = mention
    return [_finding(text, m) for m in sorted(chosen.values(), key=lambda m: m.start)]


def labels_in(text: str, labels: Sequence[str]) -> list[str]:
    """Those of `labels` (codes of an ECGBench label space) that the statements of `text` map to, in the
    order of `labels`. What the ECGBench scorer's strict mode reads, and what the findings of a result say."""
    found = {label for finding in extract_findings(text) for label in finding.labels.values()}
    return [label for label in labels if label in found]


def _mentions(text: str) -> list[_Mention]:
    """Every match of every concept; where matches overlap, the longest (then the earliest) is kept."""
    found = [_Mention(hit.start(), hit.end(), m.concept) for m in _MATCHERS for p in m.patterns
             for hit in p.finditer(text)]
    kept: list[_Mention] = []
    for mention in sorted(found, key=lambda m: (m.start - m.end, m.start)):
        if all(mention.end <= k.start or mention.start >= k.end for k in kept):
            kept.append(mention)
    return sorted(kept, key=lambda m: m.start)


def _clauses(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is a question) of each clause."""
    clauses, start = [], 0
    for boundary in _BOUNDARY.finditer(text):
        clauses.append((start, boundary.start(), boundary.group() == "?"))
        start = boundary.end()
    clauses.append((start, len(text), False))
    return clauses


def _judge_clause(text: str, clause: tuple[int, int, bool], mentions: list[_Mention]) -> None:
    """Mark the mentions of one clause negated or hedged."""
    start, end, asked = clause
    part = text[start:end]
    hedges = [(start + h.start(), start + h.end()) for h in _HEDGE_BEFORE.finditer(part)]
    pseudo = [(start + p.start(), start + p.end()) for p in _PSEUDO_NEGATION.finditer(part)]
    negations = [start + n.start() for n in _NEGATION_BEFORE.finditer(part)
                 if not any(a <= start + n.start() < b for a, b in (*hedges, *pseudo))]
    for k, mention in enumerate(mentions):
        gap_end = mentions[k + 1].start if k + 1 < len(mentions) else end
        gap = text[mention.end:gap_end]
        before = text[mentions[k - 1].end if k else start:mention.start]
        last = k + 1 == len(mentions)
        hedged_after = _after(_HEDGE_AFTER, gap, last=last)  # before "... excluded"
        negated_after = not hedged_after and (_after(_NEGATION_AFTER, gap, last=last) or bool(_MIMIC.match(gap)))
        mention.negated = (asked or any(n < mention.start for n in negations) or negated_after
                           or bool(_HISTORY_OF.search(before)))
        mention.hedged = any(b <= mention.start for _, b in hedges) or hedged_after or before.endswith("?")
    # "AF and flutter are absent": what follows the last of a list applies to the whole list.
    for k in range(len(mentions) - 2, -1, -1):
        if _CONJUNCTION.match(text[mentions[k].end:mentions[k + 1].start]):
            mentions[k].negated |= mentions[k + 1].negated
            mentions[k].hedged |= mentions[k + 1].hedged
    # "AF vs flutter", "RBBB or IVCD": both sides possible, after the lists (a differential hedges only its pair)
    for first, second in itertools.pairwise(mentions):
        if _ALTERNATIVE.match(text[first.end:second.start]) and not (first.negated or second.negated):
            first.hedged = second.hedged = True


def _after(pattern: re.Pattern[str], gap: str, *, last: bool) -> bool:
    """A negation or hedge after a statement is its own, unless it opens the next one: nothing but up to two words
    stand between it and that statement ("Sinus rhythm, possible LVH", "LBBB, cannot exclude anterior MI": the
    hedge is LVH's and MI's), where "AF not present on this tracing, sinus rhythm" keeps it AF's."""
    hit = pattern.match(gap)
    return bool(hit) and (last or not _OPENS_NEXT.fullmatch(gap[hit.end():]))


_OPENS_NEXT = re.compile(r"\s*(?:[A-Za-z-]+\s+){0,2}")


def _finding(text: str, mention: _Mention) -> Finding:
    c = mention.concept
    return Finding(c.key, c.name, c.category, c.snomed, c.scp, dict(c.labels), text[mention.start:mention.end],
                   mention.start, mention.end, "possible" if mention.hedged else "stated")
