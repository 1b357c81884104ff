"""EvalConfig: what an evaluation samples, how it grades, and what it reports (``opsd eval`` and in training).

Defaults follow the paper's released evaluation (``eval/evaluate_math.py`` and ``eval/run_eval.sh`` of the OPSD
repository): 16 samples per problem, temperature 1.0, top_p 0.95, no top-k, up to 38,912 new tokens, and its own
prompt, independent of the training prompt: the problem (no "Problem:" prefix) and the instruction to put the
final answer in ``\\boxed{}``, through the model's chat template with Qwen3 thinking mode on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from opsd.configlib import check
from opsd.prompts import DEFAULT_INSTRUCTION, PromptConfig, check_template
from opsd.sampling import check_sampling

EVAL_TEMPLATE = "{problem}\n\n{instruction}"


@dataclass
class EvalConfig:
    """Evaluation on math eval sets: avg@n, pass@k and maj@n with 95% intervals."""

    sets: list[str] = field(
        default_factory=lambda: ["aime24", "aime25", "hmmt25"],
        metadata={"doc": "Eval sets: built-in ones (aime24, aime25, hmmt25, math500, gsm8k) or files as NAME=PATH "
                  "(JSONL/Parquet with a problem and an answer per row)."},
    )
    mapping: Literal["eval", "gsm8k", "openthoughts", "opsd"] = field(
        default="eval",
        metadata={"doc": "Column mapping preset of eval sets given as files (built-in ones know their own); 'opsd': the "
                  "columns `opsd data convert` writes (ids kept)."},
    )
    columns: dict[str, str] = field(
        default_factory=dict,
        metadata={"doc": "Source column per field for eval sets given as files, overriding the mapping's, e.g. "
                  "{problem: question, answer: final}."},
    )
    limit: int | None = field(
        default=None, metadata={"doc": "Evaluate only the first N problems of each eval set (>= 1). None: all."}
    )
    every: int = field(
        default=0,
        metadata={"doc": "In training: evaluate every N steps with the rollout workers (current adapter), logged as "
                  "eval/<set>/<metric> metrics. 0: off. Ignored by `opsd eval`."},
    )
    n: int = field(default=16, metadata={"doc": "Responses sampled per problem (the paper reports avg@16)."})
    temperature: float = field(default=1.0, metadata={"doc": "Sampling temperature, >= 0 (0 is greedy)."})
    top_p: float = field(default=0.95, metadata={"doc": "Nucleus sampling probability mass, in (0, 1]."})
    top_k: int = field(default=-1, metadata={"doc": "Sample among the k most likely tokens; -1 is off."})
    max_tokens: int = field(
        default=38912,
        metadata={"doc": "Most tokens per response (the paper's evaluation: 38,912, thinking included). Must fit "
                  "the engines' max_model_len with the prompt."},
    )
    seed: int = field(
        default=0, metadata={"doc": "Sampling seed; each response's stream derives from (seed, sample id)."}
    )
    template: str = field(
        default=EVAL_TEMPLATE,
        metadata={"doc": "User turn of the evaluation prompt (the official evaluation script's by default), whatever "
                  "the training prompt. Placeholders: {problem}, {instruction}."},
    )
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"doc": "Answer-format instruction."})
    thinking: bool = field(
        default=True, metadata={"doc": "Qwen3 thinking mode in the chat template (the paper evaluates with it on)."}
    )
    system_prompt: str | None = field(
        default=None, metadata={"doc": "Optional system turn. None: the chat template's own default."}
    )
    answer_format: Literal["boxed", "flexible"] = field(
        default="boxed",
        metadata={"doc": "How a response's final answer is read: 'boxed', its last \\boxed{} (else a GSM8K '#### ' "
                  "line); 'flexible', that, else the number after the last 'answer is', else the last number "
                  "(lm-evaluation-harness's flexible-extract)."},
    )
    pass_k: list[int] = field(
        default_factory=list,
        metadata={"doc": "k of the pass@k columns (each <= n). Empty: the powers of two from 2 below n, and n "
                  "(pass@1 equals avg@n)."},
    )
    grade_timeout_s: float = field(
        default=5.0,
        metadata={"doc": "Seconds math-verify may spend on one answer; past it the answer is wrong (a reported "
                  "grading timeout)."},
    )
    grade_processes: int | None = field(
        default=None, metadata={"doc": "Grading worker processes. None: the machine's cores, at most 4."}
    )
    generate_timeout_s: float = field(
        default=12 * 3600.0, metadata={"doc": "Longest wait for the responses of one evaluation, in seconds."}
    )

    RETIRED_KEYS: ClassVar[dict[str, str]] = {
        "benchmarks": "renamed eval.sets",
    }

    def prompt(self) -> PromptConfig:
        """The evaluation prompt as a student prompt config (what the rollout workers are given per call)."""
        return PromptConfig(student_template=self.template, student_thinking=self.thinking,
                            instruction=self.instruction, system_prompt=self.system_prompt,
                            answer_format=self.answer_format)

    def validate(self) -> None:
        check_template(self.template, "eval.template", required=("problem",), forbidden=("solution",))
        check(bool(self.sets), "sets", "must name at least one eval set")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        check(self.every >= 0, "every", f"must be >= 0 (0 is off), got {self.every}")
        check_sampling(self.temperature, self.top_p, self.top_k, self.n, self.seed)
        check(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        for k in self.pass_k:
            check(1 <= k <= self.n, "pass_k", f"every k must be in [1, n={self.n}], got {k}")
        check(self.grade_timeout_s > 0, "grade_timeout_s", f"must be > 0, got {self.grade_timeout_s}")
        check(self.grade_processes is None or self.grade_processes >= 1, "grade_processes",
              f"must be >= 1 or null, got {self.grade_processes}")
        check(self.generate_timeout_s > 0, "generate_timeout_s", f"must be > 0, got {self.generate_timeout_s}")

    def ks(self) -> tuple[int, ...]:
        from evaluation.scores import default_ks

        return tuple(sorted(set(self.pass_k))) if self.pass_k else default_ks(self.n)
