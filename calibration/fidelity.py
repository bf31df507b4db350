"""Fidelity metrics of a quantized recipe against the float baseline, and the accuracy gate.

Tensor metrics (tensor_fidelity), next-token distribution distance (logit_kl), greedy decoding
agreement (greedy_agreement), a pass/fail gate over them (AccuracyGate) and a plain text table.

JSON: a perfect match has sqnr_db = +inf, which strict JSON cannot hold (json.dumps writes the
non-standard `Infinity`). Reports pass their metrics through json_safe(), which writes non-finite
floats as the strings "inf", "-inf" and "nan"; float() reads those strings back unchanged.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from pulse_edge.jsonl import JSON_TEXT_ERRORS, json_error_reason

HIGHER = "higher is better"
LOWER = "lower is better"
METRICS: Mapping[str, str] = MappingProxyType({
    "cosine": HIGHER,
    "vision_cosine": HIGHER,
    "sqnr_db": HIGHER,
    "agreement": HIGHER,
    "rel_err": LOWER,
    "max_abs_err": LOWER,
    "kl": LOWER,
})
OPERATORS: Mapping[str, Callable[[float, float], bool]] = MappingProxyType(
    {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
)
# What a failed bound reads like: "kl 0.083 > 0.05" for the bound "kl<=0.05".
_NEGATION: Mapping[str, str] = MappingProxyType({">=": "<", ">": "<=", "<=": ">", "<": ">="})
# Which operators make sense for a direction: a lower bound on a higher-is-better metric and vice versa.
_DIRECTION_OPS: Mapping[str, tuple[str, ...]] = MappingProxyType({HIGHER: (">=", ">"), LOWER: ("<=", "<")})
_CLAUSE = re.compile(r"^\s*([A-Za-z_]+)\s*(>=|<=|>|<)\s*(\S+)\s*$")


# ----------------------------------------------------------------------------- tensor metrics


def _pair(got: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    g = np.asarray(got, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if g.shape != r.shape:
        raise ValueError(f"shapes differ: got {g.shape}, ref {r.shape}")
    return g.reshape(-1), r.reshape(-1)


def _ratio(num: float, den: float) -> float:
    """num / den where 0/0 = 0 (nothing to compare) and x/0 = inf."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _sqnr_db(signal: float, noise: float) -> float:
    """10 log10(signal / noise): +inf for no noise (equal tensors, zeros included), -inf for noise on zero signal."""
    if math.isnan(noise) or math.isnan(signal):
        return math.nan
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def tensor_fidelity(got: Any, ref: Any) -> dict[str, float]:
    """cosine, rel_err = ||got - ref|| / ||ref||, sqnr_db = 10 log10(||ref||^2 / ||got - ref||^2), max_abs_err.

    Frobenius norms over all elements, float64. Edge cases: equal tensors give sqnr_db = +inf
    (see json_safe for storing it) and rel_err 0; two all-zero tensors have cosine 1; a zero
    tensor against a non-zero one has cosine 0. NaN anywhere makes the metrics NaN, which every
    gate threshold fails.
    """
    g, r = _pair(got, ref)
    diff = g - r
    noise = float(diff @ diff)
    signal = float(r @ r)
    norms = math.sqrt(float(g @ g)) * math.sqrt(signal)
    cosine = float(g @ r) / norms if norms else (1.0 if not g.any() and not r.any() else 0.0)
    return {
        "cosine": cosine,
        "rel_err": math.sqrt(_ratio(noise, signal)),
        "sqnr_db": _sqnr_db(signal, noise),
        "max_abs_err": float(np.max(np.abs(diff))) if diff.size else 0.0,
    }


def json_safe(value: Any) -> Any:
    """A copy fit for strict JSON: non-finite floats become "inf" / "-inf" / "nan", numpy scalars plain numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """log softmax over the last axis by log-sum-exp, so huge logits do not overflow."""
    with np.errstate(invalid="ignore"):  # inf - inf: a row with no finite maximum is NaN (logit_kl says so)
        shifted = logits - np.max(logits, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def logit_kl(ref_logits: Any, got_logits: Any) -> float:
    """Mean over rows (all leading dims) of KL(softmax(ref) || softmax(got)), natural log.

    Tokens the reference gives probability 0 (logit -inf, e.g. a masked vocabulary) add nothing;
    a token the reference allows and `got` rules out makes the divergence inf. NaN where either side's row holds
    NaN or +inf or no finite logit: such a reference made 0 (every term masked), which a kl<= gate passed.
    """
    ref = np.asarray(ref_logits, dtype=np.float64)
    got = np.asarray(got_logits, dtype=np.float64)
    if ref.shape != got.shape or ref.ndim < 1:
        raise ValueError(f"logit shapes differ or are scalars: ref {ref.shape}, got {got.shape}")
    log_p = _log_softmax(ref.reshape(-1, ref.shape[-1]))
    log_q = _log_softmax(got.reshape(-1, got.shape[-1]))
    if np.isnan(log_p).any():  # the reference's distribution is no distribution: nothing to compare with
        return math.nan
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):  # -inf - -inf where p = 0; masked out just below
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return float(np.mean(np.sum(terms, axis=-1)))


# ----------------------------------------------------------------------------- token agreement


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where a and b differ (the shorter length if one is a prefix); None if equal."""
    shared = min(len(a), len(b))
    mismatch = np.flatnonzero(np.asarray(a[:shared]) != np.asarray(b[:shared]))
    if mismatch.size:
        return int(mismatch[0])
    return None if len(a) == len(b) else shared


def greedy_agreement(ref_tokens: Sequence[int], got_tokens: Sequence[int]) -> dict[str, Any]:
    """Position-wise agreement of two greedy decodes.

    agreement: the fraction of positions of the shared length where the tokens are equal (1.0 for
    two empty sequences, 0.0 when only one is empty); first_divergence as above; ref_len, got_len.
    """
    shared = min(len(ref_tokens), len(got_tokens))
    if shared:
        equal = np.asarray(ref_tokens[:shared]) == np.asarray(got_tokens[:shared])
        agreement = float(np.mean(equal))
    else:
        agreement = 1.0 if len(ref_tokens) == len(got_tokens) else 0.0
    return {
        "agreement": agreement,
        "first_divergence": first_divergence(ref_tokens, got_tokens),
        "ref_len": len(ref_tokens),
        "got_len": len(got_tokens),
    }


# ----------------------------------------------------------------------------- accuracy gate


def _gate_error(detail: str) -> ValueError:
    return ValueError(
        f"bad accuracy gate: {detail}; expected METRIC OP VALUE[,METRIC OP VALUE...] with METRIC one of "
        f"{', '.join(METRICS)} and OP one of {', '.join(OPERATORS)}, "
        'or a path to a .json file of {METRIC: "OP VALUE"}'
    )


@dataclass(frozen=True)
class Threshold:
    """One bound, e.g. Threshold("kl", "<=", 0.05)."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def _threshold(metric: str, op: str, value_text: str) -> Threshold:
    if metric not in METRICS:
        raise _gate_error(f"unknown metric {metric!r}")
    if op not in OPERATORS:
        raise _gate_error(f"unknown operator {op!r}")
    try:
        value = float(value_text)
    except ValueError:
        raise _gate_error(f"{metric}{op}{value_text}: {value_text!r} is not a number") from None
    if math.isnan(value):
        raise _gate_error(f"{metric}{op}{value_text}: the bound is NaN")
    if op not in _DIRECTION_OPS[METRICS[metric]]:
        allowed = " or ".join(_DIRECTION_OPS[METRICS[metric]])
        raise _gate_error(f"{metric}{op}{value_text} bounds the wrong side ({METRICS[metric]}; use {allowed})")
    return Threshold(metric=metric, op=op, value=value)


def _parse_clause(clause: str) -> Threshold:
    match = _CLAUSE.match(clause)
    if match is None:
        raise _gate_error(f"cannot read {clause.strip()!r}")
    return _threshold(*match.groups())


def _mapping_clauses(path: Path) -> list[str]:
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise _gate_error(f"cannot read {path}: {exc}".replace("\n", " ")) from None
    except JSON_TEXT_ERRORS as exc:  # UnicodeDecodeError too: a ValueError
        raise _gate_error(f"cannot read {path}: {json_error_reason(exc)}".replace("\n", " ")) from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise _gate_error(f"{path} must hold one JSON object of strings")
    return [f"{metric}{bound}" for metric, bound in data.items()]


@dataclass(frozen=True)
class AccuracyGate:
    """Thresholds a recipe's measured fidelity must meet."""

    thresholds: tuple[Threshold, ...]

    @classmethod
    def from_string(cls, text: str) -> AccuracyGate:
        """Parse "cosine>=0.99,kl<=0.05,agreement>=0.9", or, when text ends in ".json", read that file.

        The file holds one object of bounds, e.g. {"cosine": ">=0.99", "kl": "<= 0.05"}. Metrics are
        the keys of METRICS, operators >=, >, <=, <; a bound must point the metric's better way
        (kl>=0.05 is refused). Every error is one-line ValueError naming the allowed forms.
        """
        stripped = text.strip()
        clauses = _mapping_clauses(Path(stripped)) if stripped.endswith(".json") else stripped.split(",")
        if not stripped or not clauses:
            raise _gate_error("it is empty")
        return cls(thresholds=tuple(_parse_clause(clause) for clause in clauses))

    def check(self, measured: Mapping[str, float]) -> list[str]:
        """One line per failed threshold, e.g. "kl 0.083 > 0.05"; empty when all pass.

        A metric missing from `measured` fails ("kl missing (needs <= 0.05)"), and so does NaN.
        """
        failures = []
        for t in self.thresholds:
            if t.metric not in measured:
                failures.append(f"{t.metric} missing (needs {t.op} {t.value:g})")
                continue
            value = float(measured[t.metric])
            if math.isnan(value):
                failures.append(f"{t.metric} nan (needs {t.op} {t.value:g})")
            elif not OPERATORS[t.op](value, t.value):
                failures.append(f"{t.metric} {value:.4g} {_NEGATION[t.op]} {t.value:g}")
        return failures

    def __str__(self) -> str:
        return ",".join(str(t) for t in self.thresholds)


# ----------------------------------------------------------------------------- text table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.4g}"
    return str(value)


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain aligned table: a header, a rule of dashes, one line per row; two spaces between columns.

    Floats print with 4 significant digits, None or a missing key as "-". Numeric columns (every
    present value a number, at least one present) are right-aligned, others left-aligned. No
    trailing spaces.
    """
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    present = [[row[c] for row in rows if row.get(c) is not None] for c in columns]
    numeric = [bool(values) and all(_is_numeric(v) for v in values) for values in present]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(columns)), line(["-" * w for w in widths]), *(line(r) for r in cells)])
