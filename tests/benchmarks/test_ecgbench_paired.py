"""McNemar's exact test and the paired interval of `eval compare`, against hand-computed values."""

from __future__ import annotations

import pytest

from pulse_edge.benchmarks.ecgbench.paired import mcnemar_exact, paired_change


def test_mcnemar_exact_by_hand() -> None:
    # b 10, c 2: 12 tosses, tail P(X <= 2) = (1 + 12 + 66) / 4096; two-sided: 158 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(7, 5) == pytest.approx(2 * (1 + 12 + 66 + 220 + 495 + 792) / 4096)  # 0.774
    assert mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 0) == 1.0  # capped, and nothing changed
    assert mcnemar_exact(0, 20) == pytest.approx(2 / 2**20)


def test_paired_change_counts_and_interval_by_hand() -> None:
    # 100 samples: 88 right in both, 10 right -> wrong, 2 wrong -> right; d = -0.08,
    # Wald half-width 1.959964 x sqrt((0.12 - 0.0064) / 100) = 0.066059
    first = [True] * 98 + [False] * 2
    later = [True] * 88 + [False] * 10 + [True] * 2
    change = paired_change(first, later)
    assert (change.right_to_wrong, change.wrong_to_right, change.samples) == (10, 2, 100)
    assert change.delta == -8.0 and change.p_value == pytest.approx(158 / 4096)
    assert change.ci95 == pytest.approx((-14.6059, -1.3941), abs=1e-3)
    same = paired_change(first, first)
    assert (same.delta, same.p_value, same.ci95) == (0.0, 1.0, (0.0, 0.0))
    with pytest.raises(ValueError, match="same samples"):
        paired_change([True], [True, False])
