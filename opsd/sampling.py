"""How student traces are sampled: the run's sampling parameters, or a call's own (evaluation, tests)."""

from __future__ import annotations

from dataclasses import dataclass

from opsd.configlib import check


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    top_k: int  # -1: off
    n: int
    max_tokens: int
    seed: int

    def validate(self, max_model_len: int) -> None:
        check_sampling(self.temperature, self.top_p, self.top_k, self.n, self.seed)
        check(
            1 <= self.max_tokens < max_model_len,
            "max_tokens",
            f"must be in [1, max_model_len {max_model_len}) to leave room for a prompt, got {self.max_tokens}",
        )


def check_sampling(temperature: float, top_p: float, top_k: int, n: int, seed: int) -> None:
    """The sampling parameters' ranges, for every config section that has them and for a per-call ``Sampling``."""
    check(temperature >= 0, "temperature", f"must be >= 0, got {temperature}")
    check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
    check(top_k == -1 or top_k >= 1, "top_k", f"must be -1 (off) or >= 1, got {top_k}")
    check(n >= 1, "n", f"must be >= 1, got {n}")
    check(seed >= 0, "seed", f"must be >= 0, got {seed}")
