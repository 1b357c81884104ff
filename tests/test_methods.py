"""The SFT and GRPO baselines on CPU, no cluster: their losses and gradients against float64 references, GRPO's
group-normalised advantages, how the learner builds their rows, their config rules and resource plans."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from learner.loss import PolicyTokens, TargetTokens, token_loss
from opsd.configlib import ConfigError
from opsd.schema import ROLLOUT_SCHEMA, PROBLEM_SCHEMA, TableError, TableMetadata, sample_id, with_metadata
from opsd.tables import join_columns
from orchestrator.config import ineffective_keys, load_config
from orchestrator.methods import GRPO_STD_EPS, group_advantages, grpo_rewards
from orchestrator.placement import ClusterView, ResourcePlan

EPS = 0.2
REPO_ROOT = Path(__file__).resolve().parents[1]


# --- the losses against float64 autograd -----------------------------------------------------------------------------
def inputs(dtype=torch.float64, n=40, h=12, v=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 2.5 / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,), generator=g)
    mask = torch.rand(n, generator=g) < 0.75
    leaf = lambda x: x.to(dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(bias), tokens, mask, g


def reference(hidden, weight, bias):
    """The same leaves in float64, for a plain autograd reference."""
    return [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]


def token_logprob(hidden, weight, bias, tokens, tau):
    return torch.log_softmax((hidden @ weight.T + bias) / tau, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def reference_grpo(hidden, weight, bias, tokens, old, advantage, mask, tau, normalizer):
    ratio = (token_logprob(hidden, weight, bias, tokens, tau) - old).exp()
    per_token = -torch.minimum(ratio * advantage, ratio.clamp(1 - EPS, 1 + EPS) * advantage)
    return per_token[mask].sum() / normalizer, ratio.detach()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grpo_loss_and_gradient_match_float64_autograd_with_the_clip_active(dtype):
    """Behaviour log-probs spread so that ratios fall on both sides of [1 - eps, 1 + eps] for both signs of the
    advantage; several chunks, a mask, a bias, a sampling temperature and a global normalizer."""
    tau, normalizer = 1.3, 57.0
    hidden, weight, bias, tokens, mask, g = inputs(dtype)
    with torch.no_grad():
        current = token_logprob(hidden.double(), weight.double(), bias.double(), tokens, tau)
    old = current + torch.randn(current.shape, generator=g, dtype=torch.float64) * 0.5
    advantage = torch.randn(current.shape, generator=g, dtype=torch.float64)
    out = token_loss(hidden, weight, PolicyTokens(tokens, old.to(dtype), advantage.to(dtype)), clip_eps=EPS,
                     temperature=tau, bias=bias, mask=mask, normalizer=normalizer, chunk_size=7)
    rh, rw, rb = reference(hidden, weight, bias)
    ref, ratio = reference_grpo(rh, rw, rb, tokens, old.to(dtype).double(), advantage.to(dtype).double(), mask, tau,
                                normalizer)
    active = (((advantage > 0) & (ratio > 1 + EPS)) | ((advantage < 0) & (ratio < 1 - EPS)))[mask]
    kept = ~active & ((ratio < 1 - EPS) | (ratio > 1 + EPS))[mask]  # outside the range, but the min takes r A
    assert active.sum() >= 3 and kept.sum() >= 3, "the test needs clipped and unclipped tokens outside the range"
    assert out.num_tokens == int(mask.sum()) and out.num_clipped == int(active.sum())
    assert out.num_clip_entries == out.num_tokens
    rtol, atol = (1e-10, 1e-13) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(out.loss.double(), ref, rtol=rtol, atol=atol)
    actual = torch.autograd.grad(out.loss, [hidden, weight, bias])
    expected = torch.autograd.grad(ref, [rh, rw, rb])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)
    assert actual[0][~mask].abs().max() == 0  # a position outside the mask gets no gradient


def test_on_policy_ratio_is_one_and_the_gradient_is_the_policy_gradient():
    """old_logp = the learner's own log-prob: r = 1, nothing is clipped, the loss is -mean(A) and its gradient is
    -sum(A grad logp) / N."""
    tau = 0.9
    hidden, weight, bias, tokens, _, g = inputs()
    with torch.no_grad():
        old = token_logprob(hidden, weight, bias, tokens, tau)
    advantage = torch.randn(old.shape, generator=g, dtype=torch.float64)
    out = token_loss(hidden, weight, PolicyTokens(tokens, old, advantage), temperature=tau, bias=bias, chunk_size=16)
    assert out.num_clipped == 0
    torch.testing.assert_close(out.loss, -advantage.mean(), rtol=1e-12, atol=1e-14)
    rh, rw, rb = reference(hidden, weight, bias)
    surrogate = -(advantage * token_logprob(rh, rw, rb, tokens, tau)).mean()
    for a, e in zip(torch.autograd.grad(out.loss, [hidden, weight, bias]), torch.autograd.grad(surrogate, [rh, rw, rb])):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-13)


def test_a_group_with_equal_rewards_has_zero_advantage_and_contributes_no_gradient():
    ids = [sample_id("p0", 0, r) for r in range(4)] + [sample_id("p1", 0, r) for r in range(4)]
    rewards = [1.0, 0.0, 1.0, 1.0] + [1.0, 1.0, 1.0, 1.0]  # p1: all correct, nothing to prefer
    groups = group_advantages(ids, rewards)
    assert groups.count == 2 and groups.zero == 1 and groups.advantages[4:] == [0.0] * 4
    tokens_per_trace = 5
    hidden, weight, bias, tokens, _, g = inputs(n=8 * tokens_per_trace)
    advantage = torch.tensor(groups.advantages, dtype=torch.float64).repeat_interleave(tokens_per_trace)
    zero = advantage == 0
    assert zero.sum() == 4 * tokens_per_trace
    old = torch.randn(advantage.shape, generator=g, dtype=torch.float64) - 4.0  # ratios far from 1, some clipped

    def grads(h):
        out = token_loss(h, weight, PolicyTokens(tokens, old, advantage), bias=bias, chunk_size=6)
        return torch.autograd.grad(out.loss, [h, weight, bias])

    grad_hidden, grad_weight, grad_bias = grads(hidden)
    assert torch.equal(grad_hidden[zero], torch.zeros_like(grad_hidden[zero]))  # exactly zero, not small
    assert grad_hidden[~zero].abs().max() > 0
    # Whatever those rows hold, the other gradients do not change by one bit.
    moved = hidden.detach().clone()
    moved[zero] = torch.randn(moved[zero].shape, generator=g, dtype=torch.float64) * 10
    _, grad_weight_moved, grad_bias_moved = grads(moved.requires_grad_())
    assert torch.equal(grad_weight, grad_weight_moved) and torch.equal(grad_bias, grad_bias_moved)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sft_loss_and_gradient_match_float64_cross_entropy(dtype):
    hidden, weight, bias, tokens, mask, _ = inputs(dtype, seed=3)
    normalizer = 50.0
    out = token_loss(hidden, weight, TargetTokens(tokens), bias=bias, mask=mask, normalizer=normalizer, chunk_size=9)
    rh, rw, rb = reference(hidden, weight, bias)
    ref = F.cross_entropy((rh @ rw.T + rb)[mask], tokens[mask], reduction="sum") / normalizer
    rtol, atol = (1e-10, 1e-13) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(out.loss.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(out.divergence_sum.double() / normalizer, ref, rtol=rtol, atol=atol)  # the NLL
    assert out.num_clipped == 0 and out.num_clip_entries == 0
    for a, e in zip(torch.autograd.grad(out.loss, [hidden, weight, bias]), torch.autograd.grad(ref, [rh, rw, rb])):
        torch.testing.assert_close(a.double(), e, rtol=rtol, atol=atol)


def test_token_loss_refuses_what_it_cannot_compute():
    hidden, weight, bias, tokens, _, _ = inputs()
    with pytest.raises(ValueError, match="clip_eps must be in"):
        token_loss(hidden, weight, PolicyTokens(tokens, tokens.double(), tokens.double()), clip_eps=1.5)
    with pytest.raises(TypeError, match="TargetTokens or PolicyTokens"):
        token_loss(hidden, weight, tokens)
    from learner.loss import gjs_loss

    with pytest.raises(ValueError, match="token_loss"):
        gjs_loss(hidden, weight, TargetTokens(tokens), kind="sft")


# --- GRPO's rewards and advantages -----------------------------------------------------------------------------------
def test_advantages_are_normalised_within_each_prompt_and_epoch():
    ids = [sample_id("a", 0, 0), sample_id("b", 0, 0), sample_id("a", 0, 1), sample_id("b", 0, 1),
           sample_id("a", 1, 0), sample_id("a", 1, 1), sample_id("a", 0, 2)]
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    out = group_advantages(ids, rewards)
    assert out.count == 3 and out.zero == 1  # a@e0 (3 traces), b@e0 (all 0), a@e1: epochs are separate groups
    a0 = [0, 2, 6]
    values = [rewards[i] for i in a0]
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)  # Bessel's correction
    for i in a0:
        assert out.advantages[i] == pytest.approx((rewards[i] - mean) / (std + GRPO_STD_EPS), rel=1e-12)
    assert sum(out.advantages[i] for i in a0) == pytest.approx(0.0, abs=1e-12)
    assert out.advantages[4] == pytest.approx(-out.advantages[5]) and out.advantages[5] == pytest.approx(
        1 / (math.sqrt(0.5) + GRPO_STD_EPS) * 0.5)
    assert out.advantages[1] == out.advantages[3] == 0.0
    with pytest.raises(ValueError, match="does not name its prompt"):
        group_advantages(["plain-id"], [1.0])


def test_rewards_are_one_for_correct_answers_only():
    assert grpo_rewards(["x", "y", "z", "w"], ["correct", "wrong", "no_answer", "timeout"]) == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reference answer for every trace; 'y'"):
        grpo_rewards(["x", "y"], ["correct", None])


# --- how the learner reads its tables --------------------------------------------------------------------------------
def metadata_table(rows, schema, tokenizer):
    from opsd.hf import tokenizer_fingerprint

    return with_metadata(pa.Table.from_pylist(rows, schema=schema),
                         TableMetadata("tiny", tokenizer_fingerprint(tokenizer), 151_936))


def test_sft_rows_are_the_student_prompt_then_the_solution_and_eos(qwen3_tokenizer):
    from learner.batch import rows_from_table
    from learner.objectives import SupervisedFineTuning
    from opsd.prompts import PromptBuilder

    builder = PromptBuilder(qwen3_tokenizer)
    problems = pa.Table.from_pylist([
        {"sample_id": "p-0@e0r0", "problem": "What is 3 * 7?", "solution": "3 * 7 = 21.\n#### 21", "answer": "21"},
        {"sample_id": "p-1@e0r0", "problem": "What is 10 - 4?", "solution": "10 - 4 = 6. " * 20, "answer": "6"},
    ], schema=PROBLEM_SCHEMA)
    kind = SupervisedFineTuning(max_target_tokens=30)
    kind.check_table(problems, None)
    rows = rows_from_table(problems, kind, builder=builder)
    eos = qwen3_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert rows[0].input_ids == builder.student_prompt_ids("What is 3 * 7?") + builder.encode("3 * 7 = 21.\n#### 21") \
        + [eos]
    assert rows[0].response_start == len(builder.student_prompt_ids("What is 3 * 7?"))
    assert rows[1].response_ids == builder.encode("10 - 4 = 6. " * 20)[:30]  # cut at the budget, no EOS
    batch = kind.collate([r.teacher for r in rows], [r.response_ids for r in rows], 0)
    assert batch.token_ids.tolist() == rows[0].response_ids + rows[1].response_ids
    no_solution = problems.set_column(2, PROBLEM_SCHEMA.field("solution"), pa.array(["x", None], pa.string()))
    with pytest.raises(TableError, match="'p-1@e0r0': SFT trains on the reference solution"):
        kind.check_table(no_solution, None)


def test_grpo_rows_carry_the_behaviour_logprobs_and_their_traces_advantage(qwen3_tokenizer):
    from learner.batch import rows_from_table
    from learner.objectives import ClippedPolicyGradient

    rows = [{"sample_id": sample_id("p", 0, r), "problem": "q", "solution": None, "answer": "1",
             "prompt_ids": [1, 2, 3], "response_ids": [4 + r] * (2 + r), "response_logprobs": [-0.5 - r] * (2 + r),
             "finish_reason": "stop", "policy_version": 0} for r in range(2)]
    table = metadata_table(rows, ROLLOUT_SCHEMA, qwen3_tokenizer)
    expected = TableMetadata("tiny", read_fingerprint(table), 151_936)
    kind = ClippedPolicyGradient(0.2)
    with pytest.raises(TableError, match="needs an 'advantage' column"):
        kind.check_table(table, expected)
    advantages = pa.table({"sample_id": [sample_id("p", 0, 1), sample_id("p", 0, 0)], "advantage": [-0.7, 0.7]})
    joined = join_columns(table, advantages)
    kind.check_table(joined, expected)
    assert kind.non_finite_rows(joined) == []
    built = rows_from_table(joined, kind)
    batch = kind.collate([r.teacher for r in built], [r.response_ids for r in built], 0)
    assert batch.token_ids.tolist() == [4, 4, 5, 5, 5]
    assert batch.old_logprob.tolist() == [-0.5, -0.5, -1.5, -1.5, -1.5]
    assert batch.advantage.tolist() == [0.7, 0.7, -0.7, -0.7, -0.7]
    broken = join_columns(table, pa.table({"sample_id": advantages.column(0), "advantage": [math.nan, 0.7]}))
    assert kind.non_finite_rows(broken) == [sample_id("p", 0, 1)]
    with pytest.raises(TableError, match="has no row in the columns sent with the step table"):
        join_columns(table, advantages.slice(0, 1))


def read_fingerprint(table):
    from opsd.schema import read_metadata

    return read_metadata(table).tokenizer


# --- config and placement --------------------------------------------------------------------------------------------
DATA = ["data.path=unused.jsonl"]


def config_error(*overrides):
    with pytest.raises(ConfigError) as info:
        load_config(None, DATA + list(overrides))
    return info.value


def test_grpo_refuses_what_it_cannot_train_with():
    assert config_error("train.method=grpo").key == "rollout.n"
    err = config_error("train.method=grpo", "rollout.n=4", "rollout.temperature=0")
    assert err.key == "rollout.temperature" and "advantage would be 0" in str(err)
    assert config_error("train.method=grpo", "rollout.n=4", "train.student_accuracy=false").key == \
        "train.student_accuracy"
    for method in ("grpo", "sft"):
        assert config_error(f"train.method={method}", "rollout.n=4", "train.heldout_rows=2").key == \
            "train.heldout_rows"
        assert config_error(f"train.method={method}", "rollout.n=4", "teacher.kind=ema").key == "teacher.kind"
    assert config_error("train.method=grpo", "rollout.n=4", "grpo.clip_eps=1.5").key == "grpo.clip_eps"
    assert config_error("train.method=ppo").key == "train.method"
    cfg = load_config(None, DATA + ["train.method=grpo", "rollout.n=4"])
    objective = cfg.learner_objective()
    assert objective.method == "grpo" and objective.clip_eps == 0.2 and objective.kind(cfg.learner.loss).name == "grpo"


def test_keys_a_baseline_does_not_use_are_named():
    sft = load_config(None, DATA + ["train.method=sft", "teacher.top_k=8", "rollout.n=4", "learner.loss.beta=0.1",
                                    "grpo.clip_eps=0.3"])
    notes = ineffective_keys(sft, on_cpu=True)
    for key in ("teacher.top_k", "rollout.n", "learner.loss.beta", "grpo.clip_eps"):
        assert any(n.startswith(f"{key} has no effect: train.method=sft") for n in notes), (key, notes)
    grpo = load_config(None, DATA + ["train.method=grpo", "rollout.n=4", "rollout.top_p=0.95"])
    assert any("top_p/top_k with train.method=grpo" in n for n in ineffective_keys(grpo, on_cpu=True))
    assert ineffective_keys(load_config(None, DATA + ["train.method=grpo", "rollout.n=4"]), on_cpu=True) == []


@pytest.mark.parametrize("overrides, pools", [
    (["train.method=sft"], ("learner",)),
    (["train.method=sft", "eval.every=5"], ("rollout", "learner")),  # rollout workers only to evaluate
    (["train.method=grpo", "rollout.n=4", "learner.loss.kind=topk_tail"], ("rollout", "learner")),
    (["learner.loss.kind=topk_tail"], ("rollout", "teacher", "learner")),
])
def test_the_baselines_start_no_teacher_and_sft_no_rollout_workers_unless_it_evaluates(overrides, pools):
    cfg = load_config(None, DATA + ["placement.mode=split", "rollout.num_workers=2", "teacher.num_workers=2",
                                    *overrides])
    plan = ResourcePlan.from_config(cfg, ClusterView(({"GPU": 8.0, "CPU": 16.0},)))
    assert plan.pools == pools
