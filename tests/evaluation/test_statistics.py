"""Intervals and paired tests against values computed by hand or taken from the literature."""

import math

import pytest

from evaluation.metrics import Verdict, accuracy_metrics, judged_metrics
from evaluation.statistics import check_level, mcnemar_exact, mean_interval, proportion_interval
from plumbing.errors import InputError


def test_wilson_interval_known_values():
    # 8 of 10: the Wilson 95% interval is [0.4902, 0.9433] (Newcombe 1998, table I style check)
    low, high = proportion_interval(8, 10)
    assert (low, high) == pytest.approx((49.016, 94.332), abs=1e-3)
    # the closed form, computed here: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)
    z, n, k = 1.959963984540054, 40, 27
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    expected = (100 * (centre - half) / (1 + z * z / n), 100 * (centre + half) / (1 + z * z / n))
    assert proportion_interval(k, n) == pytest.approx(expected, rel=1e-9)
    assert proportion_interval(0, 40)[0] == 0.0 and proportion_interval(40, 40)[1] == pytest.approx(
        100.0
    )
    assert proportion_interval(0, 0) is None


def test_t_interval_known_values():
    # mean 2, sd 1, n 3: t(0.975, 2) = 4.302653 -> 2 ± 4.302653/sqrt(3)
    half = 4.302652729911275 / math.sqrt(3)
    assert mean_interval([1.0, 2.0, 3.0]) == pytest.approx([2 - half, 2 + half], rel=1e-9)
    assert mean_interval([80.0, 30.0], level=0.9) == pytest.approx(
        [55 - 6.313751514675 * 25, 55 + 6.313751514675 * 25]
    )
    assert mean_interval([5.0]) is None and mean_interval([7.0, 7.0]) == [7.0, 7.0]


def test_exact_mcnemar_known_values():
    # b = 10, c = 2: two-sided exact p = 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * 79 / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096)
    assert mcnemar_exact(2, 10) == mcnemar_exact(10, 2)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0


@pytest.mark.parametrize("level", [0, 1, 1.5, -0.1, "high", True])
def test_a_level_outside_zero_one_is_refused(level):
    with pytest.raises(InputError, match=r"must be a number in \(0, 1\)"):
        check_level(level)


def test_every_run_metric_carries_its_interval():
    verdicts = [Verdict(refused=False, degenerate=False, substantive=True)] * 3 + [
        Verdict(refused=True, degenerate=True, substantive=True)
    ]
    metrics = judged_metrics(verdicts, [True, False], "refusal", level=0.9)
    assert metrics["harmful_score"] == 75.0 and metrics["harmful_score_ci"] == proportion_interval(
        3, 4, 0.9
    )
    assert metrics["harmful_score_plus_ci"] == proportion_interval(4, 4, 0.9)
    assert (
        metrics["task_refusal_rate_ci"] == proportion_interval(1, 2, 0.9)
        and metrics["interval_level"] == 0.9
    )
    fa = accuracy_metrics([True, True, False])
    assert fa["finetune_accuracy_ci"] == proportion_interval(2, 3) and fa["n_task_eval"] == 3
