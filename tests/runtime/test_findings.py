"""Findings: statements of a generated answer mapped to the vocabulary, never one the text denies."""

from __future__ import annotations

import pytest

from pulse_edge.benchmarks.ecgbench import parse
from pulse_edge.runtime.findings import CONCEPTS, LABEL_SPACES, extract_findings, labels_in


def found(text: str) -> dict[str, str]:
    """{concept key: certainty} of the findings in `text`."""
    return {f.code: f.certainty for f in extract_findings(text)}


@pytest.mark.parametrize("text", [
    "no atrial fibrillation",
    "No atrial fibrillation.",
    "There is no evidence of atrial fibrillation or flutter.",
    "Sinus rhythm without AF.",
    "Atrial fibrillation is absent.",
    "AF was ruled out.",
    "AF and atrial flutter are not seen.",
    "Negative for atrial fibrillation.",
    "This is not atrial fibrillation.",
    "Is there atrial fibrillation?",
])
def test_denied_or_asked_statements_are_never_findings(text: str) -> None:
    assert "AFIB" not in found(text) and "AFLT" not in found(text)


def test_negation_ends_with_its_clause_and_does_not_reach_back() -> None:
    assert found("Sinus rhythm. No atrial fibrillation; LBBB.") == {"SR": "stated", "LBBB": "stated"}
    assert found("Atrial fibrillation without rapid ventricular response.") == {"AFIB": "stated"}
    assert found("No ST elevation, but left bundle branch block.") == {"LBBB": "stated"}
    # commas do not end a negation: a missed statement is a smaller harm than an invented one
    assert found("No ST elevation, left axis deviation.") == {}
    # "no change" denies nothing
    assert found("No significant change compared with prior: LBBB persists.") == {"LBBB": "stated"}


def test_hedges_are_kept_as_possible() -> None:
    assert found("Possible left ventricular hypertrophy.") == {"LVH": "possible"}
    assert found("Inferior infarct cannot be excluded.") == {"MI": "possible"}
    assert found("MI not excluded") == {"MI": "possible"}
    assert found("Cannot rule out AF; sinus tachycardia.") == {"AFIB": "possible", "STACH": "stated"}
    assert found("possible AF. Atrial fibrillation confirmed in V1.")["AFIB"] == "stated"  # a stated mention wins


def _coded(text: str) -> list[tuple[str, str]]:
    return [(f.code, f.certainty) for f in extract_findings(text)]


@pytest.mark.parametrize(("text", "expected"), [
    # a differential states neither
    ("Atrial fibrillation vs atrial flutter.", [("AFIB", "possible"), ("AFLT", "possible")]),
    ("Atrial fibrillation vs. atrial flutter.", [("AFIB", "possible"), ("AFLT", "possible")]),  # the dot ends nothing
    ("ST elevation in lead I. Atrial fibrillation is absent.", [("STE", "stated")]),  # "I." still ends a sentence
    ("No ST elevation in lead i. Atrial fibrillation.", [("AFIB", "stated")]),  # nor does a lone lowercase "i."
    ("Atrial flutter or atrial fibrillation.", [("AFLT", "possible"), ("AFIB", "possible")]),
    ("Differential includes atrial flutter.", [("AFLT", "possible")]),
    # a history is not the tracing; what it shows now is
    ("History of atrial fibrillation, now in sinus rhythm.", [("SR", "stated")]),
    ("History of hypertension, sinus rhythm with LVH.", [("SR", "stated"), ("LVH", "stated")]),
    ("Known LBBB.", [("LBBB", "stated")]),  # a documented finding that is still there
    # a question is a question; "?" glued to a word queries that word only
    ("Does the ECG show LBBB? No, it shows sinus rhythm.", [("SR", "stated")]),
    ("Is this atrial fibrillation? The rhythm is sinus.", []),
    ("?LVH, RBBB", [("LVH", "possible"), ("RBBB", "stated")]),
    # a negation or hedge after a statement stays its own past further words, and is spent on it (its "not"
    # denied SR and the PACs past the comma too)
    ("Atrial fibrillation not present on this tracing, sinus rhythm with PACs.", [("SR", "stated"), ("PAC", "stated")]),
    # right after its statement, a negation is that statement's whatever follows; after a comma it opens the next
    ("LVH unlikely given LBBB", [("LBBB", "stated")]),
    ("Atrial fibrillation excluded given sinus rhythm.", [("SR", "stated")]),
    ("Sinus rhythm, unlikely MI.", [("SR", "stated")]),
    # "unlikely to be", "unlikely due to" deny both sides: which one is meant is not in the words ("AF unlikely to be
    # present", "ST elevation unlikely to be STEMI"), and stating a side the text denies is the worse error
    ("ST elevation unlikely to be STEMI.", []), ("AF unlikely to be present.", []),
    ("ST elevation unlikely to represent acute MI.", []), ("Ischemia is unlikely to be the cause.", []),
    ("ST depression unlikely due to ischemia.", []), ("VT unlikely due to typical RBBB morphology.", []),
    ("MI unlikely due to absence of Q waves.", []),
    ("AF unlikely due to regular rhythm, sinus rhythm with PACs.", [("SR", "stated"), ("PAC", "stated")]),
    ("ST depression unlikely due to ischemia, likely LVH strain.", [("LVH", "possible")]),
    # a scope break right at a denial's end is the denial's own words ("not consistent with", "unlikely due to")
    ("ST depression, unlikely due to ischemia.", [("STD", "stated")]),
    ("Findings not consistent with acute MI.", []), ("Sinus tachycardia unlikely to be due to AF.", []),
    # "unlikely to be present" is its subject's own; a relation denied does not reach back across a comma
    ("AF unlikely to be present, sinus rhythm.", [("SR", "stated")]),
    ("Left bundle branch block, ST elevation unlikely to represent acute MI.", [("LBBB", "stated")]),
    # a list denied by "unlikely to be ..." is denied whole; the verb "mimics" with a non-finding object
    ("Atrial fibrillation, atrial flutter unlikely to be the diagnosis given sinus rhythm.", []),
    ("LBBB mimics acute coronary syndrome.", [("LBBB", "stated")]), ("WPW mimics hypertrophy.", [("WPW", "stated")]),
    ("LBBB mimics many conditions, including MI.", [("LBBB", "stated"), ("MI", "possible")]),
    # a bracketed option ruled out; "resolved" before its finding
    ("The answer is C (LBBB); A (AF) is unlikely to be correct.", [("LBBB", "stated")]),
    ("Resolved LBBB, now normal conduction, sinus rhythm.", [("SR", "stated")]),
    # a fifth review: a spaced "?" queries what follows; "prob", "poss"; a ratio inside the filler; options ruled
    # out as incorrect; what an earlier tracing showed and is no longer seen
    ("SR, ? LVH.", [("SR", "stated"), ("LVH", "possible")]), ("? anterior STEMI", [("MI", "possible")]),
    ("Is there AF ? No.", []), ("Prob LVH.", [("LVH", "possible")]),
    ("Atrial flutter with 2:1 block cannot be excluded.", [("AFLT", "possible")]),
    ("Option A, right bundle branch block, is incorrect.", []),
    ("The findings argue against left bundle branch block.", []),
    ("LBBB was present on the previous ECG but is no longer seen.", []),
    ("I cannot determine with certainty whether there is LVH.", [("LVH", "possible")]),
    # a lettered options list ruled out whole (the letters and brackets are the list's, not words that end it); "does
    # not fit" denies; "until proven otherwise" presumes
    ("Options A (atrial fibrillation), B (atrial flutter), and D (junctional rhythm) are incorrect.", []),
    ("(A) atrial fibrillation, (B) atrial flutter, and (D) LBBB are wrong.", []),
    ("Answer: C. A (AF), B (LBBB) and D (RBBB) are incorrect.", []),
    ("A (sinus rhythm), B (LBBB) are correct.", [("SR", "stated"), ("LBBB", "stated")]),
    ("RBBB does not fit because the QRS is narrow.", []), ("LVH does not fit; sinus rhythm.", [("SR", "stated")]),
    ("Wide complex tachycardia, treated as VT until proven otherwise.", [("VTACH", "possible")]),
    ("Flutter and AF do not fit.", []), ("AF didn't fit.", []), ("RBBB doesn't fit here.", []),
    # ... but "does not fit" in a relative clause or before what it does not fit keeps the finding: present, if odd
    # (a review of the first version: 18 findings dropped, and "do not fit ischemia" stated ischemia)
    ("Sinus tachycardia, which does not fit the clinical picture.", [("STACH", "stated")]),
    ("ST elevation that does not fit a single coronary territory.", [("STE", "stated")]),
    ("T wave inversions do not fit ischemia.", [("TINV", "stated")]),
    ("Sinus rhythm with LBBB, which does not fit the prior ECG that showed RBBB.", [("SR", "stated"),
                                                                                  ("LBBB", "stated")]),
    # a presumption is its own statement's, not its list's
    ("AF and LBBB, VT until proven otherwise.", [("AFIB", "stated"), ("LBBB", "stated"), ("VTACH", "possible")]),
    ("VT is presumed until proven otherwise.", [("VTACH", "possible")]), ("VT until proved otherwise.",
                                                                          [("VTACH", "possible")]),
    ("The answer is VT (A), until proven otherwise; LBBB morphology.", [("VTACH", "possible"), ("LBBB", "stated")]),
    # a second review: "does not fit" at the end of a comma list is its last statement's; "either", "really";
    # "is not" at its clause's end denies
    ("Sinus rhythm, LVH, LBBB doesn't fit.", [("SR", "stated"), ("LVH", "stated")]),
    ("LVH does not fit either.", []), ("Atrial fibrillation does not really fit.", []),
    ("LBBB is present but AF is not.", [("LBBB", "stated")]),
    ("The rhythm is not AF.", []),
    # a third review: "is not" denies only right after its statement and at its clause's end
    ("Sinus rhythm is not atrial fibrillation.", [("SR", "stated")]), ("LBBB is not RBBB.", [("LBBB", "stated")]),
    ("Sinus rhythm, LVH, LBBB is not.", [("SR", "stated"), ("LVH", "stated")]),
    ("The rhythm is atrial fibrillation and the rate is not.", [("AFIB", "stated")]),
    ("Sinus rhythm is not, however, entirely normal; LVH.", [("SR", "stated"), ("LVH", "stated")]),
    ("Atrial fibrillation and B (LBBB) are present; C (RBBB) is not.", [("AFIB", "stated"), ("LBBB", "stated")]),
    # a lettered list is options in order, none chosen before them in the sentence, capitals only, nothing else
    # between them
    ("Answer: B (sinus rhythm), C (atrial fibrillation) is incorrect.", [("SR", "stated")]),
    ("Correct: A (sinus rhythm) and B (LVH), C (atrial fibrillation) is incorrect.", [("SR", "stated"),
                                                                                     ("LVH", "stated")]),
    ("C (sinus rhythm), A (AF) and B (flutter) are incorrect.", [("SR", "stated")]),
    # options marked "A (AF)" after "Options:" or a question: the chosen one only; without the cue's colon such
    # letters are a list judged together (above), never options to drop
    ("Options: A (AF), B (LBBB), C (RBBB). Answer: C.", [("RBBB", "stated")]),
    ("Which of the following is shown? A (AF), B (sinus rhythm), C (LBBB). Answer: B", [("SR", "stated")]),
    ("The correct options are A (sinus rhythm) and B (LVH), while C (atrial fibrillation) is incorrect.",
     [("SR", "stated"), ("LVH", "stated")]),
    ("Options A (SR), B (LBBB), and D (RBBB) are incorrect; the answer is C (atrial fibrillation).",
     [("AFIB", "stated")]),
    # "is not" before what the statement is not: denied, and spent on it
    ("AF is not the rhythm here; sinus rhythm.", [("SR", "stated")]),
    ("Atrial fibrillation is not the correct answer, sinus rhythm is.", [("SR", "stated")]),
    ("AF is not the only finding; LBBB.", [("AFIB", "stated"), ("LBBB", "stated")]),
    ("LBBB is not the cause of the ST changes.", [("LBBB", "stated")]),
    # a negation of a sign "by itself" still reaches what it is not diagnostic of
    ("Q wave in III, which is not, by itself, diagnostic of ischemia.", []),
    ("T wave inversion is not by itself diagnostic of ischemia.", [("TINV", "stated")]),
    ("LBBB fits better than RBBB.", [("LBBB", "stated"), ("RBBB", "possible")]),
    # a review of those rules: each "is not" spent on its own statement, "not, consistent with" still a break, a
    # list not carried back over one statement's "is not the", what runs over a rhythm never "not the rhythm", the
    # comparison and "by itself" reaching one statement only, a ratio's colon no section's
    ("AF is not the rhythm, and LBBB is not the answer either.", []),
    ("AF is not the correct answer, and LBBB isn't either.", []),
    ("AF is not the rhythm, and LBBB is not supported.", []),
    ("AF is not the correct option; sinus rhythm.", [("SR", "stated")]),
    # a hypothetical denies: "would not explain / fit"
    ("AF is not the rhythm, and LBBB would not explain the narrow QRS.", []),
    ("Sinus rhythm, LBBB would not fit.", [("SR", "stated")]),
    ("AF and LBBB are not the correct answers.", []),
    ("RBBB is not the primary diagnosis, LBBB is.", [("LBBB", "stated")]),
    ("Is the rhythm regular? It is not, consistent with atrial fibrillation.", [("AFIB", "stated")]),
    ("The ECG shows RBBB, and LBBB is not the diagnosis.", [("RBBB", "stated")]),
    ("Ventricular bigeminy is seen; the PVCs are not the underlying rhythm, which is sinus.",
     [("BIGU", "stated"), ("PVC", "stated")]),
    ("The LBBB is not the rhythm here, just a conduction delay on top of sinus rhythm.",
     [("LBBB", "stated"), ("SR", "stated")]),
    ("Complete heart block is not the rhythm; this is Mobitz I with grouped beating.", [("2AVB", "stated")]),
    ("LBBB fits better than IVCD, with left axis deviation and LVH.",
     [("LBBB", "stated"), ("IVCD", "possible"), ("LAD", "stated"), ("LVH", "stated")]),
    ("Pericarditis fits better than inferior STEMI given diffuse ST elevation.",
     [("MI", "possible"), ("STE", "stated")]),
    ("Not by itself diagnostic of ischemia, the ST depression in V5-V6 may reflect LVH strain.",
     [("STD", "stated"), ("LVH", "possible")]),
    ("ST elevation in V1-V3 is not by itself diagnostic of anterior MI in LBBB.",
     [("STE", "stated"), ("LBBB", "stated")]),
    ("Options: A (AF with RVR), B (atrial flutter with 2:1 block), C (sinus tachycardia). Answer: B",
     [("AFLT", "stated")]),
    ("Select one: A (LVH), B (RVH), C (normal ECG). Answer: C", [("NORM", "stated")]),
    # twenty-first session: options after "The options are" or any question, a panel's letter no option, "not the
    # rhythm seen here", the other comparisons; the guards beside each are what a first version read wrong
    ("The options are A (AF), B (LBBB), C (RBBB). Answer: C.", [("RBBB", "stated")]),
    ("What is the rhythm? A (AF), B (sinus rhythm). Answer: B.", [("SR", "stated")]),
    ("Which of the following is true? A (lead II) shows sinus rhythm and B (lead V1) shows RBBB.",
     [("SR", "stated"), ("RBBB", "stated")]),
    ("The correct options are: A (sinus rhythm) and B (LVH).", [("SR", "stated"), ("LVH", "stated")]),
    ("AF is not the rhythm seen here.", []), ("Sinus rhythm is not the rhythm shown; AF is.", [("AFIB", "stated")]),
    ("The QRS is more consistent with LBBB than with RBBB.", [("LBBB", "stated"), ("RBBB", "possible")]),
    ("LBBB is favoured over RBBB.", [("LBBB", "stated"), ("RBBB", "possible")]),
    ("LVH with strain is a better fit than ischemia.", [("LVH", "stated"), ("ISC", "possible")]),
    ("LBBB fits better than RBBB and LAFB is present.", [("LBBB", "stated"), ("RBBB", "possible"),
                                                        ("LAFB", "stated")]),
    ("The rate is more than 100, consistent with sinus tachycardia.", [("STACH", "stated")]),
    ("Sinus rhythm is not the main finding, LVH is.", [("SR", "stated"), ("LVH", "stated")]),
    ("AF is not the main finding, no LVH.", [("AFIB", "stated")]),
    ("Options: a) atrial fibrillation b) atrial flutter c) sinus rhythm. Answer: c", [("SR", "stated")]),
    ("Answer: (c). Options: (a) AF (b) flutter (c) SR", [("SR", "stated")]),
    ("Findings: a) sinus rhythm b) LBBB", [("SR", "stated"), ("LBBB", "stated")]),
    ("Option A: AF - no. Option B: SR - yes.", [("SR", "stated")]), ("LBBB - no, RBBB - yes", [("RBBB", "stated")]),
    ("AF - no RVR.", [("AFIB", "stated")]),
    # the review of those rules: "- no" before the next statement is that one's, a report's "a)" list and a list
    # after a question with no choice stay stated, "true/false" verdicts, counts are no comparison, a ";" ends a list
    ("Sinus rhythm - no LVH.", [("SR", "stated")]), ("Atrial fibrillation - no LBBB, no RBBB.", [("AFIB", "stated")]),
    ("Answer: a) sinus rhythm b) left axis deviation c) LAFB", [("SR", "stated"), ("LAD", "stated"),
                                                                ("LAFB", "stated")]),
    ("What are the findings? A. Sinus rhythm B. LVH", [("SR", "stated"), ("LVH", "stated")]),
    ("What is the rhythm? A (AF) is incorrect; B (sinus rhythm) is correct.", [("SR", "stated")]),
    ("Option A: AF - false. Option B: sinus rhythm - true.", [("SR", "stated")]),
    ("Option A: sinus rhythm, yes. Option B: AF, no.", [("SR", "stated")]),
    ("There are more PVCs than PACs.", [("PVC", "stated"), ("PAC", "stated")]),
    ("The options are a) LBBB, b) RBBB, c) IVCD; RBBB is present.", [("RBBB", "stated")]),
    ("The QRS is more consistent with LBBB than RBBB and LAFB is also present.",
     [("LBBB", "stated"), ("RBBB", "possible"), ("LAFB", "stated")]),
    ("LBBB, C (STEMI) cannot be excluded.", [("LBBB", "stated"), ("MI", "possible")]),
    ("a (AF), b (LBBB) are incorrect.", [("AFIB", "stated")]), ("A (AF), B - LBBB is absent.", [("AFIB", "stated")]),
    ("LVH, which does not fit because the patient is young.", [("LVH", "stated")]),
    ("A (AF) while B (LBBB) is incorrect.", [("AFIB", "stated")]),
    # a fourth review: an option outside the vocabulary, "A)" letters, "not correct", a choice of a later letter
    ("Options A (SR), B (AF), C (flutter) and D (LBBB) are incorrect.", []),
    ("A (sinus rhythm) is correct. B (AF), C (flutter), and D (SVT) are incorrect.", [("SR", "stated")]),
    ("A) LVH, B) RBBB and C) LAFB are incorrect.", []), ("(A) LBBB, (B) RBBB and (C) LAFB are not correct.", []),
    ("I choose D: A (sinus rhythm), B (LBBB) and C (RBBB) are wrong.", []),
    ("A (AF), B (LBBB), and C (RBBB) do not fit the tracing.", []),
    ("A wide QRS: LBBB does not fit (no broad R in V6); RBBB.", [("RBBB", "stated")]),
    ("Sinus rhythm does not fit the rate of 45 bpm; sinus bradycardia.", [("SBRAD", "stated")]),
    # the passive mimic, "it is unlikely that", "concerning for"
    ("MI mimicked by LBBB.", [("MI", "possible"), ("LBBB", "stated")]),
    ("It is unlikely that AF is present; sinus rhythm.", [("SR", "stated")]),
    ("Concerning for STEMI.", [("MI", "possible")]),
    # what follows the last of a list applies to all, commas alone too (an omission where they were two
    # statements, "Sinus rhythm, MI unlikely", rather than a finding stated that a list denies)
    ("AF, LBBB and RBBB are absent.", []), ("AF/flutter absent.", []), ("AF, LBBB, RBBB absent.", []),
    ("Atrial fibrillation, LBBB, RBBB, LVH: none.", []),
    # a mimic (the noun) is named, whatever follows it (what mimics, the verb or "mimic of": below)
    ("STEMI mimics include LBBB and LVH.", [("LBBB", "stated"), ("LVH", "stated")]),
    ("Benign early repolarization, a STEMI mimic in this young patient.", []),

    # edges a fifth mutation round left open: each fails on a mutant of its rule
    ("Q waves absent and LBBB", [("LBBB", "stated")]), ("Second degree AV block or greater", [("2AVB", "stated")]),
    ("Not only AF but also LBBB", [("AFIB", "stated"), ("LBBB", "stated")]),
    ("History of MI, atrial fibrillation.", [("AFIB", "stated")]),
    ("left bundle branch block incomplete right bundle branch block", [("LBBB", "stated"), ("IRBBB", "stated")]),
    ("The answer: A. Rhythm: sinus rhythm B. Conduction: LBBB.", [("SR", "stated"), ("LBBB", "stated")]),
    ("LBBB, cannot exclude coexisting new MI", [("LBBB", "stated"), ("MI", "possible")]),
    ("ST elevation absent in the inferior leads, T wave inversion in V1-V3.", [("TINV", "stated")]),
    ("Not currently in atrial fibrillation.", []), ("Atrial fibrillation, now resolved.", []),
    # a differential hedges its pair only; a mimic is named, a finding that mimics is kept
    ("Sinus bradycardia, RBBB or IVCD.", [("SBRAD", "stated"), ("RBBB", "possible"), ("IVCD", "possible")]),
    ("ST elevation in V1-V3, pattern may mimic Brugada.", [("STE", "stated")]),
    ("LBBB, which can mimic or mask MI.", [("LBBB", "stated"), ("MI", "possible")]),
    ("ST and LBBB", [("STACH", "stated"), ("LBBB", "stated")]), ("ST and T wave changes.", [("STTC", "stated")]),
    # prefixes, criteria, mimics, what is no longer there
    ("Non-sinus rhythm.", []), ("Pseudo-infarct pattern.", []), ("STEMI criteria not met.", []),
    ("STEMI mimic.", []), ("This ECG rules out MI.", []), ("Atrial fibrillation is no longer present.", []),
    ("Unlikely to represent ischemia.", []), ("Low likelihood of MI.", []),
    ("Sinus rhythm with LBBB, otherwise normal ECG.", [("SR", "stated"), ("LBBB", "stated")]),
    # doubt, in its other spellings
    ("Doubtful LVH.", [("LVH", "possible")]), ("?LVH", [("LVH", "possible")]), ("LVH doubtful.", [("LVH", "possible")]),
    ("Could not exclude inferior MI.", [("MI", "possible")]), ("Does not rule out MI.", [("MI", "possible")]),
    ("Unable to exclude inferior MI.", [("MI", "possible")]),
    # a hedge that opens the next statement is not the one before it
    ("Sinus rhythm, possible LVH.", [("SR", "stated"), ("LVH", "possible")]),
    ("Left bundle branch block, cannot exclude anterior MI.", [("LBBB", "stated"), ("MI", "possible")]),
    ("AF cannot be excluded.", [("AFIB", "possible")]),
    # new, not denied
    ("LBBB, not seen on prior ECG.", [("LBBB", "stated")]),
    # ST-segment words after ST are not CODE-15's ST (sinus tachycardia)
    ("ST flattening in lateral leads.", []), ("ST elev in V2-V4.", []), ("ST is elevated in V1-V3.", []),
    # spellings a report uses
    ("QTc is prolonged.", [("LNGQT", "stated")]), ("PR interval is prolonged at 240 ms.", [("LPR", "stated")]),
    ("1\u00b0 AV block.", [("1AVB", "stated")]), ("AV block, first degree.", [("1AVB", "stated")]),
    ("Atrial fib with RVR.", [("AFIB", "stated")]), ("A fib with RVR.", [("AFIB", "stated")]),
    ("LV hypertrophy.", [("LVH", "stated")]), ("TWI in V1-V3.", [("TINV", "stated")]),
    ("Sinus brady.", [("SBRAD", "stated")]), ("Sinus tach.", [("STACH", "stated")]),
    ("Right BBB.", [("RBBB", "stated")]),
    # each below was read wrong by a one-line change that no other case caught
    ("NON-STEMI.", []),  # not an ST-elevation MI
    ("No QRS widening beyond 0.12 s or LBBB.", []),  # a decimal point ends no clause: the negation holds
    ("History of paroxysmal atrial fibrillation.", []),  # a history, with a word between, is not this tracing
    ("LBBB and RBBB cannot be excluded.", [("LBBB", "possible"), ("RBBB", "possible")]),  # the hedge is the list's
    ("No significant change, atrial fibrillation.", [("AFIB", "stated")]),  # "no change" denies nothing
])
def test_report_phrasings_are_read_as_a_clinician_reads_them(text: str, expected: list[tuple[str, str]]) -> None:
    assert _coded(text) == expected


def test_the_longest_statement_wins_and_its_span_is_reported() -> None:
    text = "Sinus rhythm with incomplete right bundle branch block and first-degree AV block."
    findings = extract_findings(text)
    assert [f.code for f in findings] == ["SR", "IRBBB", "1AVB"]  # not RBBB
    irbbb = findings[1]
    assert text[irbbb.start:irbbb.end] == irbbb.text == "incomplete right bundle branch block"
    assert irbbb.to_dict()["labels"] == {"ptbxl": "CD"}
    first = findings[2].to_dict()
    assert (first["snomed_ct"], first["scp_ecg"], first["labels"]) == (
        "270492004", "1AVB", {"ptbxl": "CD", "cpsc2018": "I-AVB", "code15": "1dAVb"})


def test_st_segment_words_are_not_codes_for_sinus_tachycardia() -> None:
    assert found("ST elevation in V2-V4 and ST-T changes.") == {"STE": "stated", "STTC": "stated"}
    assert found("Answer: ST, AF") == {"STACH": "stated", "AFIB": "stated"}
    assert found("Non-ST elevation myocardial infarction.") == {"MI": "stated"}


def test_codes_are_case_sensitive_whole_words_as_the_scorer_reads_them() -> None:
    assert found("after a leaf") == {}  # "af" inside words, lower case
    assert found("AFIB, LBBB, PVC") == {"AFIB": "stated", "LBBB": "stated", "PVC": "stated"}


@pytest.mark.parametrize("space", sorted(LABEL_SPACES))
def test_every_label_of_every_space_is_read_from_its_own_code(space: str) -> None:
    for label in LABEL_SPACES[space]:
        assert labels_in(label, LABEL_SPACES[space]) == [label], (space, label)


def test_the_scorer_reads_labels_through_the_findings() -> None:
    cpsc = LABEL_SPACES["cpsc2018"]
    assert parse.labels_strict("Atrial fibrillation with premature ventricular contractions.", cpsc) == ["AF", "PVC"]
    assert parse.labels_strict("No AF. Sinus rhythm with RBBB.", cpsc) == ["RBBB"]  # the denied AF is not read
    ptb = LABEL_SPACES["ptbxl"]
    assert parse.labels_strict("left bundle branch block and LVH", ptb) == ["CD", "HYP"]
    assert parse.code15_strict("Answer: ABNORMAL, sinus bradycardia", ("1dAVb", "SB")) == ["ABNORMAL", "SB"]


def test_vocabulary_is_well_formed() -> None:
    keys = [c.key for c in CONCEPTS]
    assert len(keys) == len(set(keys))
    for concept in CONCEPTS:
        assert concept.snomed is None or concept.snomed.isdigit(), concept.key
        superclass = concept.labels.get("ptbxl") == concept.key  # a PTB-XL diagnostic superclass is its own code
        assert concept.snomed or concept.scp or superclass, f"{concept.key} has no standard code"
        assert concept.phrases or concept.codes, concept.key


@pytest.mark.parametrize(("text", "codes"), [
    ("Sinus rhythm. Atrial fibrillation is", ["SR"]),  # cut before "absent"
    ("Sinus rhythm. Left bundle branch block cannot", ["SR"]),  # before "be excluded": not stated
    ("Sinus rhythm.\nQRS 0.12 s, left bundle branch block", ["SR"]),
    ("Atrial fibrillation", []),
    ("Sinus tachycardia. Atrial fibrillation vs. atrial flut", ["STACH"]),  # "vs." ends no sentence either
])
def test_an_answer_cut_short_gives_findings_from_its_finished_sentences_only(text: str, codes: list[str]) -> None:
    """SNOMED-coded findings a cart files: a cut answer's last words may be the ones that deny or hedge them."""
    from pulse_edge.runtime.generation.interpretation import Interpretation
    from pulse_edge.runtime.generation.result import GenerationResult, Timings
    from pulse_edge.runtime.inputs.load import EcgInput

    def result(stop: str) -> GenerationResult:
        return GenerationResult(text=text, token_ids=[1], image_tokens=0, prompt_tokens=1, generated_tokens=1,
                                stop_reason=stop, timings=Timings(0.0, 0.0, 0.0, 0.0, 0.0, 0.0), backend="ort")

    ecg = EcgInput(image=None, kind="image", source="x.png", notes=())  # type: ignore[arg-type]
    cut = Interpretation.of(result("max_new_tokens"), ecg, "Rhythm?", 0.0)
    assert [f.code for f in cut.findings] == codes
    whole = Interpretation.of(result("eos"), ecg, "Rhythm?", 0.0)
    assert [f.code for f in whole.findings] == [f.code for f in extract_findings(text)]


def test_an_answer_the_context_cut_short_says_so_in_its_notes() -> None:
    """A bundle built for the shortest context that holds a print leaves ~100 tokens: said, not only coded."""
    from pulse_edge.runtime.generation.interpretation import Interpretation
    from pulse_edge.runtime.generation.result import GenerationResult, Timings
    from pulse_edge.runtime.inputs.load import EcgInput

    ecg = EcgInput(image=None, kind="dicom", source="x.dcm", notes=("derived III from I and II",))  # type: ignore[arg-type]
    notes = {}
    for stop in ("context_full", "max_new_tokens", "eos"):
        result = GenerationResult(text="Sinus rhythm.", token_ids=[1] * 90, image_tokens=2880, prompt_tokens=2982,
                                  generated_tokens=90, stop_reason=stop, timings=Timings(0, 0, 0, 0, 0, 0),
                                  backend="ort")
        notes[stop] = Interpretation.of(result, ecg, "Rhythm?", 0.0).notes
    assert notes["eos"] == notes["max_new_tokens"] == ecg.notes
    assert notes["context_full"] == (*ecg.notes, (
        "the answer stopped at the end of the model's context, after 90 tokens (2982 positions went to the prompt): "
        "for a full answer use a bundle exported (or TensorRT engines built) with a longer --max-context"))


# Report wording a review (2026-12-07) showed read wrong, each case one way a text says it; a few the old code
# read right stand beside them to bound the new rules' reach ("Absent P waves consistent with...", "One or more
# PVCs", "LBBB, unchanged from prior ECG", "Sinus arrhythmia, otherwise a normal ECG", "Answer: ST", ...).
@pytest.mark.parametrize(("text", "expected"), [
    # a finding named, then denied after a colon, a contraction, or words the lists lacked
    ("ST elevation: none.", []), ("ST elevation: absent.", []), ("AF: no.", []),
    ("Ventricular tachycardia: not present.", []), ("- Atrial fibrillation: absent", []),
    ("Rhythm: sinus rhythm. ST elevation: none. Q waves: none. Impression: normal ECG.",
     [("SR", "stated"), ("NORM", "stated")]),
    ("There isn't any ST elevation.", []), ("I don't see atrial fibrillation.", []),
    ("The rhythm wasn\u2019t atrial fibrillation.", []), ("Doesn't meet STEMI criteria.", []),
    ("Lack of ST elevation.", []), ("Absent ST elevation.", []), ("Unlikely atrial fibrillation.", []),
    ("Fails to meet criteria for LVH.", []), ("Insufficient criteria for LVH.", []),
    ("LVH criteria are not fulfilled.", []), ("Nothing to suggest ischemia.", []),
    # a negation spent on what is no statement does not reach past "consistent with"
    ("No P waves, consistent with atrial fibrillation.", [("AFIB", "stated")]),
    ("Absent P waves consistent with atrial fibrillation.", [("AFIB", "stated")]),
    ("No ST elevation consistent with STEMI.", []),
    # one side of a differential, the other side no statement of the vocabulary or words away
    ("Pericarditis vs STEMI.", [("MI", "possible")]),
    ("Early repolarization vs pericarditis vs STEMI.", [("MI", "possible")]),
    ("Wide QRS rhythm, LBBB versus ventricular rhythm.", [("LBBB", "possible")]),
    ("Sinus rhythm or ectopic atrial rhythm.", [("SR", "possible")]),
    ("SVT with aberrancy vs ventricular tachycardia.", [("SVTAC", "possible"), ("VTACH", "possible")]),
    ("Atrial fibrillation with aberrant conduction vs ventricular tachycardia.",
     [("AFIB", "possible"), ("VTACH", "possible")]),
    ("Atrial fibrillation vs multifocal atrial tachycardia.", [("AFIB", "possible"), ("ATACH", "possible")]),
    ("One or more PVCs.", [("PVC", "stated")]),
    # artifact that looks like a rhythm is no rhythm
    ("Artifact simulating ventricular tachycardia.", []), ("Artifact mimicking atrial fibrillation.", []),
    ("Tremor artifact resembling atrial flutter.", []), ("Baseline artifact, may simulate atrial flutter.", []),
    ("Apparent ST elevation is due to artifact.", []),
    # what an earlier tracing showed, or a history, is not this tracing
    ("Prior ECG showed atrial fibrillation. Now sinus rhythm.", [("SR", "stated")]),
    ("Atrial fibrillation on prior ECG; now sinus rhythm.", [("SR", "stated")]),
    ("Atrial fibrillation seen on the previous ECG is no longer present.", []),
    ("Atrial fibrillation converted to sinus rhythm.", [("SR", "stated")]),
    ("Atrial fibrillation has replaced sinus rhythm.", [("AFIB", "stated")]),
    ("LBBB replaced by RBBB.", [("RBBB", "stated")]),
    ("History of MI and atrial fibrillation.", []),
    ("Patient has a history of LBBB and atrial fibrillation; today sinus rhythm.", [("SR", "stated")]),
    ("Hx of atrial fibrillation. Sinus rhythm today.", [("SR", "stated")]),
    ("LBBB, unchanged from prior ECG.", [("LBBB", "stated")]),
    # "normal" with an abnormality is not a normal ECG
    ("Normal ECG except for left axis deviation.", [("LAD", "stated")]),
    ("Normal ECG, apart from sinus bradycardia.", [("NORM", "stated"), ("SBRAD", "stated")]),  # as PTB-XL labels it
    ("Normal ECG with first-degree AV block.", [("1AVB", "stated")]),
    ("Normal ECG; RBBB.", [("RBBB", "stated")]),
    ("Normal ECG. Possible LVH.", [("NORM", "possible"), ("LVH", "possible")]),
    ("Sinus arrhythmia, otherwise a normal ECG. Normal ECG.", [("SARRH", "stated"), ("NORM", "stated")]),
    # hedges in other words
    ("LVH may be present.", [("LVH", "possible")]), ("Exclude atrial fibrillation.", [("AFIB", "possible")]),
    ("To exclude MI, serial ECGs recommended.", [("MI", "possible")]),
    ("Evaluate for ischemia.", [("ISC", "possible")]), ("Correlate clinically for ischemia.", [("ISC", "possible")]),
    ("Raises the possibility of LVH.", [("LVH", "possible")]),
    ("Atrial flutter is a consideration.", [("AFLT", "possible")]),
    ("Uncertain whether this is atrial fibrillation.", [("AFIB", "possible")]),
    ("Atrial fibrillation is uncertain.", [("AFIB", "possible")]),
    ("Cannot distinguish between atrial fibrillation and atrial flutter.",
     [("AFIB", "possible"), ("AFLT", "possible")]),
    ("Sinus rhythm, minimal voltage criteria for LVH, may be normal variant.", [("SR", "stated"), ("LVH", "possible")]),
    # new, not denied: "not seen before" says the finding is there now
    ("Anterior ST elevation, not seen on the ECG from yesterday.", [("STE", "stated")]),
    ("LBBB, not seen previously.", [("LBBB", "stated")]), ("LBBB, which was not present before.", [("LBBB", "stated")]),
    ("Atrial fibrillation, not present in the 2019 ECG.", [("AFIB", "stated")]),
    ("With no prior ECG available, atrial fibrillation with LBBB.", [("AFIB", "stated"), ("LBBB", "stated")]),
    ("In the absence of a prior tracing, LBBB should be considered new.", [("LBBB", "stated")]),
    # incomplete is not complete
    ("Incomplete right BBB.", [("IRBBB", "stated")]), ("RBBB, incomplete.", [("IRBBB", "stated")]),
    ("Right bundle branch block, incomplete type.", [("IRBBB", "stated")]),
    ("Partial right bundle branch block.", [("IRBBB", "stated")]), ("LBBB, incomplete.", [("ILBBB", "stated")]),
    # CODE-15's "ST" is a label only where it stands alone, never the ST segment
    ("ST in V1-V3 is elevated by 2 mm.", []), ("ST normal.", []), ("ST isoelectric.", []),
    ("PR, QRS, ST, T normal.", []), ("ST within normal limits.", []), ("ST upsloping in V2.", []),
    ("ST-J point depression.", []), ("ST, T wave changes.", [("TAB", "stated")]),
    ("1dAVb, ST, AF", [("1AVB", "stated"), ("STACH", "stated"), ("AFIB", "stated")]),
    ("Answer: ST", [("STACH", "stated")]),
    # other languages' negations and full stops
    ("SR, kein AF, LBBB.", [("SR", "stated"), ("LBBB", "stated")]), ("Sinus rhythm. Pas de AF.", [("SR", "stated")]),
    ("\u7aa6\u6027\u5fc3\u5f8b\u3002\u6ca1\u6709 AF\u3002", []),
    ("Sinus rhythm\u3002No atrial fibrillation\u3002LBBB\u3002", [("SR", "stated"), ("LBBB", "stated")]),
    # wording not in the vocabulary before
    ("Patient with ischemic cardiomyopathy.", []), ("LAHB.", [("LAFB", "stated")]), ("LPHB.", [("LPFB", "stated")]),
    ("Left anterior hemi-block.", [("LAFB", "stated")]), ("1\u00b0 AVB.", [("1AVB", "stated")]),
    ("AV block I\u00b0.", [("1AVB", "stated")]), ("Low-voltage QRS complexes.", [("LVOLT", "stated")]),
    ("Ventricular pacing.", [("PACE", "stated")]), ("ISCAL", [("ISC", "stated")]), ("SNR", [("SR", "stated")]),
    ("VEB", [("PVC", "stated")]), ("VCLVH", []),
])
def test_report_wording_from_review(text: str, expected: list[tuple[str, str]]) -> None:
    assert _coded(text) == expected


def test_the_scorer_reads_a_denial_after_a_colon_and_never_the_st_segment_as_sinus_tachycardia() -> None:
    cpsc = LABEL_SPACES["cpsc2018"]
    assert parse.labels_strict("Sinus rhythm. ST elevation: none. ST depression in V5-V6.", cpsc) == ["STD"]
    assert parse.code15_strict("Answer: ABNORMAL. 1dAVb. ST in V1-V3 normal.", ("1dAVb", "ST")) == ["ABNORMAL", "1dAVb"]
    assert parse.labels_strict("Normal ECG with first-degree AV block.", LABEL_SPACES["ptbxl"]) == ["CD"]


# What the first version of those rules got wrong (a review of the change, 2026-12-07): each was stated before it.
@pytest.mark.parametrize(("text", "expected"), [
    # a field's value that only starts with "no" or "negative" denies nothing
    ("Atrial fibrillation: no RVR.", [("AFIB", "stated")]), ("LBBB: no acute changes.", [("LBBB", "stated")]),
    ("Anterior STEMI: no reciprocal changes", [("MI", "stated")]),
    ("Inferior MI: negative T waves in III, aVF.", [("MI", "stated")]), ("Sinus rhythm: no ectopy", [("SR", "stated")]),
    # what an earlier tracing had reaches to the comma; "present on the previous ECG" persists
    ("Compared with the prior ECG with sinus rhythm, AF is new.", [("AFIB", "stated")]),
    ("Previous ECG with sinus rhythm, now atrial fibrillation", [("AFIB", "stated")]),
    ("LBBB, present on the previous ECG.", [("LBBB", "stated")]),
    # the narrower denials stop at the comma; "sin" is sinus, "sans doute" is "probably"
    ("Absent P waves, atrial fibrillation", [("AFIB", "stated")]),
    ("Sinus rhythm, absent septal Q waves, LBBB", [("SR", "stated"), ("LBBB", "stated")]),
    ("Atrial fibrillation, absent P waves.", [("AFIB", "stated")]),  # "absent P waves" is the P waves'
    ("ST elevation absent in the inferior leads.", []),
    ("ST elevation (absent), LBBB", [("LBBB", "stated")]),
    ("I can't see P waves, atrial fibrillation", [("AFIB", "stated")]),
    ("Electrodes were replaced, atrial fibrillation", [("AFIB", "stated")]),
    ("sin brady, first degree AV block", [("1AVB", "stated")]), ("Sans doute AF", [("AFIB", "stated")]),
    # a field labelled ST is the segment
    ("Sinus rhythm. QT: normal. ST: isoelectric.", [("SR", "stated")]),
])
def test_the_new_rules_reach_no_further_than_their_words(text: str, expected: list[tuple[str, str]]) -> None:
    assert _coded(text) == expected


def test_normal_stays_beside_a_rhythm_as_ptbxl_labels_it() -> None:
    assert labels_in("Normal ECG. Sinus bradycardia.", LABEL_SPACES["ptbxl"]) == ["NORM"]
    assert labels_in("Normal ECG. Sinus rhythm with PACs", LABEL_SPACES["cpsc2018"]) == ["NORM", "PAC"]
    assert labels_in("Normal ECG with LBBB.", LABEL_SPACES["ptbxl"]) == ["CD"]


# A multiple-choice answer that repeats its options states the chosen one only (every option was a finding before).
@pytest.mark.parametrize(("text", "expected"), [
    ("Options: A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter D. Ventricular tachycardia. Answer: B",
     [("AFIB", "stated")]),
    ("A) Sinus rhythm\nB) Atrial fibrillation\nC) LBBB\n\nThe answer is (B), atrial fibrillation.",
     [("AFIB", "stated")]),
    ("The answer is C. A. Sinus rhythm B. AF C. Atrial flutter", [("AFLT", "stated")]),
    ("Options: (A) LBBB (B) RBBB (C) LAFB", []),  # options, no choice: none stated
    ("A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter. answer: b", [("AFIB", "stated")]),
    ("A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter. The answer is (b).", [("AFIB", "stated")]),
    ("Options: A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter D. LBBB. Answers: B, D",
     [("AFIB", "stated"), ("LBBB", "stated")]),
    ("Options: A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter D. LBBB. Answer: B and D",
     [("AFIB", "stated"), ("LBBB", "stated")]),
    # the second review: the "d" of "and", the article "a", answer cues without a colon, other languages
    ("Options: A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter D. LBBB. Answer: B and C",
     [("AFIB", "stated"), ("AFLT", "stated")]),
    ("A. Sinus rhythm\nB. Atrial fibrillation\nC. LBBB\nThe correct answer is C, a left bundle branch block.",
     [("LBBB", "stated")]),
    ("A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter\nThe answer is a fast irregular rhythm, so B.", []),
    ("A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter\nB is the correct answer.", [("AFIB", "stated")]),
    ("A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter\nMy answer would be B.", [("AFIB", "stated")]),
    ("Which of the following is shown? A. Sinus rhythm B. Atrial fibrillation C. Atrial flutter\nThe ECG shows "
     "atrial fibrillation.", [("AFIB", "stated")]),
    ("Optionen: A. Sinusrhythmus B. Atrial fibrillation C. LBBB\nAntwort: B", [("AFIB", "stated")]),
    ("**Options:**\n- A. Sinus rhythm\n- B. Atrial fibrillation\n\n**Answer:** B", [("AFIB", "stated")]),
    # the question's own cue opens the list: it chooses nothing
    ("Select the correct answer:\nA. Sinus rhythm\nB. Atrial fibrillation\nC. Atrial flutter\nAnswer: B",
     [("AFIB", "stated")]),
    ("Select the correct answer:\nA. Sinus rhythm\nB. Atrial fibrillation", []),
    ("A. Sinus rhythm. B. Atrial fibrillation. Answer: A. LBBB is also present.",
     [("SR", "stated"), ("LBBB", "stated")]),
    # options marked "A:" (AF was stated); with a colon inside they are a report's sections again
    ("A: atrial fibrillation. B: sinus rhythm. Correct: B.", [("SR", "stated")]),
    ("A: sinus rhythm; B: LBBB. The answer is B.", [("LBBB", "stated")]),
    ("A: Rhythm: sinus rhythm. B: Conduction: LBBB. Answer: B", [("SR", "stated"), ("LBBB", "stated")]),
    ("Findings - A: sinus rhythm. B: LBBB.", [("SR", "stated"), ("LBBB", "stated")]),
    ("A\uff1aatrial fibrillation. B\uff1asinus rhythm. Correct: B.", [("SR", "stated")]),  # full-width, no space
    # "A:" sections are options only where a letter of theirs is chosen after them (or an options cue opens them):
    # an answer spoken of is not enough (a review: a report's sections were dropped)
    ("A: Sinus rhythm. B: ST elevation in II, III, aVF. Answer: inferior STEMI.",
     [("SR", "stated"), ("STE", "stated"), ("MI", "stated")]),
    ("Interpretation:\nA: Sinus rhythm\nB: RBBB\nSummary: abnormal ECG. The answer is abnormal.",
     [("SR", "stated"), ("RBBB", "stated"), ("ABNORMAL", "stated")]),
    ("Answer A: atrial fibrillation; answer B: LBBB.", [("AFIB", "stated"), ("LBBB", "stated")]),
    # "Option A:" is each option's label, no list's cue; a choice before the list counts; a verdict after an
    # option's colon is no section; the chosen letter in Markdown bold
    ("Option A: atrial fibrillation - incorrect. Option B: sinus rhythm - correct.", [("SR", "stated")]),
    ("The answer is B. A: sinus rhythm, B: atrial fibrillation, C: atrial flutter.", [("AFIB", "stated")]),
    ("Answer: B\nA) Sinus rhythm: incorrect\nB) Atrial fibrillation: correct", [("AFIB", "stated")]),
    ("Options: A. Sinus rhythm B. Atrial fibrillation. Answer: **B**", [("AFIB", "stated")]),
    # a third review: "Option A:" drops its cue only where the options are judged one by one; an option keeps its own
    # verdict; several bold letters
    ("Option A: AF. Option B: atrial flutter. Neither; this is sinus rhythm.", [("SR", "stated")]),
    ("The options: A) Sinus rhythm: correct B) LVH: correct C) AF: incorrect", [("SR", "stated"),
                                                                                ("LVH", "stated")]),
    ("Correct: **A** and **B**. A) Sinus rhythm B) LVH C) LBBB", [("SR", "stated"), ("LVH", "stated")]),
    # a fourth review: options judged one by one with no answer, in every verdict word; a bold letter before "is
    # correct"
    ("Option A: Atrial fibrillation - wrong. Option B: Sinus rhythm - right.", [("SR", "stated")]),
    ("A) Sinus rhythm: incorrect B) Atrial fibrillation: correct", [("AFIB", "stated")]),
    ("A. Sinus rhythm: correct. B. LBBB: incorrect. C. RBBB: incorrect.", [("SR", "stated")]),
    ("A) SR: true B) AF: false", [("SR", "stated")]),
    ("Options: (A) LVH (B) RVH (C) normal. **(B)** is correct.", [("RVH", "stated")]),
    # what is no option list: one lettered answer, a lone letter, lettered sections of a report
    ("B. Atrial fibrillation", [("AFIB", "stated")]),
    ("Type A. WPW pattern. Sinus rhythm.", [("WPW", "stated"), ("SR", "stated")]),
    ("A. Rhythm: sinus rhythm\nB. Conduction: LBBB", [("SR", "stated"), ("LBBB", "stated")]),
    # a report's lettered list: no options cue, no answer's cue (the first version dropped them all)
    ("Findings:\nA. Sinus rhythm at 72 bpm.\nB. Left bundle branch block.\nC. Left ventricular hypertrophy.",
     [("SR", "stated"), ("LBBB", "stated"), ("LVH", "stated")]),
    ("Interpretation: A. Sinus rhythm B. Left ventricular hypertrophy with strain", [("SR", "stated"),
                                                                                     ("LVH", "stated")]),
    ("Sinus rhythm (A) LBBB (B) LVH", [("SR", "stated"), ("LBBB", "stated"), ("LVH", "stated")]),
    ("(A) LBBB (B) RBBB (C) LAFB", [("LBBB", "stated"), ("RBBB", "stated"), ("LAFB", "stated")]),
    ("Findings:\nA. Sinus rhythm.\nB. LBBB.\nC. LVH.\nThe best treatment option is a pacemaker.",
     [("SR", "stated"), ("LBBB", "stated"), ("LVH", "stated")]),
    ("Findings:\nA. Sinus rhythm.\nB. LBBB.\nC. LVH.\nPlease answer a few questions about symptoms.",
     [("SR", "stated"), ("LBBB", "stated"), ("LVH", "stated")]),
    ("Nonspecific ST/TW changes.", []), ("ST/J point elevation", []),  # 'ST/' is the segment
    ("A. Sinus rhythm" + " with a long description of the P waves" * 5 + " B. LBBB",
     [("SR", "stated"), ("LBBB", "stated")]),
])
def test_a_repeated_options_list_states_the_chosen_option_only(text: str, expected: list[tuple[str, str]]) -> None:
    assert _coded(text) == expected


def test_a_degenerate_answer_is_read_in_time_linear_in_its_statements() -> None:
    # 12,000 statements in 76,000 characters: ~0.7 s here; the overlap check and the clause split were quadratic
    # (~13 s), so a runaway answer of a bundle with a large max_new_tokens held its request that long
    import time
    started = time.perf_counter()
    found = extract_findings("AF, LBBB; RBBB. no " * 4000)
    assert time.perf_counter() - started < 6.0
    assert [f.code for f in found] == ["AFIB", "LBBB", "RBBB"]
    started = time.perf_counter()  # lettered lists with no cue: each list's cue is looked for near it only
    assert [f.code for f in extract_findings("A. AF B. LBBB C. RBBB " * 4000)] == ["AFIB", "LBBB", "RBBB"]
    assert time.perf_counter() - started < 6.0


def test_finished_sentences_keeps_every_finished_one() -> None:
    from pulse_edge.runtime.findings.extract import finished_sentences

    assert finished_sentences("Sinus rhythm. LBBB. Possible") == "Sinus rhythm. LBBB."


@pytest.mark.parametrize("text", ["LBBB mimics anterior MI.", "LBBB mimic of STEMI.", "LBBB mimicking anterior MI.",
                                  "LBBB may mimic an MI."])
def test_what_mimics_is_stated_and_what_it_mimics_is_possible_at_most(text: str) -> None:
    """The noun form ("a STEMI mimic") names what is not there; the finding that mimics is ("LBBB mimics MI" lost
    LBBB when the noun's rule read any words after "mimic"), and what it mimics was stated."""
    assert [(f.code, f.certainty) for f in extract_findings(text)] == [("LBBB", "stated"), ("MI", "possible")]


@pytest.mark.parametrize("text", ["STEMI mimic due to LBBB.", "STEMI mimic with LBBB.", "STEMI mimics are LBBB.",
                                  "STEMI mimic (LBBB)."])
def test_a_mimic_named_with_what_causes_it_is_not_stated(text: str) -> None:
    assert [(f.code, f.certainty) for f in extract_findings(text)] == [("LBBB", "stated")]
