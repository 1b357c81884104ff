"""Step tables in pieces: contiguous shards for the workers of a stage, and the shards put back in order.

Shards are contiguous, balanced slices of a batch (sizes differ by at most one, larger ones first), so putting them
back is concatenation in shard order: rows keep the batch's order, and the ``n`` rows of one prompt stay together.
Slicing is zero-copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from opsd.schema import TableError, read_metadata


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


def concat_tables(tables: Sequence[pa.Table]) -> pa.Table:
    """Shards of one step, in order, as one table. Their opsd metadata (model, tokenizer, k, temperature) must
    agree; the result carries the first shard's schema metadata."""
    if not tables:
        raise ValueError("concat_tables needs at least one table")
    first = read_metadata(tables[0])
    for table in tables[1:]:
        found = read_metadata(table)
        if found != first:
            raise TableError(f"cannot concatenate tables of different models or settings: {first} and {found}")
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables)


def list_column(values: Sequence[Sequence[int]] | Sequence[Sequence[float]] | Sequence[np.ndarray],
                value_type: pa.DataType) -> pa.Array:
    """An Arrow ``list<value_type>`` column from per-row sequences, built from one flat buffer and offsets."""
    lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    dtype = value_type.to_pandas_dtype()
    flat = np.concatenate([np.asarray(v, dtype=dtype).ravel() for v in values]) if len(values) else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=value_type))


@dataclass(frozen=True)
class TableRefs:
    """A step table as shards in Ray's object store, in order, with each shard's row count: what one stage pool
    hands the next (the driver never fetches the rows)."""

    refs: tuple[Any, ...]  # ray.ObjectRef of a pa.Table each
    rows: tuple[int, ...]

    @property
    def num_rows(self) -> int:
        return sum(self.rows)

    @classmethod
    def put(cls, table: pa.Table) -> TableRefs:
        """A table already in this process, put in the object store as one shard."""
        import ray

        return cls((ray.put(table),), (table.num_rows,))

    def fetch(self) -> pa.Table:
        """The whole table in this process (tests, tools; the training loop never needs it)."""
        import ray

        return concat_tables(ray.get(list(self.refs)))

    def pieces(self, num_workers: int) -> list[list[tuple[int, int, int]]]:
        """The rows split into ``num_workers`` contiguous, balanced ranges, each as ``(shard, start, stop)`` pieces
        of the shards that hold them (empty for a worker with no rows)."""
        out: list[list[tuple[int, int, int]]] = []
        for start, stop in shard_bounds(self.num_rows, num_workers):
            pieces, offset = [], 0
            for shard, rows in enumerate(self.rows):
                lo, hi = max(start, offset), min(stop, offset + rows)
                if lo < hi:
                    pieces.append((shard, lo - offset, hi - offset))
                offset += rows
            out.append(pieces)
        return out


def join_columns(table: pa.Table, columns: pa.Table) -> pa.Table:
    """``table`` with the columns of ``columns`` (a small table keyed by ``sample_id``: per-row values a stage gets
    besides the step table, e.g. GRPO's advantages) appended in ``table``'s row order; a column ``table`` already has
    is replaced. Every row of ``table`` needs exactly one row in ``columns``. Schema metadata is kept."""
    keys = columns.column("sample_id").to_pylist()
    index = {key: i for i, key in enumerate(keys)}
    if len(index) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise TableError(f"sample {duplicate!r} appears twice in the columns sent with the step table")
    ids = table.column("sample_id").to_pylist()
    missing = [sample for sample in ids if sample not in index]
    if missing:
        names = ", ".join(name for name in columns.column_names if name != "sample_id")
        raise TableError(f"sample {missing[0]!r} has no row in the columns sent with the step table ({names})")
    take = pa.array([index[sample] for sample in ids], type=pa.int64())
    for name in columns.column_names:
        if name == "sample_id":
            continue
        values = columns.column(name).take(take)
        field = columns.schema.field(name)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), field, values)
        else:
            table = table.append_column(field, values)
    return table
