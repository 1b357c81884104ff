"""The teacher's distribution, compressed to what crosses the network: top-k + one tail bucket.

For each response position the teacher sends the k most likely token ids with their log-probs, the log of the mass
outside them, and the log-prob of the token the student actually sampled. All are taken from the *tempered*
distribution log_softmax(logits / tau) over the full vocabulary, so the learner's loss (learner/loss.py, kind
'topk_tail') sees exactly the teacher's probabilities on those ids.

The tail is a logsumexp over the non-top-k log-probs, not log(1 - sum(top-k)): when the top-k hold nearly all the
mass, the subtraction cancels catastrophically in float32 while the logsumexp stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CompressedDistribution:
    """Per position: ``ids [T, k]`` (int64), ``logprobs [T, k]``, ``tail_logprob [T]``, ``token_logprob [T]``
    (all float32)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logprob: torch.Tensor
    token_logprob: torch.Tensor


def compress_logits(logits: torch.Tensor, tokens: torch.Tensor, k: int, temperature: float) -> CompressedDistribution:
    """Top-k + tail + sampled-token log-prob of ``log_softmax(logits / temperature)`` for ``logits [T, V]``."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}], got {k}")
    logp = logits.to(torch.float32, copy=True)
    logp.div_(temperature)
    logp.sub_(torch.logsumexp(logp, dim=-1, keepdim=True))
    token_logprob = logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    top, ids = logp.topk(k, dim=-1)
    tail = torch.logsumexp(logp.scatter_(-1, ids, float("-inf")), dim=-1)  # in place: logp is ours
    return CompressedDistribution(ids, top, tail, token_logprob)


def compress_hidden(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    tokens: torch.Tensor,
    k: int,
    temperature: float,
    chunk: int,
) -> CompressedDistribution:
    """The same from final hidden states ``[T, H]``, ``chunk`` positions of ``[chunk, V]`` logits at a time."""
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start:start + chunk], lm_head.weight, getattr(lm_head, "bias", None))
        parts.append(compress_logits(logits, tokens[start:start + chunk], k, temperature))
        del logits
    return CompressedDistribution(*(torch.cat(tensors) for tensors in zip(*(
        (p.ids, p.logprobs, p.tail_logprob, p.token_logprob) for p in parts))))
