"""Multi-label metrics in plain numpy, defined as the paper's scikit-learn calls compute them.

- binarize: one column per class; labels outside the classes are dropped (what
  `MultiLabelBinarizer.transform` does with unknown labels).
- per-class F1 = 2TP / (2TP + FP + FN); 0 where that is 0/0 (scikit-learn's
  default `zero_division`).
- "AUC" = ROC-AUC of hard 0/1 predictions. The ROC curve of a 0/1 score has
  the single corner (FPR, TPR), so its area is (1 + TPR - FPR) / 2; a class
  whose gold column holds one value only has no ROC curve: NaN.
- Hamming loss = wrong cells / all cells.
- One class only, fitted on the gold labels (the paper's path): scikit-learn reads a one-column matrix as a
  binary target, and F1 with `average=None` is then given per label value, 0 (the class absent) first where
  any cell is 0; the paper's loop takes entry k for its k-th class, so its figure is the F1 of the label 0
  (of the label 1 only where no cell is 0). Classes given (strict mode) keep the per-class mean.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MultiLabelScores:
    """Per-class values and their means; NaN where a value is undefined (the caller decides what to print)."""

    classes: tuple[str, ...]
    f1_per_class: tuple[float, ...]
    auc_per_class: tuple[float, ...]
    hamming: float
    f1_terms: tuple[float, ...] | None = None  # what the mean F1 averages, where not f1_per_class (module doc)

    @property
    def f1(self) -> float:
        return _mean(self.f1_per_class if self.f1_terms is None else self.f1_terms)

    @property
    def auc(self) -> float:
        return _mean(self.auc_per_class)


def fit_classes(label_sets: Sequence[Collection[str]]) -> tuple[str, ...]:
    """The sorted union of labels, as `MultiLabelBinarizer.fit` orders its classes."""
    return tuple(sorted(set().union(*label_sets))) if label_sets else ()


def binarize(label_sets: Sequence[Collection[str]], classes: Sequence[str]) -> np.ndarray:
    """[samples, classes] of 0/1; labels not among `classes` are ignored."""
    column = {c: j for j, c in enumerate(classes)}
    matrix = np.zeros((len(label_sets), len(classes)), dtype=np.int8)
    for i, labels in enumerate(label_sets):
        for label in labels:
            if label in column:
                matrix[i, column[label]] = 1
    return matrix


def f1_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    tp = np.sum((y_true == 1) & (y_pred == 1), axis=0)
    fp = np.sum((y_true == 0) & (y_pred == 1), axis=0)
    fn = np.sum((y_true == 1) & (y_pred == 0), axis=0)
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def hard_auc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """ROC-AUC of one class from 0/1 predictions; NaN when the gold column is constant."""
    positives = int(np.sum(y_true == 1))
    negatives = int(np.sum(y_true == 0))
    if positives == 0 or negatives == 0:
        return math.nan
    tpr = np.sum((y_true == 1) & (y_pred == 1)) / positives
    fpr = np.sum((y_true == 0) & (y_pred == 1)) / negatives
    return float((1.0 + tpr - fpr) / 2.0)


def hamming_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true != y_pred)) if y_true.size else math.nan


def multilabel_scores(gold: Sequence[Collection[str]], predicted: Sequence[Collection[str]],
                      classes: Sequence[str] | None = None) -> MultiLabelScores:
    """F1 / hard AUC / Hamming loss; classes default to those fitted on the gold labels (the paper's rule)."""
    fitted = classes is None
    classes = tuple(classes) if classes is not None else fit_classes(gold)
    y_true, y_pred = binarize(gold, classes), binarize(predicted, classes)
    f1 = f1_per_class(y_true, y_pred)
    auc = [hard_auc(y_true[:, j], y_pred[:, j]) for j in range(len(classes))]
    terms = None
    if fitted and len(classes) == 1 and np.any(y_true == 0) | np.any(y_pred == 0):  # binary to scikit-learn
        terms = (float(f1_per_class(1 - y_true, 1 - y_pred)[0]),)
    return MultiLabelScores(classes, tuple(float(v) for v in f1), tuple(auc), hamming_loss(y_true, y_pred), terms)


def _mean(values: Sequence[float]) -> float:
    """np.mean semantics: NaN if any value is NaN or there are none."""
    return float(np.mean(values)) if values else math.nan
