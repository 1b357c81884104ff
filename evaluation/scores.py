"""Eval-set scores from graded samples: avg@n, unbiased pass@k, maj@n, with 95% intervals.

Each problem has ``n`` sampled responses, ``c`` of them correct. Per problem:

* **avg@n** = c / n, the paper's metric (the expected accuracy of one sample; equal to pass@1);
* **pass@k** = 1 - C(n-c, k) / C(n, k), the unbiased estimator of "at least one of k samples is correct"
  (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"), for k <= n;
* **maj@n** = 1 if the most frequent extracted answer (:func:`~opsd.answers.vote_key`; ties go
  to the answer seen first; samples without an answer do not vote) is correct, else 0.

An eval set's score is the mean over its problems. The 95% interval is the normal interval of that mean,
mean ± 1.96 · s / sqrt(N), where s is the standard deviation over problems of the per-problem values (ddof 1) and
N the number of problems, clipped to [0, 1]. The problems are the unit of sampling: this interval covers both the
choice of problems and the sampling of responses (Miller 2024, "Adding Error Bars to Evals"). With N = 1 there is
no interval (NaN bounds).

Two runs on the same problems are compared per problem (:func:`paired_difference`): the interval of the mean of
the differences is much narrower than the two intervals suggest, because a problem's difficulty cancels out.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` correct out of ``n`` samples: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomial coefficients."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def default_ks(n: int) -> tuple[int, ...]:
    """The k of the pass@k columns by default: the powers of two from 2 below n, and n (for n >= 2). pass@1 is
    left out: it equals avg@n."""
    ks = {n} if n >= 2 else set()
    k = 2
    while k < n:
        ks.add(k)
        k *= 2
    return tuple(sorted(ks))


def majority_correct(keys: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """Whether the majority answer is correct. ``keys[i]`` is sample i's vote (None: no answer, no vote) and
    ``correct[i]`` its grade; samples with the same key have the same answer text up to spacing."""
    votes = Counter(key for key in keys if key is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(key for key in keys if key is not None and votes[key] == top)  # first seen among the tied
    return bool(correct[list(keys).index(winner)])


@dataclass(frozen=True)
class ProblemScore:
    """One problem's graded samples, reduced to what the metrics need."""

    problem_id: str
    n: int
    correct: int
    majority_correct: bool

    def value(self, metric: str) -> float:
        """This problem's value of ``metric`` ("avg", "maj" or "pass@K")."""
        if metric == "avg":
            return self.correct / self.n
        if metric == "maj":
            return float(self.majority_correct)
        if metric.startswith("pass@"):
            return pass_at_k(self.n, self.correct, int(metric[5:]))
        raise ValueError(f"unknown metric {metric!r}")


@dataclass(frozen=True)
class Estimate:
    """A mean over problems with its 95% interval."""

    mean: float
    low: float
    high: float
    count: int  # problems

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values: Sequence[float], clip: tuple[float, float] | None = (0.0, 1.0)) -> Estimate:
    """Mean of ``values`` with the normal 95% interval (see the module docstring)."""
    count = len(values)
    if count == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean = math.fsum(values) / count
    if count == 1:
        return Estimate(mean, math.nan, math.nan, 1)
    variance = math.fsum((v - mean) ** 2 for v in values) / (count - 1)
    half = Z95 * math.sqrt(variance / count)
    low, high = mean - half, mean + half
    if clip is not None:
        low, high = max(clip[0], low), min(clip[1], high)
    return Estimate(mean, low, high, count)


def metric_names(n: int, ks: Sequence[int]) -> list[tuple[str, str]]:
    """(name shown, per-problem metric) pairs, e.g. ("avg@16", "avg"), ("pass@4", "pass@4"), ("maj@16", "maj")."""
    return [(f"avg@{n}", "avg")] + [(f"pass@{k}", f"pass@{k}") for k in ks] + [(f"maj@{n}", "maj")]


def score_eval_set(problems: Sequence[ProblemScore], ks: Sequence[int] | None = None) -> dict[str, Estimate]:
    """avg@n, pass@k for each k <= n of ``ks`` (default :func:`default_ks`), and maj@n over ``problems``.

    Every problem must have the same n (one run samples n responses per problem)."""
    if not problems:
        return {}
    sizes = {p.n for p in problems}
    if len(sizes) != 1:
        raise ValueError(f"problems have different sample counts {sorted(sizes)}; score them separately")
    (n,) = sizes
    ks = default_ks(n) if ks is None else tuple(k for k in ks if k <= n)
    return {name: mean_interval([p.value(metric) for p in problems]) for name, metric in metric_names(n, ks)}


@dataclass(frozen=True)
class Difference:
    """B - A over the problems both runs scored, with the 95% interval of the paired mean difference."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    count: int

    @property
    def beyond_noise(self) -> bool | None:
        """True when the interval excludes 0; None when it is undefined (fewer than 2 problems)."""
        if math.isnan(self.low):
            return None
        return self.low > 0 or self.high < 0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> Difference:
    """Paired comparison of two runs' per-problem values (same problems, same order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same problems: {len(a)} vs {len(b)}")
    diffs = [y - x for x, y in zip(a, b)]
    estimate = mean_interval(diffs, clip=None)
    mean_a = math.fsum(a) / len(a) if a else math.nan
    mean_b = math.fsum(b) / len(b) if b else math.nan
    return Difference(mean_a, mean_b, estimate.mean, estimate.low, estimate.high, estimate.count)
