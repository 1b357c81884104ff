"""The DeepSpeed learner group on CPU: ranks, micro-batches, export, checkpoints, guards (tiny Qwen3, gloo)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from learner.config import LearnerConfig, LoraConfig, LossConfig, OptimConfig  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from opsd.adapter import write_adapter_dir  # noqa: E402
from opsd.hf import tokenizer_fingerprint  # noqa: E402
from opsd.prompts import PromptBuilder  # noqa: E402
from opsd.schema import ROLLOUT_SCHEMA, TableError, TableMetadata, sample_id, with_metadata  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.scorer import TeacherScorer  # noqa: E402

pytestmark = pytest.mark.slow

K, TAU = 16, 1.0
PROBLEMS = [
    ("Natalia sold clips to 48 friends in April and half as many in May. How many in total?", "48 + 24 = 72.\n#### 72"),
    ("What is 3 * 7?", "3 * 7 = 21.\n#### 21"),
    ("A train goes 60 km in 1.5 hours. What is its speed?", "60 / 1.5 = 40.\n#### 40"),
    ("What is 10 - 4?", "10 - 4 = 6.\n#### 6"),
    ("Tom has 3 apples and buys 5 more. How many?", "3 + 5 = 8.\n#### 8"),
]
ACTOR = {"num_cpus": 1}


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def rollout_table(tiny_model_dir, qwen3_tokenizer) -> pa.Table:
    from rollout_reference import sampled_rollout_table

    return sampled_rollout_table(tiny_model_dir, qwen3_tokenizer, PROBLEMS, [6 + 3 * i for i in range(len(PROBLEMS))])


@pytest.fixture(scope="module")
def scored_table(tiny_model_dir, rollout_table) -> pa.Table:
    return TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=K), temperature=TAU).score(rollout_table).table


def learner_config(zero_stage=0, workers=1, micro_batch_tokens=4096, lr=1e-3, kind="topk_tail") -> LearnerConfig:
    return LearnerConfig(
        num_workers=workers, gpus_per_worker=0, zero_stage=zero_stage, micro_batch_tokens=micro_batch_tokens,
        lora=LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        loss=LossConfig(kind=kind, temperature=TAU), optim=OptimConfig(lr=lr, schedule="constant"),
    )


def make_group(tiny_model_dir, config, total_steps=10) -> LearnerGroup:
    return LearnerGroup(str(tiny_model_dir), config, total_steps=total_steps, expected_top_k=K, actor_options=ACTOR,
                        timeout_s=600)


def assert_same_params(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_one_step_is_the_same_for_one_and_two_ranks_and_any_micro_batching(ray_cluster, tiny_model_dir,
                                                                            scored_table, zero_stage):
    results = {}
    for name, workers, micro in (("L1", 1, 4096), ("L2", 2, 4096), ("L1-small-micro", 1, 200)):
        group = make_group(tiny_model_dir, learner_config(zero_stage, workers, micro))
        try:
            before = group.trainable_parameters()
            metrics = group.train_step(scored_table)
            assert not metrics.skipped and metrics.tokens == sum(6 + 3 * i for i in range(5))
            results[name] = group.trainable_parameters()
        finally:
            group.shutdown()
    assert any(not torch.equal(before[n], results["L1"][n]) for n in before)  # the step moved the adapter
    assert_same_params(results["L1"], results["L2"])
    assert_same_params(results["L1"], results["L1-small-micro"])


def test_training_reduces_the_loss_and_the_export_reloads_in_peft(ray_cluster, tiny_model_dir, scored_table, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    group = make_group(tiny_model_dir, learner_config(lr=2e-2), total_steps=30)
    try:
        losses = [group.train_step(scored_table).loss for _ in range(30)]
        payload = group.export_adapter()
        ids = [scored_table.column("prompt_ids")[0].as_py()[:20]]
        engine_logits = group.logits(ids)
    finally:
        group.shutdown()
    assert losses[-1] < 0.5 * losses[0], losses
    assert payload.version == 30 and payload.rank == 8
    adapter = write_adapter_dir(payload, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        reloaded = peft_model(input_ids=torch.tensor(ids)).logits
    torch.testing.assert_close(reloaded, engine_logits, rtol=1e-5, atol=1e-5)


def test_bfloat16_on_cpu_trains_like_float32(ray_cluster, tiny_model_dir, scored_table):
    """The quickstart's bfloat16 learner on CPU (DeepSpeed bf16: bfloat16 weights and matmuls, float32 loss and
    optimizer state): its steps follow the float32 learner's without being the same, and the adapter it pushes is
    float32."""
    from safetensors.torch import load

    runs = {}
    for dtype in ("float32", "bfloat16"):
        config = learner_config(lr=2e-2)
        config.dtype = dtype
        group = make_group(tiny_model_dir, config, total_steps=8)
        try:
            before = group.trainable_parameters()
            first = group.train_step(scored_table)
            after_one = group.trainable_parameters()
            losses = [first.loss] + [group.train_step(scored_table).loss for _ in range(7)]
            payload = group.export_adapter()
        finally:
            group.shutdown()
        runs[dtype] = (before, after_one, losses, load(payload.weights))
    (before, f32_one, f32_losses, _), (_, bf16_one, bf16_losses, bf16_adapter) = runs["float32"], runs["bfloat16"]
    assert bf16_losses != f32_losses  # bfloat16 was used: its rounding shows in the losses
    assert bf16_losses[0] == pytest.approx(f32_losses[0], rel=0.05)
    assert bf16_losses[-1] < 0.5 * bf16_losses[0] and f32_losses[-1] < 0.5 * f32_losses[0], (bf16_losses, f32_losses)
    # Adam's first step moves each weight by ~lr in the sign of its gradient (lora_B only: lora_A's gradient is zero
    # while B is): the signs agree where the step is clear.
    f32_step = torch.cat([(f32_one[n] - before[n]).ravel() for n in before])
    bf16_step = torch.cat([(bf16_one[n] - before[n]).ravel() for n in before])
    clear = f32_step.abs() > 1e-2
    assert clear.float().mean() > 0.1
    assert (torch.sign(f32_step[clear]) == torch.sign(bf16_step[clear])).float().mean() > 0.9
    assert not torch.equal(f32_step, bf16_step)
    # The adapter the rollout engines load is float32 (their merged weights are float32 on CPU).
    assert bf16_adapter and all(t.dtype == torch.float32 for t in bf16_adapter.values())


def test_zero3_exports_a_full_adapter(ray_cluster, tiny_model_dir, scored_table):
    group = make_group(tiny_model_dir, learner_config(zero_stage=3))
    try:
        group.train_step(scored_table)
        payload = group.export_adapter()
        params = group.trainable_parameters()
    finally:
        group.shutdown()
    from safetensors.torch import load

    tensors = load(payload.weights)
    assert tensors and all(t.numel() > 0 for t in tensors.values())
    assert any("lora_B" in k and t.abs().sum() > 0 for k, t in tensors.items())
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in params.values())


def test_save_load_then_a_step_equals_two_uninterrupted_steps(ray_cluster, tiny_model_dir, scored_table, tmp_path):
    config = learner_config(zero_stage=2, lr=1e-2)
    group = make_group(tiny_model_dir, config)
    try:
        group.train_step(scored_table)
        checkpoint = group.save_checkpoint(tmp_path / "ckpt", client_state={"cursor": 5})
        group.train_step(scored_table)
        uninterrupted = group.trainable_parameters()
    finally:
        group.shutdown()
    assert checkpoint.is_dir() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    resumed = make_group(tiny_model_dir, config)
    try:
        state = resumed.load_checkpoint(checkpoint)
        assert state["cursor"] == 5 and resumed.version == 1
        resumed.train_step(scored_table)
        assert_same_params(resumed.trainable_parameters(), uninterrupted, atol=1e-6)
    finally:
        resumed.shutdown()


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_non_finite_teacher_values_skip_the_step_and_leave_weights_unchanged(ray_cluster, tiny_model_dir,
                                                                            scored_table, zero_stage):
    column = scored_table.column("teacher_topk_logprobs").combine_chunks()
    values = column.values.to_numpy().copy()
    values[3] = float("nan")
    poisoned = pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.float32()))
    bad = scored_table.set_column(scored_table.schema.get_field_index("teacher_topk_logprobs"),
                                  scored_table.schema.field("teacher_topk_logprobs"), poisoned)
    group = make_group(tiny_model_dir, learner_config(zero_stage))
    try:
        before = group.trainable_parameters()
        metrics = group.train_step(bad)
        assert metrics.skipped and "non-finite" in metrics.skip_reason and "row-0" in metrics.skip_reason
        assert_same_params(group.trainable_parameters(), before, atol=0)
        assert group.version == 0
        assert not group.train_step(scored_table).skipped  # and training goes on
    finally:
        group.shutdown()


def test_tables_that_do_not_match_are_refused(ray_cluster, tiny_model_dir, scored_table, rollout_table):
    from opsd.schema import read_metadata

    group = make_group(tiny_model_dir, learner_config())
    try:
        meta = read_metadata(scored_table)
        hot = with_metadata(scored_table, TableMetadata(meta.model, meta.tokenizer, meta.vocab_size, K, 2.0))
        with pytest.raises(TableError, match="temperature 2.0 differs"):
            group.train_step(hot)
        other_k = with_metadata(scored_table, TableMetadata(meta.model, meta.tokenizer, meta.vocab_size, 8, TAU))
        with pytest.raises(TableError, match="top_k 8 differs"):
            group.train_step(other_k)
        other_vocab = with_metadata(scored_table, TableMetadata(meta.model, meta.tokenizer, 1000, K, TAU))
        with pytest.raises(TableError, match="vocab_size"):
            group.train_step(other_vocab)
        with pytest.raises(TableError, match="no column 'teacher_topk_ids'"):
            group.train_step(rollout_table)
        empty = group.train_step(scored_table.slice(0, 0))
        assert empty.skipped and "empty step" in empty.skip_reason
    finally:
        group.shutdown()


def test_full_vocabulary_loss_runs_the_teacher_in_process(ray_cluster, tiny_model_dir, qwen3_tokenizer,
                                                          rollout_table, scored_table):
    """Step 0 of the in-process full-vocabulary teacher equals GJS computed directly (float64) from the base model's
    logits on the student and teacher contexts; the teacher actor's top-k+tail GJS is a lower bound of it."""
    from transformers import AutoModelForCausalLM

    values = {}
    for kind, table in (("full", rollout_table), ("topk_tail", scored_table)):
        group = make_group(tiny_model_dir, learner_config(kind=kind))
        try:
            values[kind] = group.train_step(table)
        finally:
            group.shutdown()
    full, topk = values["full"], values["topk_tail"]
    assert not full.skipped and full.tokens == topk.tokens == sum(6 + 3 * i for i in range(5))
    assert math.isfinite(full.grad_norm) and full.grad_norm > 0
    assert 0 < topk.gjs <= full.gjs * (1 + 1e-5)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(qwen3_tokenizer)
    total, tokens = 0.0, 0
    for row in rollout_table.to_pylist():
        response = row["response_ids"]
        student = row["prompt_ids"] + response
        teacher = builder.teacher_prompt_ids(row["problem"], row["solution"]) + response
        with torch.no_grad():
            s = model(torch.tensor([student])).logits[0, len(student) - len(response) - 1: -1].double()
            t = model(torch.tensor([teacher])).logits[0, len(teacher) - len(response) - 1: -1].double()
        p, q = torch.softmax(s / TAU, -1), torch.softmax(t / TAU, -1)
        m = 0.5 * (p + q)
        total += (0.5 * (q * (q / m).log()).sum() + 0.5 * (p * (p / m).log()).sum()).item()
        tokens += len(response)
    assert full.gjs == pytest.approx(total / tokens, rel=1e-4)


def test_clip_modes_reach_the_loss_and_report_the_clipped_fraction(ray_cluster, tiny_model_dir, scored_table):
    """learner.loss.clip_mode is passed to the loss: the step reports the fraction of tokens (token) or of the k + 1
    categories (pointwise) that were capped; a cap above every value clips nothing."""
    from dataclasses import replace

    fractions = {}
    for mode, clip in (("token", 1e-9), ("pointwise", 1e-9), ("pointwise", 1e9), ("none", None)):
        config = learner_config()
        config = replace(config, loss=replace(config.loss, clip_mode=mode, clip=clip))
        group = make_group(tiny_model_dir, config)
        try:
            fractions[(mode, clip)] = group.train_step(scored_table).clip_fraction
        finally:
            group.shutdown()
    assert fractions[("token", 1e-9)] == 1.0  # every token's divergence is above 1e-9
    assert 0.5 < fractions[("pointwise", 1e-9)] <= 1.0  # most of the 17 categories' terms are
    assert fractions[("pointwise", 1e9)] == 0.0 and fractions[("none", None)] == 0.0
