"""Configuration of the teacher stage: the initial model (frozen, or with an EMA of the student's adapter) that scores
student traces given the solution."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from opsd.configlib import check


@dataclass
class TeacherConfig:
    """The teacher: which weights it runs, its resources, how its distribution is compressed, and how long contexts
    are handled."""

    kind: Literal["frozen", "ema"] = field(
        default="frozen",
        metadata={
            "doc": "'frozen': the base model, never updated (the paper's default). 'ema': the base model with an "
            "exponential moving average of the student's LoRA weights, updated after every applied learner step "
            "(the official OPSD code's use_ema_teacher); the base model until the first step."
        },
    )
    ema_decay: float = field(
        default=0.999,
        metadata={"doc": "EMA decay d of teacher.kind=ema, in (0, 1): ema = d * ema + (1 - d) * student after each "
                  "applied step (the first step's adapter is copied). Typical: 0.99 to 0.9999."},
    )
    num_workers: int = field(default=1, metadata={"doc": "Number of TeacherScorer actors."})
    gpus_per_worker: float = field(
        default=1.0,
        metadata={"doc": "GPUs reserved per teacher actor (a fraction shares a GPU). 0 on CPU-only machines."},
    )
    top_k: int = field(
        default=64,
        metadata={
            "doc": "k of the teacher's top-k + tail compression: log-probs kept per response position "
            "(the rest travels as one tail bucket)."
        },
    )
    token_budget: int = field(
        default=16384,
        metadata={"doc": "Most tokens (teacher context + response, summed over rows) per scoring forward pass."},
    )
    logits_chunk: int = field(
        default=1024,
        metadata={"doc": "Response positions whose full-vocabulary logits are materialised at once (memory bound)."},
    )
    max_context_tokens: int | None = field(
        default=None,
        metadata={
            "doc": "Longest teacher context (prompt + solution + response), in tokens. None: the model's maximum."
        },
    )
    on_overlength: Literal["truncate_solution", "skip"] = field(
        default="truncate_solution",
        metadata={
            "doc": "When a teacher context exceeds max_context_tokens: 'truncate_solution' shortens the reference "
            "solution to fit; 'skip' leaves the row out of training."
        },
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="auto",
        metadata={"doc": "Teacher weight and compute dtype. 'auto': bfloat16 on GPU, float32 on CPU. On a "
                         "CPU with AVX512-BF16 or AMX, bfloat16 runs ~2x faster (the quickstart uses it)."},
    )

    def validate(self) -> None:
        check(0 < self.ema_decay < 1, "ema_decay", f"must be in (0, 1), got {self.ema_decay}")
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check(self.token_budget >= 1, "token_budget", f"must be >= 1, got {self.token_budget}")
        check(self.logits_chunk >= 1, "logits_chunk", f"must be >= 1, got {self.logits_chunk}")
        check(
            self.max_context_tokens is None or self.max_context_tokens >= 1,
            "max_context_tokens",
            f"must be >= 1 or null, got {self.max_context_tokens}",
        )
