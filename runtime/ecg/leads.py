"""Lead names: the dozens of spellings carts and file formats use, mapped to the 12 standard leads.

Every format names leads differently: WFDB headers say "AVR", DICOM code meanings
say "Lead I (Einthoven)", HL7 aECG says "MDC_ECG_LEAD_AVR", European carts say
"DI"/"D2" for the limb leads and "C1".."C6" (IEC 60601-2-25) for V1..V6, and
coded DICOM channels may carry only a code value from the SCPECG or MDC tables
(DICOM PS3.16 CID 3001). All of them end up here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
LIMB_LEADS: tuple[str, ...] = LEADS[:6]
PRECORDIAL_LEADS: tuple[str, ...] = LEADS[6:]

# Lead numbers shared by the SCP-ECG code values ("5.6.3-9-<n>", coding scheme
# SCPECG) and the MDC code values ("2:<n>", coding scheme MDC) of DICOM CID 3001.
_CID3001_NUMBERS = MappingProxyType(
    {1: "I", 2: "II", 61: "III", 62: "aVR", 63: "aVL", 64: "aVF", 3: "V1", 4: "V2", 5: "V3", 6: "V4", 7: "V5", 8: "V6"}
)
CODE_VALUES = MappingProxyType(
    {
        **{f"5.6.3-9-{n}": lead for n, lead in _CID3001_NUMBERS.items()},
        **{f"2:{n}": lead for n, lead in _CID3001_NUMBERS.items()},
    }
)

# Spellings after cleaning (lower case, no spaces, prefixes and "(Einthoven)" removed).
_ALIASES = MappingProxyType(
    {
        **{lead.lower(): lead for lead in LEADS},
        # Roman numerals with the European "D" (Einthoven's "Ableitung"/derivation) prefix.
        "di": "I",
        "dii": "II",
        "diii": "III",
        "d1": "I",
        "d2": "II",
        "d3": "III",
        # IEC names of the chest electrodes.
        **{f"c{k}": f"V{k}" for k in range(1, 7)},
    }
)

# Words removed from the front of a cleaned name before the alias look-up (spaces and dots are "_" by then).
_PREFIXES = ("mdc_ecg_lead", "ecg_lead", "lead", "ableitung")
# What may join a prefix to the lead and means nothing: "Lead II", "Lead-II", "Lead - II", "LEAD_II". A minus
# with a space before it and none after ("Lead -aVR") is kept: it is the sign of Cabrera's inverted lead.
_PREFIX_JOINS = re.compile(r"_*-_+|-|_+(?!-)")
# Text in brackets names the inventor or system ("Einthoven", "Goldberger", "Wilson"), not the lead.
_BRACKETS = re.compile(r"\(.*?\)|\[.*?\]")
_SEPARATORS = re.compile(r"[\s.]+")
# "-aVR", "neg aVR", "minus aVR": the inverted lead of the Cabrera display.
_NEGATIONS = ("-", "neg", "minus", "inverted", "inv")


@dataclass(frozen=True)
class LeadName:
    """A recognised lead: the standard name and whether the channel holds its negative."""

    lead: str
    inverted: bool = False


_DASHES = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2010": "-", "\u2011": "-"})  # minus, en dash, hyphens


def normalise_lead_name(label: str | None) -> LeadName | None:
    """The standard lead a channel label means, or None when it is no standard 12-lead lead.

    >>> normalise_lead_name("Lead I (Einthoven)")
    LeadName(lead='I', inverted=False)
    >>> normalise_lead_name("-aVR")
    LeadName(lead='aVR', inverted=True)
    """
    if label is None:
        return None
    raw = label.strip().translate(_DASHES)  # a typeset minus sign or an en dash: "\u2212aVR", "\u2013aVR"
    if raw in CODE_VALUES:  # codes contain '-' and ':' that the cleaning below would eat
        return LeadName(CODE_VALUES[raw])
    # a bracket names a system ("Einthoven"), or says the channel is inverted: "aVR (inverted)", "aVR [-]"
    qualifiers = [q[1:-1].strip().casefold() for q in _BRACKETS.findall(raw)]
    name = _SEPARATORS.sub("_", _BRACKETS.sub("", raw).strip().casefold()).strip("_")
    name = _strip_prefix(name)
    inverted = any(q in _NEGATIONS for q in qualifiers)
    for negation in _NEGATIONS:
        if name.startswith(negation) and name[len(negation) :].strip("_") in _ALIASES:
            name, inverted = name[len(negation) :], True  # said twice ("-aVR (inverted)") is still inverted
            break
        if name.endswith(negation) and name[: -len(negation)].strip("_") in _ALIASES:  # "aVR-", "aVR inverted"
            name, inverted = name[: -len(negation)], True
            break
    parts = [p for p in name.split("-") if p]
    if len(parts) > 1 and all(p.strip("_") in _ALIASES for p in parts):
        return None  # "I-II" is a difference of two leads, not lead III
    name = name.replace("_", "").replace("-", "")
    lead = _ALIASES.get(name)
    return LeadName(lead, inverted) if lead else None


def _strip_prefix(name: str) -> str:
    for prefix in _PREFIXES:
        if name.startswith(prefix) and len(name) > len(prefix):
            rest = name[len(prefix) :]
            join = _PREFIX_JOINS.match(rest)
            return (rest[join.end() :] if join else rest).strip("_")
    return name


def lead_from_code(code_value: str | None, code_meaning: str | None = None) -> LeadName | None:
    """A DICOM/aECG coded lead: the code value first (it is normative), then its meaning text."""
    for text in (code_value, code_meaning):
        found = normalise_lead_name(text) if text else None
        if found:
            return found
    return None
