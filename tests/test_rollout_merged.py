"""Adapters served as merged weights (``rollout.adapter_serving``: ``merged``, the CPU default) by a real vLLM engine,
against HF transformers + PEFT with the adapter unmerged.

Two engines, each in its own Ray actor bound to its own core of a 2-CPU embedded cluster, started together: the tiny
Qwen3 (config ``auto``, which must resolve to ``merged`` on CPU) and SmolLM2-135M-Instruct (Llama architecture,
pretrained weights: the quickstart's model). Each test sets the adapter version it needs first, so the tests do not
depend on their order.

Tolerance: tokens exactly, log-probs to 1e-4, as for LoRA serving (test_rollout_engine.py). The engine computes
``x @ (W0 + s * B @ A)`` where PEFT computes ``x @ W0 + s * (x @ A) @ B``: float32 rounding differs (~1e-6), not the
model.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from helpers.local_ray import local_ray  # first: sets Ray's loopback switch before ray is imported

import numpy as np
import pyarrow as pa
import pytest
from helpers.rollout_reference import hf_greedy, hf_token_logprobs, load_hf_model, make_lora_adapter
from test_rollout_engine import MAX_TOKENS, PROBLEMS, get, greedy, problem_table, rows_of

from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir
from opsd.prompts import PromptBuilder
from rollout.config import RolloutConfig

pytestmark = pytest.mark.slow

LOGPROB_ATOL = 1e-4


def config(**overrides) -> RolloutConfig:
    return RolloutConfig(num_workers=1, gpus_per_worker=0, cpu_kv_cache_gib=0.25, max_model_len=512,
                         max_response_tokens=MAX_TOKENS, seed=0, **overrides)


def assert_equals_reference(table: pa.Table, reference, version: int) -> None:
    rows = rows_of(table)
    assert [r["policy_version"] for r in rows] == [version] * len(reference)
    for row, (tokens, logprobs) in zip(rows, reference, strict=True):
        assert row["response_ids"] == tokens, row["sample_id"]
        np.testing.assert_allclose(row["response_logprobs"], logprobs, rtol=0, atol=LOGPROB_ATOL,
                                   err_msg=row["sample_id"])


# -- module setup: Ray, two engines (started first, in the background), adapters, HF references --------------------
@pytest.fixture(scope="module")
def engines(tiny_model_dir: Path, smollm2_dir: Path):
    """The tiny Qwen3 with ``adapter_serving`` left at ``auto`` on core 0, SmolLM2 with ``merged`` on core 1.

    Not waited for here: the engines start while the adapters and references are made; the first call on an actor
    waits for it (and raises its start error, if any)."""
    import ray

    from opsd.model import ModelSpec
    from rollout.pool import RolloutActor

    with local_ray(num_cpus=2):
        actors = {}
        for name, model_dir, rollout_config, core in (("tiny", tiny_model_dir, config(), 0),
                                                      ("smollm2", smollm2_dir, config(adapter_serving="merged"), 1)):
            actors[name] = RolloutActor.options(num_cpus=1).remote(
                ModelSpec(str(model_dir)), rollout_config, worker_index=core, cpu_cores=[core], max_lora_rank=8)
        try:
            yield actors
        finally:
            for actor in actors.values():
                try:
                    ray.get(actor.close.remote(), timeout=60)
                finally:
                    ray.kill(actor)


@pytest.fixture(scope="module")
def worker(engines):
    return engines["tiny"]


@pytest.fixture(scope="module")
def tiny(engines, tiny_model_dir: Path, qwen3_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout-merged")
    v1 = make_lora_adapter(tiny_model_dir, root / "v1", rank=8, seed=1)
    # Fewer layers than v1: the layers only v1 changed must be back to W0 under v2.
    v2 = make_lora_adapter(tiny_model_dir, root / "v2", rank=8, targets=["q_proj", "v_proj", "up_proj"], seed=2)
    prompts = [PromptBuilder(qwen3_tokenizer).student_prompt_ids(p) for p in PROBLEMS]
    references = {}
    for version, adapter in ((0, None), (1, v1), (2, v2)):
        model = load_hf_model(tiny_model_dir, adapter)
        references[version] = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return {"model_dir": tiny_model_dir, "v1": v1, "v2": v2, "prompts": prompts, "references": references}


# -- the tiny Qwen3 ---------------------------------------------------------------------------------------------------
def test_auto_serves_merged_weights_on_cpu_from_an_engine_without_lora(worker, tiny):
    from safetensors.torch import load_file

    info = get(worker.info.remote())
    assert (info.on_cpu, info.adapter_serving, info.engine_lora) == (True, "merged", False)
    checkpoint = load_file(str(tiny["model_dir"] / "model.safetensors"))
    linear = [t for name, t in checkpoint.items() if name.endswith("_proj.weight")]
    assert len(linear) == 14 and info.base_weights_bytes == sum(t.numel() * 4 for t in linear)
    assert info.prefix_caching and max(len(p) for p in tiny["prompts"]) > info.kv_block_size


def test_merged_adapter_gives_peft_greedy_tokens_and_sampled_logprobs(worker, tiny):
    batch = problem_table(PROBLEMS)
    info = get(worker.load_adapter.remote(1, read_adapter_dir(tiny["v1"], version=1)))
    assert (info.version, info.rank, info.layers) == (1, 8, 14)
    table = get(worker.generate.remote(batch, greedy()))
    assert table.column("prompt_ids").to_pylist() == tiny["prompts"]
    assert_equals_reference(table, tiny["references"][1], version=1)
    assert table.column("response_ids").to_pylist() != [t for t, _ in tiny["references"][0]]  # the adapter matters

    model = load_hf_model(tiny["model_dir"], tiny["v1"])
    for temperature, top_k in ((0.7, None), (1.3, 5)):
        sampled = get(worker.generate.remote(batch, greedy(temperature=temperature, top_k=top_k or -1, seed=3)))
        for row in rows_of(sampled):
            expected = hf_token_logprobs(model, row["prompt_ids"], row["response_ids"], temperature, top_k)
            np.testing.assert_allclose(row["response_logprobs"], expected, rtol=0, atol=LOGPROB_ATOL,
                                       err_msg=row["sample_id"])


def test_hot_load_serves_the_new_version_on_prompts_already_cached(worker, tiny):
    batch = problem_table(PROBLEMS)
    get(worker.load_adapter.remote(1, read_adapter_dir(tiny["v1"], version=1)))
    first = get(worker.generate.remote(batch, greedy()))  # caches the long prompt's first KV block, under v1
    assert_equals_reference(first, tiny["references"][1], version=1)

    get(worker.load_adapter.remote(2, str(tiny["v2"])))  # a PEFT directory works too
    # The same prompts: v2 must not reuse KV blocks computed with v1's weights, and v1-only layers are W0 again.
    assert_equals_reference(get(worker.generate.remote(batch, greedy())), tiny["references"][2], version=2)

    assert get(worker.load_adapter.remote(0)).version == 0  # the base model's weights, restored
    assert_equals_reference(get(worker.generate.remote(batch, greedy())), tiny["references"][0], version=0)
    get(worker.load_adapter.remote(3, read_adapter_dir(tiny["v1"], version=3)))  # and an adapter again
    assert_equals_reference(get(worker.generate.remote(batch, greedy())), tiny["references"][1], version=3)


def _bad_payloads(tiny) -> dict[str, tuple[AdapterPayload, str]]:
    import torch
    from safetensors.torch import load, save

    good = read_adapter_dir(tiny["v2"], version=3)
    tensors = load(good.weights)
    a_key = next(k for k in tensors if "lora_A" in k)
    tensors[a_key] = tensors[a_key].clone()
    tensors[a_key][0, 0] = float("nan")
    return {
        "rank above max_lora_rank": (replace(good, config=good.config | {"r": 16}), "max_lora_rank 8"),
        "unknown target module": (
            replace(good, config=good.config | {"target_modules": ["q_proj", "foo_proj"]}), "'foo_proj'"),
        "corrupt weights": (replace(good, weights=b"\x00" * 64 + good.weights[64:]), "safetensors"),
        "other base model": (
            replace(good, config=good.config | {"base_model_name_or_path": "Qwen/Qwen3-8B"}), "Qwen/Qwen3-8B"),
        "NaN weight": (replace(good, weights=save(tensors)), "NaN or infinite"),
        "DoRA": (replace(good, config=good.config | {"use_dora": True}), "DoRA"),
        # Passes the shared checks; merging cannot express it (PiSSA changes the base weights).
        "PiSSA": (replace(good, config=good.config | {"init_lora_weights": "pissa"}),
                  "cannot be served as merged weights"),
        "rank pattern the weights do not have": (
            replace(good, config=good.config | {"rank_pattern": {"v_proj": 1}}), "its config says rank 1"),
        # Finite A and B (1e20 each) whose product is not a float32.
        "overflows float32 once merged": (_scaled(good, 1e20, torch), "not finite in torch.float32"),
    }


def _scaled(payload: AdapterPayload, factor: float, torch) -> AdapterPayload:
    from safetensors.torch import load, save

    tensors = {k: t * factor for k, t in load(payload.weights).items()}
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    return replace(payload, weights=save(tensors))


def test_bad_adapter_is_refused_and_the_previous_version_keeps_serving(worker, tiny):
    batch = problem_table(PROBLEMS)
    get(worker.load_adapter.remote(2, read_adapter_dir(tiny["v2"], version=2)))
    for case, (payload, message) in _bad_payloads(tiny).items():
        with pytest.raises(AdapterError, match=message):
            get(worker.load_adapter.remote(3, payload))
        assert get(worker.policy_version.remote()) == 2, case
        assert_equals_reference(get(worker.generate.remote(batch, greedy())), tiny["references"][2], version=2)


# -- SmolLM2-135M-Instruct: a pretrained Llama ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(engines, smollm2_dir: Path, tmp_path_factory):
    from transformers import AutoTokenizer

    # A rank-8 adapter on every linear layer, scaled to change a pretrained model's greedy text, not to wreck it.
    adapter = make_lora_adapter(smollm2_dir, tmp_path_factory.mktemp("smollm2-adapter") / "v1", rank=8, seed=7,
                                scale=0.05)
    prompts = [PromptBuilder(AutoTokenizer.from_pretrained(smollm2_dir)).student_prompt_ids(p) for p in PROBLEMS[:2]]
    references = {}
    for version, folder in ((0, None), (1, adapter)):
        model = load_hf_model(smollm2_dir, folder)
        references[version] = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return {"actor": engines["smollm2"], "adapter": adapter, "prompts": prompts, "references": references}


def test_smollm2_merged_adapter_gives_peft_greedy_tokens_and_logprobs(smollm2):
    actor, batch = smollm2["actor"], problem_table(PROBLEMS[:2])
    assert_equals_reference(get(actor.generate.remote(batch, greedy())), smollm2["references"][0], version=0)
    get(actor.load_adapter.remote(1, read_adapter_dir(smollm2["adapter"], version=1)))
    table = get(actor.generate.remote(batch, greedy()))
    assert table.column("prompt_ids").to_pylist() == smollm2["prompts"]
    assert_equals_reference(table, smollm2["references"][1], version=1)
    assert smollm2["references"][1] != smollm2["references"][0]  # the adapter changes the text
