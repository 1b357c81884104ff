"""Packing rows into batches by token budget (teacher forward passes, learner micro-batches)."""

from __future__ import annotations

from typing import Sequence


def pack_by_tokens(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest) stays within ``token_budget``.

    Longest first, so rows of similar length share a batch and padding stays small; a row longer than the budget is
    a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and (len(current) + 1) * longest > token_budget:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
