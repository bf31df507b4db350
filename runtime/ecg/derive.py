"""Completing the six limb leads from any two of them.

The six limb leads measure one 2-D quantity (the frontal-plane heart vector)
from three electrodes, so each is a fixed combination of leads I and II:
Einthoven's law III = II - I and Goldberger's aVR = -(I + II)/2,
aVL = I - II/2, aVF = II - I/2. Any two leads whose combinations are not
parallel therefore give back I and II, and from them the rest. Precordial
leads V1..V6 each have their own electrode and can never be derived.
"""

from __future__ import annotations

from fractions import Fraction
from itertools import combinations
from types import MappingProxyType

import numpy as np

from pulse_edge.runtime.ecg.leads import LIMB_LEADS

# Each limb lead as (coefficient of I, coefficient of II).
_IN_TERMS_OF_I_II = MappingProxyType(
    {
        "I": (Fraction(1), Fraction(0)),
        "II": (Fraction(0), Fraction(1)),
        "III": (Fraction(-1), Fraction(1)),
        "aVR": (Fraction(-1, 2), Fraction(-1, 2)),
        "aVL": (Fraction(1), Fraction(-1, 2)),
        "aVF": (Fraction(-1, 2), Fraction(1)),
    }
)


def derivable_pair(present: set[str]) -> tuple[str, str] | None:
    """The two recorded limb leads to derive the others from, or None if no independent pair exists.

    Pairs are tried in LIMB_LEADS order, so (I, II) wins whenever both are there:
    then the derived leads are exactly the textbook formulas. (The six lead axes
    are 30 degrees apart with none opposite another, so any two are independent;
    the determinant test keeps that fact checked rather than assumed.)
    """
    for pair in combinations([lead for lead in LIMB_LEADS if lead in present], 2):
        if _determinant(*pair) != 0:
            return pair
    return None


def derive_limb_leads(leads: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The limb leads missing from `leads`, computed from an independent recorded pair.

    Returns ({derived lead: samples} in LIMB_LEADS order, the pair used). Returns
    ({}, ()) when all six are present; raises ValueError when they cannot be completed.
    """
    missing = [lead for lead in LIMB_LEADS if lead not in leads]
    if not missing:
        return {}, ()
    pair = derivable_pair(set(leads))
    if pair is None:
        raise ValueError("no two independent limb leads")
    basis = _basis_from(pair)  # I and II, each as combination of the pair
    derived = {}
    for lead in missing:
        a, b = _IN_TERMS_OF_I_II[lead]
        # Coefficients of the pair, exact rationals: for the pair (I, II) they are the
        # textbook formulas, so III is computed as II - I and nothing else.
        coefficients = (a * basis[0][0] + b * basis[1][0], a * basis[0][1] + b * basis[1][1])
        derived[lead] = _combine(coefficients, [leads[pair[0]], leads[pair[1]]])
    return derived, pair


def _determinant(first: str, second: str) -> Fraction:
    (a1, b1), (a2, b2) = _IN_TERMS_OF_I_II[first], _IN_TERMS_OF_I_II[second]
    return a1 * b2 - a2 * b1


def _basis_from(pair: tuple[str, str]) -> tuple[tuple[Fraction, Fraction], tuple[Fraction, Fraction]]:
    """I and II expressed as combinations (c_first, c_second) of the recorded pair: a 2x2 inverse."""
    (a1, b1), (a2, b2) = _IN_TERMS_OF_I_II[pair[0]], _IN_TERMS_OF_I_II[pair[1]]
    det = a1 * b2 - a2 * b1
    # [first; second] = M [I; II] with M = [[a1, b1], [a2, b2]], so [I; II] = M^-1 [first; second].
    return (b2 / det, -b1 / det), (-a2 / det, a1 / det)


def _combine(coefficients: tuple[Fraction, Fraction], signals: list[np.ndarray]) -> np.ndarray:
    """Sum of coefficient * signal in float64, skipping zero terms (so 0 * NaN never appears)."""
    out = np.zeros_like(signals[0], dtype=np.float64)
    for coefficient, signal in zip(coefficients, signals, strict=True):
        if coefficient:
            out = out + float(coefficient) * signal.astype(np.float64)
    return out


# How far a supplied limb lead may sit from what I and II give for it before it is said: recorded limb leads obey
# the laws exactly up to noise and rounding; a swapped, mislabelled or unmarked inverted channel misses by its size.
DISAGREEMENT = 0.3


def disagreeing_limb_leads(leads: dict[str, np.ndarray]) -> dict[str, float]:
    """The supplied limb leads (beyond I and II) that Einthoven's and Goldberger's laws put elsewhere: lead ->
    rms of the difference over rms of the lead (at least 0.15 mV). Empty without both I and II."""
    if "I" not in leads or "II" not in leads:
        return {}
    out = {}
    for lead in LIMB_LEADS:
        if lead in ("I", "II") or lead not in leads:
            continue
        expected = _combine(_IN_TERMS_OF_I_II[lead], [leads["I"], leads["II"]])
        # 0.15 mV floor: an isoelectric III (rms ~0.03 mV) must not be "off" by a few microvolts of noise
        scale = max(float(np.sqrt(np.mean(leads[lead] ** 2))), float(np.sqrt(np.mean(expected ** 2))), 0.15)
        miss = float(np.sqrt(np.mean((leads[lead] - expected) ** 2))) / scale
        if miss > DISAGREEMENT:
            out[lead] = miss
    return out
