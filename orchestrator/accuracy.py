"""The student's correctness during training: each trace's final answer graded against its problem's reference.

OPSD never looks at it (the teacher's distribution is the only signal); users watch it. Grading (math-verify, in
worker processes with a per-answer timeout) runs in a background thread while the teacher and the learner work, so
a step waits for it only if it is not done by the time the step is recorded. GRPO's rewards are these grades: it
waits for them (:meth:`StudentAccuracy.grade`) before its learner step. One grader per run.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from evaluation.grading import Grader
from rollout.pool import RolloutSummary


class StudentAccuracy:
    def __init__(self, processes: int = 1, timeout_s: float = 5.0):
        self.grader = Grader(processes, timeout_s)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsd-accuracy")

    def submit(self, summary: RolloutSummary) -> Future:
        """Start grading a step's traces; the future's result is the step's accuracy metrics."""
        return self.thread.submit(lambda: self.metrics(self._grade(summary)))

    def grade(self, summary: RolloutSummary) -> list[str | None]:
        """Each trace's grade status (``correct``, ``wrong``, ``no_answer``, ``timeout``, ``error``; None: its
        problem has no reference answer), waiting for it. Runs on the grading thread, one call at a time."""
        return self.thread.submit(self._grade, summary).result()

    def _grade(self, summary: RolloutSummary) -> list[str | None]:
        traces = list(zip(summary.final_answers, summary.references))
        graded = [i for i, (_, reference) in enumerate(traces) if reference is not None]
        pairs = [traces[i] for i in graded]
        statuses: list[str | None] = [None] * len(traces)
        for i, status in zip(graded, self.grader.grade(pairs) if pairs else []):
            statuses[i] = status
        return statuses

    @staticmethod
    def metrics(statuses: Sequence[str | None]) -> dict[str, float]:
        graded = [s for s in statuses if s is not None]
        n = len(graded)
        return {
            # Traces whose problem has a reference answer; accuracy over those.
            "student_accuracy": graded.count("correct") / n if n else float("nan"),
            "student_answered": sum(s != "no_answer" for s in graded) / n if n else float("nan"),
            "student_graded": n,
        }

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        self.grader.close()
