"""The OPSD distillation loss: generalized Jensen-Shannon divergence between student and teacher at every response
token, fused with ``lm_head`` and computed a chunk of positions at a time, with a closed-form gradient. The baselines'
losses on the same machinery: cross-entropy on target tokens (SFT) and GRPO's clipped policy gradient.

    out = gjs_loss(hidden[mask], lm_head.weight, TopKTeacher(ids, logprobs, tail), kind="topk_tail", beta=0.5,
                   temperature=tau, normalizer=global_response_tokens)
    out = token_loss(hidden[mask], lm_head.weight, PolicyTokens(ids, old_logprobs, advantages), clip_eps=0.2,
                     temperature=tau, normalizer=global_response_tokens)
    out.loss.backward()

Definitions, kinds, clip modes and the gradient formulas: docs/ARCHITECTURE.md ("The loss", "Baselines: SFT and
GRPO").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

LossKind = Literal["full", "topk_tail", "topk_renorm", "sampled_token"]
LOSS_KINDS: tuple[str, ...] = ("full", "topk_tail", "topk_renorm", "sampled_token")
ClipMode = Literal["none", "token", "pointwise"]
CLIP_MODES: tuple[str, ...] = ("none", "token", "pointwise")


@dataclass(frozen=True)
class FullTeacher:
    """The teacher's full distribution: raw ``logits [..., V]``, or ``hidden [..., H]`` with its ``lm_head``.

    Given as hidden states (the learner running the frozen teacher in-process), its logits are also made one chunk at
    a time. Logits are raw: the loss divides them by the temperature.
    """

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None):
            raise ValueError("FullTeacher takes either logits or hidden (with weight), not both or neither")
        if self.hidden is not None and self.weight is None:
            raise ValueError("FullTeacher(hidden=...) needs the teacher's lm_head weight")


@dataclass(frozen=True)
class TopKTeacher:
    """The compressed teacher of the rollout table: ``ids [..., k]`` (int), ``logprobs [..., k]`` and
    ``tail_logprob [...]`` = log(1 - sum of the top-k probs). Log-probs are tempered and normalised over the full
    vocabulary by the teacher."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor


@dataclass(frozen=True)
class SampledTokenTeacher:
    """The teacher's (tempered) log-prob ``logprob [...]`` of each sampled token ``token_ids [...]``."""

    token_ids: torch.Tensor
    logprob: torch.Tensor


@dataclass(frozen=True)
class TargetTokens:
    """SFT: the tokens to predict, ``token_ids [...]``; the per-token loss is their negative log-likelihood."""

    token_ids: torch.Tensor

    def to(self, device: str) -> TargetTokens:
        return TargetTokens(self.token_ids.to(device))


@dataclass(frozen=True)
class PolicyTokens:
    """GRPO: the sampled tokens ``token_ids [...]``, the behaviour policy's log-prob of each as it was sampled
    (``old_logprob [...]``) and the advantage of each token (its trace's, ``advantage [...]``)."""

    token_ids: torch.Tensor
    old_logprob: torch.Tensor
    advantage: torch.Tensor

    def to(self, device: str) -> PolicyTokens:
        return PolicyTokens(self.token_ids.to(device), self.old_logprob.to(device), self.advantage.to(device))


Teacher = FullTeacher | TopKTeacher | SampledTokenTeacher
Targets = TargetTokens | PolicyTokens


@dataclass(frozen=True)
class LossOutput:
    """``loss`` carries the gradient; the rest are detached statistics of the same call."""

    loss: torch.Tensor  # scalar (float32; float64 for float64 inputs): sum of clipped divergences / normalizer
    # scalar, same dtype: sum of the unclipped per-token divergences (token_loss: the NLL for SFT, -ratio * advantage
    # for GRPO)
    divergence_sum: torch.Tensor
    num_tokens: int  # response tokens in this call
    num_clipped: int  # entries over the clip: tokens (token mode) or token x category entries (pointwise)
    # Entries the clip was applied to: num_tokens (token mode), num_tokens x categories (pointwise: V, k + 1, k or 1
    # by kind), 0 without clipping. clip_fraction = sum(num_clipped) / sum(num_clip_entries) over micro-batches/ranks.
    num_clip_entries: int = 0


def gjs_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher: Teacher,
    *,
    kind: LossKind = "full",
    beta: float = 0.5,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalizer: float | None = None,
    chunk_size: int = 1024,
    clip: float | None = None,
    clip_mode: ClipMode = "token",
) -> LossOutput:
    """Generalized JSD between the student (``hidden [..., H]`` through ``lm_head`` = ``weight [V, H]``, ``bias``)
    and ``teacher`` at every selected position.

    ``mask [...]`` (bool) selects the response positions; teacher tensors share ``hidden``'s leading dims.
    ``normalizer``: the token count the sum is divided by (default: the tokens selected here). Pass the global
    batch's response-token count when the batch is split into micro-batches or ranks.
    ``clip`` (> 0) with ``clip_mode`` 'token' (default) or 'pointwise': docs/ARCHITECTURE.md ("The loss"). No
    clipping in any mode with ``clip=None``; ``clip_mode='none'`` with a ``clip`` is a contradiction (ValueError).
    """
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r} (SFT and GRPO: token_loss)")
    _check_arguments(hidden, weight, teacher, kind, beta, temperature, chunk_size, clip, clip_mode)
    # A sampled token has a single term: its pointwise clip is the token clip.
    entry_wise = clip_mode == "pointwise" and kind != "sampled_token"
    token_clip = None if entry_wise or clip is None else float(clip)
    entry_clip = float(clip) if entry_wise and clip is not None else None
    spec = _Spec(kind, type(teacher), float(beta), float(temperature), 0.0, int(chunk_size), token_clip, entry_clip)
    return _fused(hidden, weight, bias, teacher, mask, normalizer, spec)


def token_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: Targets,
    *,
    clip_eps: float = 0.2,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalizer: float | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """A loss on one token per position, through ``lm_head`` (``weight``, ``bias``) a chunk at a time, with the
    student's log-prob ``logp = log_softmax(z / temperature)[y]`` of the target token y:

    * ``TargetTokens`` (SFT): ``-logp`` (cross-entropy; pass ``temperature=1``);
    * ``PolicyTokens`` (GRPO): ``-min(r A, clip(r, 1 - clip_eps, 1 + clip_eps) A)`` with ``r = exp(logp -
      old_logprob)``; ``num_clipped`` counts the tokens whose clip is active (no gradient).

    ``mask``, ``normalizer`` and ``chunk_size`` as in :func:`gjs_loss`: the sum over the selected tokens is divided
    by ``normalizer`` (the global batch's token count for a token-level mean). docs/ARCHITECTURE.md ("Baselines").
    """
    kind = _TARGET_KINDS.get(type(targets))
    if kind is None:
        raise TypeError(f"token_loss takes TargetTokens or PolicyTokens, got {type(targets).__name__}")
    if not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    _check_arguments(hidden, weight, targets, kind, 0.0, temperature, chunk_size, None, "none")
    spec = _Spec(kind, type(targets), 0.0, float(temperature), 0.0, int(chunk_size), None, None, float(clip_eps))
    return _fused(hidden, weight, bias, targets, mask, normalizer, spec)


def _fused(hidden, weight, bias, teacher, mask, normalizer, spec: _Spec) -> LossOutput:
    """Select the positions, check the teacher's shapes, and run the fused chunked loss of ``spec``."""
    lead = hidden.shape[:-1]
    if mask is not None:
        if mask.shape != lead or mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool with shape {tuple(lead)}, got {mask.dtype} {tuple(mask.shape)}")
        select = lambda x: x[mask]  # noqa: E731
    else:
        select = lambda x: x.reshape(-1, *x.shape[len(lead):])  # noqa: E731

    rows = select(hidden)
    teacher_tensors = [select(t) if per_position and t is not None else t for t, per_position in _tensors_of(teacher)]
    for t, (original, per_position) in zip(teacher_tensors, _tensors_of(teacher)):
        if per_position and original is not None and original.shape[: len(lead)] != lead:
            raise ValueError(f"teacher tensors must start with the student's dims {tuple(lead)}, got {tuple(original.shape)}")
    num_tokens = rows.shape[0]
    if normalizer is None:
        normalizer = float(max(num_tokens, 1))
    if normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")

    spec = replace(spec, normalizer=float(normalizer))
    loss, divergence_sum, num_clipped = _FusedDivergence.apply(rows, weight, bias, spec, *teacher_tensors)
    num_clip_entries = num_tokens * _clip_entries_per_token(spec, weight, teacher)
    return LossOutput(loss, divergence_sum.detach(), num_tokens, int(num_clipped), num_clip_entries)


# ---------------------------------------------------------------------------------------------------------------------
# Implementation
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    kind: str
    teacher_type: type
    beta: float
    temperature: float
    normalizer: float
    chunk_size: int
    token_clip: float | None  # clip of each token's divergence (clip_mode 'token'; 'pointwise' for sampled_token)
    entry_clip: float | None  # clip of each category's term (clip_mode 'pointwise')
    clip_eps: float = 0.0  # GRPO's ratio clip range


def _clip_entries_per_token(spec: _Spec, weight: torch.Tensor, teacher: Teacher) -> int:
    """How many entries of one token the clip is applied to (0 without clipping)."""
    if spec.kind == "grpo":
        return 1
    if spec.token_clip is not None:
        return 1
    if spec.entry_clip is None:
        return 0
    if spec.kind == "full":
        return weight.shape[0]
    return teacher.ids.shape[-1] + (1 if spec.kind == "topk_tail" else 0)


def _tensors_of(teacher: Teacher) -> list[tuple[torch.Tensor | None, bool]]:
    """The teacher's tensors in a fixed order, each with whether it has one entry per position."""
    if isinstance(teacher, FullTeacher):
        return [(teacher.logits, True), (teacher.hidden, True), (teacher.weight, False), (teacher.bias, False)]
    if isinstance(teacher, TopKTeacher):
        return [(teacher.ids, True), (teacher.logprobs, True), (teacher.tail_logprob, True)]
    if isinstance(teacher, TargetTokens):
        return [(teacher.token_ids, True)]
    if isinstance(teacher, PolicyTokens):
        return [(teacher.token_ids, True), (teacher.old_logprob, True), (teacher.advantage, True)]
    return [(teacher.token_ids, True), (teacher.logprob, True)]


_KIND_TEACHER = {"full": FullTeacher, "topk_tail": TopKTeacher, "topk_renorm": TopKTeacher,
                 "sampled_token": SampledTokenTeacher, "sft": TargetTokens, "grpo": PolicyTokens}
_TARGET_KINDS = {TargetTokens: "sft", PolicyTokens: "grpo"}


def _check_arguments(hidden, weight, teacher, kind, beta, temperature, chunk_size, clip, clip_mode) -> None:
    if kind not in _KIND_TEACHER:
        raise ValueError(f"kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if not isinstance(teacher, _KIND_TEACHER[kind]):
        raise TypeError(f"kind {kind!r} needs a {_KIND_TEACHER[kind].__name__}, got {type(teacher).__name__}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if clip_mode not in CLIP_MODES:
        raise ValueError(f"clip_mode must be one of {', '.join(CLIP_MODES)}, got {clip_mode!r}")
    if clip_mode == "none" and clip is not None:
        raise ValueError(f"clip_mode 'none' contradicts clip={clip}: pass clip=None, or clip_mode 'token'/'pointwise'")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if isinstance(teacher, FullTeacher) and teacher.logits is not None and teacher.logits.shape[-1] != weight.shape[0]:
        raise ValueError(f"teacher logits have vocabulary {teacher.logits.shape[-1]}, the student {weight.shape[0]}")
    if isinstance(teacher, TopKTeacher) and teacher.ids.shape != teacher.logprobs.shape:
        raise ValueError(f"top-k ids {tuple(teacher.ids.shape)} and logprobs {tuple(teacher.logprobs.shape)} differ")


class _FusedDivergence(torch.autograd.Function):
    """Forward walks the positions in chunks and, when gradients are needed, accumulates them on the way (the chunk's
    logits never outlive its iteration); backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, rows, weight, bias, spec: _Spec, *teacher_tensors):
        need_rows, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = rows.shape[0]
        grad_rows = torch.zeros_like(rows) if need_rows else None
        accumulate = _compute_dtype(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(weight.shape[0], dtype=accumulate, device=weight.device) if need_bias else None
        loss_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
        divergence_sum = torch.zeros((), dtype=torch.float64, device=rows.device)
        num_clipped = torch.zeros((), dtype=torch.int64, device=rows.device)  # read once at the end: no sync per chunk
        want_grad = need_rows or need_weight or need_bias
        scale = 1.0 / (spec.temperature * spec.normalizer)  # d(loss)/dz = d(D)/du / (tau * normalizer)

        for start in range(0, n, spec.chunk_size):
            end = min(start + spec.chunk_size, n)
            h = rows[start:end]
            student_logp = _log_softmax_tempered(F.linear(h, weight, bias), spec.temperature)
            teacher_chunk = _teacher_chunk(spec, teacher_tensors, start, end)
            divergence, clipped, chunk_clipped, grad_u = _divergence_and_grad(spec, student_logp, teacher_chunk,
                                                                              want_grad)
            del student_logp

            divergence_sum += divergence.double().sum()
            keep = None
            if spec.token_clip is not None:
                keep = divergence <= spec.token_clip
                num_clipped += (~keep).sum()
                loss_sum += torch.where(keep, divergence, torch.full_like(divergence, spec.token_clip)).double().sum()
            elif clipped is not None:  # clipped by _divergence_and_grad, gradient included (pointwise, GRPO)
                num_clipped += chunk_clipped
                loss_sum += clipped.double().sum()
            else:
                loss_sum += divergence.double().sum()

            if want_grad:
                if keep is not None:
                    grad_u.mul_(keep.unsqueeze(-1))
                grad_z = grad_u.mul_(scale)  # [C, V] float32: d(loss)/d(logits) of this chunk
                if need_rows:
                    grad_rows[start:end] = (grad_z.to(weight.dtype) @ weight).to(rows.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_z.t().to(accumulate), h.to(accumulate))
                if need_bias:
                    grad_bias += grad_z.sum(0).to(accumulate)
                del grad_u, grad_z

        ctx.save_for_backward(grad_rows, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.num_teacher_tensors = len(teacher_tensors)
        out_dtype = _compute_dtype(rows.dtype)
        loss = (loss_sum / spec.normalizer).to(out_dtype)
        divergence_sum = divergence_sum.to(out_dtype)
        ctx.mark_non_differentiable(divergence_sum)
        return loss, divergence_sum, num_clipped

    @staticmethod
    def backward(ctx, grad_loss, _grad_divergence, _grad_clipped):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        if grad_rows is not None:
            grad_rows = grad_rows * grad_loss.to(grad_rows.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = (grad_bias * grad_loss).to(ctx.bias_dtype)
        return grad_rows, grad_weight, grad_bias, None, *([None] * ctx.num_teacher_tensors)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (the reference tests); everything else is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _log_softmax_tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / tau) in at least float32 (bf16 logits are upcast before any exp or sum). Works in place
    on ``logits`` when they are float32 already: pass a tensor this module owns."""
    u = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        u.div_(temperature)
    return u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))


def _teacher_chunk(spec: _Spec, tensors, start: int, end: int):
    if spec.teacher_type is FullTeacher:
        logits, hidden, weight, bias = tensors
        # The caller's logits are copied (the log-softmax works in place); a fresh linear output needs no copy.
        if logits is not None:
            raw = logits[start:end].to(_compute_dtype(logits.dtype), copy=True)
        else:
            raw = F.linear(hidden[start:end], weight, bias)
        return _log_softmax_tempered(raw, spec.temperature)
    return [t[start:end] for t in tensors]


class _ChunkOutput(NamedTuple):
    divergence: torch.Tensor  # [C] unclipped
    clipped: torch.Tensor | None  # [C] sum of the pointwise-clipped terms (entry clip only)
    num_clipped: torch.Tensor | None  # scalar: entries over the entry clip (entry clip only)
    grad_u: torch.Tensor | None  # [C, V] d(loss before normalisation)/du, with the entry clip applied


def _divergence_and_grad(spec: _Spec, s: torch.Tensor, teacher, want_grad: bool) -> _ChunkOutput:
    """Per-token divergence ``[C]`` (unclipped and, with ``spec.entry_clip``, pointwise clipped) and the gradient of
    the loss term w.r.t. the tempered student logits u ``[C, V]`` (or None). The token clip is the caller's."""
    clip = spec.entry_clip
    if spec.kind in ("sft", "grpo"):
        return _token_objective(spec, s, teacher, want_grad)
    if spec.kind == "full":
        return _full(s, teacher, spec.beta, clip, want_grad)
    if spec.kind == "sampled_token":
        token_ids, teacher_logprob = teacher
        y = token_ids.long().unsqueeze(-1)
        divergence = s.gather(-1, y).squeeze(-1) - teacher_logprob.to(s.dtype)
        if not want_grad:
            return _ChunkOutput(divergence, None, None, None)
        grad_u = s.exp_().neg_()  # -p, in place of s
        grad_u.scatter_add_(-1, y, torch.ones_like(y, dtype=grad_u.dtype))  # onehot(y) - p
        return _ChunkOutput(divergence, None, None, grad_u.mul_(divergence.unsqueeze(-1)))
    ids, top_logprobs, tail_logprob = teacher
    ids = ids.long()
    if spec.kind == "topk_renorm":
        return _topk_renorm(s, ids, top_logprobs.to(s.dtype), spec.beta, clip, want_grad)
    return _topk_tail(s, ids, top_logprobs.to(s.dtype), tail_logprob.to(s.dtype), spec.beta, clip, want_grad)


def _token_objective(spec: _Spec, s: torch.Tensor, targets, want_grad: bool) -> _ChunkOutput:
    """SFT's and GRPO's per-token loss from the tempered student log-probs ``s [C, V]``. Each is a function f of
    logp = s[y] alone, so dD/du = f'(logp) (onehot(y) - p)."""
    y = targets[0].long().unsqueeze(-1)
    logp = s.gather(-1, y).squeeze(-1)
    clipped = num_clipped = None
    if spec.kind == "sft":
        value = -logp
        slope = torch.full_like(logp, -1.0)
    else:
        old_logprob, advantage = targets[1].to(s.dtype), targets[2].to(s.dtype)
        ratio = (logp - old_logprob).exp()
        low, high = 1.0 - spec.clip_eps, 1.0 + spec.clip_eps
        value = -ratio * advantage  # the unclipped surrogate
        clipped = -torch.minimum(ratio * advantage, ratio.clamp(low, high) * advantage)
        # The clip is active where the min takes the clipped term and that term is constant in r; elsewhere the min
        # is r A and its derivative in logp is r A. A zero advantage gives exactly zero.
        active = ((advantage > 0) & (ratio > high)) | ((advantage < 0) & (ratio < low))
        num_clipped = active.sum()
        slope = torch.where(active, torch.zeros_like(ratio), -ratio * advantage)
    if not want_grad:
        return _ChunkOutput(value, clipped, num_clipped, None)
    grad_u = s.exp_().neg_()  # -p, in place of s
    grad_u.scatter_add_(-1, y, torch.ones_like(y, dtype=grad_u.dtype))  # onehot(y) - p
    return _ChunkOutput(value, clipped, num_clipped, grad_u.mul_(slope.unsqueeze(-1)))


# Log-probs of empty categories (a tail when k = V, an underflowed teacher tail) are raised to this floor: exp() of it
# is exactly 0, so 0 * (finite) terms vanish instead of becoming 0 * inf = NaN. Real log-probs never get near it.
_LOGPROB_FLOOR = -1.0e4


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) as a batched matmul: no ``[C, K]`` product tensor is allocated."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


class _Divergence(NamedTuple):
    value: torch.Tensor  # [C] unclipped
    clipped: torch.Tensor | None = None  # [C] sum_c min(t_c, clip) (pointwise clip only)
    num_clipped: torch.Tensor | None = None  # scalar: entries with t_c > clip (pointwise clip only)
    keep: torch.Tensor | None = None  # [C, K] bool, t_c <= clip (pointwise clip only)
    P: torch.Tensor | None = None  # student category probs [C, K] (None for beta = 0)
    g: torch.Tensor | None = None  # dD/dP_c up to a per-row constant [C, K], 0 where clipped (None for beta = 0)
    g_mean: torch.Tensor | None = None  # sum_c P_c g_c [C, 1]

    def output(self, grad_u: torch.Tensor | None) -> _ChunkOutput:
        return _ChunkOutput(self.value, self.clipped, self.num_clipped, grad_u)


def _category_divergence(S: torch.Tensor, T: torch.Tensor, beta: float, clip: float | None) -> _Divergence:
    """Divergence between category distributions given as finite log-probs ``[C, K]`` (student S, teacher T), with
    what the gradient needs: dD/du for a logit u_i of category c is P_i (g_c - g_mean) (beta = 0: see callers).

    With ``clip`` each category's term t_c is capped at it (the pointwise clip); the unclipped sum is still returned.
    Without, nothing per entry is materialised beyond what the sums need. With a clip and beta = 1, T is overwritten
    (the callers own it and need it afterwards only for beta = 0)."""
    if beta == 0.0:
        if clip is None:
            return _Divergence(_rowdot(T.exp(), T - S))
        return _clip_terms((T - S).mul_(T.exp()), clip)  # t_c = Q_c (log Q_c - log P_c)
    P = S.exp()
    if beta == 1.0:
        # T is not needed again: with a clip its memory holds g, leaving room for the per-entry terms (-T + S == S - T).
        g = S - T if clip is None else T.neg_().add_(S)
        if clip is None:
            value = _rowdot(P, g)
            return _Divergence(value, P=P, g=g, g_mean=value.unsqueeze(-1))
        terms = P * g  # t_c = P_c (log P_c - log Q_c)
        g.add_(1.0)  # dt_c/dP_c = log P_c - log Q_c + 1: the 1 cancels only while every category is kept
    else:
        log_m = torch.logaddexp(T + math.log(beta), S + math.log1p(-beta))
        if clip is None:
            teacher_part = _rowdot(T.exp(), T - log_m)
        else:
            terms = (T - log_m).mul_(T.exp()).mul_(beta)  # beta Q_c (log Q_c - log M_c), the rest added below
        g = (S - log_m).mul_(1.0 - beta)  # (1 - beta)(log P - log M) = dt_c/dP_c, per entry
        del log_m
        if clip is None:
            g_mean = _rowdot(P, g)
            return _Divergence(beta * teacher_part + g_mean, P=P, g=g, g_mean=g_mean.unsqueeze(-1))
        terms.addcmul_(P, g)  # + (1 - beta) P_c (log P_c - log M_c)
    clipped = _clip_terms(terms, clip)
    del terms
    g.mul_(clipped.keep)
    return clipped._replace(P=P, g=g, g_mean=_rowdot(P, g).unsqueeze(-1))


def _clip_terms(terms: torch.Tensor, clip: float) -> _Divergence:
    """The unclipped and the pointwise-clipped sums of per-category terms ``[C, K]`` (clamped in place)."""
    value = terms.sum(-1)
    keep = terms <= clip
    num_clipped = keep.numel() - keep.sum()
    return _Divergence(value, terms.clamp_max_(clip).sum(-1), num_clipped, keep)


def _forward_kl_kept(T: torch.Tensor, d: _Divergence) -> tuple[torch.Tensor, torch.Tensor | None]:
    """beta = 0: dD/du_i = A p_i - keep_c Q_c p_i / P_c with A = sum_c keep_c Q_c. Returns the teacher log-probs
    with the clipped categories at -inf (in place: a dropped category then contributes exp(-inf) = 0 to the formulas
    of the unclipped case), and A (None without a clip, where it is 1)."""
    if d.keep is None:
        return T, None
    T = T.masked_fill_(~d.keep, float("-inf"))
    return T, T.exp().sum(-1, keepdim=True)


def _times(p: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    return p if scale is None else p.mul_(scale)


def _full(s: torch.Tensor, t: torch.Tensor, beta: float, clip: float | None, want_grad: bool) -> _ChunkOutput:
    d = _category_divergence(s, t, beta, clip)
    if not want_grad:
        return d.output(None)
    if beta == 0.0:
        t, kept_mass = _forward_kl_kept(t, d)
        return d.output(_times(s.exp_(), kept_mass).sub_(t.exp_()))  # A p - keep q
    return d.output(d.g.sub_(d.g_mean).mul_(d.P))


def _topk_tail(s, ids, top_logprobs, tail_logprob, beta, clip, want_grad) -> _ChunkOutput:
    s_top = s.gather(-1, ids)
    s_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1)  # exact tail mass, no 1 - sum(top-k)
    S = torch.cat([s_top, s_tail.unsqueeze(-1)], dim=-1).clamp_min_(_LOGPROB_FLOOR)
    T = torch.cat([top_logprobs, tail_logprob.unsqueeze(-1)], dim=-1).clamp_min_(_LOGPROB_FLOOR)
    d = _category_divergence(S, T, beta, clip)
    if not want_grad:
        return d.output(None)
    if beta == 0.0:
        # dD/du_i = A p_i - keep_c Q_c p_i / P_c = A p_i - exp(s_i - S_c + T_c); a top-k id is its own category.
        T, kept_mass = _forward_kl_kept(T, d)
        q_share = (s - S[:, -1:] + T[:, -1:]).scatter_(-1, ids, T[:, :-1])
        return d.output(_times(s.exp_(), kept_mass).sub_(q_share.exp_()))
    g_token = d.g[:, -1:].expand_as(s).clone().scatter_(-1, ids, d.g[:, :-1])  # each token gets its category's g
    return d.output(s.exp_().mul_(g_token.sub_(d.g_mean)))


def _topk_renorm(s, ids, top_logprobs, beta, clip, want_grad) -> _ChunkOutput:
    S = torch.log_softmax(s.gather(-1, ids), dim=-1)
    T = torch.log_softmax(top_logprobs, dim=-1)
    d = _category_divergence(S, T, beta, clip)
    if not want_grad:
        return d.output(None)
    if beta == 0.0:
        T, kept_mass = _forward_kl_kept(T, d)
        grad_top = _times(S.exp(), kept_mass).sub_(T.exp())
    else:
        grad_top = d.g.sub_(d.g_mean).mul_(d.P)
    return d.output(torch.zeros_like(s).scatter_(-1, ids, grad_top))  # only the k logits move
