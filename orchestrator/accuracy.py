"""The student's correctness during training: each trace's final answer graded against its problem's reference.

OPSD never looks at it (the teacher's distribution is the only signal); users watch it. Grading (math-verify, in
worker processes with a per-answer timeout) runs in a background thread while the teacher and the learner work, so
a step waits for it only if it is not done by the time the step is recorded.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from evaluation.grading import Grader
from rollout.table import RolloutSummary


class StudentAccuracy:
    def __init__(self, processes: int = 1, timeout_s: float = 5.0):
        self.grader = Grader(processes, timeout_s)
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="opsd-accuracy")

    def submit(self, summary: RolloutSummary) -> Future:
        """Start grading a step's traces; the future's result is the step's accuracy metrics."""
        pairs = [(answer, reference) for answer, reference in zip(summary.final_answers, summary.references)
                 if reference is not None]
        return self.thread.submit(self._score, pairs, len(summary.final_answers))

    def _score(self, pairs: list[tuple[str | None, str]], traces: int) -> dict[str, float]:
        statuses = self.grader.grade(pairs) if pairs else []
        graded = len(statuses)
        return {
            # Traces whose problem has a reference answer; accuracy over those.
            "student_accuracy": statuses.count("correct") / graded if graded else float("nan"),
            "student_answered": sum(s != "no_answer" for s in statuses) / graded if graded else float("nan"),
            "student_graded": graded,
        }

    def close(self) -> None:
        self.thread.shutdown(wait=True)
        self.grader.close()
