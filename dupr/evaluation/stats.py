"""Means over seeds with 95 % confidence intervals, and paired differences between methods.

A study run once per seed gives a handful of values per metric. The interval of their mean is
Student's t interval, mean ± t(0.975, n − 1) · s / √n, the usual choice for a few independent
runs whose spread is unknown. Two initialisations evaluated with the same seeds are compared by
the mean of their per-seed differences (a paired t interval): the seed fixes the evaluation's
data order, augmentations and random heads, so pairing removes that shared noise. A difference
counts only when its interval excludes zero; with one seed there is no interval and nothing is
called a difference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

CONFIDENCE = 0.95
Seed = TypeVar("Seed")  # an int, or its text in JSON records


@dataclass(frozen=True)
class Estimate:
    """A mean over `n` seeds and its confidence interval (nan bounds when n < 2)."""

    mean: float
    n: int
    low: float = math.nan
    high: float = math.nan

    @property
    def has_interval(self) -> bool:
        return self.n >= 2 and math.isfinite(self.low) and math.isfinite(self.high)

    @property
    def excludes_zero(self) -> bool:
        """True when the interval lies on one side of zero: a difference, at 95 %."""
        return self.has_interval and (self.low > 0 or self.high < 0)

    def text(self, number_format: str = ".4g") -> str:
        """ "45.8 [42.1, 49.5]" (the mean and its interval), or "45.8" for one seed."""
        if not math.isfinite(self.mean):
            return ""
        shown = format(self.mean, number_format)
        if self.has_interval:
            shown += f" [{self.low:{number_format}}, {self.high:{number_format}}]"
        return shown


def estimate(values: Iterable[float], confidence: float = CONFIDENCE) -> Estimate:
    """The mean of `values` (nan ones left out) and its Student's t interval."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Estimate(math.nan, 0)
    mean = sum(xs) / n
    if n < 2:
        return Estimate(mean, n)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    # Imported here: scipy.stats and what it pulls in took 1.1 s of each start of a process
    # that imports the evaluations (the pipeline's driver, each stage's Ray worker), for a
    # quantile that only the summary computes.
    from scipy import stats

    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Estimate(mean, n, mean - half, mean + half)


def paired_difference(
    values: Mapping[Seed, float], reference: Mapping[Seed, float], confidence: float = CONFIDENCE
) -> Estimate:
    """`values − reference` over the seeds both have: the mean difference and its interval."""
    seeds = set(values) & set(reference)
    return estimate((values[s] - reference[s] for s in seeds), confidence)
