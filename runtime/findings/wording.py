"""How report text denies, doubts, dates or bounds a statement: the patterns extract.py judges mentions by.

Each pattern is matched around one mention of the vocabulary (runtime/findings/vocabulary.py):
    in its clause, before it      negations, hedges, what breaks a negation's reach, what an earlier ECG showed
    right before it               a history ("history of", "Hx of"), the far side of a differential ("... vs")
    right after it (its gap)      negations, hedges, a mimic, a differential, what an earlier ECG showed,
                                  a denial after a colon ("ST elevation: none")
All are case-insensitive, whole words. Sources of the wording: the phrasing of ECG reports and of the answers
ECG models give; each case is a test in tests/runtime/test_findings.py.
"""

from __future__ import annotations

import re

_I = re.IGNORECASE
_W = r"(?<![A-Za-z])"  # a word starts here
_E = r"(?![A-Za-z])"  # a word ends here
_EARLIER = r"(?:prior|previous|old|older|earlier|last|preceding)"
_TRACING = r"(?:ecgs?|ekgs?|electrocardiograms?|tracings?|stud(?:y|ies)|records?)"

# Where a sentence ends: '.', '!' or '?' before whitespace or the end of the text (not "0.12 s"), a line break, or
# a full-width full stop, exclamation or question mark (CJK text). The '.' of "vs." ends nothing: "AF vs. flutter"
# split in two stated both sides.
SENTENCE_END = re.compile(r"(?<!\bvs)(?<!\bVs)(?<!\bVS)\.(?=\s|$)|[!?](?=\s|$)|\n|[\u3002\uff01\uff1f]")
# Where a clause ends: sentence punctuation, ';' and ':' (a "?" glued to a word queries that word: "?LVH"), and
# the words that turn the sentence ("but", "except", ...).
BOUNDARY = re.compile(
    # a "?" ends a question, not where it opens a query of what follows ("NSR, ? WPW": QUERIED)
    r"(?<!\bvs)\.(?!\d)|[;:!](?!\d)|\?(?<![,;(]\?)(?<![,;(] \?)(?<!^\?)(?<!\n\?)(?![A-Za-z])|\n"
    r"|[\u3002\uff1b\uff1a\uff01\uff1f]"
    rf"|{_W}(?:but|however|although|though|whereas|except|apart from|aside from){_E}", _I)

# --- before a mention, earlier in its clause ------------------------------------------------------------------
# A finding denied, ruled out, or no longer there: these reach to the end of the clause, commas included (module
# doc of extract.py: "no ST elevation, LBBB" drops both).
NEGATION_BEFORE = re.compile(
    rf"{_W}(?:no(?!\s*[,.;:!?])|not|without|negative for|absence of|free of|ruled out|rules out|never|neither|nor"
    rf"|rather than|instead of|argues? against|excluding|(?:is|are) (?:incorrect|wrong) because"
    rf"|unlikely to (?:be|represent)|unlikely that|low likelihood of|no longer){_E}", _I)
# Denials of a narrower reach, to the next comma only ("Absent P waves, atrial fibrillation" states AF;
# "I can't see P waves, atrial fibrillation" too): a leading "absent" / "unlikely" / "lack of" (right after a word
# they are that word's: "ST elevation absent in the inferior leads, T wave inversion", NEGATION_AFTER),
# contractions ("isn't", "don't"; "can't rule out" is a hedge), criteria not met, artifact that looks like a
# rhythm, what a new rhythm replaced, and the negations of German, French and Chinese answers around English
# codes ("kein AF", "pas de AF", "没有 AF"; not Spanish "sin", which is also short for "sinus").
NEGATION_TO_COMMA = re.compile(
    rf"{_W}(?:(?<![A-Za-z] )(?<!\()(?:absent|unlikely|resolved)"
    r"|unlikely (?:(?:due|related|secondary) to|caused by)|lack of|[a-z]+n['\u2019]t"
    r"|fails? to meet(?: the)? criteria (?:for|of)|insufficient(?: voltage)? criteria (?:for|of)"
    r"|nothing (?:to suggest|suggest(?:s|ing|ive of))"
    r"|art[ie]fact\w*[\s,]+(?:(?:that|which)\s+)?(?:(?:may|can|could|might)\s+)?(?:simulat|mimick?|resembl)\w*"
    rf"|(?:has |have )?replaced(?!\s+by)|kein(?:e|en|er)?|ohne|nicht|pas de|aucune?){_E}"
    r"|\u6ca1\u6709|\u65e0|\u672a\u89c1", _I)
COMMA = re.compile(r"[,\uff0c]")
# Negation words that deny nothing after them: "not only", "no significant change", "no prior ECG available".
PSEUDO_NEGATION = re.compile(
    rf"{_W}(?:not only|not necessarily|no (?:significant |interval )?changes?"
    rf"|(?:(?:in the )?absence of|no|without|lack of) (?:an? |any )?(?:{_EARLIER}|comparison) {_TRACING}){_E}", _I)
# A negation spent on something that is no statement does not reach past these: "No P waves, consistent with
# atrial fibrillation" states AF (where "No ST elevation consistent with STEMI" still denies both).
SCOPE_BREAK = re.compile(
    rf"{_W}(?:consistent with|compatible with|in keeping with|suggest(?:s|ive of|ing)|indicat(?:es|ive of|ing)"
    rf"|diagnostic of|typical of|characteristic of|due to){_E}", _I)
# what a negation says of itself alone: "not, by itself, diagnostic of ischemia" denies ischemia, no break between
# ("It is not, consistent with AF": a comma alone is a break)
ABOUT_ITSELF = re.compile(r"[\s,]*(?:(?:by|in|of) (?:it|them)sel(?:f|ves)|on (?:its|their) own|alone|per se)[\s,]*",
                          _I)
UNSURE = (r"(?:(?:cannot|can't|can not|could not|couldn't|does not|doesn't|did not|do not|unable to) (?:be )?"
          r"(?:ruled out|rule out|excluded?)|not (?:be )?(?:ruled out|excluded))")
HEDGE_BEFORE = re.compile(
    rf"{_W}(?:{UNSURE}|possibl[ey]|probabl[ey]|prob|poss|likely|suspected|suspicious (?:for|of)|concerning for"
    r"|worrisome for|possibility of"
    r"|suggest(?:s|ive of|ing)?|consider|questionable|borderline|equivocal|uncertain(?: whether| if)?"
    r"|may (?:be|represent|indicate|reflect)|might|could (?:be|represent)|doubtful|query"
    r"|differential(?: diagnosis)?(?: includes?| of)?|(?:can|may|could) (?:mimic|mask|obscure)(?: or (?:mimic|mask"
    r"|obscure))?|rule out|r/o|(?:to )?exclude|evaluate for|assess for|(?:evaluation|assessment) (?:for|of)"
    r"|(?:cannot|can't|can not|could not|unable to) (?:confirm|determine|assess|diagnose)(?: with certainty)?"
    r"(?: whether| if)?|correlate(?: clinically)? (?:for|with)"
    r"|clinical correlation (?:for|with)|(?:cannot|can't|can not|unable to) (?:distinguish|differentiate)"
    rf"(?: between)?|(?:minimal |borderline |isolated )?voltage criteria (?:for|of)){_E}", _I)
# What an earlier tracing showed is not this one ("Prior ECG showed atrial fibrillation. Now sinus rhythm."), to
# the next comma ("Previous ECG with sinus rhythm, now atrial fibrillation" and "Compared with the prior ECG with
# sinus rhythm, AF is new" state AF).
EARLIER_TRACING_BEFORE = re.compile(
    rf"{_W}{_EARLIER} {_TRACING} (?:showed|shows?|demonstrated|revealed|had|with){_E}", _I)

# --- right before a mention (the text since the previous mention) --------------------------------------------
# A history is not the tracing ("history of AF, now in sinus rhythm" states SR); it governs the statement right
# after it, and those joined to that one by "and" / "or".
HISTORY_OF = re.compile(
    rf"(?:{_W}(?:a |past |prior )?history of|{_W}hx of|{_W}h/o)\s+(?:[A-Za-z-]+\s+){{0,2}}$", _I)
# The far side of a differential whose near side is no statement of the vocabulary, or words away: "Pericarditis
# vs STEMI", "SVT with aberrancy vs ventricular tachycardia", "RBBB or IVCD".
# "LBBB fits better than RBBB", "... better than C (RBBB)", "... than inferior STEMI", "a better fit than RBBB",
# "more consistent with LBBB than RBBB", "LBBB is favoured over RBBB": what fits less is possible, not the rest of
# the clause ("less likely than" turns it round: not here)
_OVER = r"\s+(?:\(?(?-i:[A-H])\)\s*|(?-i:[A-H])\s+\(|(?:[\w-]+\s+){1,2})?"  # an option's letter, or two words
ALTERNATIVE_BEFORE = re.compile(
    rf"(?:{_W}(?:vs\.?|versus)\s+(?:[\w-]+\s+){{0,3}}|(?:^|[\s,]){_W}or\s+"
    rf"|{_W}better(?:\s+[\w-]+)?\s+than{_OVER}|{_W}(?:favou?red|preferred)\s+over{_OVER})$", _I)
# "more consistent with LBBB than RBBB": its "more" before the statement the clause prefers (matched over the clause,
# the "than" after that statement: extract._judge_clause)
MORE_THAN = re.compile(  # a fit, not a count ("more PVCs than PACs": both there)
    rf"{_W}more\s+(?:consistent|likely|suggestive|in keeping|compatible|typical|characteristic|indicative|like)"
    rf"{_E}[^.;:\n]{{0,60}}?\s(?P<than>than){_OVER}$", _I)

# --- a multiple-choice answer that repeats its options -----------------------------------------------------------
# "Options: A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter. Answer: B": the options are no statements; the
# chosen one is. An option is a capital A-H marked "A.", "A)", "A:" or "(A)" before a space ("a)" and "(a)" too: no
# article), or bare before its option in brackets ("A (AF)", only after "Options:", "The options are" or a question;
# "A (lead II)" is a panel); a list is a run of them in alphabetical order from A, each at most OPTION_CHARS from the
# last, so "Type A. ..." or "Vitamin B" alone is none; and it is a list of options only where the text says so: an
# options cue right before it ("Options:", "Choose from") or an answer's cue (CHOSEN) outside it. "Findings:\nA. Sinus
# rhythm.\nB. LBBB." is a report's list.
OPTION_MARK = re.compile(  # "A：" needs no space
    r"(?<![A-Za-z0-9])(?:\(([A-Ha-h])\)(?=\s)|([A-H])(?:[.):](?=\s)|\uff1a"
    r"|(?=[ \t]\((?!(?i:leads?|panels?|strips?|fig\w*|image|page)\b)[^()\n]{1,60}\)))|([a-h])\)(?=\s))")
OPTION_CHARS = 160
# the cue right before a list (within OPTIONS_CUE_CHARS): "Options:", "The options are:", "Which of the following
# is shown?", "Choose from", and the word in German, Spanish, French and Chinese answers
OPTIONS_CUE = re.compile(
    rf"(?:{_W}(?<!correct )(?<!right )(?<!true )(?<!best )"  # "The correct options are A (SR) and B (LVH)": chosen
    rf"(?:options?(?:\s+(?:are|were))?|choices?(?:\s+(?:are|were))?"
    rf"|(?:choose|select|pick)(?: from| one| the (?:best|correct|right|most likely) (?:answer|option|choice))?"
    rf"|candidates?|optionen|opciones|possibilit\w+)|\u9009\u9879|which of the following[^.\n]{{0,60}}\?)"
    rf"\W{{0,6}}$", _I)
# any other question right before a list ("What is the rhythm? A (AF), B (SR). Answer: B."): a cue only where a
# letter of the list is chosen ("What are the findings? A. SR B. LVH" is a report's list)
QUESTION_CUE = re.compile(rf"{_W}(?:what|which)\s[^.?\n]{{0,60}}\?\W{{0,6}}$", _I)
OPTIONS_CUE_CHARS = 100
# where the last option ends: a line break, a semicolon, a sentence's end, or the answer's cue
OPTION_END = re.compile(
    r"\n|;|(?<=[^\s.])\.(?=\s)|(?=(?:the )?(?:correct |right |best )?(?:answers?|choice|option)\b)", _I)
COLON = re.compile(r"(?<!\d)[:\uff1a](?!\d)")  # not a ratio's: "flutter with 2:1 block"
# "A) Sinus rhythm: incorrect": a verdict on the option after its colon, not a report's section
VERDICT_COLON = re.compile(r"[:\uff1a][ \t]*(?:correct|incorrect|wrong|right|yes|no|true|false)(?![A-Za-z])", _I)
DENYING_VERDICT = re.compile(r"[:\uff1a][ \t]*(?:incorrect|wrong|no|false)(?![A-Za-z])", _I)
# the words of options judged one by one ("Option A: AF - incorrect")
VERDICT_WORD = re.compile(r"(?<![A-Za-z])(?:(?:in)?correct|wrong|right|yes|no|true|false)(?![A-Za-z])", _I)
# The choice: "Answer: B", "The answer is (b)", "the correct option is B", "Answers: B, D", "Answer: B and C",
# "My answer would be B", "The correct choices are B and D", "I choose B", "Correct: B", "Antwort: B", "B is the
# correct answer". A lower-case letter only where it cannot be the article "a" or a word's first letter: in
# parentheses, or before "." / ")" / the end ("The answer is a fast rhythm" chooses nothing). "Options: A. ..." opens
# a list: the plural of option and choice is no answer's cue.
_LETTER = r"(?:\([A-Ha-h]\)|(?-i:[A-H])(?![A-Za-z0-9])|(?-i:[a-h])(?=[.)]|\s*$))"
CHOSEN = re.compile(
    rf"(?:{_W}(?:answers?(?:\s+would\s+be)?|choice|option|correct(?:\s+(?:choices|options))?"
    rf"|(?:choose|chose|select|pick)|antwort|respuesta|r\u00e9ponse)|\u7b54\u6848)(?:\s+(?:is|are))?[*_]{{0,2}}\s*"
    rf"[:\uff1a]?[*_]{{0,2}}\s*[*_]{{0,2}}"
    rf"({_LETTER}(?:[*_]{{0,2}}\s*(?:,|and|&|/|or)\s*[*_]{{0,2}}{_LETTER})*)", _I)
# an answer is spoken of, letter or not ("The answer is a fast irregular rhythm, so B."): a lettered list beside it
# is the question's options ("Please answer a few questions" is no such thing)
ANSWER_SPOKEN = re.compile(rf"{_W}(?:the\s+(?:(?:correct|right|best|final)\s+)?answer\b|answers?\s*[:\uff1a])", _I)
CHOSEN_BEFORE = re.compile(  # "**(B)** is correct" too
    r"(?<![A-Za-z0-9])[*_]{0,2}\(?([A-H])\)?[*_]{0,2}\s+is\s+(?:the\s+)?(?:correct|right|best)\b")
CHOSEN_LETTER = re.compile(r"(?<![A-Za-z])[A-Ha-h](?![A-Za-z0-9])")

# --- right after a mention (its gap: up to the next mention or the clause's end) ------------------------------
# Up to four words between a statement and what follows it: "AF and flutter are absent" must deny AF even where
# "flutter" alone is no statement of the vocabulary. The price: "AF, P waves are absent" drops AF too (a missed
# statement is the smaller harm, as for the negation's reach).
_FILLER = r"^[\s,()]*(?:[\w/+:-]+[\s,()]+){0,4}?"  # "ST elevation (absent)" too
_VERB = r"(?:(?:is|are|was|were|has been|have been|appears?|seems?)\s+)?"
# ("absent" before a noun is that noun's: "Atrial fibrillation, absent P waves" states AF; "ST elevation absent in
# the inferior leads" denies STE.)
# "not seen on the prior ECG", "not present in the 2019 ECG", "not seen on the ECG from yesterday", "not seen
# previously": new, not denied (where "not seen on the ECG" or "on this tracing" denies)
_DATED = r"(?:\d{4}|\d{1,2}[/.-]\d{1,2}(?:[/.-]\d{2,4})?)"
_NEW = (rf"(?![\s,]+(?:(?:on|in|from|compared (?:to|with)) (?:the |an? )?(?:(?:[\w-]+\s+){{0,2}}?{_EARLIER}{_E}"
        rf"|{_DATED}\s+{_TRACING}|{_TRACING}\s+(?:from|of|dated|on)\s+(?!this|today)\w)"
        rf"|(?:previously|before|earlier){_E}))")
# "RBBB does not fit because ...", "LVH does not fit;": the finding denied, at its clause's end or before the
# reason; "which does not fit the clinical picture", "does not fit a single territory" keep it (present but odd)
_FIT = (r"(?:(?<!which )(?<!that )(?:(?:does|do|did|would) not|doesn't|don't|didn't|wouldn't)(?: really| quite)? fit"
        r"(?:\s+(?:either|at all|well))?(?=\s*(?:[.;,:!?()]|$"
        r"|(?:because|as|since|here|given|the (?:tracing|ECG|rate))(?![A-Za-z]))))")
# "LBBB is present but AF is not.": the verb alone, right after its statement and at its clause's end (never after
# other words: "the rate is not" is the rate's, "is not, however, excluded" goes on)
_ARE_NOT = r"(?<!which )(?<!that )(?:(?:is|are)(?: also)? not|isn't|aren't)"
_IS_NOT = rf"(?:{_ARE_NOT}(?=\s*(?:[.;!?)]|$|(?:either|too)(?![A-Za-z]))))"
# ... or before what the statement is not: "AF is not the rhythm here", "SR is not the correct answer, AF is"; the
# rhythm only where the statement is a whole tracing's rhythm (NOT_THE_RHYTHM: "the PVCs are not the underlying
# rhythm" and "bigeminy is not the underlying rhythm" are present)
_WHAT_NOT = (r"(?:the\s+)?(?:(?:correct|right|best|final|underlying|primary|main)\s+)?"
             r"(?:diagnos[ie]s|answers?|options?|choices?{})(?=\s*(?:[.,;!?)]|$"
             r"|(?:here|on this|in this|given|because|since|as|either|too|as well|seen|shown|present)(?![A-Za-z])))")
_NOT_THE = rf"(?:{_ARE_NOT} {_WHAT_NOT.format('')})"
_NOT_THE_OR_RHYTHM = rf"(?:{_ARE_NOT} {_WHAT_NOT.format('|rhythm')})"
_NEGATED = (
    r"(?:not (?:seen|present|identified|observed|evident|detected|noted|found|visible|apparent|supported"
    r"|shown|demonstrated|correct)|no longer (?:seen|present|evident|visible)"
    rf"|absent(?!\s+(?!(?:in|on|from|at|throughout)\b)[A-Za-z])|ruled out|excluded|resolved|incorrect|wrong|{_FIT}"
    r"|cannot be (?:reliably |confidently |definitely )?(?:diagnosed|confirmed|determined)"
    r"|unlikely|would not (?:explain|account for|cause|produce)"  # a hypothetical: "LBBB would not explain ..."
    r"|criteria (?:are |were )?not (?:met|fulfilled)|(?:(?:likely|probably) )?(?:due to|caused by|secondary to)"
    rf" (?:[\w-]+\s+){{0,2}}?art[ie]fact\w*|art[ie]factual){_E}{_NEW}")
NEGATION_AFTER = re.compile(rf"{_FILLER}{_VERB}{_NEGATED}", _I)
# The negation right after its statement, no comma or other word between ("LVH unlikely given LBBB", "AF excluded
# because of ..."): that statement's whatever follows; after a comma it may open the next ("Sinus rhythm, unlikely
# MI": MI's, wording.NEGATION_TO_COMMA). "C (RBBB) is not" too.
# a verdict after a dash or a comma: "Option A: AF - no", "AF, false"; never "- no LVH", which denies LVH (the
# statement's own only where more than the next statement follows: extract._own_negation)
_DASH_NO = (r"(?:[ \t]+[-\u2013\u2014]|[ \t]*,)[ \t]*(?:no|none|nil|negative|false|incorrect|wrong)"
            r"(?=[ \t]*(?:[.;,!\n]|$))")
DASH_NO = re.compile(rf"^\)?{_DASH_NO}", _I)
NEGATION_RIGHT_AFTER = re.compile(rf"^\)?(?:[ \t]+(?:{_VERB}{_NEGATED}|{_IS_NOT}|{_NOT_THE})|{_DASH_NO})", _I)
NOT_THE_RHYTHM = re.compile(rf"^\)?(?:[ \t]+(?:{_VERB}{_NEGATED}|{_IS_NOT}|{_NOT_THE_OR_RHYTHM})|{_DASH_NO})", _I)
NOT_THE = re.compile(rf"^\)?[ \t]+{_NOT_THE_OR_RHYTHM}", _I)  # its words alone
# "SR is not the main finding, LVH is": present, not the main one; the "not" is its own, and reaches no further
NOT_THE_MAIN = re.compile(rf"^\)?[ \t]+{_ARE_NOT} (?:the|its) (?:main|primary|only|dominant|major|key|principal)"
                          r" (?:findings?|abnormalit(?:y|ies)|issues?|problems?|features?)(?![A-Za-z])", _I)
# "RBBB, and LBBB is not the diagnosis": one statement is not it (the verb's number), the list is not carried back
SINGLE_NOT_THE = re.compile(r"\)?[ \t]+(?:is not|isn't) the\b", _I)  # matched at the statement's end
# A negation that denies both its sides: "AF unlikely to be present", "ST elevation unlikely to be STEMI", "VT
# unlikely due to RBBB morphology", "ST depression unlikely due to ischemia": which side it means is not in the
# words, and stating either side the text may deny is the worse error (an omission is the lesser)
# ("AF unlikely to be present, sinus rhythm": the subject's own, so its reach ends there)
BOTH_SIDES = re.compile(r"unlikely\s+(?:to\s+(?:be|represent)(?!\s+(?:present|seen|evident|identified|noted)\b)"
                        r"|(?:due|related|secondary)\s+to|caused\s+by)\b", _I)
HEDGE_AFTER = re.compile(
    rf"{_FILLER}{_VERB}(?:{UNSURE}|possible|suspected|likely|questionable|not certain|uncertain|doubtful"
    r"|(?:may|might) be (?:present|seen)|a consideration|(?:a )?normal variant)(?![A-Za-z])", _I)
# "treated as VT until proven otherwise": presumed, so possible; the statement's own, never its list's ("AF and LBBB,
# VT until proven otherwise" states AF and LBBB)
PRESUMED_AFTER = re.compile(r"^[\s,]*(?:\([A-H]\)[\s,]*)?(?:(?:is|are|was|were)\s+)?(?:presumed\s+)?until prove[nd] "
                            r"otherwise(?![A-Za-z])", _I)
# What a finding became or gave way to is what the tracing shows: "AF converted to sinus rhythm" states SR only;
# and a finding seen on an earlier tracing ("AF on prior ECG; now sinus rhythm") is not this one (where "present
# on the previous ECG" or "as on the prior ECG" says it persists).
GONE_AFTER = re.compile(
    rf"^[\s,]*(?:(?:has |have |had )?(?:converted|reverted|changed) (?:back )?to|(?:has been |was |is )?replaced by"
    rf"|(?:(?:was|were|is) )?(?:(?:seen|noted) |(?<=was )present |(?<=were )present )?(?:on|in) (?:the |an? )?"
    rf"{_EARLIER}"
    rf" {_TRACING}){_E}", _I)
# "ST elevation: none", "- Atrial fibrillation: absent": a report's field and a value that denies it whole, and ends
# there ("Atrial fibrillation: no RVR", "Inferior MI: negative T waves in III" state theirs)
DENIED_AFTER_COLON = re.compile(
    r"^[ \t]*[:\uff1a][ \t]*(?:none|absent|no|nil|negative|not (?:present|seen|identified|detected|found|evident))"
    r"[ \t]*(?:[.;,!\n\u3002\uff0c\uff1b]|$)", _I)
# the verb right before the next statement (at most two words between, none of the noun's: "are", "include",
# "due to", "with"): "LBBB mimics anterior MI", "LBBB may mimic an MI", "LBBB mimic of STEMI" state LBBB; what is
# mimicked is possible at most ("LBBB, which can mimic or mask MI")
_NOUN_NEXT = (r"(?:are|is|was|were|include[sd]?|including|such|due|caused|secondary|with|from|rather|in|on|like"
              r"|pattern|seen)")
_MIMICS = (rf"mimic(?:s|ked|king)?\s+(?:of\s+|or\s+mask\s+)?(?!(?:{_NOUN_NEXT}|by)\b)(?:[A-Za-z-]+\s+){{0,2}}"
           r"(?:[A-Za-z-]+,?\s+(?:including|such as|like)\s+)?$")  # "mimics many conditions, including MI"
# "STEMI mimic", "LBBB mimicker", "a STEMI mimic in this patient", "STEMI mimics are LBBB and LVH": the noun, a
# mimic of the statement, names what it is not; "LBBB mimic of STEMI" names what is (and "mimicking" is the verb)
# "mimics" is the noun only before the noun's words or the clause's end ("STEMI mimics are ..."); "LBBB mimics
# acute coronary syndrome" is the verb
MIMIC = re.compile(
    rf"^[\s-]*(?:mimic(?:kers?)?(?![A-Za-z])(?!\s+of\b)|mimics(?=[\s,;)]*(?:$|(?:{_NOUN_NEXT})\b)))", _I)
MIMIC_VERB = re.compile(rf"^[\s-]*(?:(?:may|can|could|might)\s+)?{_MIMICS}", _I)
MIMICKED_BEFORE = re.compile(rf"(?<![A-Za-z]){_MIMICS}", _I)
# the passive: "MI mimicked by LBBB", "AF may be mimicked by artifact": the subject is possible at most
MIMICKED_BY = re.compile(r"^[\s,-]*(?:(?:is|was|are|were|being|(?:may|can|could|might)\s+be)\s+)?mimicked\s+by\b",
                         _I)
# "?LVH", "NSR, ? WPW", "? anterior STEMI": a query of what follows
QUERIED = re.compile(r"(?:\?|(?:^|[\s,;(])\?[ \t]*(?:[A-Za-z-]+[ \t]+){0,2})$")
# the gap inside a list: "AF and flutter are absent", "LBBB and RBBB cannot be excluded"
CONJUNCTION = re.compile(r"^[\s,/]*(?:(?:and|or|nor|and/or)[\s,]*)?$", _I)
# the gap inside a list of lettered options: "A (AF), B (flutter), and D (JR) are incorrect", "(A) AF, (B) LBBB and
# (D) RBBB are wrong": the letters are the list's, not words that would end it (capitals A-H only, never "a")
# ("A (SR), B (AF), C (flutter) and D (LBBB) are incorrect": an option outside the vocabulary is skipped whole)
LETTERED_GAP = re.compile(r"^[\s,)]*(?:(?-i:[A-H])[ \t]*\([^()]{1,40}\)[\s,]+)*(?:(?:and|or|nor|and/or)\s+)?"
                          r"(?-i:\(([A-H])\)|([A-H])\)?)[ \t]*\(?[ \t]*$", _I)
# the letter marking the first option of such a list, right before it: "A (AF)", "(A) AF"
LETTERED_BEFORE = re.compile(r"(?<![A-Za-z0-9])(?:\(([A-H])\)|([A-H])\)?)[ \t]*\(?[ \t]*$")
# the same, with its word: a history reaches along "MI and AF", not along a bare comma
JOINED = re.compile(r"^[\s,]*(?:and|or|and/or)[\s,]*$", _I)
# "AF vs flutter", "Sinus rhythm or ectopic atrial rhythm", "SVT with aberrancy vs VT": a differential; neither
# side is stated ("one or more PVCs" is no differential)
ALTERNATIVE_AFTER = re.compile(
    rf"^[\s,]*(?:(?:[\w-]+\s+){{0,3}}?(?:vs\.?|versus){_E}|or\s+(?!(?:more|less|greater|fewer|so){_E})(?=[A-Za-z]|$))",
    _I)
# the options cue that is only an option's own label ("Option A: ..."), no list's
OPTION_LABEL = re.compile(r"\W*(?:option|choice)\W*", _I)
# a denial after a statement that is its "does not fit" / "is not": the statement's own (extract._along_lists)
FIT_AFTER = re.compile(rf"^\)?[ \t]+(?:{_VERB}{_FIT}|{_IS_NOT}|{_NOT_THE_OR_RHYTHM})", _I)
