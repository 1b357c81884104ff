"""Rollout rows: sample ids of the n traces of a prompt, their seeds, the rollout table and what the driver reads of
it (:class:`RolloutSummary`). The id and seed rules: docs/ARCHITECTURE.md ("The step table").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import pyarrow as pa

from opsd.schema import ROLLOUT_FIELDS, RolloutStats, TableError, parse_sample_id, rollout_stats, sample_id
from opsd.tables import list_column


# -- sample ids and seeds ----------------------------------------------------------------------------------------
def rollout_sample_ids(prompt_id: str, n: int) -> list[str]:
    """Ids of the ``n`` traces sampled for the prompt row ``prompt_id`` (docs/ARCHITECTURE.md, "The step table")."""
    if n == 1:
        return [prompt_id]
    parsed = parse_sample_id(prompt_id)
    if parsed is None:
        raise TableError(
            f"sample {prompt_id!r}: with n = {n} rollouts per prompt the sample id must follow "
            "opsd.schema.sample_id (ROW@eEPOCHrROLLOUT) so that each rollout gets its own index"
        )
    row, epoch, first = parsed
    return [sample_id(row, epoch, first + i) for i in range(n)]


def trace_seed(seed: int, sample: str) -> int:
    """The random seed of one trace: a stable 63-bit hash of the run's seed and the trace's sample id."""
    digest = hashlib.sha256(f"{seed}\x00{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# -- statistics --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutSummary:
    """What the driver reads of a rollout shard (the table itself travels on as an object ref)."""

    sample_ids: tuple[str, ...]
    policy_versions: tuple[int, ...]
    response_lengths: tuple[int, ...]
    stats: RolloutStats
    final_answers: tuple[str | None, ...] = ()  # each trace's last \boxed{} (or '#### ') answer, None without one
    references: tuple[str | None, ...] = ()  # each row's reference answer (the data's answer column), if any

    @property
    def rows(self) -> int:
        return len(self.sample_ids)

    @classmethod
    def of(cls, table: pa.Table, final_answers: Sequence[str | None] = ()) -> RolloutSummary:
        import pyarrow.compute as pc

        references = table.column("answer").to_pylist() if "answer" in table.column_names else [None] * len(table)
        return cls(tuple(table.column("sample_id").to_pylist()), tuple(table.column("policy_version").to_pylist()),
                   tuple(pc.list_value_length(table.column("response_ids")).to_pylist()), rollout_stats(table),
                   tuple(final_answers), tuple(references))

    @classmethod
    def merge(cls, parts: Sequence[RolloutSummary]) -> RolloutSummary:
        return cls(tuple(i for p in parts for i in p.sample_ids), tuple(v for p in parts for v in p.policy_versions),
                   tuple(n for p in parts for n in p.response_lengths), RolloutStats.merge([p.stats for p in parts]),
                   tuple(a for p in parts for a in p.final_answers), tuple(r for p in parts for r in p.references))


# -- the table ---------------------------------------------------------------------------------------------------
def check_no_rollout_columns(problems: pa.Table) -> None:
    """A problem table must not carry rollout columns already: the worker writes them (a table that went through a
    rollout once is a rollout table, not a batch of problems)."""
    present = [f.name for f in ROLLOUT_FIELDS if f.name in problems.column_names]
    if present:
        raise TableError(f"the problem table already has rollout column(s) {', '.join(present)}; send problem rows "
                         "(sample_id, problem, solution, answer and any extra columns) only")


@dataclass(frozen=True)
class Trace:
    """One sampled trace, as the engine returned it."""

    prompt_ids: Sequence[int]
    response_ids: Sequence[int]
    response_logprobs: Sequence[float]
    finish_reason: str


def rollout_table(problems: pa.Table, rows: Sequence[int], ids: Sequence[str], traces: Sequence[Trace],
                  policy_version: int) -> pa.Table:
    """The problem rows ``rows`` (one per trace, in order) with their new sample ids and the rollout columns.

    Every column of ``problems`` is kept (extra columns too), so the table carries whatever the orchestrator put in.
    """
    if not (len(rows) == len(ids) == len(traces)):
        raise ValueError(f"{len(rows)} rows, {len(ids)} ids and {len(traces)} traces: one each per sample")
    table = problems.take(pa.array(rows, type=pa.int64()))
    index = table.column_names.index("sample_id")
    table = table.set_column(index, table.schema.field("sample_id"), pa.array(ids, type=pa.string()))
    columns = {
        "prompt_ids": list_column([t.prompt_ids for t in traces], pa.int32()),
        "response_ids": list_column([t.response_ids for t in traces], pa.int32()),
        "response_logprobs": list_column([t.response_logprobs for t in traces], pa.float32()),
        "finish_reason": pa.array([t.finish_reason for t in traces], type=pa.string()),
        "policy_version": pa.array([policy_version] * len(traces), type=pa.int64()),
    }
    for field in ROLLOUT_FIELDS:
        table = table.append_column(field, columns[field.name])
    return table
