"""Synthetic step tables for the benchmarks: GSM8K problems (shipped subset) with random traces of a fixed length.

The cost of scoring and learning does not depend on what the traces say, only on their lengths.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import torch

from opsd.hf import tokenizer_fingerprint
from opsd.prompts import PromptBuilder
from opsd.schema import ROLLOUT_SCHEMA, TableMetadata, sample_id, with_metadata
from opsd.data import load_problems

REPO_ROOT = Path(__file__).resolve().parents[1]


def synthetic_rollout_table(builder: PromptBuilder, vocab_size: int, model: str, rows: int, response_tokens: int,
                            seed: int = 0) -> pa.Table:
    problems, _ = load_problems(REPO_ROOT / "data" / "gsm8k" / "train-1k.jsonl", "gsm8k", limit=rows)
    g = torch.Generator().manual_seed(seed)
    real_tokens = len(builder.tokenizer)
    records = []
    for row in problems.to_pylist():
        response = torch.randint(0, real_tokens, (response_tokens,), generator=g).tolist()
        records.append({
            "sample_id": sample_id(row["id"], 0, 0), "problem": row["problem"], "solution": row["solution"],
            "answer": row["answer"], "prompt_ids": builder.student_prompt_ids(row["problem"]),
            "response_ids": response, "response_logprobs": [0.0] * response_tokens, "finish_reason": "length",
            "policy_version": 0,
        })
    meta = TableMetadata(model, tokenizer_fingerprint(builder.tokenizer), vocab_size)
    return with_metadata(pa.Table.from_pylist(records, schema=ROLLOUT_SCHEMA), meta)
