"""TeacherScorer: the frozen initial model, shown the reference solution, scores every position of the student's trace.

    scorer = TeacherScorer("Qwen/Qwen3-1.7B", TeacherConfig(), temperature=1.1)
    result = scorer.score(rollout_table)        # rollout columns in, + teacher_topk_* / tail / token log-probs out

The model is loaded once with its initial weights and never updated (no adapter is ever attached). Rows are packed
into forward passes by token budget (padded rows x longest <= ``token_budget``), the transformer runs under
``torch.inference_mode`` (bf16 + SDPA on GPU), and ``lm_head`` + log-softmax + top-k run ``logits_chunk`` response
positions at a time, so the ``[T, V]`` logits of a long trace never exist at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from opsd.hf import load_tokenizer, tokenizer_fingerprint
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.schema import SCORED_SCHEMA, TableMetadata, check_metadata, check_table, read_metadata, with_metadata
from teacher.config import TeacherConfig
from opsd.packing import pack_by_tokens
from opsd.teacher_context import build_contexts
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


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


class TeacherScorer:
    """A plain class (no Ray); ``teacher.actor.TeacherActor`` wraps it for the cluster."""

    def __init__(
        self,
        model_path: str,
        config: TeacherConfig | None = None,
        *,
        temperature: float = 1.0,
        prompt: PromptConfig | None = None,
        tokenizer_path: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        device: str | None = None,
    ):
        from transformers import AutoModelForCausalLM

        self.config = config or TeacherConfig()
        self.config.validate()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(tokenizer_path or model_path, revision, trust_remote_code)
        self.builder = PromptBuilder(self.tokenizer, prompt)
        self.model = AutoModelForCausalLM.from_pretrained(
            model_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=resolve_dtype(self.config.dtype, self.device),
            use_safetensors=True,
            attn_implementation="sdpa",
        ).to(self.device).eval().requires_grad_(False)
        self.lm_head = self.model.get_output_embeddings()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_context = self.config.max_context_tokens or int(self.model.config.max_position_embeddings)
        self.metadata = TableMetadata(
            model=model_path,
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


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """A list column from per-row numpy arrays, built from offsets (no Python loop over values)."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([a.size for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=value_type))


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
        table = table.append_column(name, _list_column([row[index] for row in cpu], value_type))
    return table


def _scored_schema_for(table: pa.Table) -> pa.Schema:
    """The contract's types for its columns, the table's own for any extra column."""
    contract = {f.name: f for f in SCORED_SCHEMA}
    return pa.schema([contract.get(f.name, f) for f in table.schema], metadata=table.schema.metadata)
