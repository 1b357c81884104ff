"""What an evaluation produces: one record per sample, and per-eval-set scores computed from those records.

The records are the source of truth: ``samples.jsonl`` holds them, and both a run's scores and ``--compare`` are
computed from them by :func:`summarize` / :func:`problem_scores`.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from opsd.answers import vote_key
from evaluation.grading import GRADE_STATUSES
from evaluation.scores import Estimate, ProblemScore, majority_correct, score_eval_set


@dataclass(frozen=True)
class SampleRecord:
    """One sampled response, graded (a line of ``samples.jsonl``)."""

    eval_set: str
    problem_id: str
    sample_index: int  # 0 .. n-1 within the problem
    sample_id: str
    reference: str  # the eval set's answer
    extracted: str | None  # the response's final answer (None: none found)
    status: str  # correct, wrong, no_answer, timeout, error
    correct: bool
    finish_reason: str  # stop or length (truncated)
    response_tokens: int
    policy_version: int  # adapter version that generated it (0: base model)
    response: str

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> SampleRecord:
        return cls(**{name: row[name] for name in cls.__dataclass_fields__})


@dataclass(frozen=True)
class EvalSetResult:
    """Scores of one eval set (fractions in [0, 1]) and what went into them."""

    name: str
    n: int
    problems: int
    scores: dict[str, Estimate]  # "avg@16", "pass@1", ..., "maj@16"
    statuses: dict[str, int]  # samples per grade status
    truncated: int  # samples cut at max_tokens
    mean_response_tokens: float
    skipped: int = 0  # problems left out (prompt too long, with on_long_prompt=skip)

    @property
    def samples(self) -> int:
        return sum(self.statuses.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "problems": self.problems, "n": self.n, "samples": self.samples, "skipped_problems": self.skipped,
            "scores": {name: {"mean": e.mean, "ci95": [e.low, e.high]} for name, e in self.scores.items()},
            "statuses": self.statuses, "truncated": self.truncated,
            "mean_response_tokens": self.mean_response_tokens,
        }


@dataclass
class EvalResult:
    """An evaluation: per-eval-set results, every sample, and where the time went."""

    eval_sets: dict[str, EvalSetResult]
    samples: list[SampleRecord]
    seconds: dict[str, float] = field(default_factory=dict)  # generate, grade, total
    policy_version: int | None = None

    def metrics(self, prefix: str = "eval") -> dict[str, float]:
        """Flat numbers for a metrics log: ``eval/<set>/avg@16`` (with ``_ci95_low``/``_ci95_high``),
        ``pass@k``, ``maj@n``, ``no_answer_rate``, ``grading_timeouts``, ``truncation_rate``,
        ``response_tokens``; and ``eval/seconds``."""
        out: dict[str, float] = {}
        for name, result in self.eval_sets.items():
            base = f"{prefix}/{name}"
            for metric, estimate in result.scores.items():
                out[f"{base}/{metric}"] = estimate.mean
                if metric.startswith("avg@"):
                    out[f"{base}/{metric}_ci95_low"] = estimate.low
                    out[f"{base}/{metric}_ci95_high"] = estimate.high
            samples = max(result.samples, 1)
            out[f"{base}/no_answer_rate"] = result.statuses.get("no_answer", 0) / samples
            out[f"{base}/grading_timeouts"] = float(result.statuses.get("timeout", 0))
            out[f"{base}/truncation_rate"] = result.truncated / samples
            out[f"{base}/response_tokens"] = result.mean_response_tokens
        if "total" in self.seconds:
            out[f"{prefix}/seconds"] = self.seconds["total"]
        return out


def problem_scores(samples: Iterable[SampleRecord]) -> dict[str, list[ProblemScore]]:
    """Per eval set, per problem (in first-seen order): n, number correct, and whether the majority is right."""
    grouped: dict[str, dict[str, list[SampleRecord]]] = {}
    for sample in samples:
        grouped.setdefault(sample.eval_set, {}).setdefault(sample.problem_id, []).append(sample)
    scores: dict[str, list[ProblemScore]] = {}
    for eval_set, problems in grouped.items():
        scores[eval_set] = []
        for problem_id, rows in problems.items():
            rows = sorted(rows, key=lambda r: r.sample_index)
            keys = [vote_key(r.extracted) if r.extracted is not None else None for r in rows]
            scores[eval_set].append(ProblemScore(
                problem_id=problem_id, n=len(rows), correct=sum(r.correct for r in rows),
                majority_correct=majority_correct(keys, [r.correct for r in rows])))
    return scores


def summarize(samples: Sequence[SampleRecord], ks: Sequence[int] | None = None,
              skipped: dict[str, int] | None = None, order: Sequence[str] | None = None
              ) -> dict[str, EvalSetResult]:
    """Per-eval-set results from graded samples (``order``: eval set order, e.g. as requested)."""
    by_problem = problem_scores(samples)
    results: dict[str, EvalSetResult] = {}
    for name in list(order or []) + [other for other in by_problem if other not in (order or [])]:
        rows = [s for s in samples if s.eval_set == name]
        problems = by_problem.get(name, [])
        counts = Counter(s.status for s in rows)
        tokens = [s.response_tokens for s in rows]
        results[name] = EvalSetResult(
            name=name,
            n=problems[0].n if problems else 0,
            problems=len(problems),
            scores=score_eval_set(problems, ks),
            statuses={status: counts.get(status, 0) for status in GRADE_STATUSES},
            truncated=sum(s.finish_reason == "length" for s in rows),
            mean_response_tokens=sum(tokens) / len(tokens) if tokens else math.nan,
            skipped=(skipped or {}).get(name, 0),
        )
    return results
