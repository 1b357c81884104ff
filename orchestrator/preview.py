"""Show what the student and the teacher will read, before any engine starts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import pyarrow as pa

from opsd.hf import load_tokenizer
from opsd.prompts import PromptBuilder, PromptLengths
from orchestrator.config import OPSDConfig
from opsd.data import load_dataset


@dataclass(frozen=True)
class LengthSummary:
    """Token accounting over a dataset: the longest and the mean prompt of each side."""

    rows: int
    student_prompt_max: int
    student_prompt_mean: float
    teacher_prompt_max: int
    teacher_prompt_mean: float
    solution_max: int
    response_budget: int

    @property
    def teacher_context_max(self) -> int:
        return self.teacher_prompt_max + self.response_budget


def summarize_lengths(lengths: list[PromptLengths]) -> LengthSummary:
    if not lengths:
        raise ValueError("no rows to summarise")
    return LengthSummary(
        rows=len(lengths),
        student_prompt_max=max(x.student_prompt for x in lengths),
        student_prompt_mean=statistics.fmean(x.student_prompt for x in lengths),
        teacher_prompt_max=max(x.teacher_prompt for x in lengths),
        teacher_prompt_mean=statistics.fmean(x.teacher_prompt for x in lengths),
        solution_max=max(x.solution for x in lengths),
        response_budget=lengths[0].response_budget,
    )


@dataclass(frozen=True)
class PromptPreview:
    """What a preview loaded, for callers that go on with it."""

    table: pa.Table
    builder: PromptBuilder
    lengths: LengthSummary


def preview_prompts(cfg: OPSDConfig, rows: int = 1, print_fn=print) -> PromptPreview:
    """Print the first ``rows`` student and teacher prompts and the token accounting of the whole dataset."""
    table, report = load_dataset(cfg.data, required=("problem", "solution"))
    print_fn(f"data: {report.path}: {report.rows_kept} rows kept of {report.rows_read} read")
    for reason, count in sorted(report.skipped.items()):
        print_fn(f"  skipped {count} rows ({reason})")

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    builder = PromptBuilder(tokenizer, cfg.prompt)
    problems = table.column("problem").to_pylist()
    solutions = table.column("solution").to_pylist()
    budget = cfg.rollout.max_response_tokens

    for i in range(min(rows, table.num_rows)):
        print_fn(f"\n===== row {table.column('id')[i].as_py()}: student prompt =====")
        print_fn(builder.student_prompt(problems[i]))
        print_fn(f"===== row {table.column('id')[i].as_py()}: teacher prompt (the student's trace follows) =====")
        print_fn(builder.teacher_prompt(problems[i], solutions[i]))

    summary = summarize_lengths([builder.lengths(p, s, budget) for p, s in zip(problems, solutions)])
    print_fn(
        f"\ntokens over {summary.rows} rows: student prompt max {summary.student_prompt_max} "
        f"(mean {summary.student_prompt_mean:.0f}), teacher prompt max {summary.teacher_prompt_max} "
        f"(mean {summary.teacher_prompt_mean:.0f}), solution max {summary.solution_max}; "
        f"with {budget} response tokens the longest teacher context is {summary.teacher_context_max} tokens"
    )
    return PromptPreview(table, builder, summary)
