"""The nine ECGBench subsets: one table says how each is scored.

Names are the dataset's config names (the folder names of the Hugging Face
release, `PULSE-ECG/ECGBench`); short aliases are accepted on the command line.
Sizes are the paper's (Liu et al. 2024, ECGBench table), used to tell a full
run from a partial one.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from pulse_edge.errors import ConfigError
from pulse_edge.runtime.findings.vocabulary import CODE15_CLASSES, CPSC2018_CLASSES, PTBXL_SUPERCLASSES
from pulse_edge.runtime.findings.vocabulary import CODE15_WHOLE as CODE15_WHOLE  # NORM / ABNORMAL answers

# Scoring kinds; ecgbench_score maps each to its scorer.
LABELS = "labels"  # multi-label by label-code substrings (PTB-XL super, CPSC 2018)
CODE15 = "code15"  # CODE-15%: NORM / ABNORMAL or label codes, read after "Answer:"
CHOICE = "choice"  # one option letter
ECGQA = "ecgqa"  # a set of options named in the question
JUDGE = "judge"  # free text scored by an LLM judge
KINDS = (LABELS, CODE15, CHOICE, ECGQA, JUDGE)


@dataclass(frozen=True)
class SubsetSpec:
    """How one subset is asked, answered and scored."""

    name: str
    title: str  # as the paper's table names it
    kind: str
    paper_size: int
    labels: tuple[str, ...] = ()  # label codes (LABELS, CODE15)
    letters: str = ""  # valid option letters (CHOICE)
    judge_axes: tuple[str, ...] = ()  # what the judge scores (JUDGE)
    multi_turn: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"subset kind {self.kind!r} is not one of {', '.join(KINDS)}")


# The label spaces live with the findings vocabulary (runtime/findings/vocabulary.py), which maps statements
# onto them, so the scorer and every inference result read labels the same way.
PTB_LABELS = PTBXL_SUPERCLASSES
CPSC_LABELS = CPSC2018_CLASSES
CODE15_LABELS = CODE15_CLASSES
REPORT_AXES = ("diagnosis", "waveform", "rhythm")
ARENA_AXES = ("accuracy", "completeness", "instruction_adherence")

SUBSETS: MappingProxyType[str, SubsetSpec] = MappingProxyType({s.name: s for s in (
    SubsetSpec("ptb-test", "PTB-XL super", LABELS, 2082, labels=PTB_LABELS),
    SubsetSpec("ptb-test-report", "PTB-XL report", JUDGE, 500, judge_axes=REPORT_AXES),
    SubsetSpec("code15-test", "CODE-15%", CODE15, 1400, labels=CODE15_LABELS),
    SubsetSpec("ecgqa-test", "ECG-QA", ECGQA, 1317),
    SubsetSpec("cpsc-test", "CPSC 2018", LABELS, 2061, labels=CPSC_LABELS),
    SubsetSpec("csn-test-no-cot", "CSN", CHOICE, 1611, letters="ABCDEFGH"),
    SubsetSpec("g12-test-no-cot", "G12EC", CHOICE, 2026, letters="ABCDEFGH"),
    SubsetSpec("mmmu-ecg", "MMMU-ECG", CHOICE, 200, letters="ABCD"),
    SubsetSpec("arena", "ECG Arena", JUDGE, 50, judge_axes=ARENA_AXES, multi_turn=True),
)})

ALIASES: MappingProxyType[str, str] = MappingProxyType({
    "ptb": "ptb-test", "ptb-xl": "ptb-test", "ptb-report": "ptb-test-report", "report": "ptb-test-report",
    "code15": "code15-test", "code-15": "code15-test", "ecgqa": "ecgqa-test", "ecg-qa": "ecgqa-test",
    "cpsc": "cpsc-test", "csn": "csn-test-no-cot", "g12": "g12-test-no-cot", "mmmu": "mmmu-ecg",
    "ecg-arena": "arena",
})

# Metrics whose smaller value is better (a "drop" is a rise).
LOWER_IS_BETTER = frozenset({"hl"})


def resolve_subset(name: str) -> SubsetSpec:
    """The spec of a subset given by its config name or an alias; the error lists the valid names."""
    key = name.strip().lower()
    spec = SUBSETS.get(ALIASES.get(key, key))
    if spec is None:
        raise ConfigError(f"unknown ECGBench subset {name!r}; choose from {', '.join(SUBSETS)} "
                          f"(aliases: {', '.join(ALIASES)})")
    return spec
