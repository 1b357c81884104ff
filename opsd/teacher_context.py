"""Teacher contexts: the teacher prompt (problem + reference solution + transition) followed by the student's trace,
token for token. Shared by the teacher actors and the learner's in-process teacher (full-vocabulary loss), so both see
exactly the same context. The over-length policy: docs/ARCHITECTURE.md ("The teacher").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from opsd.prompts import PromptBuilder

TRUNCATION_MARKER = "\n[... part of the reference solution omitted ...]\n"
MIN_SOLUTION_TOKENS = 16  # below this a "solution" carries no information: skip the row instead
_MAX_FIT_ATTEMPTS = 4  # re-tokenising the shortened text can differ by a few tokens; tighten and retry


@dataclass(frozen=True)
class TeacherContext:
    """One row's teacher input: ``input_ids`` = teacher prompt + response; the response starts at ``response_start``."""

    row: int  # index in the incoming table
    input_ids: list[int]
    response_start: int
    solution_tokens_removed: int = 0

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass(frozen=True)
class ContextPlan:
    contexts: list[TeacherContext]
    skipped: dict[str, int]  # reason -> rows
    skipped_rows: list[int]
    truncated_rows: int


def build_contexts(
    builder: PromptBuilder,
    problems: Sequence[str],
    solutions: Sequence[str],
    responses: Sequence[Sequence[int]],
    max_context: int,
    on_overlength: Literal["truncate_solution", "skip"],
) -> ContextPlan:
    contexts, skipped_rows, truncated = [], [], 0
    skipped: dict[str, int] = {}
    for row, (problem, solution, response) in enumerate(zip(problems, solutions, responses)):
        response = [int(t) for t in response]
        prompt = builder.teacher_prompt_ids(problem, solution)
        removed = 0
        if len(prompt) + len(response) > max_context:
            if on_overlength == "skip":
                reason = "overlength"
            else:
                prompt, removed, reason = _shorten_solution(builder, problem, solution, len(response), max_context)
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                skipped_rows.append(row)
                continue
            truncated += 1
        contexts.append(TeacherContext(row, prompt + response, len(prompt), removed))
    return ContextPlan(contexts, skipped, skipped_rows, truncated)


def _shorten_solution(builder: PromptBuilder, problem: str, solution: str, response_length: int, max_context: int):
    """Teacher prompt ids with the solution cut from the middle so that prompt + response fits, or a skip reason."""
    solution_ids = builder.encode(solution)
    marker = len(builder.encode(TRUNCATION_MARKER))
    excess = len(builder.teacher_prompt_ids(problem, solution)) + response_length - max_context
    for _ in range(_MAX_FIT_ATTEMPTS):
        keep = len(solution_ids) - excess - marker
        if keep < MIN_SOLUTION_TOKENS:
            return None, 0, "overlength_even_without_solution"
        head = keep // 2
        shortened = (builder.tokenizer.decode(solution_ids[:head]) + TRUNCATION_MARKER
                     + builder.tokenizer.decode(solution_ids[len(solution_ids) - (keep - head):]))
        prompt = builder.teacher_prompt_ids(problem, shortened)
        over = len(prompt) + response_length - max_context
        if over <= 0:
            return prompt, len(solution_ids) - keep, ""
        excess += over
    return None, 0, "overlength_even_without_solution"
