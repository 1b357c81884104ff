"""The stage-to-stage table contract: columns, list lengths, metadata checks."""

from __future__ import annotations

import pyarrow as pa
import pytest

from opsd.schema import (
    SCORED_SCHEMA,
    TableError,
    TableMetadata,
    check_metadata,
    check_table,
    read_metadata,
    sample_id,
    with_metadata,
)

META = TableMetadata(model="m", tokenizer="abc", vocab_size=100, top_k=2, temperature=1.1)


def scored_table(response_lengths=(3, 1), k=2, **overrides) -> pa.Table:
    rows = []
    for i, n in enumerate(response_lengths):
        rows.append({
            "sample_id": sample_id(f"row-{i}", 0, 0), "problem": "p", "solution": "s", "answer": None,
            "prompt_ids": [1, 2], "response_ids": list(range(n)), "response_logprobs": [-0.5] * n,
            "finish_reason": "stop", "policy_version": 0,
            "teacher_topk_ids": list(range(n * k)), "teacher_topk_logprobs": [-1.0] * (n * k),
            "teacher_tail_logprob": [-3.0] * n, "teacher_token_logprob": [-0.7] * n,
        })
    for key, value in overrides.items():
        rows[-1][key] = value
    return with_metadata(pa.Table.from_pylist(rows, schema=SCORED_SCHEMA), META)


def test_a_well_formed_table_passes_every_stage():
    table = scored_table()
    for stage in ("problems", "rollouts", "scored"):
        check_table(table, stage)
    assert read_metadata(table) == META
    assert sample_id("gsm8k-7", 2, 1) == "gsm8k-7@e2r1"


def test_mismatched_lengths_name_the_sample_and_column():
    with pytest.raises(TableError, match=r"row-1@e0r0.*teacher_topk_ids has 3 values, expected 2"):
        check_table(scored_table(teacher_topk_ids=[1, 2, 3]), "scored")
    with pytest.raises(TableError, match=r"row-1@e0r0.*response_logprobs has 2 values, expected 1"):
        check_table(scored_table(response_logprobs=[-1.0, -2.0]), "rollouts")
    with pytest.raises(TableError, match="finish_reason"):
        check_table(scored_table(finish_reason="abort"), "rollouts")


def test_missing_column_or_wrong_type_is_refused():
    table = scored_table()
    with pytest.raises(TableError, match="no column 'teacher_tail_logprob'"):
        check_table(table.drop_columns(["teacher_tail_logprob"]), "scored")
    wrong = table.set_column(table.schema.get_field_index("policy_version"), "policy_version",
                             pa.array([0.0, 1.0], pa.float64()))
    with pytest.raises(TableError, match="policy_version.*double"):
        check_table(wrong, "rollouts")


def test_metadata_mismatch_is_refused():
    table = scored_table()
    assert check_metadata(table, META) == META
    with pytest.raises(TableError, match="tokenizer 'abc' does not match this stage's 'xyz'"):
        check_metadata(table, TableMetadata("m2", "xyz", 100, 2, 1.1))
    with pytest.raises(TableError, match="top_k 2 does not match this stage's 64"):
        check_metadata(table, TableMetadata("m", "abc", 100, 64, 1.1))
    check_metadata(table, TableMetadata("m", "abc", 100, 64, 1.0), check_topk=False)
    with pytest.raises(TableError, match="no opsd metadata"):
        read_metadata(pa.table({"a": [1]}))
