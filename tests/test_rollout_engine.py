"""Rollout workers with a real vLLM engine (CPU, tiny Qwen3), as Ray actors, against HF transformers + PEFT.

The engines here serve adapters with vLLM's LoRA support (``adapter_serving = lora``, the GPU default; on CPU the
default is merged weights, tested in test_rollout_merged.py).

Two engines serve the whole module (each in its own Ray actor, bound to its own core of a 2-CPU embedded cluster):
``worker`` (on_long_prompt = error) and ``skipper`` (on_long_prompt = skip). Each test sets the adapter version it
needs first, so the tests do not depend on their order.

The served model is a copy of the tiny Qwen3 whose generation config adds one more end-of-sequence token, picked
from adapter v1's greedy trace, so that some traces end with "stop" (EOS included) and others with "length".
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

from helpers.local_ray import local_ray  # first: sets Ray's loopback switch before ray is imported

import numpy as np
import pyarrow as pa
import pytest
from helpers.rollout_reference import hf_greedy, hf_token_logprobs, load_hf_model, make_lora_adapter

from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir
from opsd.hf import tokenizer_fingerprint
from opsd.prompts import PromptBuilder
from opsd.schema import PROBLEM_SCHEMA, TableMetadata, check_table, read_metadata, sample_id
from rollout.config import RolloutConfig
from opsd.schema import rollout_stats

pytestmark = pytest.mark.slow

TIMEOUT_S = 300
MAX_TOKENS = 16
PROBLEMS = [
    "What is 2 + 3?",
    "Name a prime number larger than 10.",
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell in total?",
    # Longer than a KV-cache block (128 tokens on CPU): its first block is prefix-cached when first served.
    "A train leaves a station at 9:00 and travels at 60 km/h; a second train leaves the same station at 10:30 "
    "on a parallel track and travels at 90 km/h in the same direction. " * 4 + "When does the second train catch up?",
]
ROLLOUT_COLUMNS = ["sample_id", "prompt_ids", "response_ids", "response_logprobs", "finish_reason", "policy_version"]


def problem_table(texts, prefix="p", epoch=0) -> pa.Table:
    return pa.table(
        {
            "sample_id": [sample_id(f"{prefix}{i}", epoch, 0) for i in range(len(texts))],
            "problem": list(texts),
            "solution": ["a solution"] * len(texts),
            "answer": [None] * len(texts),
        },
        schema=PROBLEM_SCHEMA,
    )


def rows_of(table: pa.Table) -> list[dict]:
    return table.select(ROLLOUT_COLUMNS).to_pylist()


def greedy(**overrides):
    from opsd.sampling import Sampling

    return replace(Sampling(temperature=0.0, top_p=1.0, top_k=-1, n=1, max_tokens=MAX_TOKENS, seed=0), **overrides)


def get(ref):
    import ray

    return ray.get(ref, timeout=TIMEOUT_S)


# -- module setup: model, adapters, HF references, Ray, two engines ---------------------------------------------------
@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, qwen3_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-engine")
    model_dir = Path(shutil.copytree(tiny_model_dir, root / "tiny-qwen3"))
    v1_dir = make_lora_adapter(model_dir, root / "v1", rank=8, seed=1)
    v2_dir = make_lora_adapter(model_dir, root / "v2", rank=8, targets=["q_proj", "v_proj", "up_proj"], seed=2)
    builder = PromptBuilder(qwen3_tokenizer)
    prompts = [builder.student_prompt_ids(p) for p in PROBLEMS]

    # One more EOS token: the first new token of adapter v1's greedy trace of prompt 0 after position 2.
    v1_tokens, _ = hf_greedy(load_hf_model(model_dir, v1_dir), prompts[0], MAX_TOKENS)
    stop = next(t for k, t in enumerate(v1_tokens) if k >= 2 and t not in v1_tokens[:k])
    generation = json.loads((model_dir / "generation_config.json").read_text())
    generation["eos_token_id"] = list(generation["eos_token_id"]) + [stop]
    (model_dir / "generation_config.json").write_text(json.dumps(generation))

    references = {}
    for version, adapter in ((0, None), (1, v1_dir), (2, v2_dir)):
        model = load_hf_model(model_dir, adapter)
        references[version] = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return {"model_dir": model_dir, "v1": v1_dir, "v2": v2_dir, "prompts": prompts, "references": references,
            "eos": set(generation["eos_token_id"]), "tokenizer": qwen3_tokenizer}


@pytest.fixture(scope="module")
def config() -> RolloutConfig:
    return RolloutConfig(num_workers=1, gpus_per_worker=0, cpu_kv_cache_gib=0.25, max_model_len=512,
                         max_response_tokens=MAX_TOKENS, temperature=1.0, seed=0, adapter_serving="lora")


@pytest.fixture(scope="module")
def engines(setup, config):
    """(worker, skipper): two engines started concurrently, on cores 0 and 1."""
    import ray

    from opsd.model import ModelSpec
    from rollout.pool import RolloutActor

    model = ModelSpec(str(setup["model_dir"]))
    with local_ray(num_cpus=2):
        skip_config = replace(config, on_long_prompt="skip")
        skipper = RolloutActor.options(num_cpus=1).remote(model, skip_config, worker_index=1, cpu_cores=[1],
                                                           max_lora_rank=8)
        worker = RolloutActor.options(num_cpus=1).remote(model, config, worker_index=0, cpu_cores=[0],
                                                          max_lora_rank=8)
        get([worker.info.remote(), skipper.info.remote()])
        try:
            yield worker, skipper
        finally:
            ray.get([w.close.remote() for w in (worker, skipper)], timeout=60)
            for actor in (worker, skipper):
                ray.kill(actor)


@pytest.fixture
def worker(engines):
    return engines[0]


def assert_equals_reference(table: pa.Table, reference, eos: set[int]) -> None:
    rows = rows_of(table)
    assert len(rows) == len(reference)
    for row, (tokens, logprobs) in zip(rows, reference):
        assert row["response_ids"] == tokens, row["sample_id"]
        np.testing.assert_allclose(row["response_logprobs"], logprobs, rtol=0, atol=1e-4, err_msg=row["sample_id"])
        stopped = len(tokens) < MAX_TOKENS
        assert row["finish_reason"] == ("stop" if stopped else "length")
        assert not stopped or tokens[-1] in eos  # EOS included in the trace


# -- tests ---------------------------------------------------------------------------------------------------------
def test_each_engine_runs_in_its_actor_bound_to_its_own_core(engines, setup):
    infos = get([engine.info.remote() for engine in engines])
    assert [(i.cpu_cores, i.affinity, i.torch_threads) for i in infos] == [((0,), (0,), 1), ((1,), (1,), 1)]
    assert infos[0].pid != infos[1].pid and all(i.on_cpu for i in infos)
    assert {(i.vocab_size, i.max_model_len) for i in infos} == {(151_936, 512)}
    assert infos[0].tokenizer == tokenizer_fingerprint(setup["tokenizer"])
    assert {(i.adapter_serving, i.engine_lora, i.base_weights_bytes) for i in infos} == {("lora", True, 0)}


def test_greedy_traces_and_logprobs_equal_transformers(worker, setup):
    assert get(worker.load_adapter.remote(0)).version == 0
    table = get(worker.generate.remote(problem_table(PROBLEMS), greedy()))
    check_table(table, "rollouts")
    assert table.column("prompt_ids").to_pylist() == setup["prompts"]  # chat-templated student prompts
    assert table.column("policy_version").to_pylist() == [0] * len(PROBLEMS)
    assert_equals_reference(table, setup["references"][0], setup["eos"])
    assert "length" in table.column("finish_reason").to_pylist()
    metadata = read_metadata(table)
    assert metadata == TableMetadata(model=str(setup["model_dir"]), tokenizer=tokenizer_fingerprint(setup["tokenizer"]),
                                     vocab_size=151_936)
    stats = rollout_stats(table)
    assert (stats.prompts, stats.samples, stats.skipped) == (len(PROBLEMS),) * 2 + (0,)
    assert stats.generated_tokens == sum(len(t) for t, _ in setup["references"][0])


def test_adapter_versions_equal_peft_without_stale_cache(worker, setup):
    info = get(worker.info.remote())
    assert info.prefix_caching and max(len(p) for p in setup["prompts"]) > info.kv_block_size
    batch = problem_table(PROBLEMS)
    v1 = read_adapter_dir(setup["v1"], version=1)  # bytes, as they come from the object store
    info = get(worker.load_adapter.remote(1, v1))
    assert (info.version, info.rank, info.layers) == (1, 8, 14)
    first = get(worker.generate.remote(batch, greedy()))
    assert_equals_reference(first, setup["references"][1], setup["eos"])
    assert "stop" in first.column("finish_reason").to_pylist()  # ended by the extra EOS token

    get(worker.load_adapter.remote(2, str(setup["v2"])))  # a PEFT directory works too
    # The same prompts, already served (and prefix-cached) with v1: v2 must not reuse v1's cached blocks.
    second = get(worker.generate.remote(batch, greedy()))
    assert second.column("policy_version").to_pylist() == [2] * len(PROBLEMS)
    assert_equals_reference(second, setup["references"][2], setup["eos"])
    assert second.column("response_ids").to_pylist() != first.column("response_ids").to_pylist()


def _bad_payloads(setup) -> dict[str, tuple[AdapterPayload, str]]:
    good = read_adapter_dir(setup["v2"], version=3)
    return {
        "rank above max_lora_rank": (replace(good, config=good.config | {"r": 16}), "max_lora_rank 8"),
        "unknown target module": (
            replace(good, config=good.config | {"target_modules": ["q_proj", "foo_proj"]}), "'foo_proj'"),
        "corrupt weights": (replace(good, weights=b"\x00" * 64 + good.weights[64:]), "safetensors"),
        "other base model": (
            replace(good, config=good.config | {"base_model_name_or_path": "Qwen/Qwen3-8B"}), "Qwen/Qwen3-8B"),
        # Passes opsd's checks; vLLM itself refuses it (PiSSA changes the base weights).
        "refused by vLLM": (replace(good, config=good.config | {"init_lora_weights": "pissa"}), "engine refused"),
    }


def test_bad_adapter_is_refused_and_the_previous_version_keeps_serving(worker, setup):
    batch = problem_table(PROBLEMS)
    get(worker.load_adapter.remote(2, read_adapter_dir(setup["v2"], version=2)))
    for case, (payload, message) in _bad_payloads(setup).items():
        with pytest.raises(AdapterError, match=message):
            get(worker.load_adapter.remote(3, payload))
        assert get(worker.policy_version.remote()) == 2, case
        table = get(worker.generate.remote(batch, greedy()))
        assert table.column("policy_version").to_pylist() == [2] * len(PROBLEMS), case
        assert_equals_reference(table, setup["references"][2], setup["eos"])


def test_sampled_logprobs_are_those_of_the_tempered_truncated_distribution(worker, setup):
    get(worker.load_adapter.remote(0))
    model = load_hf_model(setup["model_dir"])
    for temperature, top_k in ((0.7, None), (1.3, 5)):
        sampling = greedy(temperature=temperature, top_k=top_k or -1, seed=3)
        table = get(worker.generate.remote(problem_table(PROBLEMS), sampling))
        for row in rows_of(table):
            expected = hf_token_logprobs(model, row["prompt_ids"], row["response_ids"], temperature, top_k)
            np.testing.assert_allclose(row["response_logprobs"], expected, rtol=0, atol=1e-4, err_msg=row["sample_id"])


def test_seeded_sampling_is_reproducible_and_n_gives_distinct_ids(worker):
    get(worker.load_adapter.remote(0))
    batch = problem_table(PROBLEMS)
    sampling = greedy(temperature=1.0, n=3, seed=11)
    first = get(worker.generate.remote(batch, sampling))
    again = get(worker.generate.remote(batch, sampling))
    alone = get(worker.generate.remote(batch.slice(1, 1), sampling))  # another batch, the same sample ids
    other_seed = get(worker.generate.remote(batch, replace(sampling, seed=12)))
    for table in (first, again, alone, other_seed):
        check_table(table, "rollouts")

    ids = first.column("sample_id").to_pylist()
    assert ids == [sample_id(f"p{i}", 0, r) for i in range(len(PROBLEMS)) for r in range(3)]  # n per prompt, together
    assert rows_of(again) == rows_of(first)
    assert rows_of(alone) == rows_of(first)[3:6]
    assert other_seed.column("response_ids").to_pylist() != first.column("response_ids").to_pylist()
    responses = first.column("response_ids").to_pylist()
    assert len({tuple(r) for r in responses}) == len(responses)  # the n rollouts of a prompt differ
    assert first.column("problem").to_pylist() == [p for p in PROBLEMS for _ in range(3)]


def test_a_pool_of_two_workers_serves_one_version_and_merges_shards_in_order(engines, setup, config):
    from opsd.model import ModelSpec
    from rollout.pool import RolloutPool

    # Two more engines on the same two cores (the module's actors hold the Ray CPUs): the pool's own actors.
    pool = RolloutPool(ModelSpec(str(setup["model_dir"])), replace(config, num_workers=2, cpu_threads_per_worker=1),
                       actor_options=[{"num_cpus": 0}] * 2, max_lora_rank=8, call_timeout_s=TIMEOUT_S)
    try:
        v1 = read_adapter_dir(setup["v1"], version=5)
        pool.load_adapter(v1)
        assert [i.version for i in get([a.load_adapter.remote(5, v1) for a in pool.actors])] == [5, 5]
        assert pool.version == 5 and [i.policy_version for i in pool.infos()] == [5, 5]
        batch = problem_table(PROBLEMS[:3] * 2, prefix="q", epoch=1)
        sampling = greedy(temperature=1.0, n=2, seed=5)
        rollouts = pool.collect(pool.launch(batch, sampling))
        expected_ids = [sample_id(f"q{i}", 1, r) for i in range(6) for r in range(2)]
        # The driver holds refs and a summary; the rows stay in the object store until a stage reads them.
        assert rollouts.tables.rows == (6, 6) and list(rollouts.summary.sample_ids) == expected_ids
        assert set(rollouts.summary.policy_versions) == {5} and rollouts.summary.stats.samples == 12
        merged = rollouts.tables.fetch()
        check_table(merged, "rollouts")
        assert merged.column("sample_id").to_pylist() == expected_ids
        assert list(rollouts.summary.response_lengths) == [len(r) for r in merged.column("response_ids").to_pylist()]
        # Per-trace seeds: the two workers' rows are exactly what one worker makes of the whole batch.
        get(engines[0].load_adapter.remote(5, v1))
        assert rows_of(merged) == rows_of(get(engines[0].generate.remote(batch, sampling)))
        assert rows_of(pool.generate(batch, sampling)) == rows_of(merged)
    finally:
        pool.shutdown()


def test_overlong_prompt_is_rejected_by_sample_id_before_generation(worker):
    from rollout.worker import PromptTooLongError

    batch = problem_table([PROBLEMS[0], "1 + " * 400, PROBLEMS[1]])
    with pytest.raises(PromptTooLongError, match=r"'p1@e0r0' \(\d+ tokens\).*at most 496 tokens") as error:
        get(worker.generate.remote(batch, greedy()))
    assert "p0@e0r0" not in str(error.value)
    assert get(worker.generate.remote(batch.slice(0, 1), greedy())).num_rows == 1  # the engine still serves


def test_overlong_prompt_is_skipped_and_counted_when_configured(engines):
    skipper = engines[1]
    get(skipper.load_adapter.remote(0))
    batch = problem_table([PROBLEMS[0], "1 + " * 400, PROBLEMS[1]])
    table = get(skipper.generate.remote(batch, greedy(n=2)))
    check_table(table, "rollouts")
    assert table.column("sample_id").to_pylist() == ["p0@e0r0", "p0@e0r1", "p2@e0r0", "p2@e0r1"]
    stats = rollout_stats(table)
    assert (stats.prompts, stats.samples, stats.skipped_ids) == (3, 4, ("p1@e0r0",))
