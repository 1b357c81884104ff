"""The Arrow table that flows between stages: one row per sample, one table per step (docs/ARCHITECTURE.md, "The step table").

    orchestrator -> rollout:   sample_id, problem, solution, answer
    rollout adds:              prompt_ids, response_ids, response_logprobs, finish_reason, policy_version
    teacher adds:              teacher_topk_ids, teacher_topk_logprobs, teacher_tail_logprob, teacher_token_logprob

Per-token top-k data are flattened (``T*k`` values for a response of ``T`` tokens) with ``k`` stored once, in the
table metadata, next to the loss temperature and the model/tokenizer identity. A stage that receives a table checks it
with :func:`check_table` before any work, and refuses a table whose tokenizer, k or temperature differ from its own.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from opsd.errors import UserInputError

PROBLEM_FIELDS = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("problem", pa.string(), nullable=False),
    pa.field("solution", pa.string()),
    pa.field("answer", pa.string()),
]
ROLLOUT_FIELDS = [
    pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("policy_version", pa.int64(), nullable=False),
]
TEACHER_FIELDS = [
    pa.field("teacher_topk_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("teacher_topk_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("teacher_tail_logprob", pa.list_(pa.float32()), nullable=False),
    pa.field("teacher_token_logprob", pa.list_(pa.float32()), nullable=False),
]

PROBLEM_SCHEMA = pa.schema(PROBLEM_FIELDS)
ROLLOUT_SCHEMA = pa.schema(PROBLEM_FIELDS + ROLLOUT_FIELDS)
SCORED_SCHEMA = pa.schema(PROBLEM_FIELDS + ROLLOUT_FIELDS + TEACHER_FIELDS)
STAGE_SCHEMAS = {"problems": PROBLEM_SCHEMA, "rollouts": ROLLOUT_SCHEMA, "scored": SCORED_SCHEMA}

FINISH_REASONS = ("stop", "length")
METADATA_KEY = b"opsd"
STATS_KEY = b"opsd.rollout"


class TableError(UserInputError):
    """A table that does not follow the contract, or that belongs to another model/tokenizer/k/temperature."""


@dataclass(frozen=True)
class TableMetadata:
    """What a table carries once for all rows. Written by the stage that fixes it (rollout: model, tokenizer;
    teacher: k, temperature)."""

    model: str
    tokenizer: str  # opsd.hf.tokenizer_fingerprint
    vocab_size: int
    top_k: int | None = None
    temperature: float | None = None


_SAMPLE_ID_RE = re.compile(r"^(?P<row>.+)@e(?P<epoch>\d+)r(?P<rollout>\d+)$")


@dataclass(frozen=True)
class RolloutStats:
    """What one generate call (or several, combined) did besides returning rows."""

    prompts: int  # problem rows received
    samples: int  # rows returned (prompts kept x n)
    skipped_ids: tuple[str, ...] = ()  # problem rows left out: prompt too long (on_long_prompt = "skip")
    generated_tokens: int = 0
    truncated: int = 0  # samples that hit max_tokens (finish_reason "length")
    generate_seconds: float = 0.0  # wall time of the generate calls, summed over workers

    @property
    def skipped(self) -> int:
        return len(self.skipped_ids)

    @classmethod
    def merge(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        return cls(
            prompts=sum(p.prompts for p in parts),
            samples=sum(p.samples for p in parts),
            skipped_ids=tuple(i for p in parts for i in p.skipped_ids),
            generated_tokens=sum(p.generated_tokens for p in parts),
            truncated=sum(p.truncated for p in parts),
            generate_seconds=sum(p.generate_seconds for p in parts),
        )


def with_rollout_stats(table: pa.Table, stats: RolloutStats) -> pa.Table:
    metadata = dict(table.schema.metadata or {})
    metadata[STATS_KEY] = json.dumps(asdict(stats), sort_keys=True).encode()
    return table.replace_schema_metadata(metadata)


def rollout_stats(table: pa.Table) -> RolloutStats:
    raw = (table.schema.metadata or {}).get(STATS_KEY)
    if raw is None:
        raise TableError("table has no rollout statistics (it was not made by a RolloutWorker)")
    data = json.loads(raw)
    data["skipped_ids"] = tuple(data["skipped_ids"])
    return RolloutStats(**data)


def sample_id(row_id: str, epoch: int, rollout: int) -> str:
    """Stable id of one sample: dataset row, epoch, rollout index."""
    return f"{row_id}@e{epoch}r{rollout}"


def parse_sample_id(value: str) -> tuple[str, int, int] | None:
    """``(row, epoch, rollout)`` of an id made by :func:`sample_id`; None for any other string."""
    match = _SAMPLE_ID_RE.match(value)
    if match is None:
        return None
    return match["row"], int(match["epoch"]), int(match["rollout"])


def with_metadata(table: pa.Table, metadata: TableMetadata) -> pa.Table:
    existing = dict(table.schema.metadata or {})
    existing[METADATA_KEY] = json.dumps(asdict(metadata), sort_keys=True).encode()
    return table.replace_schema_metadata(existing)


def read_metadata(table: pa.Table) -> TableMetadata:
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise TableError("table has no opsd metadata (model, tokenizer, k, temperature)")
    return TableMetadata(**json.loads(raw))


def check_metadata(table: pa.Table, expected: TableMetadata, *, check_topk: bool = True) -> TableMetadata:
    """Refuse a table made with another tokenizer (or, with ``check_topk``, another k or temperature)."""
    found = read_metadata(table)
    fields = ["tokenizer", "vocab_size"] + (["top_k", "temperature"] if check_topk else [])
    for name in fields:
        mine, theirs = getattr(expected, name), getattr(found, name)
        if mine != theirs:
            raise TableError(
                f"table {name} {theirs!r} does not match this stage's {mine!r} "
                f"(table from model {found.model!r}, this stage uses {expected.model!r})"
            )
    return found


def check_table(table: pa.Table, stage: str) -> None:
    """Columns and types of ``stage`` ("problems", "rollouts" or "scored") present, list lengths consistent.

    Extra columns are allowed. The message names the column and the sample id of the first bad row.
    """
    schema = STAGE_SCHEMAS[stage]
    for field in schema:
        if field.name not in table.column_names:
            raise TableError(f"{stage} table has no column {field.name!r}")
        actual = table.schema.field(field.name).type
        if actual != field.type:
            raise TableError(f"{stage} table column {field.name!r} is {actual}, expected {field.type}")
        if not field.nullable and table.column(field.name).null_count:
            raise TableError(f"{stage} table column {field.name!r} has nulls")
    if stage == "problems":
        return
    ids = table.column("sample_id").to_pylist()
    responses = _lengths(table, "response_ids")
    _same_lengths(table, "response_logprobs", responses, ids, "response_ids")
    bad = [i for i, reason in enumerate(table.column("finish_reason").to_pylist()) if reason not in FINISH_REASONS]
    if bad:
        raise TableError(f"sample {ids[bad[0]]!r}: finish_reason must be one of {FINISH_REASONS}")
    if stage == "scored":
        k = read_metadata(table).top_k
        if not k or k < 1:
            raise TableError("scored table metadata has no top_k")
        _same_lengths(table, "teacher_topk_ids", [n * k for n in responses], ids, f"{k} x response_ids")
        _same_lengths(table, "teacher_topk_logprobs", [n * k for n in responses], ids, f"{k} x response_ids")
        _same_lengths(table, "teacher_tail_logprob", responses, ids, "response_ids")
        _same_lengths(table, "teacher_token_logprob", responses, ids, "response_ids")


def _lengths(table: pa.Table, column: str) -> list[int]:
    return pc.list_value_length(table.column(column)).to_pylist()


def _same_lengths(table, column, expected, ids, what) -> None:
    for i, (actual, want) in enumerate(zip(_lengths(table, column), expected)):
        if actual != want:
            raise TableError(f"sample {ids[i]!r}: {column} has {actual} values, expected {want} ({what})")
