"""Intervals and paired tests for the scores (scipy.stats), so that a table says whether a
difference is larger than chance.

- Per run, over prompts: a Wilson score interval for each rate (HS, HS+, task refusals, FA),
  in percent. A run's HS on 40 prompts is a binomial proportion; its interval is wide.
- Over seeds: the mean with a Student t interval (needs at least 2 seeds; with fewer than 3 it is
  very wide and the report says so).
- Two defenses on the same prompts: the exact McNemar test, a two-sided binomial test on the
  discordant pairs (b: only the first counts the prompt, c: only the second), pooled over the
  seeds both finished (a pair is one prompt at one seed).
"""

from __future__ import annotations

import statistics

from scipy import stats

from plumbing.errors import InputError

DEFAULT_LEVEL = 0.95


def check_level(level: float, key: str = "eval.interval_level") -> float:
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise InputError(f"{key}={level!r} must be a number in (0, 1), e.g. 0.95 for 95% intervals")
    return float(level)


def proportion_interval(successes: int, n: int, level: float = DEFAULT_LEVEL) -> list[float] | None:
    """Wilson score interval of successes / n, in percent; None when n == 0."""
    if n == 0:
        return None
    ci = stats.binomtest(successes, n).proportion_ci(
        confidence_level=check_level(level), method="wilson"
    )
    return [100.0 * float(ci.low), 100.0 * float(ci.high)]


def mean_interval(values: list[float], level: float = DEFAULT_LEVEL) -> list[float] | None:
    """Student t interval of the mean of `values` (one per seed); None with fewer than 2 values."""
    check_level(level)
    if len(values) < 2:
        return None
    sem = statistics.stdev(values) / len(values) ** 0.5
    if sem == 0:
        return [statistics.fmean(values)] * 2
    low, high = stats.t.interval(level, df=len(values) - 1, loc=statistics.fmean(values), scale=sem)
    return [float(low), float(high)]


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """p-value of the exact two-sided McNemar test from the discordant pair counts (1.0 when the
    two agree on every pair)."""
    discordant = only_first + only_second
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(only_first, discordant, 0.5).pvalue)
