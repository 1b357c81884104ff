"""From a step's Arrow table to per-rank micro-batches of tensors.

A row becomes the student sequence ``prompt_ids + response_ids``; the positions that predict the response tokens
(``prompt-1 .. prompt+response-2``) are where the loss is taken. The teacher side comes from the table's teacher
columns (top-k + tail, or the sampled token's log-prob), or, for the full-vocabulary loss, as the teacher's own
context ids (problem + solution + the same response) that the learner runs through the frozen base in-process.

Rows are split over ranks balancing tokens, then packed into micro-batches of at most ``micro_batch_tokens`` padded
tokens. Every rank runs the same number of micro-batches (collectives must match); a rank with fewer runs empty ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import torch

from opsd.packing import pack_by_tokens
from opsd.schema import TableError, read_metadata

TEACHER_FLOAT_COLUMNS = ("teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob")


@dataclass
class Row:
    """One sample as the learner needs it."""

    sample_id: str
    input_ids: list[int]  # student: prompt + response
    response_start: int
    teacher_ids: np.ndarray | None = None  # [R, k]
    teacher_logprobs: np.ndarray | None = None  # [R, k]
    teacher_tail: np.ndarray | None = None  # [R]
    teacher_token_logprob: np.ndarray | None = None  # [R]
    teacher_input_ids: list[int] | None = None  # full-vocabulary loss: the teacher's context
    teacher_response_start: int = 0
    policy_version: int = 0

    @property
    def response_length(self) -> int:
        return len(self.input_ids) - self.response_start

    @property
    def tokens(self) -> int:
        return len(self.input_ids) + (len(self.teacher_input_ids) if self.teacher_input_ids else 0)


@dataclass
class MicroBatch:
    """Padded tensors for one forward/backward. ``response_mask`` marks the predicting positions, row-major, so
    ``hidden[response_mask]`` lines up with the concatenated teacher tensors."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    num_tokens: int = 0  # response tokens (loss positions)

    def to(self, device: str) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
                          {k: v.to(device) for k, v in self.teacher.items()}, self.num_tokens)


def non_finite_teacher_rows(table: pa.Table) -> list[str]:
    """Sample ids whose teacher log-probs hold NaN or +inf (-inf is a legitimate empty tail)."""
    bad = np.zeros(table.num_rows, dtype=bool)
    for name in TEACHER_FLOAT_COLUMNS:
        if name not in table.column_names:
            continue
        column = table.column(name).combine_chunks()
        values = column.values.to_numpy(zero_copy_only=False)
        broken = np.isnan(values) | (values == np.inf)
        if broken.any():
            offsets = column.offsets.to_numpy()
            row_of_value = np.searchsorted(offsets, np.nonzero(broken)[0], side="right") - 1
            bad[row_of_value] = True
    ids = table.column("sample_id").to_pylist()
    return [ids[i] for i in np.nonzero(bad)[0]]


def rows_from_table(table: pa.Table, kind: str, teacher_contexts=None) -> list[Row]:
    """Rows of a scored table (``kind`` topk_tail / topk_renorm / sampled_token) or of a rollout table with the
    teacher contexts built for it (``kind`` full; ``teacher_contexts[i]`` for row i, None where skipped)."""
    prompts = table.column("prompt_ids").to_pylist()
    responses = table.column("response_ids").to_pylist()
    ids = table.column("sample_id").to_pylist()
    versions = table.column("policy_version").to_pylist()
    k = read_metadata(table).top_k if kind in ("topk_tail", "topk_renorm") else None
    if kind in ("topk_tail", "topk_renorm") and not k:
        raise TableError(f"loss kind {kind!r} needs a scored table with top_k in its metadata")
    columns = {}
    for name in ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob"):
        if name in table.column_names:
            columns[name] = _split(table.column(name))
    rows = []
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        row = Row(ids[i], list(prompt) + list(response), len(prompt), policy_version=versions[i])
        n = len(response)
        if k:
            row.teacher_ids = columns["teacher_topk_ids"][i].reshape(n, k)
            row.teacher_logprobs = columns["teacher_topk_logprobs"][i].reshape(n, k)
            row.teacher_tail = columns["teacher_tail_logprob"][i]
        elif kind == "sampled_token":
            row.teacher_token_logprob = columns["teacher_token_logprob"][i]
        elif kind == "full":
            context = teacher_contexts[i]
            if context is None:
                continue
            row.teacher_input_ids, row.teacher_response_start = context.input_ids, context.response_start
        rows.append(row)
    return rows


def _split(column: pa.ChunkedArray) -> list[np.ndarray]:
    column = column.combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    return [values[offsets[i]: offsets[i + 1]] for i in range(len(column))]


def split_over_ranks(rows: Sequence[Row], world_size: int) -> list[list[Row]]:
    """Longest first, each row to the rank with the fewest tokens so far (deterministic)."""
    shards: list[list[Row]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for row in sorted(rows, key=lambda r: (-r.tokens, r.sample_id)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shards[rank].append(row)
        load[rank] += row.tokens
    return shards


def pack_micro_batches(rows: Sequence[Row], micro_batch_tokens: int, pad_id: int, kind: str) -> list[MicroBatch]:
    lengths = [max(len(r.input_ids), len(r.teacher_input_ids or ())) for r in rows]
    return [collate([rows[i] for i in sorted(batch)], pad_id, kind)
            for batch in pack_by_tokens(lengths, micro_batch_tokens)]


def collate(rows: Sequence[Row], pad_id: int, kind: str) -> MicroBatch:
    input_ids, attention, response = _pad([r.input_ids for r in rows], [r.response_start for r in rows], pad_id)
    teacher: dict[str, torch.Tensor] = {}
    if kind in ("topk_tail", "topk_renorm"):
        teacher["ids"] = torch.from_numpy(np.concatenate([r.teacher_ids for r in rows]).astype(np.int64))
        teacher["logprobs"] = torch.from_numpy(np.concatenate([r.teacher_logprobs for r in rows]))
        teacher["tail_logprob"] = torch.from_numpy(np.concatenate([r.teacher_tail for r in rows]))
    elif kind == "sampled_token":
        teacher["token_ids"] = torch.tensor([t for r in rows for t in r.input_ids[r.response_start:]])
        teacher["logprob"] = torch.from_numpy(np.concatenate([r.teacher_token_logprob for r in rows]))
    elif kind == "full":
        ids, mask, positions = _pad([r.teacher_input_ids for r in rows], [r.teacher_response_start for r in rows],
                                    pad_id)
        teacher.update(input_ids=ids, attention_mask=mask, response_mask=positions)
    return MicroBatch(input_ids, attention, response, teacher, int(response.sum()))


def empty_micro_batch(pad_id: int) -> MicroBatch:
    """A one-token batch with no loss position: keeps a rank's collectives in step with the others."""
    one = torch.full((1, 1), pad_id, dtype=torch.long)
    return MicroBatch(one, torch.ones_like(one), torch.zeros_like(one, dtype=torch.bool), {}, 0)


def _pad(sequences: Sequence[Sequence[int]], response_starts: Sequence[int], pad_id: int):
    """Right-padded ids, attention mask, and the mask of positions predicting a response token."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    predicting = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for i, (sequence, start) in enumerate(zip(sequences, response_starts)):
        ids[i, : len(sequence)] = torch.tensor(sequence)
        attention[i, : len(sequence)] = 1
        predicting[i, start - 1: len(sequence) - 1] = True
    return ids, attention, predicting
