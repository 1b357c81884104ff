"""Loss kinds: what each kind of distillation loss needs from the step table and how its teacher reaches the loss.

``learner.loss.kind`` names one of :data:`LOSS_KINDS`. A kind says whether the teacher stage runs (it adds the
teacher columns), which table contract it trains on, how a row's teacher data is read and collated into a typed
:class:`TeacherBatch`, and how that batch becomes the loss's teacher (``learner.loss``). A new kind is one class here
(plus its divergence in ``learner/loss.py``) and its tests. The baselines' objectives (SFT, GRPO) are kinds too:
``learner/objectives.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np
import pyarrow as pa
import torch

from opsd.schema import TableError, TableMetadata, check_metadata, check_table, read_metadata

if TYPE_CHECKING:
    from learner.config import LossConfig
    from learner.loss import LossOutput, Teacher
    from opsd.prompts import PromptBuilder
    from opsd.teacher_context import ContextPlan

TEACHER_FLOAT_COLUMNS = ("teacher_topk_logprobs", "teacher_tail_logprob", "teacher_token_logprob")


# -- typed teacher batches -----------------------------------------------------------------------------------------
@dataclass
class TopKBatch:
    """The teacher's top-k ids and log-probs and its tail log-prob, one row per response position."""

    ids: torch.Tensor  # [N, k] int64
    logprobs: torch.Tensor  # [N, k]
    tail_logprob: torch.Tensor  # [N]

    def to(self, device: str) -> TopKBatch:
        return TopKBatch(self.ids.to(device), self.logprobs.to(device), self.tail_logprob.to(device))


@dataclass
class SampledTokenBatch:
    """The teacher's log-prob of each sampled token."""

    token_ids: torch.Tensor  # [N]
    logprob: torch.Tensor  # [N]

    def to(self, device: str) -> SampledTokenBatch:
        return SampledTokenBatch(self.token_ids.to(device), self.logprob.to(device))


@dataclass
class ContextBatch:
    """The teacher's own contexts (problem + solution + the same response), padded; ``response_mask`` marks the
    positions that predict a response token, row-major, like the student's."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: str) -> ContextBatch:
        return ContextBatch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


TeacherBatch = TopKBatch | SampledTokenBatch | ContextBatch


@dataclass(frozen=True)
class LearnerTeacher:
    """The teacher model the learner runs itself, for kinds whose teacher runs inside the learner: the base model
    (adapter off), or with ``teacher.kind=ema`` the base model with the EMA of the LoRA weights."""

    hidden: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, attention_mask) -> last hidden
    lm_head: torch.nn.Module


# -- the kinds -----------------------------------------------------------------------------------------------------
class LossKind:
    """What one kind of loss needs. Subclasses set the class attributes and implement the three methods."""

    name: ClassVar[str]
    needs_teacher_stage: ClassVar[bool]  # the teacher actors add columns this kind reads
    runs_teacher_in_learner: ClassVar[bool] = False  # the learner runs the teacher model on teacher contexts itself
    needs_prompts: ClassVar[bool] = False  # the learner builds prompts itself (teacher contexts, SFT rows)
    teacher_columns: ClassVar[tuple[str, ...]] = ()
    non_finite_what: ClassVar[str] = "teacher values"  # what non_finite_rows looks at, for the skip reason

    def check_table(self, table: pa.Table, expected: TableMetadata) -> None:
        """Refuse a table this kind cannot train on: columns, tokenizer, vocabulary, and (teacher stage) k and the
        loss temperature."""
        check_table(table, "rollouts")
        if self.needs_teacher_stage:
            missing = [c for c in self.teacher_columns if c not in table.column_names]
            if missing:
                raise TableError(f"loss kind {self.name!r} needs the teacher's columns: this table has no column "
                                 f"{missing[0]!r} (was it scored by the teacher?)")
        found = check_metadata(table, expected, check_topk=False)
        if not self.needs_teacher_stage:
            return
        if found.temperature is None or abs(found.temperature - (expected.temperature or 0.0)) > 1e-9:
            raise TableError(f"table temperature {found.temperature} differs from the loss temperature "
                             f"{expected.temperature} (learner.loss.temperature)")
        if expected.top_k is not None and found.top_k != expected.top_k:
            raise TableError(f"table top_k {found.top_k} differs from teacher.top_k {expected.top_k}")
        check_table(table, "scored")

    def non_finite_rows(self, table: pa.Table) -> list[str]:
        """Sample ids whose teacher log-probs hold NaN or +inf (-inf is a legitimate empty tail)."""
        bad = np.zeros(table.num_rows, dtype=bool)
        for name in TEACHER_FLOAT_COLUMNS:
            if name not in self.teacher_columns:
                continue
            column = table.column(name).combine_chunks()
            values = column.values.to_numpy(zero_copy_only=False)
            broken = np.isnan(values) | (values == np.inf)
            if broken.any():
                offsets = column.offsets.to_numpy()
                bad[np.searchsorted(offsets, np.nonzero(broken)[0], side="right") - 1] = True
        ids = table.column("sample_id").to_pylist()
        return [ids[i] for i in np.nonzero(bad)[0]]

    def sequences(self, table: pa.Table, builder: PromptBuilder | None) -> tuple[list[list[int]], list[list[int]]]:
        """Each row's prompt ids and the ids the loss is on: the rollout's prompt and response."""
        return table.column("prompt_ids").to_pylist(), table.column("response_ids").to_pylist()

    def row_teachers(self, table: pa.Table, contexts: ContextPlan | None) -> list[Any]:
        """Each row's teacher data (what :meth:`collate` takes), None for a row left out."""
        raise NotImplementedError

    def collate(self, teachers: Sequence[Any], responses: Sequence[Sequence[int]], pad_id: int) -> TeacherBatch:
        """One micro-batch's teacher data; ``responses`` are the rows' response ids."""
        raise NotImplementedError

    def loss_teacher(self, batch: TeacherBatch, model: LearnerTeacher) -> Teacher:
        raise NotImplementedError

    def loss(self, hidden: torch.Tensor, lm_head: torch.nn.Module, teacher: Any, config: LossConfig,
             normalizer: float | None) -> LossOutput:
        """The fused loss of the student's ``hidden`` states at the response positions against ``teacher``."""
        from learner.loss import gjs_loss

        return gjs_loss(hidden, lm_head.weight, teacher, kind=self.name, beta=config.beta, temperature=config.tau,
                        bias=getattr(lm_head, "bias", None), normalizer=normalizer, chunk_size=config.chunk_size,
                        clip=config.clip, clip_mode=config.clip_mode if config.clip is not None else "token")

    def context_tokens(self, teacher: Any) -> int:
        """Tokens the learner runs for a row's teacher (0 unless the teacher runs in the learner)."""
        return 0


class _TopK(LossKind):
    needs_teacher_stage = True
    teacher_columns = ("teacher_topk_ids", "teacher_topk_logprobs", "teacher_tail_logprob")

    def row_teachers(self, table, contexts):
        k = read_metadata(table).top_k
        if not k:
            raise TableError(f"loss kind {self.name!r} needs a scored table with top_k in its metadata")
        ids, logprobs, tails = (_split(table.column(c)) for c in self.teacher_columns)
        return [(i.reshape(-1, k), lp.reshape(-1, k), t) for i, lp, t in zip(ids, logprobs, tails)]

    def collate(self, teachers, responses, pad_id):
        return TopKBatch(torch.from_numpy(np.concatenate([t[0] for t in teachers]).astype(np.int64)),
                         torch.from_numpy(np.concatenate([t[1] for t in teachers])),
                         torch.from_numpy(np.concatenate([t[2] for t in teachers])))

    def loss_teacher(self, batch, model):
        from learner.loss import TopKTeacher

        return TopKTeacher(batch.ids, batch.logprobs, batch.tail_logprob)


class TopKTail(_TopK):
    """The teacher's top-k ids plus one tail bucket (what crosses the network): a lower bound of ``full``."""

    name = "topk_tail"


class TopKRenorm(_TopK):
    """Both sides renormalised over the teacher's k ids, no tail (an ablation; a different objective)."""

    name = "topk_renorm"


class SampledToken(LossKind):
    """The sampled token only (the paper's ablation)."""

    name = "sampled_token"
    needs_teacher_stage = True
    teacher_columns = ("teacher_token_logprob",)

    def row_teachers(self, table, contexts):
        return _split(table.column("teacher_token_logprob"))

    def collate(self, teachers, responses, pad_id):
        return SampledTokenBatch(torch.tensor([t for r in responses for t in r], dtype=torch.long),
                                 torch.from_numpy(np.concatenate(teachers)))

    def loss_teacher(self, batch, model):
        from learner.loss import SampledTokenTeacher

        return SampledTokenTeacher(batch.token_ids, batch.logprob)


class FullVocabulary(LossKind):
    """GJS over the whole vocabulary (the paper's default): no teacher actors; the learner runs the teacher model (the
    frozen base, or the base with the EMA adapter) on each row's teacher context itself."""

    name = "full"
    needs_teacher_stage = False
    runs_teacher_in_learner = True
    needs_prompts = True

    def row_teachers(self, table, contexts):
        if contexts is None:
            raise ValueError("the full-vocabulary loss needs the teacher contexts of the table's rows")
        teachers: list[Any] = [None] * table.num_rows
        for context in contexts.contexts:
            teachers[context.row] = context
        return teachers

    def collate(self, teachers, responses, pad_id):
        ids, mask, positions = pad_sequences([t.input_ids for t in teachers], [t.response_start for t in teachers],
                                             pad_id)
        return ContextBatch(ids, mask, positions)

    def loss_teacher(self, batch, model):
        from learner.loss import FullTeacher

        hidden = model.hidden(batch.input_ids, batch.attention_mask)
        head = model.lm_head
        # The parameters themselves, not detached copies: under ZeRO-3 they are filled in when gathered for the loss.
        return FullTeacher(hidden=hidden[batch.response_mask], weight=head.weight, bias=getattr(head, "bias", None))

    def context_tokens(self, teacher):
        return len(teacher.input_ids)


LOSS_KINDS: dict[str, LossKind] = {kind.name: kind for kind in (FullVocabulary(), TopKTail(), TopKRenorm(),
                                                                 SampledToken())}


def loss_kind(name: str | LossKind) -> LossKind:
    if isinstance(name, LossKind):
        return name
    try:
        return LOSS_KINDS[name]
    except KeyError:
        raise ValueError(f"loss kind must be one of {', '.join(LOSS_KINDS)}, got {name!r}") from None


# -- helpers -------------------------------------------------------------------------------------------------------
def _split(column: pa.ChunkedArray) -> list[np.ndarray]:
    column = column.combine_chunks()
    values = column.values.to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy()
    return [values[offsets[i]: offsets[i + 1]] for i in range(len(column))]


def pad_sequences(sequences: Sequence[Sequence[int]], response_starts: Sequence[int], pad_id: int):
    """Right-padded ids, attention mask, and the mask of positions predicting a response token."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), longest), dtype=torch.long)
    predicting = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for i, (sequence, start) in enumerate(zip(sequences, response_starts)):
        ids[i, : len(sequence)] = torch.tensor(sequence)
        attention[i, : len(sequence)] = 1
        predicting[i, start - 1: len(sequence) - 1] = True
    return ids, attention, predicting
