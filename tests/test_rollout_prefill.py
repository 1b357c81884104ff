"""A CPU engine given more prompt tokens at once than one scheduler step holds: every seeded trace comes back.

vLLM splits such a batch's prefill over steps (chunked prefill); for a seeded request it then sets the offset of a
CPU random generator, which vLLM's CPU build does not support ("CPU Generator does not use offset"). CPU engines
therefore run without chunked prefill (rollout.resources.engine_launch). Every trace of opsd is seeded.
"""

from __future__ import annotations

from helpers.local_ray import local_ray  # first: sets Ray's loopback switch before ray is imported

import pyarrow as pa
import pytest

from opsd.schema import PROBLEM_SCHEMA, sample_id
from rollout.config import RolloutConfig

pytestmark = pytest.mark.slow

LONG = "A train leaves a station at 9:00 and travels at 60 km/h toward a town 240 km away. " * 6


def test_more_prompt_tokens_than_one_step_holds(tiny_model_dir):
    from opsd.model import ModelSpec
    from rollout.pool import RolloutPool

    rows = 48  # ~130 tokens each: ~6,000 prompt tokens, past the 4,096 a step holds with chunked prefill
    problems = pa.table({"sample_id": [sample_id(f"p{i}", 0, 0) for i in range(rows)],
                         "problem": [f"{LONG} Question {i}: when does it arrive?" for i in range(rows)],
                         "solution": ["s"] * rows, "answer": [None] * rows}, schema=PROBLEM_SCHEMA)
    config = RolloutConfig(gpus_per_worker=0, max_response_tokens=4, temperature=1.0, cpu_kv_cache_gib=0.5,
                           cpu_threads_per_worker=1, max_model_len=1024)
    with local_ray(num_cpus=2):
        pool = RolloutPool(ModelSpec(str(tiny_model_dir)), config, call_timeout_s=300)
        try:
            table = pool.generate(problems)
        finally:
            pool.shutdown()
    assert table.column("sample_id").to_pylist() == problems.column("sample_id").to_pylist()
    assert sum(len(p) for p in table.column("prompt_ids").to_pylist()) > 4096
    assert all(len(r) >= 1 for r in table.column("response_ids").to_pylist())
