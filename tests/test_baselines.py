"""The SFT and GRPO baselines on the real stack (tiny Qwen3, CPU, Ray): the learner group's steps against a direct
computation from the model's logits, and short end-to-end runs of `train.method=grpo` and `train.method=sft`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from learner.config import LearnerConfig, LearnerObjective, LoraConfig, LossConfig, OptimConfig  # noqa: E402
from learner.group import LearnerGroup  # noqa: E402
from opsd.hf import tokenizer_fingerprint  # noqa: E402
from opsd.prompts import PromptBuilder  # noqa: E402
from opsd.schema import PROBLEM_SCHEMA, ROLLOUT_SCHEMA, TableMetadata, sample_id, with_metadata  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"  # 5 problems
PROBLEMS = [
    ("What is 3 * 7?", "3 * 7 = 21.\n#### 21"),
    ("What is 10 - 4?", "10 - 4 = 6.\n#### 6"),
    ("Tom has 3 apples and buys 5 more. How many?", "3 + 5 = 8.\n#### 8"),
]
EPS = 0.2


@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=4):
        yield


def learner_config(workers=1, lr=1e-2, micro_batch_tokens=4096) -> LearnerConfig:
    return LearnerConfig(num_workers=workers, gpus_per_worker=0, zero_stage=0, micro_batch_tokens=micro_batch_tokens,
                         lora=LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
                         loss=LossConfig(temperature=1.0), optim=OptimConfig(lr=lr, schedule="constant"))


def response_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits (temperature 1) at the positions predicting each response token, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].double()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_grpo_learner_step_is_the_clipped_objective_of_the_models_logprobs(ray_cluster, tiny_model_dir,
                                                                           qwen3_tokenizer):
    """Two ranks, several micro-batches: the step's loss and clip fraction equal the clipped objective computed
    directly from the base model's log-probs (LoRA starts at zero) and the rows' behaviour log-probs; a step whose
    advantages are all zero (every group's rewards equal) leaves the adapter exactly as it was."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(qwen3_tokenizer)
    torch.manual_seed(0)
    rows, expected_terms = [], []
    advantages = [0.7, -0.7, 0.7, -0.7]
    shifts = [-0.5, 0.5, 0.5, 0.0]  # r = e^0.5 with A > 0 and r = e^-0.5 with A < 0: clipped; the others not
    for i, shift in enumerate(shifts):
        problem = PROBLEMS[i // 2][0]
        prompt = builder.student_prompt_ids(problem)
        n = 5 + 2 * i
        out = model.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0)
        response = out[0, len(prompt):].tolist()
        logp = response_logprobs(model, prompt, response)
        old = (logp + shift).float()
        rows.append({"sample_id": sample_id(f"row-{i // 2}", 0, i % 2), "problem": problem, "solution": None,
                     "answer": "1", "prompt_ids": prompt, "response_ids": response,
                     "response_logprobs": old.tolist(), "finish_reason": "length", "policy_version": 0})
        ratio = (logp - old.double()).exp()
        a = advantages[i]
        expected_terms.append(-torch.minimum(ratio * a, ratio.clamp(1 - EPS, 1 + EPS) * a))
    table = with_metadata(pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA),
                          TableMetadata(str(tiny_model_dir), tokenizer_fingerprint(qwen3_tokenizer), 151_936))
    ids = [r["sample_id"] for r in rows]
    terms = torch.cat(expected_terms)
    group = LearnerGroup(str(tiny_model_dir), learner_config(workers=2, micro_batch_tokens=120), total_steps=4,
                         objective=LearnerObjective("grpo", clip_eps=EPS), actor_options={"num_cpus": 1},
                         timeout_s=600)
    try:
        before = group.trainable_parameters()
        still = group.train_step(table, pa.table({"sample_id": ids, "advantage": [0.0] * 4}))
        assert not still.skipped and still.loss == 0 and still.grad_norm == 0 and group.version == 1
        after_zero = group.trainable_parameters()
        for name in before:
            assert torch.equal(before[name], after_zero[name]), name
        step = group.train_step(table, pa.table({"sample_id": ids, "advantage": advantages}))
        moved = group.trainable_parameters()
    finally:
        group.shutdown()
    assert not step.skipped and step.tokens == terms.numel() == sum(5 + 2 * i for i in range(4))
    assert step.loss == pytest.approx(float(terms.mean()), rel=1e-4)
    assert step.clip_fraction == pytest.approx((5 + 7) / terms.numel())
    assert step.grad_norm > 0 and any(not torch.equal(before[n], moved[n]) for n in before)


def test_sft_learner_step_is_the_cross_entropy_of_the_solutions_and_training_reduces_it(ray_cluster, tiny_model_dir,
                                                                                       qwen3_tokenizer):
    from transformers import AutoModelForCausalLM

    problems = pa.Table.from_pylist(
        [{"sample_id": sample_id(f"p-{i}", 0, 0), "problem": p, "solution": s, "answer": None}
         for i, (p, s) in enumerate(PROBLEMS)], schema=PROBLEM_SCHEMA)
    group = LearnerGroup(str(tiny_model_dir), learner_config(lr=2e-2), total_steps=10,
                         objective=LearnerObjective("sft", max_target_tokens=64), actor_options={"num_cpus": 1},
                         timeout_s=600)
    try:
        steps = [group.train_step(problems) for _ in range(10)]
    finally:
        group.shutdown()
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(qwen3_tokenizer)
    total, tokens = 0.0, 0
    for problem, solution in PROBLEMS:
        target = builder.encode(solution) + [qwen3_tokenizer.eos_token_id]
        total -= float(response_logprobs(model, builder.student_prompt_ids(problem), target).sum())
        tokens += len(target)
    assert steps[0].tokens == tokens and steps[0].staleness_mean == 0
    assert steps[0].loss == pytest.approx(total / tokens, rel=1e-4)
    losses = [s.loss for s in steps]
    # From ~log(V) (a random model), down by more than half a nat in ten steps, steadily.
    assert losses[-1] < losses[5] < losses[0] - 0.3 and losses[-1] < losses[0] - 0.6, losses


# --- end to end --------------------------------------------------------------------------------------------------------
def tiny_config(model_dir: Path, run_dir: Path, *overrides: str):
    return load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={model_dir}", f"data.path={DATA}", "data.limit=null", "rollout.max_response_tokens=8",
        f"train.run_dir={run_dir}", "rollout.cpu_threads_per_worker=1", "learner.optim.lr=5e-3", *overrides])


def actors() -> dict[str, str]:
    """Every actor this Ray session started, alive or dead (the GCS keeps the dead ones): id -> class name."""
    from ray._private import state

    return {actor_id: a["ActorClassName"] for actor_id, a in state.actors().items()}


def classes_started_since(before: dict[str, str]) -> set[str]:
    return {name for actor_id, name in actors().items() if actor_id not in before}


def test_a_grpo_run_trains_on_rewards_and_counts_its_tokens(ray_cluster, tiny_model_dir, tmp_path):
    from orchestrator.plot import _accuracy_by_tokens, plot_run
    from orchestrator.train import train

    before = actors()
    lines: list[str] = []
    run_dir = train(tiny_config(tiny_model_dir, tmp_path / "grpo", "train.method=grpo", "rollout.n=2",
                                "train.prompts_per_step=2", "train.steps=2", "train.checkpoint_every=2",
                                "eval.every=2", "eval.sets=[gsm8k]", "eval.limit=1", "eval.n=1",
                                "eval.max_tokens=8", "eval.grade_processes=1"), print_fn=lines.append)
    assert classes_started_since(before) == {"RolloutWorker", "LearnerRank"}  # no teacher actors
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    total = 0
    for r in records:
        assert len(r["sample_ids"]) == 4 and sorted(s.split("r")[-1] for s in r["sample_ids"]) == ["0", "0", "1", "1"]
        assert 0 <= r["reward_mean"] <= 1 and r["reward_mean"] == r["student_accuracy"]
        assert r["zero_advantage_groups"] in (0.0, 0.5, 1.0) and r["gjs"] is None
        assert r["stage_seconds/reward"] >= 0 and "tokens_per_second/teacher" not in r
        assert 0 < r["generated_tokens"] <= 4 * 8 and r["tokens"] == r["generated_tokens"]
        total += r["generated_tokens"]
        assert r["generated_tokens_total"] == total
    assert [r["policy_versions"] for r in records] == [[0], [1]] and records[-1]["adapter_version"] == 2
    assert "eval/gsm8k/avg@1" in records[-1]
    assert (run_dir / "adapters" / "v2" / "adapter_model.safetensors").is_file()
    assert json.loads((run_dir / "checkpoints" / "step-2" / "client_state.json").read_text())[
        "generated_tokens_total"] == total
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["generated_tokens_total"] == total and set(summary["eval"]) == {"0", "2"}
    assert any(line.startswith("step 2/2") and "reward" in line for line in lines)
    by_tokens = _accuracy_by_tokens(records, run_dir)
    assert by_tokens["training traces"] == [(float(r["generated_tokens_total"]), r["student_accuracy"])
                                            for r in records]
    assert [x for x, _ in by_tokens["gsm8k avg@1"]] == [0.0, float(total)]  # before training, and after step 2
    assert plot_run(run_dir).is_file()


def test_an_sft_run_starts_no_teacher_nor_rollout_workers_and_resumes_and_evaluates(ray_cluster, tiny_model_dir, tmp_path):
    from orchestrator.train import train

    before = actors()
    sft = ("train.method=sft", "train.prompts_per_step=2", "train.steps=3", "train.checkpoint_every=2",
           "learner.optim.lr=2e-2")
    straight = train(tiny_config(tiny_model_dir, tmp_path / "sft", *sft), print_fn=lambda line: None)
    assert classes_started_since(before) == {"LearnerRank"}  # no teacher, no rollout workers (no evaluation)
    records = read_metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert r["generated_tokens"] == 0 and r["generated_tokens_total"] == 0 and r["gjs"] is None
        assert r["rollout_length_mean"] is None and "student_accuracy" not in r and r["tokens"] > 0
        assert set(k for k in r if k.startswith("stage_seconds/")) == {"stage_seconds/learner"}
    assert records[-1]["loss"] < records[0]["loss"]
    assert (straight / "adapters" / "v3" / "adapter_model.safetensors").is_file()
    assert json.loads((straight / "summary.json").read_text())["generated_tokens_total"] == 0
    # Resumed, and evaluated: now rollout workers start, for the eval sets only, and serve the checkpoint's adapter.
    before = actors()
    resumed = read_metrics(train(tiny_config(tiny_model_dir, tmp_path / "resumed", *sft,
                                             f"train.resume={straight / 'checkpoints' / 'step-2'}", "eval.every=1",
                                             "eval.sets=[gsm8k]", "eval.limit=1", "eval.n=1", "eval.max_tokens=8",
                                             "eval.grade_processes=1"),
                                 print_fn=lambda line: None))
    assert classes_started_since(before) == {"LearnerRank", "RolloutWorker"}
    assert [r["step"] for r in resumed] == [3] and resumed[0]["sample_ids"] == records[2]["sample_ids"]
    assert resumed[0]["loss"] == pytest.approx(records[2]["loss"], rel=1e-4)
    assert 0 <= resumed[0]["eval/gsm8k/avg@1"] <= 1 and resumed[0]["generated_tokens_total"] == 0
