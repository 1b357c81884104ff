"""The baselines' objectives on the OPSD learner, as loss kinds: SFT (cross-entropy on the reference solutions) and
GRPO (the clipped policy gradient on the rollouts, with advantages the driver computed from rewards).

Both train the same LoRA model with the same DeepSpeed bookkeeping as the distillation kinds: each rank reads the
step table, builds its rows and micro-batches from it with the kind, and the loss is ``learner.loss.token_loss``
(a token-level mean over the global batch). docs/ARCHITECTURE.md ("Baselines: SFT and GRPO").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from learner.kinds import LossKind, _split
from learner.loss import PolicyTokens, TargetTokens, token_loss
from opsd.schema import TableError, check_table

if TYPE_CHECKING:
    from learner.config import LearnerObjective
    from opsd.prompts import PromptBuilder

ADVANTAGE_COLUMN = "advantage"


class SupervisedFineTuning(LossKind):
    """Cross-entropy on the reference solution, after the student prompt: a row is the student prompt's ids (the
    chat template applied, as the rollout workers build it) followed by the solution's tokens and the tokenizer's
    EOS token, cut at ``max_target_tokens``. It trains on the problems table itself: no rollouts, no teacher."""

    name = "sft"
    needs_teacher_stage = False
    needs_prompts = True

    def __init__(self, max_target_tokens: int | None = None):
        self.max_target_tokens = max_target_tokens

    def check_table(self, table: pa.Table, expected) -> None:
        check_table(table, "problems")
        solutions = table.column("solution")
        missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(solutions), ""), True).to_pylist()
        if any(missing):
            sample = table.column("sample_id")[missing.index(True)].as_py()
            raise TableError(f"sample {sample!r}: SFT trains on the reference solution, and this row has none")

    def sequences(self, table: pa.Table, builder: PromptBuilder | None):
        if builder is None:
            raise ValueError("SFT rows are built with the student prompt: pass a PromptBuilder")
        eos = builder.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("SFT needs the tokenizer's EOS token to end a solution, and this tokenizer has none")
        prompts = [builder.student_prompt_ids(p) for p in table.column("problem").to_pylist()]
        targets = [(builder.encode(s) + [int(eos)])[: self.max_target_tokens]
                   for s in table.column("solution").to_pylist()]
        return prompts, targets

    def row_teachers(self, table, contexts):
        return [()] * table.num_rows  # nothing besides the target tokens (an empty tuple, not None: kept)

    def collate(self, teachers, responses, pad_id):
        return TargetTokens(torch.tensor([t for r in responses for t in r], dtype=torch.long))

    def loss_teacher(self, batch, model):
        return batch

    def loss(self, hidden, lm_head, teacher, config, normalizer):
        # Plain cross-entropy: temperature 1, whatever the sampling temperature.
        return token_loss(hidden, lm_head.weight, teacher, temperature=1.0, bias=getattr(lm_head, "bias", None),
                          normalizer=normalizer, chunk_size=config.chunk_size)


class ClippedPolicyGradient(LossKind):
    """GRPO's loss on the rollouts: per sampled token ``-min(r A, clip(r, 1 - eps, 1 + eps) A)``, ``r = exp(logp -
    old_logp)``, where old_logp is the rollout's ``response_logprobs`` and logp the learner's log-softmax of logits /
    ``learner.loss.temperature`` (the sampling temperature). A, the row's advantage, is the ``advantage`` column the
    driver sends with the table (every rank joins it on by sample id)."""

    name = "grpo"
    needs_teacher_stage = False
    non_finite_what = "behaviour log-probs or advantages"

    def __init__(self, clip_eps: float = 0.2):
        self.clip_eps = clip_eps

    def check_table(self, table: pa.Table, expected) -> None:
        super().check_table(table, expected)
        if ADVANTAGE_COLUMN not in table.column_names:
            raise TableError(f"loss kind 'grpo' needs an {ADVANTAGE_COLUMN!r} column: each row's group-normalised "
                             "reward, which the driver sends with the step table")
        column = table.column(ADVANTAGE_COLUMN)
        if not pa.types.is_floating(column.type):
            raise TableError(f"column {ADVANTAGE_COLUMN!r} is {column.type}, expected a float type")
        if column.null_count:
            sample = table.column("sample_id")[column.is_null().to_pylist().index(True)].as_py()
            raise TableError(f"sample {sample!r} has no advantage")

    def non_finite_rows(self, table: pa.Table) -> list[str]:
        logprobs = table.column("response_logprobs").combine_chunks()
        values = logprobs.values.to_numpy(zero_copy_only=False)
        bad = np.zeros(table.num_rows, dtype=bool)
        broken = ~np.isfinite(values)
        if broken.any():
            offsets = logprobs.offsets.to_numpy()
            bad[np.searchsorted(offsets, np.nonzero(broken)[0], side="right") - 1] = True
        bad |= ~np.isfinite(table.column(ADVANTAGE_COLUMN).to_numpy())
        ids = table.column("sample_id").to_pylist()
        return [ids[i] for i in np.nonzero(bad)[0]]

    def row_teachers(self, table, contexts) -> list[Any]:
        advantages = table.column(ADVANTAGE_COLUMN).to_numpy()
        return [(old, float(a)) for old, a in zip(_split(table.column("response_logprobs")), advantages)]

    def collate(self, teachers: Sequence[Any], responses, pad_id):
        lengths = [len(r) for r in responses]
        return PolicyTokens(torch.tensor([t for r in responses for t in r], dtype=torch.long),
                            torch.from_numpy(np.concatenate([t[0] for t in teachers]).astype(np.float32)),
                            torch.from_numpy(np.repeat([t[1] for t in teachers], lengths)))

    def loss_teacher(self, batch, model):
        return batch

    def loss(self, hidden, lm_head, teacher, config, normalizer):
        return token_loss(hidden, lm_head.weight, teacher, clip_eps=self.clip_eps, temperature=config.tau,
                          bias=getattr(lm_head, "bias", None), normalizer=normalizer, chunk_size=config.chunk_size)


def objective_kind(objective: LearnerObjective) -> LossKind:
    """The loss kind of a baseline objective ('sft' or 'grpo')."""
    if objective.method == "sft":
        return SupervisedFineTuning(objective.max_target_tokens)
    if objective.method == "grpo":
        return ClippedPolicyGradient(objective.clip_eps)
    raise ValueError(f"no baseline objective {objective.method!r} (the methods are opsd, sft, grpo)")
