"""TeacherScorer: the frozen initial model, shown the reference solution, scores every position of the student's trace.

    scorer = TeacherScorer("Qwen/Qwen3-1.7B", TeacherConfig(), temperature=1.1)
    result = scorer.score(rollout_table)        # rollout columns in, + teacher_topk_* / tail / token log-probs out

Packing, chunking and the columns it writes: docs/ARCHITECTURE.md ("The teacher").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from opsd.hf import tokenizer_fingerprint
from opsd.model import ModelSpec, as_model_spec, resolve_dtype
from opsd.packing import pack_by_tokens
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.schema import SCORED_SCHEMA, TableMetadata, check_metadata, check_table, read_metadata, with_metadata
from opsd.tables import concat_tables, list_column
from opsd.teacher_context import build_contexts
from teacher.config import TeacherConfig
from teacher.topk import CompressedDistribution, compress_hidden


@dataclass
class ScoreResult:
    """The scored table (skipped rows left out) and what happened on the way."""

    table: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_rows: int = 0
    tokens: int = 0  # teacher tokens run through the model (contexts, unpadded)
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> ScoreSummary:
        return ScoreSummary(self.table.num_rows, dict(self.skipped), self.truncated_rows, self.tokens, self.seconds)


@dataclass(frozen=True)
class ScoreSummary:
    """What the driver reads of a scored shard (the table itself travels on as an object ref)."""

    rows: int
    skipped: dict[str, int]
    truncated_rows: int
    tokens: int
    seconds: float


class TeacherScorer:
    """A plain class (no Ray); ``teacher.pool`` runs it as Ray actors."""

    def __init__(
        self,
        model: ModelSpec | str,
        config: TeacherConfig | None = None,
        *,
        temperature: float = 1.0,
        prompt: PromptConfig | None = None,
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        model = as_model_spec(model)
        self.config = config or TeacherConfig()
        self.config.validate()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = model.load_tokenizer()
        self.builder = PromptBuilder(self.tokenizer, prompt)
        self.model = AutoModelForCausalLM.from_pretrained(
            model.path,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            dtype=resolve_dtype(self.config.dtype, on_gpu=self.device.startswith("cuda")),
            use_safetensors=True,
            attn_implementation="sdpa",
        ).to(self.device).eval().requires_grad_(False)
        self.lm_head = self.model.get_output_embeddings()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_context = self.config.max_context_tokens or int(self.model.config.max_position_embeddings)
        self.metadata = TableMetadata(
            model=model.path,
            tokenizer=tokenizer_fingerprint(self.tokenizer),
            vocab_size=int(self.lm_head.weight.shape[0]),
            top_k=self.config.top_k,
            temperature=self.temperature,
        )

    def score(self, table: pa.Table) -> ScoreResult:
        """Append the teacher columns to a rollout table. Refuses a table from another tokenizer before any work."""
        start = time.perf_counter()
        check_table(table, "rollouts")
        check_metadata(table, self.metadata, check_topk=False)
        responses = table.column("response_ids").to_pylist()
        plan = build_contexts(
            self.builder,
            table.column("problem").to_pylist(),
            table.column("solution").to_pylist(),
            responses,
            self.max_context,
            self.config.on_overlength,
        )
        scored: dict[int, CompressedDistribution] = {}
        lengths = [len(c.input_ids) for c in plan.contexts]
        for batch in pack_by_tokens(lengths, self.config.token_budget):
            contexts = [plan.contexts[i] for i in batch]
            for context, compressed in zip(contexts, self._score_batch(contexts)):
                scored[context.row] = compressed

        kept = [c.row for c in plan.contexts]
        out = table.take(pa.array(kept, pa.int64())) if len(kept) != table.num_rows else table
        out = out.select([name for name in out.column_names if not name.startswith("teacher_")])
        out = _append_teacher_columns(out, [scored[row] for row in kept])
        source = read_metadata(table)
        metadata = TableMetadata(source.model, source.tokenizer, source.vocab_size, self.config.top_k, self.temperature)
        return ScoreResult(
            table=with_metadata(out.cast(_scored_schema_for(out)), metadata),
            skipped=plan.skipped,
            truncated_rows=plan.truncated_rows,
            tokens=sum(lengths),
            seconds=time.perf_counter() - start,
        )

    def score_pieces(self, pieces: list[tuple[int, int, int]], *tables: pa.Table) -> tuple[pa.Table, ScoreSummary]:
        """Score rows ``start:stop`` of ``tables[shard]`` for each ``(shard, start, stop)`` piece, as one table (what
        a pool sends: the rollout stage's shards stay in the object store; Ray resolves them here)."""
        table = concat_tables([tables[shard].slice(start, stop - start) for shard, start, stop in pieces])
        result = self.score(table)
        return result.table, result.summary()

    @torch.inference_mode()
    def _score_batch(self, contexts) -> list[CompressedDistribution]:
        longest = max(len(c.input_ids) for c in contexts)
        ids = torch.full((len(contexts), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(contexts), longest), dtype=torch.long)
        for i, c in enumerate(contexts):
            ids[i, : len(c.input_ids)] = torch.tensor(c.input_ids)
            mask[i, : len(c.input_ids)] = 1  # right padding: positions of real tokens are unchanged
        hidden = self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        results = []
        for i, c in enumerate(contexts):
            # The position before each response token predicts it.
            positions = hidden[i, c.response_start - 1: len(c.input_ids) - 1]
            tokens = torch.tensor(c.input_ids[c.response_start:], device=self.device)
            results.append(compress_hidden(positions, self.lm_head, tokens, self.config.top_k, self.temperature,
                                           self.config.logits_chunk))
        return results


def _append_teacher_columns(table: pa.Table, scored: list[CompressedDistribution]) -> pa.Table:
    cpu = [(s.ids.cpu().numpy().astype(np.int32).ravel(), s.logprobs.float().cpu().numpy().ravel(),
            s.tail_logprob.float().cpu().numpy(), s.token_logprob.float().cpu().numpy()) for s in scored]
    columns = {
        "teacher_topk_ids": (0, pa.int32()),
        "teacher_topk_logprobs": (1, pa.float32()),
        "teacher_tail_logprob": (2, pa.float32()),
        "teacher_token_logprob": (3, pa.float32()),
    }
    for name, (index, value_type) in columns.items():
        table = table.append_column(name, list_column([row[index] for row in cpu], value_type))
    return table


def _scored_schema_for(table: pa.Table) -> pa.Schema:
    """The contract's types for its columns, the table's own for any extra column."""
    contract = {f.name: f for f in SCORED_SCHEMA}
    return pa.schema([contract.get(f.name, f) for f in table.schema], metadata=table.schema.metadata)
