"""TeacherScorer: the initial model, shown the reference solution, scores every position of the student's trace.

    scorer = TeacherScorer("Qwen/Qwen3-1.7B", TeacherConfig(), temperature=1.1)
    result = scorer.score(rollout_table)        # rollout columns in, + teacher_topk_* / tail / token log-probs out
    scorer.load_adapter(3, payload)             # teacher.kind=ema: score with the base + the learner's EMA adapter

Packing, chunking, the columns it writes and the EMA teacher: docs/ARCHITECTURE.md ("The teacher").
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from opsd.adapter import AdapterError, AdapterPayload
from opsd.hf import tokenizer_fingerprint
from opsd.lora import VLLM_LORA_RANKS, AdapterTarget, check_mergeable, model_linear_shapes, validated_lora_weights
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
    teacher_version: int = 0  # the adapter version the teacher scored with (0: the base model)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> ScoreSummary:
        return ScoreSummary(self.table.num_rows, dict(self.skipped), self.truncated_rows, self.tokens, self.seconds,
                            self.teacher_version)


@dataclass(frozen=True)
class ScoreSummary:
    """What the driver reads of a scored shard (the table itself travels on as an object ref)."""

    rows: int
    skipped: dict[str, int]
    truncated_rows: int
    tokens: int
    seconds: float
    teacher_version: int = 0


# PEFT config keys that shape the LoRA layers put on the teacher: later versions must keep them.
_LORA_STRUCTURE = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora")


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
        self.model_spec = model
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
        self.adapter_version = 0  # 0: the base model
        self._lora_structure: dict[str, Any] | None = None  # the PEFT config of the LoRA layers put on the model
        self._target: AdapterTarget | None = None  # what adapters are checked against (built at the first load)

    # -- adapter versions (teacher.kind=ema) ---------------------------------------------------------------------
    def load_adapter(self, version: int, payload: AdapterPayload | None = None) -> None:
        """Score with the base model plus adapter ``version`` from the next call on; version 0 (no payload) is the
        base model. The first adapter puts LoRA layers on the model (PEFT's ``inject_adapter_in_model``, from the
        payload's PEFT config); later versions write their weights into them. The payload is checked as the rollout
        workers check theirs (``opsd.lora``): on any problem this raises :class:`AdapterError` and the previous
        version stays."""
        if version < 0:
            raise AdapterError(f"adapter version must be >= 0, got {version}")
        if version == 0:
            if payload is not None:
                raise AdapterError("adapter version 0 is the base model: it takes no payload")
            self._enable_lora(False)
            self.adapter_version = 0
            return
        if payload is None:
            raise AdapterError(f"adapter version {version} needs a payload")
        if payload.version != version:
            raise AdapterError(f"load_adapter({version}) was given the payload of version {payload.version}")
        if self._target is None:
            spec = self.model_spec
            self._target = AdapterTarget(spec.path, VLLM_LORA_RANKS[-1],
                                         model_linear_shapes(spec.path, spec.revision, spec.trust_remote_code))
        weights = validated_lora_weights(payload, self._target)
        check_mergeable(payload)  # a plain LoRA: nothing PEFT would do to the base weights on loading
        structure = {key: payload.config.get(key) for key in _LORA_STRUCTURE}
        if self._lora_structure is None:
            self._inject_lora(payload.config)
            self._lora_structure = structure
        elif structure != self._lora_structure:
            changed = next(key for key in _LORA_STRUCTURE if structure[key] != self._lora_structure[key])
            raise AdapterError(f"adapter version {version}: {changed}={structure[changed]!r} differs from the "
                               f"teacher's LoRA layers ({self._lora_structure[changed]!r})")
        layers = self._lora_layers()
        differ = sorted(set(weights) ^ set(layers))
        if differ:
            raise AdapterError(f"adapter version {version}: its weights and its target_modules differ on {differ[0]!r} "
                               "(a LoRA layer without weights, or weights without a layer)")
        with torch.no_grad():
            for name, layer in layers.items():
                layer.lora_A["default"].weight.copy_(weights[name].a)
                layer.lora_B["default"].weight.copy_(weights[name].b)
        self._enable_lora(True)
        self.adapter_version = version

    def _inject_lora(self, peft_config: dict) -> None:
        from peft import get_peft_config, inject_adapter_in_model

        config = get_peft_config(dict(peft_config))
        config.init_lora_weights = False  # the payload's weights are written next
        config.inference_mode = True
        inject_adapter_in_model(config, self.model, adapter_name="default")
        self.model.eval()  # new layers start in train mode: no LoRA dropout when scoring
        self._enable_lora(False)  # until a version's weights are written into them

    def _lora_layers(self) -> dict[str, Any]:
        from peft.tuners.lora import LoraLayer

        return {name: module for name, module in self.model.named_modules() if isinstance(module, LoraLayer)}

    def _enable_lora(self, enabled: bool) -> None:
        for layer in self._lora_layers().values():
            layer.enable_adapters(enabled)
        self.model.requires_grad_(False)

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
            teacher_version=self.adapter_version,
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
