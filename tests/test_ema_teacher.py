"""The EMA teacher (teacher.kind=ema): the learner's EMA of the LoRA weights against a float64 recurrence, the teacher
actors and the learner's in-process teacher against HF transformers + PEFT loading the same adapter, checkpoints, and
the config rules. Tiny Qwen3 on CPU; the learner tests run DeepSpeed (gloo) in Ray actors."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from learner.config import LearnerConfig, LoraConfig, LossConfig, OptimConfig  # noqa: E402
from learner.ema import EmaWeights  # noqa: E402
from opsd.adapter import AdapterError, AdapterPayload, write_adapter_dir  # noqa: E402
from opsd.configlib import ConfigError  # noqa: E402
from opsd.hf import tokenizer_fingerprint  # noqa: E402
from opsd.prompts import PromptBuilder  # noqa: E402
from opsd.schema import ROLLOUT_SCHEMA, TableMetadata, sample_id, with_metadata  # noqa: E402
from orchestrator.config import ineffective_keys, load_config  # noqa: E402
from teacher.config import TeacherConfig  # noqa: E402
from teacher.scorer import TeacherScorer  # noqa: E402

K, TAU, DECAY = 8, 1.0, 0.5  # a decay this low makes the EMA move visibly in three steps
PROBLEMS = [
    ("Natalia sold clips to 48 friends in April and half as many in May. How many in total?", "48 + 24 = 72.\n#### 72"),
    ("What is 3 * 7?", "3 * 7 = 21.\n#### 21"),
    ("A train goes 60 km in 1.5 hours. What is its speed?", "60 / 1.5 = 40.\n#### 40"),
]
DATA = ["data.path=data/train.jsonl"]
ACTOR = {"num_cpus": 1}


# -- shared pieces ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rollout_table(tiny_model_dir, qwen3_tokenizer) -> pa.Table:
    """Traces sampled from the tiny model itself, of different lengths."""
    from rollout_reference import sampled_rollout_table

    return sampled_rollout_table(tiny_model_dir, qwen3_tokenizer, PROBLEMS, [6 + 4 * i for i in range(len(PROBLEMS))])


@pytest.fixture(scope="module")
def frozen_scored(tiny_model_dir, rollout_table) -> pa.Table:
    return TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=K), temperature=TAU).score(rollout_table).table


def peft_model(model_dir, payload: AdapterPayload | None, tmp_path: Path):
    """The reference: HF transformers in float32, plus PEFT loading the payload written as an adapter directory."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if payload is None:
        return base.eval()
    adapter = write_adapter_dir(payload, tmp_path / f"adapter-{payload.version}-{id(payload)}")
    return PeftModel.from_pretrained(base, adapter).eval()


def response_logits(model, context: list[int], response: list[int]) -> torch.Tensor:
    """float64 logits of the positions that predict the response tokens (unpadded context)."""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0]
    start = len(context) - len(response)
    return logits[start - 1: len(context) - 1].double()


def assert_scores_equal_reference(table: pa.Table, model, builder: PromptBuilder, atol: float = 1e-5) -> None:
    """The scored columns against the full-vocabulary float64 log-softmax of the reference model's logits."""
    for row in range(table.num_rows):
        problem, solution = table.column("problem")[row].as_py(), table.column("solution")[row].as_py()
        response = table.column("response_ids")[row].as_py()
        n = len(response)
        logp = torch.log_softmax(response_logits(model, builder.teacher_prompt_ids(problem, solution) + response,
                                                 response) / TAU, dim=-1)
        ref_top, ref_ids = logp.topk(K, dim=-1)
        top = torch.tensor(table.column("teacher_topk_logprobs")[row].as_py()).view(n, K).double()
        ids = torch.tensor(table.column("teacher_topk_ids")[row].as_py()).view(n, K)
        tail = torch.tensor(table.column("teacher_tail_logprob")[row].as_py()).double()
        token = torch.tensor(table.column("teacher_token_logprob")[row].as_py()).double()
        torch.testing.assert_close(top, ref_top, rtol=0, atol=atol)
        torch.testing.assert_close(tail, torch.log1p(-ref_top.exp().sum(-1)), rtol=0, atol=atol)
        torch.testing.assert_close(token, logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1),
                                   rtol=0, atol=atol)
        apart = (ref_top[:, :-1] - ref_top[:, 1:]).abs() > 1e-4  # ids compared where no near-tie can swap them
        apart[:, 1:] &= apart[:, :-1].clone()
        assert apart.float().mean() > 0.5
        assert torch.equal(ids[:, :-1][apart], ref_ids[:, :-1][apart])


def teacher_columns(table: pa.Table) -> dict:
    return {c: table.column(c).to_pylist() for c in table.column_names if c.startswith("teacher_")}


def gjs(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-position GJS with beta 0.5, float64."""
    p, q = torch.softmax(student / TAU, -1), torch.softmax(teacher / TAU, -1)
    m = 0.5 * (p + q)
    return 0.5 * (q * (q / m).log()).sum(-1) + 0.5 * (p * (p / m).log()).sum(-1)


def lora_tensors(payload: AdapterPayload) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return {k: v.double() for k, v in load(payload.weights).items()}


# -- the EMA arithmetic, the config (fast) -----------------------------------------------------------------------------
def test_ema_weights_copy_first_then_decay_and_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    students = [{"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g)} for _ in range(4)]
    ema = EmaWeights(0.9)
    assert ema.params is None and ema.version == 0
    ema.update(students[0])
    students[0]["a"].add_(1.0)  # a copy, not a reference
    expected = {name: value.double() - (1.0 if name == "a" else 0.0) for name, value in students[0].items()}
    for student in students[1:]:
        ema.update(student)
        expected = {name: 0.9 * expected[name] + 0.1 * student[name].double() for name in expected}
    assert ema.version == 4
    for name in expected:
        torch.testing.assert_close(ema.params[name].double(), expected[name], rtol=0, atol=1e-6)

    ema.save(tmp_path / "ema.safetensors")
    restored = EmaWeights(0.9)
    restored.load(tmp_path / "ema.safetensors", {"a", "b"}, "cpu")
    assert restored.version == 4 and all(torch.equal(restored.params[n], ema.params[n]) for n in expected)
    with pytest.raises(ValueError, match="do not match"):
        restored.load(tmp_path / "ema.safetensors", {"a", "c"}, "cpu")
    EmaWeights(0.9).save(tmp_path / "none.safetensors")  # before the first update: no tensors
    restored.load(tmp_path / "none.safetensors", {"a", "b"}, "cpu")
    assert restored.params is None and restored.version == 0
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        EmaWeights(1.0)


def test_config_kind_decay_zero3_rule_and_the_ineffective_decay():
    assert load_config(None, DATA).teacher.kind == "frozen"  # frozen stays the default
    cfg = load_config(None, DATA + ["teacher.kind=ema", "teacher.ema_decay=0.99"])
    assert (cfg.teacher.kind, cfg.teacher.ema_decay) == ("ema", 0.99)
    for bad in ("0", "1", "1.5", "-0.1"):
        with pytest.raises(ConfigError) as info:
            load_config(None, DATA + ["teacher.kind=ema", f"teacher.ema_decay={bad}"])
        assert info.value.key == "teacher.ema_decay" and "(0, 1)" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_config(None, DATA + ["teacher.kind=ema", "learner.zero_stage=3"])  # the full kind swaps weights
    assert info.value.key == "teacher.kind" and "learner.zero_stage=3" in str(info.value)
    load_config(None, DATA + ["teacher.kind=ema", "learner.zero_stage=3", "learner.loss.kind=topk_tail"])
    load_config(None, DATA + ["learner.zero_stage=3"])  # frozen: as before

    frozen = load_config(None, DATA + ["teacher.ema_decay=0.99", "learner.loss.kind=topk_tail"])
    assert ineffective_keys(frozen, on_cpu=True) == [
        "teacher.ema_decay has no effect: teacher.kind=frozen keeps no EMA"]
    ema = load_config(None, DATA + ["teacher.kind=ema", "teacher.ema_decay=0.99", "learner.loss.kind=topk_tail"])
    assert ineffective_keys(ema, on_cpu=True) == []


# -- the teacher scorer with an adapter (fast) -------------------------------------------------------------------------
def random_adapter(model_dir, version: int, rank: int = 8, seed: int = 0) -> AdapterPayload:
    """A LoRA payload as the learner exports one (PEFT state dict in float32, PEFT config), with random A and B."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, get_peft_model_state_dict
    from safetensors.torch import save
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           PeftLoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in get_peft_model_state_dict(model).items()}
    config = json.loads(json.dumps(model.peft_config["default"].to_dict(),
                                   default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    config["base_model_name_or_path"] = str(model_dir)
    return AdapterPayload(version=version, weights=save(state), config=config)


def test_scorer_with_an_adapter_equals_peft_and_version_0_is_the_base(tiny_model_dir, qwen3_tokenizer, rollout_table,
                                                                      frozen_scored, tmp_path):
    builder = PromptBuilder(qwen3_tokenizer)
    scorer = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=K), temperature=TAU)
    payload = random_adapter(tiny_model_dir, version=2)
    scorer.load_adapter(2, payload)
    result = scorer.score(rollout_table)
    assert result.teacher_version == 2 and result.summary().teacher_version == 2
    assert_scores_equal_reference(result.table, peft_model(tiny_model_dir, payload, tmp_path), builder)
    assert teacher_columns(result.table) != teacher_columns(frozen_scored)

    # A bad payload is refused before anything changes: the served version stays.
    with pytest.raises(AdapterError, match="was given the payload of version 2"):
        scorer.load_adapter(3, payload)
    with pytest.raises(AdapterError, match="r=1 differs"):
        scorer.load_adapter(3, random_adapter(tiny_model_dir, version=3, rank=1))
    assert scorer.adapter_version == 2

    second = random_adapter(tiny_model_dir, version=3, seed=1)  # the next version writes into the same layers
    scorer.load_adapter(3, second)
    assert_scores_equal_reference(scorer.score(rollout_table).table, peft_model(tiny_model_dir, second, tmp_path),
                                  builder)
    scorer.load_adapter(0)  # version 0: the base model, bit for bit
    base = scorer.score(rollout_table)
    assert base.teacher_version == 0 and teacher_columns(base.table) == teacher_columns(frozen_scored)


# -- the learner's EMA, the teacher pool, checkpoints (Ray, DeepSpeed) ------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray(num_cpus=2):
        yield


def learner_config(kind="topk_tail", zero_stage=2, lr=1e-2) -> LearnerConfig:
    return LearnerConfig(
        num_workers=1, gpus_per_worker=0, zero_stage=zero_stage, micro_batch_tokens=4096,
        lora=LoraConfig(rank=8, alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
        loss=LossConfig(kind=kind, temperature=TAU), optim=OptimConfig(lr=lr, schedule="constant"),
    )


def make_group(tiny_model_dir, config, ema_decay=DECAY):
    from learner.group import LearnerGroup

    return LearnerGroup(str(tiny_model_dir), config, total_steps=10, expected_top_k=K, ema_decay=ema_decay,
                        actor_options=ACTOR, timeout_s=600)


def assert_recurrence(students: list[AdapterPayload], emas: list[AdapterPayload]) -> None:
    """EMA after step n == the float64 recurrence over the student adapters exported after steps 1..n."""
    expected = lora_tensors(students[0])
    first = lora_tensors(emas[0])
    assert first.keys() == expected.keys() and all(torch.equal(first[k], expected[k]) for k in expected)  # a copy
    for student, ema in zip(students[1:], emas[1:]):
        expected = {k: DECAY * expected[k] + (1 - DECAY) * v for k, v in lora_tensors(student).items()}
        got = lora_tensors(ema)
        assert got.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6, msg=k)
    assert [e.version for e in emas] == [s.version for s in students] == list(range(1, len(students) + 1))
    assert all(e.config == s.config for e, s in zip(emas, students))
    # The test can fail: the student moved every step, and the EMA is not the student.
    for before, after in zip(students, students[1:]):
        a, b = lora_tensors(before), lora_tensors(after)
        assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-4
    last_student, last_ema = lora_tensors(students[-1]), lora_tensors(emas[-1])
    assert max((last_student[k] - last_ema[k]).abs().max().item() for k in last_ema) > 1e-4


@pytest.fixture(scope="module")
def ema_run(ray_cluster, tiny_model_dir, frozen_scored, tmp_path_factory):
    """Three steps (top-k + tail, ZeRO-2) with an EMA teacher: the student and EMA adapters after each, a checkpoint
    after step 1, the parameters after step 2."""
    checkpoint = tmp_path_factory.mktemp("ema") / "step-1"
    group = make_group(tiny_model_dir, learner_config())
    students, emas, params = [], [], {}
    try:
        assert group.export_teacher_adapter() is None  # before the first step: the base model
        for step in range(3):
            assert not group.train_step(frozen_scored).skipped
            students.append(group.export_adapter())
            emas.append(group.export_teacher_adapter())
            if step == 0:
                group.save_checkpoint(checkpoint)
            if step == 1:
                params = group.trainable_parameters()
    finally:
        group.shutdown()
    return {"students": students, "emas": emas, "checkpoint": checkpoint, "params_after_2": params}


@pytest.mark.slow
def test_learner_ema_equals_the_float64_recurrence(ema_run):
    assert_recurrence(ema_run["students"], ema_run["emas"])


@pytest.mark.slow
def test_top_k_kinds_keep_the_ema_under_zero3(ray_cluster, tiny_model_dir, frozen_scored):
    group = make_group(tiny_model_dir, learner_config(zero_stage=3))
    students, emas = [], []
    try:
        for _ in range(3):
            assert not group.train_step(frozen_scored).skipped
            students.append(group.export_adapter())
            emas.append(group.export_teacher_adapter())
    finally:
        group.shutdown()
    assert_recurrence(students, emas)


@pytest.mark.slow
def test_a_checkpoint_keeps_the_ema_and_a_skipped_step_leaves_it(ray_cluster, tiny_model_dir, frozen_scored,
                                                                 ema_run, tmp_path):
    """Save after step 1, load, step: the EMA and the adapter equal two uninterrupted steps."""
    from learner.worker import ema_state_path

    emas = ema_run["emas"]
    column = frozen_scored.column("teacher_topk_logprobs").combine_chunks()
    values = column.values.to_numpy().copy()
    values[3] = float("nan")
    poisoned = frozen_scored.set_column(frozen_scored.schema.get_field_index("teacher_topk_logprobs"),
                                        frozen_scored.schema.field("teacher_topk_logprobs"),
                                        pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.float32())))
    group = make_group(tiny_model_dir, learner_config())
    try:
        group.load_checkpoint(ema_run["checkpoint"])
        assert group.version == 1
        assert group.export_teacher_adapter().weights == emas[0].weights
        assert group.train_step(poisoned).skipped  # no optimizer step: the EMA stays
        assert group.export_teacher_adapter().weights == emas[0].weights
        assert not group.train_step(frozen_scored).skipped
        resumed = group.export_teacher_adapter()
        assert resumed.version == 2
        for k, v in lora_tensors(emas[1]).items():
            torch.testing.assert_close(lora_tensors(resumed)[k], v, rtol=0, atol=1e-6, msg=k)
        params = group.trainable_parameters()
        for name, value in ema_run["params_after_2"].items():
            torch.testing.assert_close(params[name], value, rtol=0, atol=1e-6, msg=name)

        frozen_checkpoint = tmp_path / "no-ema"
        shutil.copytree(ema_run["checkpoint"], frozen_checkpoint)
        ema_state_path(frozen_checkpoint).unlink()  # as a teacher.kind=frozen run saves it
        with pytest.raises(FileNotFoundError, match="teacher.kind=frozen"):
            group.load_checkpoint(frozen_checkpoint)
    finally:
        group.shutdown()


@pytest.mark.slow
def test_teacher_pool_scores_with_the_ema_adapter_and_a_replaced_actor_loads_it(
        ray_cluster, tiny_model_dir, qwen3_tokenizer, rollout_table, ema_run, tmp_path):
    import ray

    from opsd.tables import TableRefs
    from teacher.pool import TeacherPool

    ema = ema_run["emas"][-1]
    refs = TableRefs.put(rollout_table)
    pool = TeacherPool(str(tiny_model_dir), TeacherConfig(top_k=K, gpus_per_worker=0), temperature=TAU,
                       actor_options=[ACTOR], device="cpu", call_timeout_s=600)
    builder = PromptBuilder(qwen3_tokenizer)
    try:
        scored = pool.score(refs)
        assert scored.teacher_version == 0
        base = scored.tables.fetch()
        assert_scores_equal_reference(base, peft_model(tiny_model_dir, None, tmp_path), builder)

        pool.load_adapter(ema)
        scored = pool.score(refs)
        assert scored.teacher_version == ema.version == pool.version == 3
        table = scored.tables.fetch()
        assert_scores_equal_reference(table, peft_model(tiny_model_dir, ema, tmp_path), builder)
        assert teacher_columns(table) != teacher_columns(base)

        ray.kill(pool.actors[0])
        again = pool.score(refs)
        assert pool.replaced == 1 and again.teacher_version == 3
        assert teacher_columns(again.tables.fetch()) == teacher_columns(table)  # the fresh actor loaded version 3

        pool.load_adapter(None)  # back to the base model, bit for bit
        assert teacher_columns(pool.score(refs).tables.fetch()) == teacher_columns(base)
    finally:
        pool.shutdown()


@pytest.mark.slow
def test_full_vocabulary_in_process_teacher_runs_the_ema(ray_cluster, tiny_model_dir, qwen3_tokenizer, rollout_table,
                                                        tmp_path):
    """After three steps the step's GJS is the float64 GJS between base + the student's adapter and base + the EMA
    adapter, computed with HF + PEFT; the held-out evaluation keeps the frozen base as its teacher."""
    group = make_group(tiny_model_dir, learner_config(kind="full", zero_stage=0))
    try:
        versions = [group.train_step(rollout_table).teacher_version for _ in range(3)]
        student, ema = group.export_adapter(), group.export_teacher_adapter()
        heldout = group.evaluate(rollout_table)
        step = group.train_step(rollout_table)
    finally:
        group.shutdown()
    assert versions == [0, 1, 2] and step.teacher_version == 3 and ema.version == student.version == 3
    assert not step.skipped

    builder = PromptBuilder(qwen3_tokenizer)
    student_model = peft_model(tiny_model_dir, student, tmp_path)
    teachers = {"ema": peft_model(tiny_model_dir, ema, tmp_path), "frozen": peft_model(tiny_model_dir, None, tmp_path)}
    totals, tokens = {"ema": 0.0, "frozen": 0.0}, 0
    for row in rollout_table.to_pylist():
        response = row["response_ids"]
        s = response_logits(student_model, row["prompt_ids"] + response, response)
        context = builder.teacher_prompt_ids(row["problem"], row["solution"]) + response
        for name, model in teachers.items():
            totals[name] += gjs(s, response_logits(model, context, response)).sum().item()
        tokens += len(response)
    assert step.tokens == tokens
    assert step.gjs == pytest.approx(totals["ema"] / tokens, rel=1e-4)
    assert heldout == pytest.approx(totals["frozen"] / tokens, rel=1e-4)
    assert abs(totals["ema"] - totals["frozen"]) > 0.05 * totals["frozen"]  # the two teachers are told apart
