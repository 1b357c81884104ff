"""Rollout pieces that need no engine: sample ids and seeds, sharding and concatenation, adapter checks, engine
launch."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir
from opsd.configlib import ConfigError
from opsd.schema import PROBLEM_SCHEMA, TableError, TableMetadata, check_table, sample_id, with_metadata
from rollout.config import RolloutConfig, cpu_cores_for, resolve_adapter_serving
from opsd.lora import VLLM_LORA_RANKS, engine_lora_rank
from opsd.model import ModelSpec
from opsd.schema import parse_sample_id
from opsd.tables import TableRefs, concat_tables, shard_bounds, shard_rows
from rollout.resources import engine_launch, scoped_environ
from opsd.schema import RolloutStats, rollout_stats, with_rollout_stats
from rollout.table import (
    RolloutSummary,
    Trace,
    check_no_rollout_columns,
    rollout_sample_ids,
    rollout_table,
    trace_seed,
)

META = TableMetadata(model="m", tokenizer="abc", vocab_size=10)


def problems(n: int, prefix: str = "row") -> pa.Table:
    return pa.table(
        {
            "sample_id": [sample_id(f"{prefix}{i}", 0, 0) for i in range(n)],
            "problem": [f"problem {i}" for i in range(n)],
            "solution": [f"solution {i}" for i in range(n)],
            "answer": [str(i) for i in range(n)],
        },
        schema=PROBLEM_SCHEMA,
    )


def fake_rollouts(batch: pa.Table, n: int, version: int = 0, skipped: tuple[str, ...] = ()) -> pa.Table:
    """What a worker returns for ``batch``, with made-up traces (row i, trace j -> response [i, j])."""
    rows, ids, traces = [], [], []
    for row, prompt_id in enumerate(batch.column("sample_id").to_pylist()):
        for j, trace_id in enumerate(rollout_sample_ids(prompt_id, n)):
            rows.append(row)
            ids.append(trace_id)
            traces.append(Trace([1, 2], [row, j], [-0.5, -0.25], "length"))
    table = with_metadata(rollout_table(batch, rows, ids, traces, version), META)
    stats = RolloutStats(prompts=batch.num_rows, samples=len(ids), skipped_ids=skipped,
                         generated_tokens=2 * len(ids), truncated=len(ids), generate_seconds=1.0)
    return with_rollout_stats(table, stats)


# -- sample ids and seeds ----------------------------------------------------------------------------------------
def test_rollout_sample_ids_number_the_rollouts_of_a_prompt():
    assert rollout_sample_ids("gsm8k-7@e2r0", 3) == ["gsm8k-7@e2r0", "gsm8k-7@e2r1", "gsm8k-7@e2r2"]
    assert rollout_sample_ids("a@b@e0r4", 2) == ["a@b@e0r4", "a@b@e0r5"]  # the first rollout index is kept
    assert rollout_sample_ids("any id at all", 1) == ["any id at all"]  # n = 1: unchanged
    assert parse_sample_id(sample_id("x@y", 3, 12)) == ("x@y", 3, 12)
    assert parse_sample_id("plain") is None
    with pytest.raises(TableError, match="'plain'.*ROW@eEPOCHrROLLOUT"):
        rollout_sample_ids("plain", 2)


def test_trace_seed_is_stable_and_distinct():
    assert trace_seed(0, "a@e0r0") == trace_seed(0, "a@e0r0")
    seeds = {trace_seed(s, f"a@e0r{i}") for s in range(3) for i in range(50)}
    assert len(seeds) == 150 and all(0 <= s < 2**63 for s in seeds)


# -- the table, sharding, concatenation --------------------------------------------------------------------------
def test_rollout_table_keeps_extra_columns_and_follows_the_contract():
    batch = problems(2).append_column("epoch", pa.array([0, 0], pa.int64()))
    table = fake_rollouts(batch, n=2, version=4)
    check_table(table, "rollouts")
    assert table.column("sample_id").to_pylist() == ["row0@e0r0", "row0@e0r1", "row1@e0r0", "row1@e0r1"]
    assert table.column("problem").to_pylist() == ["problem 0", "problem 0", "problem 1", "problem 1"]
    assert table.column("epoch").to_pylist() == [0] * 4
    assert table.column("policy_version").to_pylist() == [4] * 4
    assert table.schema.field("response_logprobs").type == pa.list_(pa.float32())
    assert table.column("response_ids").to_pylist()[3] == [1, 1]
    check_no_rollout_columns(batch)
    with pytest.raises(TableError, match="already has rollout column.*prompt_ids"):
        check_no_rollout_columns(table)


@pytest.mark.parametrize("rows,workers", [(10, 3), (2, 4), (0, 2), (7, 1), (8, 8)])
def test_shard_rows_are_balanced_contiguous_and_cover_the_batch(rows, workers):
    batch = problems(rows)
    shards = shard_rows(batch, workers)
    assert len(shards) == workers
    sizes = [s.num_rows for s in shards]
    assert sum(sizes) == rows and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    assert pa.concat_tables(shards).equals(batch)
    assert shard_bounds(rows, workers)[-1][1] == rows


def test_concat_tables_restores_batch_order_and_summaries_sum_stats():
    batch = problems(5)
    shards = shard_rows(batch, 3)
    outputs = [fake_rollouts(s, n=2, skipped=(f"skipped{i}",)) for i, s in enumerate(shards)]
    merged = concat_tables(outputs)
    check_table(merged, "rollouts")
    expected = [sid for p in batch.column("sample_id").to_pylist() for sid in rollout_sample_ids(p, 2)]
    assert merged.column("sample_id").to_pylist() == expected
    summary = RolloutSummary.merge([RolloutSummary.of(t) for t in outputs])
    assert list(summary.sample_ids) == expected and summary.rows == 10
    assert summary.response_lengths == (2,) * 10 and set(summary.policy_versions) == {0}
    stats = summary.stats
    assert (stats.prompts, stats.samples, stats.generated_tokens, stats.truncated) == (5, 10, 20, 10)
    assert stats.skipped_ids == ("skipped0", "skipped1", "skipped2") and stats.skipped == 3
    assert stats.generate_seconds == pytest.approx(3.0)


def test_concat_tables_handles_empty_shards_and_refuses_other_models():
    batch = problems(1)
    outputs = [fake_rollouts(s, n=1) for s in shard_rows(batch, 3)]
    assert concat_tables(outputs).num_rows == 1
    other = with_metadata(outputs[1], replace(META, tokenizer="other"))
    with pytest.raises(TableError, match="different models"):
        concat_tables([outputs[0], other])


@pytest.mark.parametrize("rows,workers", [((3, 0, 2), 2), ((5,), 3), ((1, 1, 1, 1), 3), ((0,), 2), ((2, 2), 1)])
def test_table_refs_pieces_cover_every_row_once_in_order_balanced(rows, workers):
    refs = TableRefs(tuple(range(len(rows))), rows)
    pieces = refs.pieces(workers)
    assert len(pieces) == workers
    covered = [(shard, r) for worker in pieces for shard, start, stop in worker for r in range(start, stop)]
    assert covered == [(shard, r) for shard, n in enumerate(rows) for r in range(n)]
    sizes = [sum(stop - start for _, start, stop in worker) for worker in pieces]
    assert max(sizes) - min(sizes) <= 1


# -- resources -----------------------------------------------------------------------------------------------------
def test_cpu_cores_for_gives_each_worker_its_own_cores():
    assert [cpu_cores_for(i, 2, None, [0, 1]) for i in range(2)] == [(0,), (1,)]
    assert [cpu_cores_for(i, 2, 2, range(8)) for i in range(2)] == [(0, 1), (2, 3)]
    assert cpu_cores_for(0, 1, None, [3, 2]) == (2, 3)
    with pytest.raises(ConfigError, match="3 rollout workers need a core each; this machine has 2 usable cores"):
        cpu_cores_for(0, 3, None, [0, 1])
    with pytest.raises(ConfigError, match="cpu_threads_per_worker: 2 rollout workers x 2 cores do not fit the 3"):
        cpu_cores_for(0, 2, 2, [0, 1, 2])


def test_engine_launch_on_cpu_sets_kv_cache_in_process_engine_and_cores():
    config = RolloutConfig(gpus_per_worker=0, cpu_kv_cache_gib=0.5, max_model_len=512)
    launch = engine_launch(ModelSpec("/models/m"), config, on_cpu=True, lora_layers=["v_proj", "q_proj"],
                           max_lora_rank=8, cpu_cores=[1])
    assert launch.kwargs["kv_cache_memory_bytes"] == 512 * 2**20
    assert launch.kwargs["distributed_executor_backend"] == "uni"
    assert launch.kwargs["dtype"] == "float32" and launch.kwargs["enforce_eager"] is True
    assert launch.kwargs["logprobs_mode"] == "processed_logprobs"
    assert launch.kwargs["enable_lora"] is True and launch.kwargs["max_lora_rank"] == 8
    assert launch.kwargs["lora_target_modules"] == ["q_proj", "v_proj"]  # not the output head
    assert launch.env == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": None,  # legacy variable removed: it would override the engine argument
        "VLLM_CPU_OMP_THREADS_BIND": "1",
        "OMP_NUM_THREADS": "1",
    }
    assert launch.cpu_cores == (1,)
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        engine_launch(ModelSpec("m"), replace(config, tensor_parallel_size=2), on_cpu=True, lora_layers=["q_proj"],
                      cpu_cores=[0])


def test_engine_launch_without_lora_layers_builds_an_engine_without_lora():
    config = RolloutConfig(gpus_per_worker=0, cpu_kv_cache_gib=0.5, max_model_len=512)
    launch = engine_launch(ModelSpec("/models/m"), config, on_cpu=True, lora_layers=None, cpu_cores=[0])
    lora_keys = {"enable_lora", "max_lora_rank", "lora_target_modules", "max_loras", "max_cpu_loras"}
    assert lora_keys.isdisjoint(launch.kwargs)
    assert launch.kwargs["logprobs_mode"] == "processed_logprobs" and launch.kwargs["dtype"] == "float32"


def test_adapter_serving_auto_resolves_per_device_and_merged_is_cpu_only():
    assert resolve_adapter_serving("auto", on_cpu=True) == "merged"
    assert resolve_adapter_serving("auto", on_cpu=False) == "lora"
    assert resolve_adapter_serving("lora", on_cpu=True) == "lora"
    assert resolve_adapter_serving("lora", on_cpu=False) == "lora"
    assert resolve_adapter_serving("merged", on_cpu=True) == "merged"
    with pytest.raises(ConfigError, match="rollout.adapter_serving.*CPU engines only"):
        resolve_adapter_serving("merged", on_cpu=False)
    assert RolloutConfig().adapter_serving == "auto"
    RolloutConfig(adapter_serving="merged").validate()
    with pytest.raises(ConfigError, match="adapter_serving.*must be one of 'auto', 'lora', 'merged'"):
        RolloutConfig(adapter_serving="fused").validate()


def test_adapter_serving_is_checked_when_loaded_from_a_config_file():
    from opsd.configlib import from_dict

    assert from_dict(RolloutConfig, {"adapter_serving": "lora"}, path="rollout").adapter_serving == "lora"
    with pytest.raises(ConfigError) as error:
        from_dict(RolloutConfig, {"adapter_serving": "fused"}, path="rollout")
    assert error.value.key == "rollout.adapter_serving"


def test_engine_launch_on_gpu_uses_config_and_sets_no_environment():
    config = RolloutConfig(tensor_parallel_size=2, gpu_memory_utilization=0.5)
    launch = engine_launch(ModelSpec("m", dtype="auto"), config, on_cpu=False, lora_layers=["q_proj"])
    assert launch.kwargs["tensor_parallel_size"] == 2 and launch.kwargs["gpu_memory_utilization"] == 0.5
    assert launch.kwargs["dtype"] == "bfloat16"
    assert launch.kwargs["enforce_eager"] is False  # CUDA graphs on GPU unless asked otherwise
    assert engine_launch(ModelSpec("m"), replace(config, enforce_eager=True), on_cpu=False,
                         lora_layers=None).kwargs["enforce_eager"] is True
    assert "kv_cache_memory_bytes" not in launch.kwargs and "distributed_executor_backend" not in launch.kwargs
    assert launch.env == {} and launch.cpu_cores is None


def test_scoped_environ_restores_the_callers_environment(monkeypatch):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "40")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with scoped_environ({"VLLM_CPU_KVCACHE_SPACE": None, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}):
        assert "VLLM_CPU_KVCACHE_SPACE" not in os.environ
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "40"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ


def test_engine_lora_rank_is_the_smallest_vllm_rank_that_holds_the_adapter():
    assert [engine_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    assert all(engine_lora_rank(r) == r for r in VLLM_LORA_RANKS)
    with pytest.raises(ValueError, match="exceeds vLLM's largest, 512"):
        engine_lora_rank(513)
    RolloutConfig(on_long_prompt="skip").validate()


def test_prompt_too_long_error_names_ids_and_survives_pickling():
    from rollout.worker import PromptTooLongError

    error = PromptTooLongError(["a@e0r0", "b@e0r0"], [700, 900], 496, 512, 16)
    assert "'a@e0r0' (700 tokens)" in str(error) and "at most 496 tokens" in str(error)
    assert "on_long_prompt=skip" in str(error)
    copy = pickle.loads(pickle.dumps(error))
    assert copy.sample_ids == ["a@e0r0", "b@e0r0"] and str(copy) == str(error)


# -- adapter checks ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_setup(tiny_model_dir: Path, tmp_path_factory):
    from helpers.rollout_reference import make_lora_adapter

    from opsd.lora import AdapterTarget, model_linear_shapes

    shapes = model_linear_shapes(str(tiny_model_dir))
    target = AdapterTarget(base_model=str(tiny_model_dir), max_rank=8, linear_shapes=shapes)
    folder = make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "good", rank=8, seed=1)
    return target, read_adapter_dir(folder, version=1)


def test_model_linear_shapes_are_the_blocks_linear_layers(adapter_setup):
    target, _ = adapter_setup
    assert target.linear_shapes["model.layers.0.self_attn.q_proj"] == (64, 128)
    assert target.linear_shapes["model.layers.1.mlp.down_proj"] == (256, 64)
    assert "lm_head" not in target.linear_shapes
    assert target.layer_names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_validate_adapter_accepts_a_peft_lora(adapter_setup):
    from opsd.lora import validate_adapter

    target, good = adapter_setup
    assert validate_adapter(good, target) == 14  # 7 layers x 2 blocks


def _broken_weights(payload: AdapterPayload, edit) -> AdapterPayload:
    from safetensors.torch import load, save

    tensors = load(payload.weights)
    edit(tensors)
    return replace(payload, weights=save(tensors))


@pytest.mark.parametrize(
    "case,message",
    [
        ("rank", "rank r=16 is larger than this engine's max_lora_rank 8"),
        ("target", "target module 'foo_proj' is not a linear layer"),
        ("head", "target module 'lm_head' is not a linear layer"),
        ("base", "was trained on base model '/elsewhere/model'"),
        ("dora", "DoRA"),
        ("corrupt", "not a readable safetensors file"),
        ("shape", "model.layers.0.self_attn.q_proj has lora_A (8, 32)"),
        ("nan", "holds NaN or infinite values"),
        ("missing_b", "has no lora_B weight"),
        ("unknown_module", "LoRA tensors for 'model.layers.0.self_attn.foo_proj'"),
    ],
)
def test_validate_adapter_names_what_is_wrong(adapter_setup, case, message):
    import torch

    from opsd.lora import validate_adapter

    target, good = adapter_setup
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    bad = {
        "rank": lambda: replace(good, config=good.config | {"r": 16}),
        "target": lambda: replace(good, config=good.config | {"target_modules": ["q_proj", "foo_proj"]}),
        "head": lambda: replace(good, config=good.config | {"target_modules": ["q_proj", "lm_head"]}),
        "base": lambda: replace(good, config=good.config | {"base_model_name_or_path": "/elsewhere/model"}),
        "dora": lambda: replace(good, config=good.config | {"use_dora": True}),
        "corrupt": lambda: replace(good, weights=good.weights[: len(good.weights) // 2]),
        "shape": lambda: _broken_weights(good, lambda t: t.update({q_a: t[q_a][:, :32].contiguous()})),
        "nan": lambda: _broken_weights(good, lambda t: t[q_a].__setitem__((0, 0), float("nan"))),
        "missing_b": lambda: _broken_weights(good, lambda t: t.pop(q_a.replace("lora_A", "lora_B"))),
        "unknown_module": lambda: _broken_weights(
            good, lambda t: t.update({q_a.replace("q_proj", "foo_proj"): torch.zeros(8, 64)})),
    }
    with pytest.raises(AdapterError, match=re.escape(message)):
        validate_adapter(bad[case](), target)


# -- merged serving: the merge and the base weights, against PEFT ------------------------------------------------
def _peft_adapter(model_dir: Path, out_dir: Path, seed: int, **lora_options) -> Path:
    """A PEFT LoRA adapter with random, nonzero A and B, saved with ``lora_options`` (a LoraConfig's fields)."""
    import torch
    from helpers.rollout_reference import load_hf_model
    from peft import LoraConfig, get_peft_model

    options = dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"], init_lora_weights=False) | lora_options
    peft_model = get_peft_model(load_hf_model(model_dir), LoraConfig(**options))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


def _peft_merged_state(model_dir: Path, adapter_dir: Path) -> dict:
    from helpers.rollout_reference import load_hf_model

    return load_hf_model(model_dir, adapter_dir).merge_and_unload().state_dict()


@pytest.fixture(scope="module")
def merge_setup(tiny_model_dir: Path):
    from opsd.lora import AdapterTarget, model_linear_shapes
    from rollout.merge import read_base_weights

    shapes = model_linear_shapes(str(tiny_model_dir))
    target = AdapterTarget(base_model=str(tiny_model_dir), max_rank=8, linear_shapes=shapes)
    return target, read_base_weights(str(tiny_model_dir), shapes)


def test_base_weights_are_the_targetable_layers_only(merge_setup, tiny_model_dir):
    from safetensors.torch import load_file

    target, base = merge_setup
    checkpoint = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(base.tensors) == {f"{m}.weight" for m in target.linear_shapes}  # no embeddings, norms, head
    assert base.modules == tuple(sorted(target.linear_shapes)) and len(base.modules) == 14
    for name, tensor in base.tensors.items():
        assert tensor.dtype == checkpoint[name].dtype and bool((tensor == checkpoint[name]).all()), name
    assert base.nbytes == sum(checkpoint[n].numel() * 4 for n in base.tensors)


@pytest.mark.parametrize(
    "case,options",
    [
        ("plain", {}),
        ("rslora", {"use_rslora": True, "lora_alpha": 8}),
        ("patterns", {"rank_pattern": {"q_proj": 4, "layers.1.mlp.up_proj": 1}, "alpha_pattern": {"down_proj": 3}}),
        ("some layers", {"target_modules": ["q_proj", "v_proj", "up_proj"]}),
    ],
)
def test_merged_weights_equal_peft_merge_and_unload(merge_setup, tiny_model_dir, tmp_path, case, options):
    import torch

    from opsd.lora import validated_lora_weights
    from rollout.merge import merged_weights

    target, base = merge_setup
    folder = _peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=3, **options)
    payload = read_adapter_dir(folder, version=1)
    lora = validated_lora_weights(payload, target)
    merged = dict(merged_weights(payload, lora, base, torch.float32))
    reference = _peft_merged_state(tiny_model_dir, folder)
    assert set(merged) == set(base.tensors)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], msg=f"{case}: {name}")
        if name.removesuffix(".weight") not in lora:
            assert bool((tensor == base.tensors[name]).all()), f"{case}: {name} is not W0"
    assert len(lora) == (6 if case == "some layers" else 14)


def test_merged_weights_ignore_fan_in_fan_out_on_linear_layers_as_peft_does(merge_setup, tiny_model_dir, tmp_path):
    import json

    import torch

    from opsd.lora import validated_lora_weights
    from rollout.merge import merged_weights

    target, base = merge_setup
    folder = _peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=4)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"fan_in_fan_out": True}))
    payload = read_adapter_dir(folder, version=1)
    merged = dict(merged_weights(payload, validated_lora_weights(payload, target), base, torch.float32))
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module is `torch.nn.Linear`"):
        reference = _peft_merged_state(tiny_model_dir, folder)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, reference[name], msg=name)


def test_merged_weights_are_summed_in_float32_then_cast_to_the_engine_dtype(merge_setup, tiny_model_dir, tmp_path):
    import torch

    from opsd.lora import validated_lora_weights
    from rollout.merge import merged_weights

    target, base = merge_setup
    folder = _peft_adapter(tiny_model_dir, tmp_path / "adapter", seed=5)
    payload = read_adapter_dir(folder, version=1)
    merged = dict(merged_weights(payload, validated_lora_weights(payload, target), base, torch.bfloat16))
    reference = _peft_merged_state(tiny_model_dir, folder)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        assert bool((tensor == reference[name].to(torch.bfloat16)).all()), name


@pytest.mark.parametrize(
    "config,message",
    [
        ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa' cannot be served as merged weights"),
        ({"init_lora_weights": "olora"}, "PEFT changes the base weights"),
        ({"alora_invocation_tokens": [1, 2]}, "activated LoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "LoRA on parameters"),
        ({"trainable_token_indices": [5]}, "trainable tokens"),
        ({"lora_alpha": None}, "no numeric lora_alpha"),
    ],
)
def test_check_mergeable_refuses_what_the_merge_cannot_express(config, message):
    from opsd.lora import check_mergeable

    payload = AdapterPayload(version=2, weights=b"", config={"r": 8, "lora_alpha": 16} | config)
    with pytest.raises(AdapterError, match=re.escape(message)):
        check_mergeable(payload)
    check_mergeable(AdapterPayload(version=2, weights=b"", config={"r": 8, "lora_alpha": 16,
                                                                    "init_lora_weights": "gaussian"}))


def test_merged_weights_refuse_a_rank_the_config_does_not_give(merge_setup, adapter_setup):
    import torch

    from opsd.lora import validated_lora_weights
    from rollout.merge import merged_weights

    target, base = merge_setup
    _, good = adapter_setup
    lora = validated_lora_weights(good, target)
    patterned = replace(good, config=good.config | {"rank_pattern": {"q_proj": 1}})
    with pytest.raises(AdapterError, match="q_proj has lora_A of rank 8, its config says rank 1"):
        merged_weights(patterned, lora, base, torch.float32)


def test_read_base_weights_names_what_the_checkpoint_lacks(tiny_model_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from opsd.lora import model_linear_shapes
    from rollout.merge import read_base_weights

    shapes = model_linear_shapes(str(tiny_model_dir))
    with pytest.raises(ConfigError, match="rollout.adapter_serving.*has none. Use 'lora'"):
        read_base_weights(str(tmp_path), shapes)
    tensors = load_file(str(tiny_model_dir / "model.safetensors"))
    tensors.pop("model.layers.1.mlp.up_proj.weight")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.up_proj.weight is not there"):
        read_base_weights(str(tmp_path), shapes)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(64, 256)  # (in, out): not the nn.Linear layout
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"float \(256, 64\) tensor.*holds torch.float32 \(64, 256\)"):
        read_base_weights(str(tmp_path), shapes)
