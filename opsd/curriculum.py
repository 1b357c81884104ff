"""Difficulty scores for a curriculum (``data.order = curriculum``): the order in which an epoch visits its problems.

Each epoch goes from the easiest problem to the hardest; problems of equal difficulty come in the epoch's seeded
shuffle, so a curriculum is as reproducible (and as resumable) as the shuffled order. The score is

* the base model's failure rate on the problem, ``1 - pass rate``, read from an ``opsd eval`` of the training
  problems (``data.difficulty = EVAL_DIR``: its ``samples.jsonl``; the pre-pass the OPSD paper proposes), or
* the length of the reference solution in characters when no such pass is given (longer worked solutions: more
  steps).
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import pyarrow as pa

from opsd.data import DataError

ORDERS = ("shuffled", "curriculum")


def solution_lengths(problems: pa.Table) -> np.ndarray:
    """Characters of each row's reference solution (0 where there is none)."""
    return np.array([len(s or "") for s in problems.column("solution").to_pylist()], dtype=np.float64)


def failure_rates(problems: pa.Table, eval_dir: str | os.PathLike) -> np.ndarray:
    """``1 - pass rate`` of each row, from the graded samples of an ``opsd eval`` run over these problems.

    Rows are matched by id (an eval set built from the training file gives its rows the same ids); a row the
    evaluation never sampled is an error naming it, since guessing its difficulty would silently reorder it."""
    from evaluation.report import SAMPLES_FILE, read_run

    _, records = read_run(eval_dir)
    correct: dict[str, list[bool]] = defaultdict(list)
    for record in records:
        correct[record.problem_id].append(record.correct)
    ids = problems.column("id").to_pylist()
    missing = [i for i in ids if i not in correct]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise DataError(f"data.difficulty: {os.path.join(eval_dir, SAMPLES_FILE)} has no samples of training "
                        f"problem(s) {shown}; evaluate the training file itself (opsd eval --sets NAME=DATA_FILE) "
                        "with the same ids")
    return np.array([1.0 - float(np.mean(correct[i])) for i in ids], dtype=np.float64)


def difficulty_scores(problems: pa.Table, order: str, difficulty: str | None) -> np.ndarray | None:
    """The rows' difficulty for ``order='curriculum'`` (None for ``'shuffled'``)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "shuffled":
        return None
    return solution_lengths(problems) if difficulty is None else failure_rates(problems, difficulty)


def curriculum_order(permutation: np.ndarray, difficulty: np.ndarray) -> np.ndarray:
    """``permutation`` (an epoch's shuffle of row indices) sorted by difficulty, easiest first; ties keep the
    shuffle's order."""
    return permutation[np.argsort(difficulty[permutation], kind="stable")]
