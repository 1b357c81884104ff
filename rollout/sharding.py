"""Spreading one batch of problem rows over R rollout workers, and putting their tables back together.

Shards are contiguous, balanced slices of the batch (sizes differ by at most one, larger ones first), so merging is
concatenation in shard order: the merged table lists the rows in the batch's order, and the ``n`` rows of one
prompt, which a worker writes next to each other, stay together. Slicing is zero-copy.
"""

from __future__ import annotations

from typing import Sequence

import pyarrow as pa

from opsd.schema import TableError, check_table, read_metadata, with_metadata
from rollout.table import RolloutStats, rollout_stats, with_rollout_stats


def shard_bounds(num_rows: int, num_workers: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each worker's slice; a worker may get an empty one when rows are fewer."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    base, extra = divmod(num_rows, num_workers)
    bounds, start = [], 0
    for worker in range(num_workers):
        stop = start + base + (1 if worker < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def shard_rows(table: pa.Table, num_workers: int) -> list[pa.Table]:
    """``num_workers`` contiguous slices of ``table``, in order (empty ones included, so they zip with workers)."""
    return [table.slice(start, stop - start) for start, stop in shard_bounds(table.num_rows, num_workers)]


def merge_tables(tables: Sequence[pa.Table]) -> pa.Table:
    """The rollout tables of the shards of one batch, in shard order, as one table.

    The shards must come from the same model and tokenizer (their opsd metadata must agree); their rollout
    statistics are summed. Rows keep the order of the shards, hence of the batch.
    """
    if not tables:
        raise ValueError("merge_tables needs at least one table")
    metadata = [read_metadata(t) for t in tables]
    for found in metadata[1:]:
        if found != metadata[0]:
            raise TableError(f"cannot merge rollout tables of different models: {metadata[0]} and {found}")
    for table in tables:
        check_table(table, "rollouts")
    merged = pa.concat_tables(tables)
    merged = with_metadata(merged, metadata[0])
    return with_rollout_stats(merged, RolloutStats.merge([rollout_stats(t) for t in tables]))
