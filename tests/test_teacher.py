"""TeacherScorer against a full-vocabulary float64 reference computed from the same model's logits."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from learner.loss import TopKTeacher, gjs_loss
from opsd.hf import tokenizer_fingerprint
from opsd.prompts import PromptBuilder
from opsd.schema import ROLLOUT_SCHEMA, TableError, TableMetadata, check_table, read_metadata, sample_id, with_metadata
from teacher.config import TeacherConfig
from opsd.packing import pack_by_tokens
from opsd.teacher_context import TRUNCATION_MARKER, build_contexts
from teacher.scorer import TeacherScorer
from teacher.topk import compress_logits

PROBLEMS = [
    ("Natalia sold clips to 48 friends in April and half as many in May. How many in total?",
     "In May she sold 48/2 = 24. In total 48 + 24 = 72.\n#### 72"),
    ("What is 3 * 7?", "3 * 7 = 21.\n#### 21"),
    ("A train goes 60 km in 1.5 hours. What is its speed in km/h?", "60 / 1.5 = 40 km/h.\n#### 40"),
]


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def builder(qwen3_tokenizer) -> PromptBuilder:
    return PromptBuilder(qwen3_tokenizer)


def rollout_table(builder, tokenizer, responses, vocab_size=151_936) -> pa.Table:
    rows = []
    for i, ((problem, solution), response) in enumerate(zip(PROBLEMS, responses)):
        rows.append({
            "sample_id": sample_id(f"row-{i}", 0, 0), "problem": problem, "solution": solution, "answer": None,
            "prompt_ids": builder.student_prompt_ids(problem), "response_ids": response,
            "response_logprobs": [0.0] * len(response), "finish_reason": "length", "policy_version": 0,
        })
    table = pa.Table.from_pylist(rows, schema=ROLLOUT_SCHEMA)
    return with_metadata(table, TableMetadata("tiny", tokenizer_fingerprint(tokenizer), vocab_size))


@pytest.fixture(scope="module")
def traces(hf_model, builder):
    """Random traces and real ones (sampled from the tiny model), of different lengths."""
    g = torch.Generator().manual_seed(0)
    random = [torch.randint(0, 151_669, (n,), generator=g).tolist() for n in (7, 19, 3)]
    real = []
    torch.manual_seed(0)
    for (problem, _), n in zip(PROBLEMS, (12, 5, 20)):
        ids = torch.tensor([builder.student_prompt_ids(problem)])
        out = hf_model.generate(ids, do_sample=True, max_new_tokens=n, min_new_tokens=n, top_k=0)
        real.append(out[0, ids.shape[1]:].tolist())
    return {"random": random, "real": real}


def reference(hf_model, builder, problem, solution, response, k, tau):
    """Full-vocabulary float64 reference from the model's own float32 logits of the unpadded context."""
    context = builder.teacher_prompt_ids(problem, solution) + response
    with torch.inference_mode():
        logits = hf_model(torch.tensor([context])).logits[0]
    start = len(context) - len(response)
    logp = torch.log_softmax(logits[start - 1: len(context) - 1].double() / tau, dim=-1)
    top, ids = logp.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1))
    token = logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)
    return ids, top, tail, token


def unflatten(table, row, k):
    n = len(table.column("response_ids")[row])
    ids = torch.tensor(table.column("teacher_topk_ids")[row].as_py()).view(n, k)
    top = torch.tensor(table.column("teacher_topk_logprobs")[row].as_py()).view(n, k)
    tail = torch.tensor(table.column("teacher_tail_logprob")[row].as_py())
    token = torch.tensor(table.column("teacher_token_logprob")[row].as_py())
    return ids, top, tail, token


@pytest.mark.parametrize("kind", ["random", "real"])
@pytest.mark.parametrize("k, tau, budget", [(1, 1.0, 10_000), (8, 1.1, 10_000), (64, 1.0, 64), (64, 1.1, 10_000)])
def test_scores_equal_the_float64_reference(tiny_model_dir, hf_model, builder, qwen3_tokenizer, traces,
                                            kind, k, tau, budget):
    # budget 64: each row alone, no padding; 10,000: all rows padded into one batch.
    scorer = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=k, token_budget=budget, logits_chunk=4),
                           temperature=tau)
    table = rollout_table(builder, qwen3_tokenizer, traces[kind])
    result = scorer.score(table)
    out = result.table
    check_table(out, "scored")
    assert read_metadata(out) == TableMetadata("tiny", tokenizer_fingerprint(qwen3_tokenizer), 151_936, k, tau)
    assert out.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()
    for row, ((problem, solution), response) in enumerate(zip(PROBLEMS, traces[kind])):
        ids, top, tail, token = unflatten(out, row, k)
        ref_ids, ref_top, ref_tail, ref_token = reference(hf_model, builder, problem, solution, response, k, tau)
        torch.testing.assert_close(top.double(), ref_top, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(tail.double(), ref_tail, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(token.double(), ref_token, rtol=1e-5, atol=1e-5)
        # Ids agree wherever the reference's log-probs are not tied to within float32 noise.
        gap = (ref_top[:, :-1] - ref_top[:, 1:]).abs() > 1e-5  # gap[j]: entry j is apart from entry j+1
        apart = gap.clone()
        apart[:, 1:] &= gap[:, :-1]  # ... and from entry j-1
        assert k == 1 or apart.float().mean() > 0.5
        assert torch.equal(ids[:, :-1][apart], ref_ids[:, :-1][apart])
        # The sampled token's log-prob equals its top-k entry when it is in the top-k.
        hit = ids == torch.tensor(response).unsqueeze(-1)
        torch.testing.assert_close(token[hit.any(-1)], top[hit], rtol=0, atol=0)


def test_padding_does_not_change_scores(tiny_model_dir, builder, qwen3_tokenizer, traces):
    table = rollout_table(builder, qwen3_tokenizer, traces["real"])
    alone = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=8, token_budget=1), temperature=1.1).score(table)
    padded = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=8, token_budget=100_000), temperature=1.1).score(table)
    for name in ("teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob"):
        a = torch.tensor(pa.compute.list_flatten(alone.table.column(name)).to_numpy())
        b = torch.tensor(pa.compute.list_flatten(padded.table.column(name)).to_numpy())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert padded.tokens == alone.tokens > 0


def test_teacher_context_is_the_documented_template_then_the_trace(builder, qwen3_tokenizer):
    problem, solution = PROBLEMS[0]
    response = [151645, 15, 16, 17, 151643]  # ids that would not survive a decode/encode round trip
    plan = build_contexts(builder, [problem], [solution], [response], 10_000, "truncate_solution")
    (context,) = plan.contexts
    assert context.input_ids[context.response_start:] == response
    # The official code's current teacher turn (tests/test_prompts.py spells it out), in thinking mode.
    assert qwen3_tokenizer.decode(context.input_ids[: context.response_start]) == (
        "<|im_start|>user\n"
        f"Problem: {problem}\n\n"
        "Here is a reference solution to this problem:\n"
        f"=== Reference Solution Begin ===\n{solution}\n=== Reference Solution End ===\n\n\n"
        "After reading the reference solution above, make sure you truly understand the reasoning behind each step "
        "\u2014 do not copy or paraphrase it. Now, using your own words and independent reasoning, derive the same final "
        "answer to the problem above. Think step by step, explore different approaches, and don't be afraid to backtrack "
        "or reconsider if something doesn't work out:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_overlength_truncates_the_solution_from_the_middle_never_the_response(builder, qwen3_tokenizer):
    problem = "Sum the numbers."
    solution = "First step. " + " ".join(f"n{i}" for i in range(300)) + " Final answer: \\boxed{42}."
    response = list(range(1000, 1040))
    full = len(builder.teacher_prompt_ids(problem, solution)) + len(response)
    limit = full - 150
    plan = build_contexts(builder, [problem], [solution], [response], limit, "truncate_solution")
    (context,) = plan.contexts
    assert len(context.input_ids) <= limit and plan.truncated_rows == 1 and context.solution_tokens_removed >= 150
    assert context.input_ids[context.response_start:] == response
    text = qwen3_tokenizer.decode(context.input_ids[: context.response_start])
    assert "First step." in text and "\\boxed{42}" in text and TRUNCATION_MARKER.strip() in text

    skipped = build_contexts(builder, [problem], [solution], [response], limit, "skip")
    assert skipped.contexts == [] and skipped.skipped == {"overlength": 1} and skipped.skipped_rows == [0]
    hopeless = build_contexts(builder, [problem], [solution], [list(range(5000))], limit, "truncate_solution")
    assert hopeless.contexts == [] and hopeless.skipped == {"overlength_even_without_solution": 1}


def test_scorer_skips_and_counts_overlength_rows(tiny_model_dir, builder, qwen3_tokenizer, traces):
    table = rollout_table(builder, qwen3_tokenizer, [traces["real"][0], list(range(500)), traces["real"][2]])
    limit = max(len(builder.teacher_prompt_ids(p, s)) for p, s in PROBLEMS) + 25
    scorer = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=4, max_context_tokens=limit, on_overlength="skip"))
    result = scorer.score(table)
    assert result.skipped == {"overlength": 1}
    assert result.table.column("sample_id").to_pylist() == [sample_id("row-0", 0, 0), sample_id("row-2", 0, 0)]
    check_table(result.table, "scored")


def test_table_from_another_tokenizer_is_refused(tiny_model_dir, builder, qwen3_tokenizer, traces):
    table = rollout_table(builder, qwen3_tokenizer, traces["real"])
    table = with_metadata(table, TableMetadata("other", "0123456789abcdef", 151_936))
    with pytest.raises(TableError, match="tokenizer '0123456789abcdef' does not match"):
        TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=4)).score(table)


def test_scored_table_feeds_the_learner_loss(tiny_model_dir, hf_model, builder, qwen3_tokenizer, traces):
    k, tau = 16, 1.1
    scored = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=k), temperature=tau).score(
        rollout_table(builder, qwen3_tokenizer, traces["real"])).table
    weight = hf_model.get_output_embeddings().weight
    total = sum(len(r) for r in traces["real"])
    loss = 0.0
    for row, ((problem, _), response) in enumerate(zip(PROBLEMS, traces["real"])):
        ids, top, tail, _ = unflatten(scored, row, k)
        prompt = builder.student_prompt_ids(problem)
        hidden = hf_model.model(torch.tensor([prompt + response])).last_hidden_state[0]
        hidden = hidden[len(prompt) - 1: len(prompt) + len(response) - 1]
        out = gjs_loss(hidden, weight, TopKTeacher(ids, top, tail), kind="topk_tail", temperature=tau,
                       normalizer=total)
        loss = loss + out.loss
    loss.backward()
    assert torch.isfinite(loss) and loss.item() >= 0
    # The student is the teacher's own weights here: the two contexts differ only by the solution.
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_compress_logits_tail_is_exact_when_top_k_holds_almost_everything():
    logits = torch.zeros(2, 1000)
    logits[:, :4] = 30.0  # the 996 others share ~1e-10 of the mass
    out = compress_logits(logits, torch.tensor([0, 999]), k=4, temperature=1.0)
    expected_tail = torch.log(torch.tensor(996.0, dtype=torch.float64)) - torch.logsumexp(
        torch.tensor([30.0] * 4 + [0.0] * 996, dtype=torch.float64), 0)
    torch.testing.assert_close(out.tail_logprob.double(), expected_tail.expand(2), rtol=1e-6, atol=0)
    assert torch.isfinite(out.tail_logprob).all()


def test_pack_by_tokens_respects_the_budget():
    lengths = [5, 50, 7, 30, 31, 200]
    batches = pack_by_tokens(lengths, token_budget=64)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64


def test_bfloat16_scores_stay_within_bfloat16_rounding_of_the_float64_reference(tiny_model_dir, hf_model, builder,
                                                                                 qwen3_tokenizer, traces):
    """The quickstart's bfloat16 teacher on CPU: bfloat16 weights and matmuls, float32 log-softmax and top-k."""
    k, tau = 8, 1.1
    scorer = TeacherScorer(str(tiny_model_dir), TeacherConfig(top_k=k, dtype="bfloat16"), temperature=tau)
    assert scorer.model.dtype == torch.bfloat16
    out = scorer.score(rollout_table(builder, qwen3_tokenizer, traces["real"])).table
    check_table(out, "scored")
    for column in ("teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob"):
        assert out.schema.field(column).type.value_type == pa.float32()  # float32 columns from a bfloat16 model
    errors = []
    for row, ((problem, solution), response) in enumerate(zip(PROBLEMS, traces["real"])):
        ids, top, tail, token = unflatten(out, row, k)
        assert torch.all(top[:, :-1] >= top[:, 1:])  # sorted, as the float32 teacher's
        _, ref_top, ref_tail, ref_token = reference(hf_model, builder, problem, solution, response, k, tau)
        errors += [(top.double() - ref_top).abs().max(), (token.double() - ref_token).abs().max(),
                   (tail.double() - ref_tail).abs().max()]
    worst = max(errors).item()
    # bfloat16 keeps 8 significant bits: log-probs move by up to a few thousandths here, not by the float32
    # teacher's 1e-5.
    assert 1e-5 < worst < 0.03, worst
