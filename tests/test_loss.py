"""The fused GJS loss against a float64 reference written plainly (full softmax, mixture, two KLs)."""

from __future__ import annotations

import itertools

import pytest
import torch

from learner.loss import FullTeacher, SampledTokenTeacher, TopKTeacher, gjs_loss

BETAS = (0.0, 0.3, 0.5, 1.0)
TAUS = (1.0, 1.1)
SHAPES = ((1, 6, 8, 40), (3, 5, 16, 97), (2, 9, 12, 300))  # (batch, time, hidden, vocab)


# --- the reference: plain float64 autograd, no tricks ------------------------------------------------------------------
def entry_terms(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-entry terms of GJS_beta(q_teacher, p_student) (they sum to it over the last dim), on probabilities."""
    if beta == 0.0:
        return q * (q.log() - p.log())
    if beta == 1.0:
        return p * (p.log() - q.log())
    m = beta * q + (1 - beta) * p
    return beta * q * (q.log() - m.log()) + (1 - beta) * p * (p.log() - m.log())


def divergence(p: torch.Tensor, q: torch.Tensor, beta: float) -> torch.Tensor:
    """GJS_beta(q_teacher, p_student) per row, over the last dim, on probabilities."""
    return entry_terms(p, q, beta).sum(-1)


def student_probs(hidden, weight, bias, tau):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return torch.softmax(logits / tau, dim=-1)


def reference_full(hidden, weight, bias, teacher_logits, beta, tau, mask, normalizer=None, clip=None):
    p = student_probs(hidden, weight, bias, tau)
    q = torch.softmax(teacher_logits / tau, dim=-1)
    d = divergence(p, q, beta)[mask]
    if clip is not None:
        d = d.clamp(max=clip)
    return d.sum() / (normalizer if normalizer is not None else d.numel())


def topk_of(teacher_logits, tau, k):
    t = torch.log_softmax(teacher_logits / tau, dim=-1)
    top, ids = t.topk(k, dim=-1)
    tail = torch.log1p(-top.exp().sum(-1)) if k < t.shape[-1] else torch.full(top.shape[:-1], float("-inf"), dtype=t.dtype)
    return ids, top, tail


def categories(kind, p, teacher, tau):
    """Student and teacher category probabilities ``[..., K]`` of a loss kind, from the student's full ``p``.
    ``teacher``: raw logits ('full') or (ids, top log-probs, tail log-prob)."""
    if kind == "full":
        return p, torch.softmax(teacher / tau, dim=-1)
    ids, top, tail = teacher
    p_top = p.gather(-1, ids)
    if kind == "topk_tail":
        return (torch.cat([p_top, (1 - p_top.sum(-1)).unsqueeze(-1)], -1),
                torch.cat([top.exp(), tail.exp().unsqueeze(-1)], -1))
    q_top = top.exp()
    return p_top / p_top.sum(-1, keepdim=True), q_top / q_top.sum(-1, keepdim=True)


def reference_topk_tail(hidden, weight, bias, ids, top, tail, beta, tau, mask):
    P, Q = categories("topk_tail", student_probs(hidden, weight, bias, tau), (ids, top, tail), tau)
    return divergence(P, Q, beta)[mask].sum() / mask.sum()


def reference_topk_renorm(hidden, weight, bias, ids, top, beta, tau, mask):
    P, Q = categories("topk_renorm", student_probs(hidden, weight, bias, tau), (ids, top, None), tau)
    return divergence(P, Q, beta)[mask].sum() / mask.sum()


def reference_clipped(terms, clip_mode, clip, normalizer):
    """Loss, clipped entries and clip entries from the per-entry terms ``[N, K]`` of the selected tokens. Capping with
    ``torch.where`` makes autograd produce the gradient the capping implies (none through a capped entry)."""
    if clip_mode == "pointwise":
        kept = terms <= clip
        per_token = torch.where(kept, terms, torch.full_like(terms, clip)).sum(-1)
        return per_token.sum() / normalizer, int((~kept).sum()), terms.numel()
    per_token = terms.sum(-1)
    if clip_mode == "none":
        return per_token.sum() / normalizer, 0, 0
    kept = per_token <= clip
    clipped = torch.where(kept, per_token, torch.full_like(per_token, clip))
    return clipped.sum() / normalizer, int((~kept).sum()), per_token.numel()


# --- helpers ----------------------------------------------------------------------------------------------------------
def make_inputs(shape, dtype, seed, with_bias=True, scale=2.0):
    b, t, h, v = shape
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale / h**0.5
    bias = torch.randn(v, generator=g, dtype=torch.float64) if with_bias else None
    teacher = torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(b, t, generator=g) < 0.7
    mask[0, 0] = True
    cast = lambda x: None if x is None else x.to(dtype).requires_grad_(x.is_floating_point())  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), teacher.to(dtype), mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


def assert_close(actual, expected, dtype):
    rtol, atol = (1e-6, 1e-10) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def reference_inputs(*tensors):
    return [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in tensors]


def assert_exact(actual, expected, dtype):
    """Fused against the float64 reference: ~1e-10 relative in float64 (looser in float32)."""
    rtol, atol = (1e-10, 1e-13) if dtype == torch.float64 else (1e-4, 1e-6)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def clip_between(values, fraction):
    """A clip leaving about ``fraction`` of ``values`` at or under it: the midpoint of the widest gap between sorted
    values near that rank, so float32 rounding cannot move a value across it."""
    v = values.detach().double().flatten().sort().values
    n = v.numel()
    j = min(max(int(fraction * n), 1), n - 1)
    lo, hi = max(1, j - n // 20), min(n - 1, j + n // 20)
    gaps = v[lo: hi + 1] - v[lo - 1: hi]
    i = lo + int(gaps.argmax())
    return float((v[i - 1] + v[i]) / 2)


TOP_K = 5


def clip_case(kind, beta, dtype, seed, shape=(2, 7, 12, 60), tau=1.1):
    """Inputs of one kind at ``dtype``, and the float64 reference's per-entry terms ``[N, K]`` of the selected tokens
    (a function of the reference's leaf tensors, which it returns too)."""
    hidden, weight, bias, teacher_logits, mask = make_inputs(shape, dtype, seed=seed, scale=3.0)
    if kind == "full":
        teacher, ref_teacher = FullTeacher(logits=teacher_logits), teacher_logits.double()
    else:
        ids, top, tail = topk_of(teacher_logits.double(), tau, TOP_K)
        top, tail = top.to(dtype), tail.to(dtype)  # the reference sees the same rounded numbers
        teacher, ref_teacher = TopKTeacher(ids, top, tail), (ids, top.double(), tail.double())
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    P, Q = categories(kind, student_probs(rh, rw, rb, tau), ref_teacher, tau)
    terms = entry_terms(P, Q, beta)[mask]
    return (hidden, weight, bias, teacher, mask), (rh, rw, rb), terms


# --- values and gradients against the reference -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta, tau", list(itertools.product(BETAS, TAUS)))
def test_full_vocabulary_matches_reference(dtype, shape, beta, tau):
    hidden, weight, bias, teacher, mask = make_inputs(shape, dtype, seed=hash((shape, beta, tau)) % 1000)
    out = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=beta, temperature=tau, bias=bias, mask=mask, chunk_size=4)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    ref = reference_full(rh, rw, rb, teacher.double(), beta, tau, mask)
    assert out.num_tokens == int(mask.sum())
    assert_close(out.loss, ref, dtype)
    assert_close(out.divergence_sum / out.num_tokens, ref, dtype)
    for actual, expected in zip(grads(out.loss, hidden, weight, bias), grads(ref, rh, rw, rb)):
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_tail_matches_reference(dtype, beta, k):
    tau = 1.1
    hidden, weight, bias, teacher, mask = make_inputs((2, 7, 12, 60), dtype, seed=k)
    ids, top, tail = topk_of(teacher.double(), tau, k)
    out = gjs_loss(hidden, weight, TopKTeacher(ids, top.to(dtype), tail.to(dtype)), kind="topk_tail",
                   beta=beta, temperature=tau, bias=bias, mask=mask, chunk_size=3)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    ref = reference_topk_tail(rh, rw, rb, ids, top, tail, beta, tau, mask)
    assert_close(out.loss, ref, dtype)
    for actual, expected in zip(grads(out.loss, hidden, weight, bias), grads(ref, rh, rw, rb)):
        assert_close(actual, expected, dtype)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_tail_with_k_equal_to_vocabulary_is_the_full_loss(beta):
    hidden, weight, bias, teacher, mask = make_inputs((2, 5, 8, 30), torch.float64, seed=7)
    ids, top, tail = topk_of(teacher, 1.0, 30)
    topk = gjs_loss(hidden, weight, TopKTeacher(ids, top, tail), kind="topk_tail", beta=beta, bias=bias, mask=mask)
    full = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=beta, bias=bias, mask=mask)
    assert_close(topk.loss, full.loss, torch.float64)
    for a, b in zip(grads(topk.loss, hidden, weight, bias), grads(full.loss, hidden, weight, bias)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("beta", BETAS)
def test_topk_tail_is_a_lower_bound_of_the_full_loss(beta):
    for seed, k in itertools.product(range(3), (1, 4, 16, 64)):
        hidden, weight, bias, teacher, mask = make_inputs((1, 8, 8, 128), torch.float64, seed=seed)
        ids, top, tail = topk_of(teacher, 1.0, k)
        kwargs = dict(beta=beta, bias=bias, mask=mask)
        tokens_topk = gjs_loss(hidden, weight, TopKTeacher(ids, top, tail), kind="topk_tail", **kwargs)
        tokens_full = gjs_loss(hidden, weight, FullTeacher(logits=teacher), **kwargs)
        assert tokens_topk.loss.item() <= tokens_full.loss.item() + 1e-12


@pytest.mark.parametrize("beta", BETAS)
def test_topk_renorm_matches_reference(beta):
    hidden, weight, bias, teacher, mask = make_inputs((2, 6, 10, 50), torch.float64, seed=3)
    ids, top, tail = topk_of(teacher, 1.0, 8)
    out = gjs_loss(hidden, weight, TopKTeacher(ids, top, tail), kind="topk_renorm", beta=beta, bias=bias, mask=mask)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    ref = reference_topk_renorm(rh, rw, rb, ids, top, beta, 1.0, mask)
    assert_close(out.loss, ref, torch.float64)
    for a, b in zip(grads(out.loss, hidden, weight, bias), grads(ref, rh, rw, rb)):
        assert_close(a, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_token_value_and_score_function_gradient(dtype):
    tau = 1.1
    hidden, weight, bias, teacher, mask = make_inputs((2, 6, 10, 50), dtype, seed=5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, mask.shape, generator=g)
    teacher_logprob = torch.log_softmax(teacher.double() / tau, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    out = gjs_loss(hidden, weight, SampledTokenTeacher(tokens, teacher_logprob.to(dtype)), kind="sampled_token",
                   temperature=tau, bias=bias, mask=mask, chunk_size=5)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    s_y = torch.log_softmax((rh @ rw.T + rb) / tau, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    advantage = (teacher_logprob - s_y).detach()
    assert_close(out.loss, (s_y - teacher_logprob)[mask].mean(), dtype)  # the value: KL(p || q) estimate
    surrogate = -(advantage * s_y)[mask].mean()  # the paper code's loss: its gradient is the estimator's
    for a, b in zip(grads(out.loss, hidden, weight, bias), grads(surrogate, rh, rw, rb)):
        assert_close(a, b, dtype)


# --- chunking, micro-batching, clipping, teacher as hidden states -----------------------------------------------------
@pytest.mark.parametrize("clip_mode", ["none", "pointwise"])
@pytest.mark.parametrize("kind", ["full", "topk_tail"])
def test_chunk_size_does_not_change_anything(kind, clip_mode):
    hidden, weight, bias, teacher, mask = make_inputs((2, 9, 8, 70), torch.float64, seed=11)
    ids, top, tail = topk_of(teacher, 1.0, 6)
    t = FullTeacher(logits=teacher) if kind == "full" else TopKTeacher(ids, top, tail)
    clip = 0.01 if clip_mode == "pointwise" else None
    results = []
    for chunk in (1, 2, 5, 7, 1000):
        out = gjs_loss(hidden, weight, t, kind=kind, bias=bias, mask=mask, chunk_size=chunk, clip=clip,
                       clip_mode=clip_mode)
        results.append((out.loss, out.num_clipped, *grads(out.loss, hidden, weight, bias)))
    assert (results[0][1] > 0) == (clip is not None)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_micro_batches_add_up_to_the_whole_batch():
    hidden, weight, bias, teacher, mask = make_inputs((4, 6, 8, 40), torch.float64, seed=13)
    whole = gjs_loss(hidden, weight, FullTeacher(logits=teacher), bias=bias, mask=mask)
    total_tokens = int(mask.sum())
    parts = [gjs_loss(hidden[i:j], weight, FullTeacher(logits=teacher[i:j]), bias=bias, mask=mask[i:j],
                      normalizer=total_tokens) for i, j in ((0, 1), (1, 3), (3, 4))]
    summed = sum(p.loss for p in parts)
    torch.testing.assert_close(summed, whole.loss, rtol=1e-12, atol=0)
    for a, b in zip(grads(summed, hidden, weight, bias), grads(whole.loss, hidden, weight, bias)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_per_token_clip_matches_clamped_reference(beta):
    hidden, weight, bias, teacher, mask = make_inputs((2, 8, 8, 40), torch.float64, seed=17, scale=4.0)
    unclipped = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=beta, bias=bias, mask=mask)
    per_token = unclipped.divergence_sum.item() / unclipped.num_tokens
    clip = per_token  # about half the tokens exceed the mean
    out = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=beta, bias=bias, mask=mask, clip=clip)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    ref = reference_full(rh, rw, rb, teacher, beta, 1.0, mask, clip=clip)
    assert 0 < out.num_clipped < out.num_tokens
    assert_close(out.loss, ref, torch.float64)
    for a, b in zip(grads(out.loss, hidden, weight, bias), grads(ref, rh, rw, rb)):
        assert_close(a, b, torch.float64)


# --- clip modes: none, token, pointwise --------------------------------------------------------------------------------
CLIP_MODES = ("none", "token", "pointwise")
CATEGORY_KINDS = ("full", "topk_tail", "topk_renorm")


def run_clip_case(kind, beta, inputs, clip, clip_mode, chunk_size=3):
    hidden, weight, bias, teacher, mask = inputs
    return gjs_loss(hidden, weight, teacher, kind=kind, beta=beta, temperature=1.1, bias=bias, mask=mask,
                    chunk_size=chunk_size, clip=clip, clip_mode=clip_mode)


def assert_matches_reference(out, ref, inputs, ref_leaves, dtype):
    hidden, weight, bias = inputs[:3]
    assert_exact(out.loss, ref, dtype)
    for actual, expected in zip(grads(out.loss, hidden, weight, bias), grads(ref, *ref_leaves)):
        assert_exact(actual, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("clip_mode", CLIP_MODES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", CATEGORY_KINDS)
def test_clip_modes_match_reference(kind, beta, clip_mode, dtype):
    """Values, gradients and clip counts of every kind x beta x mode against the float64 reference, with chunks
    that split the selected positions unevenly. The clip leaves ~20% of the entries (or tokens) over it."""
    seed = 101 + 10 * CATEGORY_KINDS.index(kind) + BETAS.index(beta)
    inputs, ref_leaves, terms = clip_case(kind, beta, dtype, seed)
    num_tokens = int(inputs[-1].sum())
    chunk_size = next(c for c in (3, 4, 5) if num_tokens % c)  # a ragged last chunk
    if clip_mode == "none":
        clip = None
    else:
        clip = clip_between(terms if clip_mode == "pointwise" else terms.sum(-1), 0.8)
    ref, ref_clipped, ref_entries = reference_clipped(terms, clip_mode, clip, num_tokens)

    out = run_clip_case(kind, beta, inputs, clip, clip_mode, chunk_size)
    assert (out.num_clipped, out.num_clip_entries) == (ref_clipped, ref_entries)
    if clip_mode != "none":
        assert 0 < out.num_clipped < out.num_clip_entries
    per_token = terms.shape[-1] if clip_mode == "pointwise" else 1
    assert out.num_clip_entries == (0 if clip_mode == "none" else num_tokens * per_token)
    assert_exact(out.divergence_sum, terms.sum(), dtype)  # the unclipped divergence in every mode
    assert_matches_reference(out, ref, inputs, ref_leaves, dtype)


@pytest.mark.parametrize("kind, beta", [("full", 0.0), ("topk_tail", 0.0), ("full", 1.0)])
def test_pointwise_clip_can_make_the_loss_negative(kind, beta):
    """For beta 0 or 1 a per-entry term Q log(Q/P) or P log(P/Q) is negative where the other side is larger; capping
    the positive ones can leave the sum below zero (the official code's behaviour, siyan-zhao/OPSD issue #2)."""
    inputs, ref_leaves, terms = clip_case(kind, beta, torch.float64, seed=7 + CATEGORY_KINDS.index(kind))
    clip = clip_between(terms[terms > 0], 0.05)
    ref, ref_clipped, _ = reference_clipped(terms, "pointwise", clip, int(inputs[-1].sum()))
    assert ref.item() < 0  # the case is what it says
    out = run_clip_case(kind, beta, inputs, clip, "pointwise")
    assert out.loss.item() < 0 < out.divergence_sum.item()
    assert out.num_clipped == ref_clipped
    assert_matches_reference(out, ref, inputs, ref_leaves, torch.float64)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("kind", CATEGORY_KINDS)
def test_pointwise_clip_above_every_term_is_the_unclipped_loss(kind, beta):
    inputs, _, terms = clip_case(kind, beta, torch.float64, seed=41)
    clipped = run_clip_case(kind, beta, inputs, 2 * terms.max().item(), "pointwise")
    unclipped = run_clip_case(kind, beta, inputs, None, "none")
    assert clipped.num_clipped == 0 and clipped.num_clip_entries == terms.numel()
    hidden, weight, bias = inputs[:3]
    for a, b in zip((clipped.loss, *grads(clipped.loss, hidden, weight, bias)),
                    (unclipped.loss, *grads(unclipped.loss, hidden, weight, bias))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("beta", [0.3, 0.5])
@pytest.mark.parametrize("kind", CATEGORY_KINDS)
def test_pointwise_clip_below_every_term_stops_the_gradient(kind, beta):
    """For 0 < beta < 1 every per-entry term is > 0 (log-sum inequality), so a clip under the smallest caps them all:
    the loss is clip x categories per token, and no gradient is left."""
    inputs, _, terms = clip_case(kind, beta, torch.float64, seed=43)
    assert terms.min() > 0
    clip = terms.min().item() / 2
    out = run_clip_case(kind, beta, inputs, clip, "pointwise")
    assert out.num_clipped == out.num_clip_entries == terms.numel()
    torch.testing.assert_close(out.loss.item(), clip * terms.shape[-1], rtol=1e-12, atol=0)
    for g in grads(out.loss, *inputs[:3]):
        assert torch.count_nonzero(g) == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sampled_token_pointwise_clip_is_the_token_clip(dtype):
    """One term per token: both modes cap the estimate log p(y) - log q(y), and a capped token's score-function
    gradient is dropped."""
    tau = 1.1
    hidden, weight, bias, teacher, mask = make_inputs((2, 6, 10, 50), dtype, seed=5)
    tokens = torch.randint(0, 50, mask.shape, generator=torch.Generator().manual_seed(0))
    teacher_logprob = torch.log_softmax(teacher.double() / tau, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    teacher_logprob = teacher_logprob.to(dtype)
    rh, rw, rb = reference_inputs(hidden, weight, bias)
    s_y = torch.log_softmax((rh @ rw.T + rb) / tau, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    estimate = (s_y - teacher_logprob.double())[mask]
    clip = clip_between(estimate, 0.7)
    kept = (estimate <= clip).detach()
    ref_value = torch.where(kept, estimate, torch.full_like(estimate, clip)).mean()
    surrogate = (kept * estimate.detach() * s_y[mask]).mean()  # the score-function estimator of the kept tokens
    ref_grads = grads(surrogate, rh, rw, rb)

    outs = [gjs_loss(hidden, weight, SampledTokenTeacher(tokens, teacher_logprob), kind="sampled_token",
                     temperature=tau, bias=bias, mask=mask, chunk_size=4, clip=clip, clip_mode=mode)
            for mode in ("token", "pointwise")]
    for out in outs:
        assert (out.num_clipped, out.num_clip_entries) == (int((~kept).sum()), int(mask.sum()))
        assert 0 < out.num_clipped < out.num_clip_entries
        assert_exact(out.loss, ref_value, dtype)
        for a, b in zip(grads(out.loss, hidden, weight, bias), ref_grads):
            assert_exact(a, b, dtype)
    assert torch.equal(outs[0].loss, outs[1].loss)


@pytest.mark.parametrize("clip_mode", ["token", "pointwise"])
def test_clip_counts_add_up_over_micro_batches(clip_mode):
    hidden, weight, bias, teacher, mask = make_inputs((4, 6, 8, 40), torch.float64, seed=13, scale=3.0)
    unclipped = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=0.0, bias=bias, mask=mask)
    clip = 0.05 if clip_mode == "pointwise" else unclipped.divergence_sum.item() / unclipped.num_tokens
    kwargs = dict(beta=0.0, bias=bias, clip=clip, clip_mode=clip_mode)
    whole = gjs_loss(hidden, weight, FullTeacher(logits=teacher), mask=mask, **kwargs)
    parts = [gjs_loss(hidden[i:j], weight, FullTeacher(logits=teacher[i:j]), mask=mask[i:j],
                      normalizer=int(mask.sum()), **kwargs) for i, j in ((0, 1), (1, 3), (3, 4))]
    assert 0 < whole.num_clipped < whole.num_clip_entries
    assert sum(p.num_clipped for p in parts) == whole.num_clipped
    assert sum(p.num_clip_entries for p in parts) == whole.num_clip_entries
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("clip_mode", CLIP_MODES)
def test_no_clip_value_means_no_clipping_in_any_mode(clip_mode):
    hidden, weight, bias, teacher, mask = make_inputs((2, 5, 8, 40), torch.float64, seed=47, scale=4.0)
    out = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=0.0, bias=bias, mask=mask, clip_mode=clip_mode)
    plain = gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=0.0, bias=bias, mask=mask)
    assert (out.num_clipped, out.num_clip_entries) == (0, 0)
    assert torch.equal(out.loss, plain.loss)


def test_teacher_given_as_hidden_states_equals_teacher_logits():
    hidden, weight, bias, _, mask = make_inputs((2, 5, 8, 40), torch.float64, seed=19)
    teacher_hidden = torch.randn(2, 5, 8, dtype=torch.float64)
    frozen = weight.detach()
    logits = teacher_hidden @ frozen.T + bias.detach()
    a = gjs_loss(hidden, weight, FullTeacher(hidden=teacher_hidden, weight=frozen, bias=bias.detach()), bias=bias, mask=mask, chunk_size=3)
    b = gjs_loss(hidden, weight, FullTeacher(logits=logits), bias=bias, mask=mask)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    for x, y in zip(grads(a.loss, hidden, weight, bias), grads(b.loss, hidden, weight, bias)):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-15)


def test_frozen_weight_gets_no_gradient_and_inputs_are_not_modified():
    hidden, weight, _, teacher, mask = make_inputs((2, 5, 8, 40), torch.float32, seed=23, with_bias=False)
    weight = weight.detach()
    teacher_before = teacher.clone()
    out = gjs_loss(hidden, weight, FullTeacher(logits=teacher), temperature=1.1, mask=mask)
    out.loss.backward()
    assert hidden.grad is not None and weight.grad is None
    assert torch.equal(teacher, teacher_before)


def test_no_grad_mode_returns_the_same_value():
    hidden, weight, bias, teacher, mask = make_inputs((2, 5, 8, 40), torch.float64, seed=29)
    with_grad = gjs_loss(hidden, weight, FullTeacher(logits=teacher), bias=bias, mask=mask).loss
    with torch.no_grad():
        without = gjs_loss(hidden, weight, FullTeacher(logits=teacher), bias=bias, mask=mask).loss
    assert not without.requires_grad
    torch.testing.assert_close(with_grad.detach(), without, rtol=0, atol=0)


# --- numerical stability -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
def test_student_tail_is_exact_when_top_k_holds_almost_all_the_mass(beta):
    """The student's top-k mass is 1 - 1e-10: 1 - sum(top-k) in float32 is 0, the logsumexp tail is exact."""
    v, k, h = 200, 4, 8
    weight = torch.zeros(v, h, dtype=torch.float64)
    weight[:k, 0] = torch.linspace(24.0, 25.0, k)  # top-k logits ~ 24-25, the 196 others 0 -> tail ~ 4e-9 mass
    hidden = torch.zeros(1, 3, h, dtype=torch.float64)
    hidden[..., 0] = 1.0
    teacher = torch.randn(1, 3, v, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    teacher[..., :k] += 6.0
    ids, top, tail = topk_of(teacher, 1.0, k)
    mask = torch.ones(1, 3, dtype=torch.bool)
    ref_h, ref_w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = reference_topk_tail(ref_h, ref_w, None, ids, top, tail, beta, 1.0, mask)
    h32, w32 = hidden.float().requires_grad_(), weight.float().requires_grad_()
    out = gjs_loss(h32, w32, TopKTeacher(ids, top.float(), tail.float()), kind="topk_tail", beta=beta, mask=mask)
    assert torch.isfinite(out.loss)
    assert_close(out.loss, ref, torch.float32)
    for a, b in zip(grads(out.loss, h32, w32), grads(ref, ref_h, ref_w)):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("kind", ["full", "topk_tail"])
@pytest.mark.parametrize("beta", BETAS)
def test_bfloat16_inputs_are_finite_and_close_to_float32(kind, beta):
    hidden, weight, bias, teacher, mask = make_inputs((2, 6, 32, 500), torch.float32, seed=31, scale=8.0)
    ids, top, tail = topk_of(teacher.double(), 1.0, 16)
    t = FullTeacher(logits=teacher) if kind == "full" else TopKTeacher(ids, top.float(), tail.float())
    h16, w16 = hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    tb = FullTeacher(logits=teacher.bfloat16()) if kind == "full" else t
    out16 = gjs_loss(h16, w16, tb, kind=kind, beta=beta, mask=mask)
    # The float32 reference sees the same bf16-rounded numbers.
    h32, w32 = h16.detach().float().requires_grad_(), w16.detach().float().requires_grad_()
    t32 = FullTeacher(logits=teacher.bfloat16().float()) if kind == "full" else t
    out32 = gjs_loss(h32, w32, t32, kind=kind, beta=beta, mask=mask)
    assert out16.loss.dtype == torch.float32 and torch.isfinite(out16.loss)
    torch.testing.assert_close(out16.loss, out32.loss, rtol=2e-2, atol=1e-4)
    g16, g32 = grads(out16.loss, h16, w16), grads(out32.loss, h32, w32)
    for a, b in zip(g16, g32):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        cos = torch.nn.functional.cosine_similarity(a.float().flatten(), b.flatten(), dim=0)
        assert cos > 0.99


# --- bad arguments -----------------------------------------------------------------------------------------------------
def test_bad_arguments_are_refused():
    hidden, weight, bias, teacher, mask = make_inputs((1, 3, 8, 20), torch.float32, seed=37)
    ids, top, tail = topk_of(teacher.double(), 1.0, 4)
    with pytest.raises(TypeError, match="topk_tail.*TopKTeacher"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), kind="topk_tail")
    with pytest.raises(ValueError, match="beta"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), beta=1.5)
    with pytest.raises(ValueError, match="vocabulary"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher[..., :10]))
    with pytest.raises(ValueError, match="mask"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), mask=mask.int())
    with pytest.raises(ValueError, match="kind"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), kind="jsd")
    with pytest.raises(ValueError, match="clip_mode"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), clip=0.1, clip_mode="vocab")
    with pytest.raises(ValueError, match="clip_mode 'none' contradicts"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), clip=0.1, clip_mode="none")
    with pytest.raises(ValueError, match="clip must be > 0"):
        gjs_loss(hidden, weight, FullTeacher(logits=teacher), clip=0.0, clip_mode="pointwise")
