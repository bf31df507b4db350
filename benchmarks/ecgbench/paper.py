"""Published ECGBench figures, to set measured results beside (reference data, never measured here).

Source: Liu et al. 2024, "Teach Multimodal LLMs to Comprehend Electrocardiographic
Images" (arXiv:2410.19008), ECGBench results table. Percentages; AUC and F1
higher is better, HL (Hamming loss) lower is better; the report and arena
figures are LLM-judge scores (GPT-4o as judge) on a 0-100 scale.
"""

from __future__ import annotations

from types import MappingProxyType

SOURCE = ('Liu et al. 2024, "Teach Multimodal LLMs to Comprehend Electrocardiographic Images" '
          "(arXiv:2410.19008), ECGBench table")


def _table(values: tuple[float, ...]) -> MappingProxyType[str, MappingProxyType[str, float]]:
    """The paper's column order: PTB-XL super AUC/F1/HL, report, CODE-15 AUC/F1/HL, ECG-QA,
    CPSC AUC/F1/HL, CSN, G12, MMMU-ECG, arena."""
    (ptb_auc, ptb_f1, ptb_hl, report, code_auc, code_f1, code_hl, ecgqa,
     cpsc_auc, cpsc_f1, cpsc_hl, csn, g12, mmmu, arena) = values
    return MappingProxyType({
        "ptb-test": MappingProxyType({"auc": ptb_auc, "f1": ptb_f1, "hl": ptb_hl}),
        "ptb-test-report": MappingProxyType({"score": report}),
        "code15-test": MappingProxyType({"auc": code_auc, "f1": code_f1, "hl": code_hl}),
        "ecgqa-test": MappingProxyType({"accuracy": ecgqa}),
        "cpsc-test": MappingProxyType({"auc": cpsc_auc, "f1": cpsc_f1, "hl": cpsc_hl}),
        "csn-test-no-cot": MappingProxyType({"accuracy": csn}),
        "g12-test-no-cot": MappingProxyType({"accuracy": g12}),
        "mmmu-ecg": MappingProxyType({"accuracy": mmmu}),
        "arena": MappingProxyType({"score": arena}),
    })


REFERENCE = MappingProxyType({
    "PULSE-7B (paper)": _table((82.4, 74.8, 11.0, 61.3, 90.7, 85.4, 5.0, 73.8, 76.9, 57.6, 8.6, 85.2, 78.2, 58.0,
                                38.9)),
    "GPT-4o (paper)": _table((55.6, 28.3, 26.2, 50.2, 59.9, 24.9, 15.7, 35.2, 50.9, 10.6, 18.2, 57.5, 49.2, 43.5,
                              33.5)),
})
