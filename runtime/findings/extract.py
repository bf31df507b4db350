"""Find the statements of the vocabulary in a generated answer, leaving out what the text denies.

    "Sinus rhythm. No atrial fibrillation; possible LVH."  ->  SR (stated), LVH (possible); never AFIB

A statement is a whole-word match of a concept's phrases (any case) or codes (exact case); where matches
overlap, the longest wins ("incomplete right bundle branch block" is IRBBB, not RBBB). The text is cut
into clauses at sentence punctuation (full-width too), ';', ':' and at "but", "however", "except", ...; a mention is

- left out when a negation comes before it in its clause ("no", "not", "isn't", "without", "lack of", "fails to meet
  criteria for", "artifact simulating", ...), unless the negation denied nothing that is a statement before
  "consistent with" stands between them ("No P waves, consistent with AF" states AF); when a negation follows it
  ("AF is absent", "... not seen", "criteria not met", "does not fit", "AF is not the rhythm here", "due to
  artifact", "STEMI mimic") or its field says so ("ST elevation: none"), a negation right after it being its own and
  spent on it ("AF not present on this tracing, sinus rhythm" states SR); on both sides of "unlikely to be" /
  "unlikely due to" ("ST elevation unlikely to be STEMI": which side is meant is not in the words); when "non-" or
  "pseudo-" prefixes it; when it is past: a history ("history of AF, now in sinus rhythm" states SR; "history of MI
  and AF" neither), what an earlier tracing showed ("prior ECG showed AF", "AF on prior ECG"), what converted or
  gave way ("AF converted to sinus rhythm"); or when its clause is a question. "Not seen on the prior ECG" and "not
  seen previously" deny nothing: the finding is new;
- kept as "possible" when a hedge comes before it ("possible", "suggestive of", "cannot rule out", "evaluate for",
  "voltage criteria for", ...), when "?" is glued to it ("?LVH"), when a hedge follows it ("... cannot be excluded",
  "... may be present", "... until proven otherwise"), and when it is a side of a differential, "vs" / "versus" /
  "or", whether or not the other side is a statement ("AF vs flutter", "Pericarditis vs STEMI"), or what fits less
  ("LBBB fits better than RBBB"), and when it is what another mimics ("LBBB mimics anterior MI", "MI mimicked by
  LBBB"); a hedge that runs on into the next statement is that one's ("sinus rhythm, possible LVH");
- kept as "stated" otherwise; "normal ECG" beside a stated diagnostic abnormality is left out ("Normal ECG except
  for left axis deviation"; not beside a rhythm: PTB-XL labels NORM with sinus bradycardia), and only possible
  beside a possible one;
- left out when it is an option of a multiple-choice list the answer repeats, unless the answer chose it
  ("A. Sinus rhythm B. Atrial fibrillation. Answer: B" states AF); a lettered list is one of options only where
  "Options:" (or the like) opens it or the text speaks of its answer ("Findings: A. SR. B. LBBB." states both), a
  list marked "A:" only where a letter of it is chosen outside it; an option judged after its colon ("A) SR:
  incorrect") keeps its verdict.

"No", "not", "without" and their kin reach to the end of the clause, commas included ("no ST elevation, LBBB"
drops both): a missed statement is a smaller harm than a finding the text does not state. The rest ("absent",
"isn't", "lack of", "kein", what an earlier tracing showed, ...) reach to the next comma ("Absent P waves, atrial
fibrillation" states AF). A concept mentioned several times is
reported once, by its first stated mention (else its first possible one). The wording: wording.py.
"""

from __future__ import annotations

import bisect
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pulse_edge.runtime.findings import wording as w
from pulse_edge.runtime.findings.vocabulary import CONCEPTS, Concept

CERTAINTIES = ("stated", "possible")
# what can be "not the rhythm" of a tracing (wording.NOT_THE_RHYTHM): its rhythms and the AV blocks that make one,
# not pacing, bigeminy or trigeminy, which run over another rhythm
_WHOLE_RHYTHMS = (frozenset(c.key for c in CONCEPTS if c.category == "rhythm") - {"PACE", "BIGU", "TRIGU"}
                  | {"2AVB", "3AVB"})
_LEFT, _RIGHT = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])"
# Diagnostic statements that contradict "normal ECG" ("Normal ECG except for left axis deviation", "Normal ECG with
# first-degree AV block"): the abnormality wins. Not the rhythm and its ectopic beats: PTB-XL labels NORM beside
# sinus bradycardia, tachycardia or PACs (its rhythm statements are annotated apart from its diagnoses).
_NOT_NORMAL = frozenset({"conduction", "ischemia", "infarction", "hypertrophy", "axis", "waves"})


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
    past: bool = False  # a history, or what an earlier tracing showed
    # denied by words that are its own ("X unlikely to be/represent/due to Y", "X does not fit"): not along a bare
    # comma ("Sinus rhythm, LVH, LBBB doesn't fit" states SR and LVH)
    relational: bool = False


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
    ends = [m.end() for m in w.SENTENCE_END.finditer(text)]
    return text[:ends[-1]] if ends else ""


def extract_findings(text: str) -> list[Finding]:
    """The vocabulary's statements that `text` makes, in order of first mention; none that it denies."""
    mentions = _mentions(text)
    starts = [m.start for m in mentions]
    for clause in _clauses(text):
        _judge_clause(text, clause, mentions[slice(*_within(starts, clause[0], clause[1]))])
    for start, end in _options_not_chosen(text):
        for mention in mentions[slice(*_within(starts, start, end))]:
            mention.negated = True
    chosen: dict[str, _Mention] = {}
    for mention in mentions:
        if mention.negated:
            continue
        previous = chosen.get(mention.concept.key)
        if previous is None or (previous.hedged and not mention.hedged):
            chosen[mention.concept.key] = mention
    return [_finding(text, m) for m in sorted(_normal_resolved(chosen), key=lambda m: m.start)]


def _within(starts: list[int], start: int, end: int) -> tuple[int, int]:
    """The index range of the sorted `starts` in [start, end)."""
    return bisect.bisect_left(starts, start), bisect.bisect_left(starts, end)


def _normal_resolved(chosen: dict[str, _Mention]) -> list[_Mention]:
    """The chosen mentions, "normal ECG" left out beside a stated abnormality and only possible beside a possible
    one (_NOT_NORMAL)."""
    others = [m for m in chosen.values() if m.concept.category in _NOT_NORMAL]
    normal = chosen.get("NORM")
    if normal is None or not others:
        return list(chosen.values())
    if any(not m.hedged for m in others):
        return [m for key, m in chosen.items() if key != "NORM"]
    normal.hedged = True
    return list(chosen.values())


def labels_in(text: str, labels: Sequence[str]) -> list[str]:
    """Those of `labels` (codes of an ECGBench label space) that the statements of `text` map to, in the
    order of `labels`. What the ECGBench scorer's strict mode reads, and what the findings of a result say."""
    found = {label for finding in extract_findings(text) for label in finding.labels.values()}
    return [label for label in labels if label in found]


def _mentions(text: str) -> list[_Mention]:
    """Every match of every concept; where matches overlap, the longest (then the earliest) is kept."""
    found = [_Mention(hit.start(), hit.end(), m.concept) for m in _MATCHERS for p in m.patterns
             for hit in p.finditer(text)]
    kept: list[_Mention] = []  # disjoint, sorted by start: a new one can overlap only its two neighbours
    for mention in sorted(found, key=lambda m: (m.start - m.end, m.start)):
        k = bisect.bisect_left(kept, mention.start, key=lambda m: m.start)
        if (not k or kept[k - 1].end <= mention.start) and (k == len(kept) or mention.end <= kept[k].start):
            kept.insert(k, mention)
    return kept


def _clauses(text: str) -> list[tuple[int, int, bool]]:
    """(start, end, is a question) of each clause."""
    clauses, start = [], 0
    for boundary in w.BOUNDARY.finditer(text):
        clauses.append((start, boundary.start(), boundary.group() == "?"))
        start = boundary.end()
    clauses.append((start, len(text), False))
    return clauses


def _judge_clause(text: str, clause: tuple[int, int, bool], mentions: list[_Mention]) -> None:
    """Mark the mentions of one clause negated, hedged or past (module doc; the patterns: wording.py)."""
    start, end, asked = clause
    part = text[start:end]
    hedges = _spans(w.HEDGE_BEFORE, part, start)
    gaps = [text[m.end:mentions[k + 1].start if k + 1 < len(mentions) else end] for k, m in enumerate(mentions)]
    hedged_after = [_after(w.HEDGE_AFTER, gap, last=k + 1 == len(gaps)) > 0 for k, gap in enumerate(gaps)]
    # a negation after a statement is spent on it: its "not" denies nothing further ("AF not present on this
    # tracing, sinus rhythm" states SR)
    owned = [0 if hedged else _own_negation(gap, last=k + 1 == len(gaps), rhythm=m.concept.key in _WHOLE_RHYTHMS)
             for k, (m, gap, hedged) in enumerate(zip(mentions, gaps, hedged_after, strict=True))]
    spent = [(m.end, m.end + n) for m, n, gap in zip(mentions, owned, gaps, strict=True)
             if n and not w.BOTH_SIDES.search(gap)]
    # "The LBBB is not the rhythm here, ... sinus rhythm": denies neither, its "not" is spent all the same
    spent += [(m.end, m.end + hit.end()) for m, n, gap in zip(mentions, owned, gaps, strict=True)
              if not n and (hit := w.NOT_THE.match(gap) or w.NOT_THE_MAIN.match(gap))]
    denials = _denials(text, clause, [*hedges, *spent], [m.start for m in mentions])
    alternatives = []
    for k, mention in enumerate(mentions):
        gap = gaps[k]
        before = text[mentions[k - 1].end if k else start:mention.start]
        last = k + 1 == len(mentions)
        mention.past = bool(w.HISTORY_OF.search(before)) or bool(w.GONE_AFTER.match(gap))
        mimics = bool(w.MIMIC_VERB.match(gap)) and not last
        negated_after = not hedged_after[k] and (owned[k] > 0 or (bool(w.MIMIC.match(gap)) and not mimics)
                                                 or (last and bool(w.DENIED_AFTER_COLON.match(text[end:]))))
        reached = any(n < mention.start < reach for n, reach in denials)
        mention.negated = asked or reached or negated_after or mention.past
        # the relation's other side is the next statement, at most two words on ("unlikely to represent acute MI");
        # "AF, atrial flutter unlikely to be the diagnosis given sinus rhythm" is a list denied
        relation = w.BOTH_SIDES.search(gap)
        fits = owned[k] > 0 and bool(w.FIT_AFTER.match(gap))
        mention.relational = (fits or (owned[k] > 0 and not last and relation is not None
                                       and bool(_OPENS_NEXT.fullmatch(gap[relation.end():]))
                                       and not (asked or reached or mention.past)))
        mention.hedged = (any(b <= mention.start for _, b in hedges) or hedged_after[k]
                          or bool(w.QUERIED.search(before)))
        more = w.MORE_THAN.search(text, start, mention.start)
        alternatives.append(bool(w.ALTERNATIVE_AFTER.match(gap) or w.ALTERNATIVE_BEFORE.search(before)
                                 or (more and more.start("than") >= mention.start - len(before))
                                 or w.MIMICKED_BEFORE.search(before)  # what is mimicked: possible at most
                                 or w.MIMICKED_BY.match(gap) or w.PRESUMED_AFTER.match(gap)))
    _along_lists(text, mentions)
    # "AF vs flutter", "Pericarditis vs STEMI": possible, after the lists (a differential hedges its own sides only;
    # so does "until proven otherwise")
    for mention, alternative in zip(mentions, alternatives, strict=True):
        mention.hedged |= alternative and not mention.negated


def _spans(pattern: re.Pattern[str], part: str, offset: int) -> list[tuple[int, int]]:
    return [(offset + m.start(), offset + m.end()) for m in pattern.finditer(part)]


def _denials(text: str, clause: tuple[int, int, bool], hedges: list[tuple[int, int]], starts: list[int]
             ) -> list[tuple[int, int]]:
    """(where each denial of the clause starts, where its reach ends): the clause's end, or the next comma for the
    narrower ones (wording.NEGATION_TO_COMMA, EARLIER_TRACING_BEFORE); sooner where "consistent with"
    (wording.SCOPE_BREAK) follows before it denied any statement ("No P waves, consistent with AF" states AF).
    A negation word inside a hedge or a pseudo-negation ("cannot rule out", "no prior ECG") denies nothing."""
    start, end, _ = clause
    part = text[start:end]
    skipped = [*hedges, *_spans(w.PSEUDO_NEGATION, part, start)]
    commas = [a for a, _ in _spans(w.COMMA, part, start)]
    breaks = [a for a, _ in _spans(w.SCOPE_BREAK, part, start)]
    found = [(a, e, end) for a, e in _spans(w.NEGATION_BEFORE, part, start)]
    found += [(a, e, next((c for c in commas if c >= e), end)) for pattern in (w.NEGATION_TO_COMMA,
              w.EARLIER_TRACING_BEFORE) for a, e in _spans(pattern, part, start)]
    denials = []
    for first, said, reach in found:
        if any(s <= first < e for s, e in skipped):
            continue
        spent = bisect.bisect_right(starts, first)  # the first statement after the denial
        for b in breaks:  # not one inside the denial's own words ("unlikely due to ischemia")
            if not (said <= b < reach and text[said:b].strip() and (spent == len(starts) or starts[spent] > b)):
                continue
            # "not, by itself, diagnostic of anterior MI in LBBB": what it is not diagnostic of, and no further
            after = bisect.bisect_right(starts, b)
            itself = w.ABOUT_ITSELF.fullmatch(text[said:b]) and after < len(starts)
            reach = starts[after] + 1 if itself else b
            break
        denials.append((first, reach))
    return denials


def _along_lists(text: str, mentions: list[_Mention]) -> None:
    """"AF and flutter are absent": what follows the last of a list applies to the whole list; "history of MI and
    AF": a history reaches along the list it opens. Commas alone join a list too ("AF, LBBB, RBBB absent"), and the
    letters of options ("A (AF), B (LBBB), and D (RBBB) are incorrect"): where two statements and a comma are two
    ("Sinus rhythm, MI unlikely"), SR is lost, an omission, where reading a list as two would state a finding the
    text denies, the worse error."""
    for k in range(len(mentions) - 2, -1, -1):
        gap = text[mentions[k].end:mentions[k + 1].start]
        # a relation denied ("ST elevation unlikely to represent MI") is no list's end: not back across a comma
        listed = w.CONJUNCTION.match(gap) or _lettered_list(text, mentions[k].start, w.LETTERED_GAP.match(gap))
        later = mentions[k + 1]
        if listed and not (later.relational and (not re.search(r"[A-Za-z]", gap)
                                                 or w.SINGLE_NOT_THE.match(text, later.end))):
            mentions[k].negated |= mentions[k + 1].negated
            mentions[k].hedged |= mentions[k + 1].hedged
    for first, second in itertools.pairwise(mentions):
        if first.past and w.JOINED.match(text[first.end:second.start]):
            second.past = second.negated = True


def _lettered_list(text: str, start: int, gap: re.Match[str] | None) -> bool:
    """Two options of a lettered list ("A (AF), B (flutter) and D (JR) are incorrect"): each statement after its
    letter, the letters in order, and no answer chosen earlier in the sentence ("Answer: B (SR), C (AF) is
    incorrect", "Correct: A (SR) and B (LVH), C (AF) is incorrect" deny C only)."""
    mark = w.LETTERED_BEFORE.search(text, max(0, start - 6), start) if gap else None
    if gap is None or mark is None or (mark.group(1) or mark.group(2)) >= (gap.group(1) or gap.group(2)):
        return False
    window = max(0, start - w.OPTION_CHARS)
    sentence = max((m.end() for m in w.SENTENCE_END.finditer(text, window, start)), default=window)
    last = gap.group(1) or gap.group(2)
    return not any(c.upper() <= last for p in (w.CHOSEN, w.CHOSEN_BEFORE) for h in p.finditer(text, sentence, start)
                   for c in w.CHOSEN_LETTER.findall(h.group(1)))


def _options_not_chosen(text: str) -> list[tuple[int, int]]:
    """(start, end) of each option of a repeated multiple-choice list but the chosen one (wording.OPTION_MARK):
    "A. Sinus rhythm B. Atrial fibrillation. Answer: B" states AF only; a list with no choice states none.
    Lettered items with a colon are sections of a report, stated as any text."""
    runs = _option_runs(text)
    if not runs:  # most answers: no lettered list, no cue to look for
        return []
    hits = [*w.CHOSEN.finditer(text), *w.CHOSEN_BEFORE.finditer(text)]
    answered = bool(hits) or w.ANSWER_SPOKEN.search(text) is not None
    spans = []
    judged: dict[int, bool] = {}  # an option's start -> whether its own verdict denies it
    for run in runs:
        tail = run[-1][2]
        cut = w.OPTION_END.search(text, tail, tail + w.OPTION_CHARS)
        ends = [start for _, start, _ in run[1:]] + [cut.start() if cut else min(len(text), tail + w.OPTION_CHARS)]
        near = max(0, run[0][1] - w.OPTIONS_CUE_CHARS), run[0][1]  # the cue right before the list only
        cued = w.OPTIONS_CUE.search(text, *near) or (w.QUESTION_CUE.search(text, *near)
                                                     if _chosen_outside(hits, run, ends[-1]) else None)
        if cued is None and any(c.islower() for c in text[run[0][1]:run[0][2]]):
            continue  # "a) ... b) ..." is a list of options only where something says so: a report's otherwise
        colon = w.COLON.search(text, *run[0][1:])
        if colon and cued and w.OPTION_LABEL.fullmatch(cued.group()) and w.VERDICT_WORD.search(text, run[0][1],
                                                                                            ends[-1]):
            cued = None  # "Option A: AF - incorrect. Option B: SR - correct": options judged one by one
        colons = [w.COLON.search(text, marked, end) for (_, _, marked), end in zip(run, ends, strict=True)]
        verdicts = all(c and w.VERDICT_COLON.match(text, c.start()) for c in colons)
        if not (cued or verdicts or (_chosen_outside(hits, run, ends[-1]) if colon else answered)):
            continue  # "A: Sinus rhythm. B: LBBB. The answer is abnormal": sections, unless a letter is chosen
        if any(text[at + 1] in " \t" for _, at, _ in run) and not (cued and _CUE_END.search(cued.group())):
            continue  # "Options A (SR) and B (LVH) are correct": a list, options only after "Options:" (or the like)
        items = [(letter, start, end) for (letter, start, _), end in zip(run, ends, strict=True)]
        sections = any(c and not w.VERDICT_COLON.match(text, c.start()) for c in colons)
        # an option judged after its colon keeps its verdict: denied for "incorrect", kept for "correct"
        judged.update({start: bool(w.DENYING_VERDICT.match(text, c.start()))
                       for (_, start, _), c in zip(items, colons, strict=True) if c})
        spans += [] if sections else items
    firsts, lasts = [start for _, start, _ in spans], [end for _, _, end in spans]  # sorted, disjoint

    def outside(at: int) -> bool:
        return not (k := bisect.bisect_right(firsts, at)) or at >= lasts[k - 1]

    # a cue whose letter opens a list is the question's ("Select the correct answer:\nA. ..."), not a choice
    chosen = {letter.upper() for hit in hits if outside(hit.start()) and outside(hit.start(1))
              for letter in w.CHOSEN_LETTER.findall(hit.group(1))}
    return [(start, end) for letter, start, end in spans
            if judged.get(start, letter not in chosen)]


_CUE_END = re.compile(r"[:?\uff1a\uff1f]|(?<![A-Za-z])(?:are|were)\W*$")  # "Options:", "What is shown?", "... are"


def _chosen_outside(hits: list[re.Match[str]], run: list[tuple[str, int, int]], end: int) -> bool:
    """A choice outside the list names one of its letters ("A: AF. B: SR. Correct: B.", "The answer is B. A: SR,
    B: AF"); "Answer A: AF; answer B: LBBB" labels sections."""
    letters = {letter for letter, _, _ in run}
    return any((hit.start() >= end or hit.end() <= run[0][1])
               and letters & {c.upper() for c in w.CHOSEN_LETTER.findall(hit.group(1))} for hit in hits)


def _option_runs(text: str) -> list[list[tuple[str, int, int]]]:
    """(letter, where its mark starts, where it ends) of each run of two or more option marks in alphabetical order
    from A, each within OPTION_CHARS of the last."""
    runs: list[list[tuple[str, int, int]]] = []
    for hit in w.OPTION_MARK.finditer(text):
        letter = next(mark for mark in hit.groups() if mark).upper()
        last = runs[-1][-1] if runs else None
        if last and ord(letter) == ord(last[0]) + 1 and hit.start() - last[1] <= w.OPTION_CHARS:
            runs[-1].append((letter, hit.start(), hit.end()))
        elif letter == "A":
            runs.append([(letter, hit.start(), hit.end())])
    return [run for run in runs if len(run) > 1]


def _after(pattern: re.Pattern[str], gap: str, *, last: bool) -> int:
    """How many characters of `gap` a negation or hedge after a statement takes, as its own (0: none). It is its
    own unless it opens the next one: nothing but up to two words stand between it and that statement ("Sinus
    rhythm, possible LVH", "LBBB, cannot exclude anterior MI": the hedge is LVH's and MI's), where "AF not present
    on this tracing, sinus rhythm" keeps it AF's."""
    hit = pattern.match(gap)
    return hit.end() if hit and (last or not _OPENS_NEXT.fullmatch(gap[hit.end():])) else 0


_OPENS_NEXT = re.compile(r"\s*(?:[A-Za-z-]+\s+){0,2}")


def _own_negation(gap: str, *, last: bool, rhythm: bool) -> int:
    """How many characters of `gap` negate the statement before it (0: none): right after it, whatever follows
    (wording.NEGATION_RIGHT_AFTER; "is not the rhythm" too for a whole tracing's `rhythm`), else as `_after`
    decides."""
    right = (w.NOT_THE_RHYTHM if rhythm else w.NEGATION_RIGHT_AFTER).match(gap)
    # "does not fit" / "is not" right before the next statement is about that one ("T wave inversions do not fit
    # ischemia", "the rhythm is not AF"): the gap's end is where the next statement starts, not the clause's end
    # their words need
    opens_next = not last and not gap[right.end():].strip() if right else False
    if right and not (opens_next and (w.FIT_AFTER.match(gap) or w.DASH_NO.match(gap))):  # "- no LVH": LVH's
        return right.end()
    return _after(w.NEGATION_AFTER, gap, last=last)


def _finding(text: str, mention: _Mention) -> Finding:
    c = mention.concept
    return Finding(c.key, c.name, c.category, c.snomed, c.scp, dict(c.labels), text[mention.start:mention.end],
                   mention.start, mention.end, "possible" if mention.hedged else "stated")
