"""Which prompts each step trains on: epoch-aware, shuffled with a seed, every row exactly once per epoch.

With difficulty scores (``data.order = curriculum``, opsd.curriculum) each epoch runs from the easiest row to the
hardest, ties in the epoch's shuffled order.

The cursor (epoch, position) is all the state there is, so a checkpoint stores it and a resumed run continues with
the very next rows. The last batch of an epoch is smaller when the rows do not divide evenly: nothing wraps into the
next epoch, nothing is dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from opsd.curriculum import curriculum_order
from opsd.schema import PROBLEM_SCHEMA, sample_id


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0


class EpochSampler:
    def __init__(self, problems: pa.Table, prompts_per_step: int, seed: int, cursor: Cursor | None = None,
                 difficulty: np.ndarray | None = None):
        if problems.num_rows == 0:
            raise ValueError("no problems to train on")
        if difficulty is not None and len(difficulty) != problems.num_rows:
            raise ValueError(f"{len(difficulty)} difficulty scores for {problems.num_rows} problems")
        self.problems = problems
        self.difficulty = difficulty
        self.prompts_per_step = prompts_per_step
        self.seed = seed
        self.cursor = cursor or Cursor()

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.problems.num_rows / self.prompts_per_step)

    def order(self, epoch: int) -> np.ndarray:
        shuffled = np.random.default_rng([self.seed, epoch]).permutation(self.problems.num_rows)
        return shuffled if self.difficulty is None else curriculum_order(shuffled, self.difficulty)

    def next_batch(self) -> pa.Table:
        """The next step's problems (columns of opsd.schema.PROBLEM_SCHEMA; sample ids carry the epoch)."""
        if self.cursor.position >= self.problems.num_rows:
            self.cursor = Cursor(self.cursor.epoch + 1, 0)
        epoch, start = self.cursor.epoch, self.cursor.position
        rows = self.order(epoch)[start: start + self.prompts_per_step]
        self.cursor = Cursor(epoch, start + len(rows))
        batch = self.problems.take(pa.array(rows))
        ids = [sample_id(row_id, epoch, 0) for row_id in batch.column("id").to_pylist()]
        return pa.table(
            {"sample_id": ids, "problem": batch.column("problem"), "solution": batch.column("solution"),
             "answer": batch.column("answer")},
            schema=PROBLEM_SCHEMA,
        )
