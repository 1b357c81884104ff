"""Running an evaluation: a RolloutPool samples, this process extracts and grades, the records are scored.

    evaluator = Evaluator(cfg.eval, tokenizer)        # loads and checks the eval sets, starts the grading pool
    evaluator.check_prompts(context)                  # before any engine starts (its own prompt, eval.template)
    result = evaluator.run(rollout_pool)              # -> EvalResult; result.metrics(): eval/<set>/avg@n, ...

Problem ids become sample ids ``<set>:<id>@e0r<i>`` (each response seeded by its id); see docs/ARCHITECTURE.md ("Evaluation").
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evaluation.sets import EvalSet, load_eval_sets
from evaluation.config import EvalConfig
from opsd.answers import extract_answer
from evaluation.grading import Grader
from evaluation.records import EvalResult, SampleRecord, summarize
from opsd.configlib import ConfigError, validate_all
from opsd.errors import UserInputError
from opsd.prompts import PromptBuilder
from opsd.sampling import Sampling
from opsd.schema import PROBLEM_SCHEMA, parse_sample_id, sample_id
from opsd.schema import rollout_stats


def sampling_of(config: EvalConfig) -> Sampling:
    return Sampling(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, n=config.n,
                    max_tokens=config.max_tokens, seed=config.seed)


def problem_table(eval_sets: Sequence[EvalSet], shuffle_seed: int = 0) -> pa.Table:
    """Every eval set's problems as one problems table (ids ``<set>:<id>@e0r0``), rows shuffled."""
    ids, problems, answers = [], [], []
    for eval_set in eval_sets:
        ids += [sample_id(f"{eval_set.name}:{row_id}", 0, 0) for row_id in eval_set.table.column("id").to_pylist()]
        problems += eval_set.table.column("problem").to_pylist()
        answers += eval_set.table.column("answer").to_pylist()
    table = pa.table({"sample_id": ids, "problem": problems, "solution": [None] * len(ids), "answer": answers},
                     schema=PROBLEM_SCHEMA)
    order = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
    return table.take(pa.array(order, pa.int64()))


def split_sample_id(value: str) -> tuple[str, str, int]:
    """``"aime24:aime24-3@e0r5"`` -> ``("aime24", "aime24-3", 5)``."""
    parsed = parse_sample_id(value)
    if parsed is None or ":" not in parsed[0]:
        raise ValueError(f"not an evaluation sample id: {value!r}")
    eval_set, problem_id = parsed[0].split(":", 1)
    return eval_set, problem_id, parsed[2]


def decode_responses(table: pa.Table, tokenizer: Any, rows_per_batch: int = 256) -> list[str]:
    """Response texts (special tokens dropped), decoded a slice of rows at a time: long thinking traces would
    otherwise sit in memory as Python lists of token ids all at once."""
    texts: list[str] = []
    for start in range(0, table.num_rows, rows_per_batch):
        ids = table.column("response_ids").slice(start, rows_per_batch).to_pylist()
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts


def load_config_eval_sets(config: EvalConfig) -> list[EvalSet]:
    return load_eval_sets(config.sets, config.limit, config.mapping, config.columns)


def run_eval(pool: Any, eval_sets: Sequence[EvalSet], config: EvalConfig, tokenizer: Any,
             grader: Grader | None = None) -> EvalResult:
    """Evaluate what ``pool`` (a ``rollout.pool.RolloutPool``) serves now on ``eval_sets``: every eval set as
    one batch, rows shuffled so that long and short problems spread evenly over the workers.

    ``tokenizer`` decodes the responses (the model's). ``grader``: a pool to reuse across calls; None starts one
    for this call and stops it after."""
    started = time.perf_counter()
    table = pool.generate(problem_table(eval_sets, config.seed), sampling_of(config), config.prompt(),
                          config.generate_timeout_s)
    generated = time.perf_counter()

    responses = decode_responses(table, tokenizer)
    extracted = [extract_answer(text, config.answer_format) for text in responses]
    references = table.column("answer").to_pylist()
    if grader is None:
        with Grader(config.grade_processes, config.grade_timeout_s) as own:
            statuses = own.grade(list(zip(extracted, references)))
    else:
        statuses = grader.grade(list(zip(extracted, references)))
    graded = time.perf_counter()

    samples = []
    columns = {name: table.column(name).to_pylist() for name in ("sample_id", "finish_reason", "policy_version")}
    lengths = pc.list_value_length(table.column("response_ids")).to_pylist()
    for i, sid in enumerate(columns["sample_id"]):
        eval_set, problem_id, index = split_sample_id(sid)
        samples.append(SampleRecord(
            eval_set=eval_set, problem_id=problem_id, sample_index=index, sample_id=sid,
            reference=references[i], extracted=extracted[i], status=statuses[i],
            correct=statuses[i] == "correct", finish_reason=columns["finish_reason"][i],
            response_tokens=lengths[i], policy_version=columns["policy_version"][i],
            response=responses[i]))
    position = {(e.name, pid): (k, j) for k, e in enumerate(eval_sets)
                for j, pid in enumerate(e.table.column("id").to_pylist())}
    samples.sort(key=lambda s: (position[(s.eval_set, s.problem_id)], s.sample_index))

    skipped: dict[str, int] = {}
    for prompt_id in rollout_stats(table).skipped_ids:
        name = split_sample_id(prompt_id)[0]
        skipped[name] = skipped.get(name, 0) + 1
    versions = set(columns["policy_version"])
    return EvalResult(
        eval_sets=summarize(samples, config.ks(), skipped, order=[e.name for e in eval_sets]),
        samples=samples,
        seconds={"generate": generated - started, "grade": graded - generated,
                 "total": time.perf_counter() - started},
        policy_version=versions.pop() if len(versions) == 1 else None,
    )


class Evaluator:
    """Eval sets loaded and checked once, a tokenizer and a grading pool: :meth:`run` it every N training steps.

    Bad eval sets (unknown name, missing file, a row without problem or answer) raise here, at construction."""

    def __init__(self, config: EvalConfig, tokenizer: Any, eval_sets: Sequence[EvalSet] | None = None):
        """``eval_sets``: already loaded ones (default: load ``config``'s)."""
        validate_all(config)
        self.config = config
        self.tokenizer = tokenizer
        self.eval_sets = list(eval_sets) if eval_sets is not None else load_config_eval_sets(config)
        self.grader = Grader(config.grade_processes, config.grade_timeout_s)

    def check_prompts(self, context_tokens: int | None) -> None:
        """Refuse, naming the problems, evaluation prompts that leave less than ``max_tokens`` of a
        ``context_tokens`` context (what the engines would refuse after starting), and a ``max_tokens`` that
        leaves no room for any prompt. ``context_tokens`` None: no check."""
        if context_tokens is None:
            return
        max_tokens = self.config.max_tokens
        if max_tokens >= context_tokens:
            raise ConfigError("max_tokens", f"{max_tokens} does not fit the engines' context of {context_tokens} "
                              "tokens with a prompt; lower it or raise max_model_len")
        builder = PromptBuilder(self.tokenizer, self.config.prompt())
        limit = context_tokens - max_tokens
        too_long = []
        for eval_set in self.eval_sets:
            rows = zip(eval_set.table.column("id").to_pylist(), eval_set.table.column("problem").to_pylist())
            for row_id, problem in rows:
                length = len(builder.student_prompt_ids(problem))
                if length > limit:
                    too_long.append(f"'{eval_set.name}:{row_id}' ({length} tokens)")
        if too_long:
            more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
            raise UserInputError(
                f"{len(too_long)} evaluation prompt(s) too long: {', '.join(too_long[:5])}{more}. With max_tokens "
                f"{max_tokens} in a {context_tokens}-token context a prompt may hold {limit} tokens; raise "
                "max_model_len (up to the model's context) or lower max_tokens")

    def run(self, pool: Any) -> EvalResult:
        """Evaluate what ``pool`` (a ``rollout.pool.RolloutPool``) serves now."""
        return run_eval(pool, self.eval_sets, self.config, self.tokenizer, self.grader)

    def close(self) -> None:
        self.grader.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
