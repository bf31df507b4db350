"""Voltage units to millivolts.

Formats spell units as UCUM codes ("uV", "mV"), with the micro sign or the Greek
mu, or as DICOM code meanings ("microvolt"). Case is ignored: "MV" would be
megavolts in UCUM, but no ECG is recorded in megavolts, and carts do write "MV".
"""

from __future__ import annotations

from types import MappingProxyType

from pulse_edge.runtime.ecg.checks import recording_error

_MV_PER_UNIT = MappingProxyType(
    {
        "nv": 1e-6,
        "nanovolt": 1e-6,
        "uv": 1e-3,
        "\u00b5v": 1e-3,  # micro sign
        "\u03bcv": 1e-3,  # Greek small mu
        "microvolt": 1e-3,
        "mv": 1.0,
        "millivolt": 1.0,
        "v": 1e3,
        "volt": 1e3,
    }
)


def mv_per_unit(unit: str | None) -> float | None:
    """Millivolts per one `unit`, or None for a unit that is not a voltage we know."""
    if unit is None:
        return None
    key = unit.strip().casefold().removesuffix("s")  # "microvolts", "mVs" are seen in the wild
    return _MV_PER_UNIT.get(key)


def require_mv_per_unit(unit: str | None, source: str, what: str) -> float:
    """`mv_per_unit`, raising a RecordingError that names the channel for an unknown unit."""
    factor = mv_per_unit(unit)
    if factor is None and not unit:
        raise recording_error(source, f"{what} has no unit", "export the ECG with its unit (uV, mV or V)")
    if factor is None:
        raise recording_error(
            source,
            f"{what} is in unit {unit!r}, which is not a voltage unit this reader knows",
            "export the ECG in uV, mV or V",
        )
    return factor
