"""Diagnostic statements in a generated answer, mapped to a fixed vocabulary with standard codes."""

from pulse_edge.runtime.findings.extract import Finding, extract_findings, labels_in, word_pattern
from pulse_edge.runtime.findings.vocabulary import CONCEPTS, LABEL_SPACES, Concept

__all__ = ["CONCEPTS", "LABEL_SPACES", "Concept", "Finding", "extract_findings", "labels_in", "word_pattern"]
