"""From a step's Arrow table to each rank's micro-batches of tensors.

A row is the student sequence ``prompt_ids + response_ids``; the positions predicting response tokens carry the loss.
Every rank computes the same :class:`StepPlan` from the same table (rows split over ranks by tokens, packed into
micro-batches by ``micro_batch_tokens``) and collates only its own micro-batches. Every rank runs the same number of
micro-batches (DeepSpeed's collectives must line up); a rank with fewer runs empty ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import torch

from learner.kinds import LossKind, TeacherBatch, pad_sequences
from opsd.packing import pack_by_tokens
from opsd.prompts import PromptBuilder
from opsd.teacher_context import ContextPlan


@dataclass
class Row:
    """One sample as the learner needs it; ``teacher`` is the loss kind's per-row teacher data."""

    sample_id: str
    input_ids: list[int]  # student: prompt + response
    response_start: int
    teacher: Any
    teacher_tokens: int = 0  # tokens of the teacher context the learner runs itself (full-vocabulary loss)
    policy_version: int = 0

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start

    @property
    def tokens(self) -> int:
        return len(self.input_ids) + self.teacher_tokens

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start:]


@dataclass
class MicroBatch:
    """Padded tensors for one forward/backward. ``response_mask`` marks the predicting positions, row-major, so
    ``hidden[response_mask]`` lines up with the teacher batch."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    teacher: TeacherBatch | None = None
    num_tokens: int = 0  # response tokens (loss positions)

    def to(self, device: str) -> MicroBatch:
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                          self.teacher.to(device) if self.teacher is not None else None, self.num_tokens)


@dataclass
class StepPlan:
    """How a step's rows are spread: per rank, micro-batches of row indices into ``rows``."""

    rows: list[Row]
    micro: list[list[list[int]]]  # [rank][micro-batch] -> indices into rows
    skipped_rows: dict[str, int] = field(default_factory=dict)  # rows the teacher context left out, by reason

    @property
    def global_tokens(self) -> int:
        return sum(r.response_length for r in self.rows)

    @property
    def num_micro_batches(self) -> int:
        return max(1, max((len(m) for m in self.micro), default=0))

    def micro_batches(self, rank: int, kind: LossKind, pad_id: int) -> list[MicroBatch]:
        return [collate([self.rows[i] for i in batch], kind, pad_id) for batch in self.micro[rank]]


def rows_from_table(table: pa.Table, kind: LossKind, contexts: ContextPlan | None = None,
                    builder: PromptBuilder | None = None) -> list[Row]:
    """The rows of a checked table, with their teacher data; rows the teacher context left out are dropped. The
    kind says what a row's sequence is (a rollout's prompt and response; SFT: the prompt and the reference
    solution, built with ``builder``)."""
    prompts, responses = kind.sequences(table, builder)
    ids = table.column("sample_id").to_pylist()
    versions = table.column("policy_version").to_pylist() if "policy_version" in table.column_names \
        else [0] * table.num_rows
    rows = []
    for i, teacher in enumerate(kind.row_teachers(table, contexts)):
        if teacher is None:
            continue
        rows.append(Row(ids[i], list(prompts[i]) + list(responses[i]), len(prompts[i]), teacher,
                        kind.context_tokens(teacher), versions[i]))
    return rows


def plan_step(rows: Sequence[Row], world_size: int, micro_batch_tokens: int,
              skipped_rows: dict[str, int] | None = None) -> StepPlan:
    """Rows split over ranks by tokens, each rank's rows packed into micro-batches (deterministic)."""
    rows = list(rows)
    micro = []
    for shard in split_over_ranks(range(len(rows)), [r.tokens for r in rows], [r.sample_id for r in rows],
                                  world_size):
        lengths = [max(len(rows[i].input_ids), rows[i].teacher_tokens) for i in shard]
        micro.append([[shard[j] for j in sorted(batch)] for batch in pack_by_tokens(lengths, micro_batch_tokens)])
    return StepPlan(rows, micro, dict(skipped_rows or {}))


def split_over_ranks(indices: Sequence[int], tokens: Sequence[int], names: Sequence[str],
                     world_size: int) -> list[list[int]]:
    """Longest first, each row to the rank with the fewest tokens so far (ties by name: deterministic)."""
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(indices, key=lambda i: (-tokens[i], names[i])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(i)
        load[rank] += tokens[i]
    return shards


def collate(rows: Sequence[Row], kind: LossKind, pad_id: int) -> MicroBatch:
    input_ids, attention, response = pad_sequences([r.input_ids for r in rows], [r.response_start for r in rows],
                                                   pad_id)
    teacher = kind.collate([r.teacher for r in rows], [r.response_ids for r in rows], pad_id)
    return MicroBatch(input_ids, attention, response, teacher, int(response.sum()))


def empty_micro_batch(pad_id: int) -> MicroBatch:
    """A one-token batch with no loss position: keeps a rank's collectives in step with the others."""
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    return MicroBatch(one, torch.ones_like(one), torch.zeros_like(one, dtype=torch.bool), None, 0)
