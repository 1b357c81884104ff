"""The learner group: L Ray actors, one ``LearnerWorker`` per rank, trained as one data-parallel DeepSpeed job.

    group = LearnerGroup(model_path, learner_config, total_steps=100, actor_options={"num_gpus": 1})
    metrics = group.train_step(scored_table)          # splits rows over ranks, one optimizer step
    payload = group.export_adapter(version=1)         # AdapterPayload for the rollout workers
    group.save_checkpoint("runs/x/checkpoints/step-10", client_state={"cursor": ...})

Rendezvous: rank 0's actor reports its node address and a free port; every rank then joins torch.distributed there
(gloo on CPU, NCCL on GPU). Each step's table is checked (columns, tokenizer, k, temperature) and split here, in the
caller's process, so that every rank gets the same number of micro-batches; the actors only run them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray

from learner.batch import non_finite_teacher_rows, pack_micro_batches, rows_from_table, split_over_ranks
from learner.config import LearnerConfig
from learner.worker import LearnerWorker, StepMetrics, free_port, rng_state_path
from opsd.adapter import AdapterPayload
from opsd.atomic import atomic_directory
from opsd.hf import load_tokenizer, tokenizer_fingerprint
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.schema import TableError, TableMetadata, check_metadata, check_table
from opsd.teacher_context import build_contexts


CLIENT_STATE_FILE = "client_state.json"


def read_client_state(directory: str | Path) -> dict:
    """The state a checkpoint was saved with (``group_step``, ``version`` and the caller's ``client_state``)."""
    path = Path(directory) / CLIENT_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a learner checkpoint: it has no {CLIENT_STATE_FILE}")
    return json.loads(path.read_text())


class _LearnerActor:
    """The Ray-side shell: address discovery, then a LearnerWorker built in place."""

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, **kwargs) -> None:
        self.worker = LearnerWorker(**kwargs)

    def call(self, method: str, *args, **kwargs):
        return getattr(self.worker, method)(*args, **kwargs)


LearnerActor = ray.remote(_LearnerActor)


@dataclass(frozen=True)
class FullTeacherSettings:
    """What the learner needs to build teacher contexts itself (full-vocabulary loss): the same prompt templates and
    length policy as the teacher stage."""

    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_context_tokens: int = 32_768
    on_overlength: str = "truncate_solution"


@dataclass
class GroupStepMetrics:
    step: int
    loss: float  # token-level mean over the global batch (clipped divergences)
    gjs: float  # mean unclipped divergence per response token
    tokens: int
    rows: int
    grad_norm: float
    lr: float
    skipped: bool = False
    skip_reason: str = ""
    clipped_tokens: int = 0
    staleness_mean: float = 0.0
    staleness_max: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LearnerGroup:
    def __init__(
        self,
        model_path: str,
        config: LearnerConfig,
        *,
        total_steps: int,
        seed: int = 0,
        expected_top_k: int | None = None,
        full_teacher: FullTeacherSettings | None = None,
        tokenizer_path: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        actor_options: dict | list[dict] | None = None,
        timeout_s: float = 1800.0,
    ):
        config.validate()
        self.config, self.timeout_s = config, timeout_s
        self.version = 0  # adapter version the learner holds: 0 = base model, +1 per applied step
        self.step_count = 0
        self.tokenizer = load_tokenizer(tokenizer_path or model_path, revision, trust_remote_code)
        from transformers import AutoConfig

        vocab_size = AutoConfig.from_pretrained(model_path, revision=revision, trust_remote_code=trust_remote_code).vocab_size
        self.expected = TableMetadata(model_path, tokenizer_fingerprint(self.tokenizer), int(vocab_size),
                                      expected_top_k, config.loss.temperature)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.full_teacher = full_teacher or FullTeacherSettings()
        self.builder = PromptBuilder(self.tokenizer, self.full_teacher.prompt) if config.loss.kind == "full" else None

        n = config.num_workers
        options = actor_options if isinstance(actor_options, list) else [dict(actor_options or {})] * n
        self.actors = [LearnerActor.options(**options[r]).remote() for r in range(n)]
        address, port = ray.get(self.actors[0].address.remote(), timeout=timeout_s)
        kwargs = dict(model_path=model_path, config=config, world_size=n, master_addr=address, master_port=port,
                      total_steps=total_steps, seed=seed, revision=revision, trust_remote_code=trust_remote_code)
        ray.get([a.setup.remote(rank=r, **kwargs) for r, a in enumerate(self.actors)], timeout=timeout_s)

    # ------------------------------------------------------------------------------------------------------------
    def check(self, table: pa.Table) -> None:
        """Refuse a table this learner cannot train on (columns, tokenizer, vocabulary, k, temperature)."""
        kind = self.config.loss.kind
        check_table(table, "rollouts")
        if kind != "full" and "teacher_topk_ids" not in table.column_names:
            raise TableError(f"loss kind {kind!r} needs the teacher's columns: this table has no column "
                             "'teacher_topk_ids' (was it scored by the teacher?)")
        found = check_metadata(table, self.expected, check_topk=False)
        if kind != "full":
            if found.temperature is None or abs(found.temperature - self.config.loss.temperature) > 1e-9:
                raise TableError(f"table temperature {found.temperature} differs from learner.loss.temperature "
                                 f"{self.config.loss.temperature}")
            if self.expected.top_k is not None and found.top_k != self.expected.top_k:
                raise TableError(f"table top_k {found.top_k} differs from teacher.top_k {self.expected.top_k}")
        if kind != "full":
            check_table(table, "scored")

    def train_step(self, table: pa.Table) -> GroupStepMetrics:
        start = time.perf_counter()
        self.check(table)
        kind = self.config.loss.kind
        bad = non_finite_teacher_rows(table) if kind != "full" else []
        versions = table.column("policy_version").to_pylist()
        staleness = [self.version - v for v in versions] or [0]
        base = dict(step=self.step_count, rows=table.num_rows, staleness_mean=sum(staleness) / len(staleness),
                    staleness_max=max(staleness))
        if bad:
            self.step_count += 1
            return GroupStepMetrics(loss=float("nan"), gjs=float("nan"), tokens=0, grad_norm=float("nan"), lr=0.0,
                                    skipped=True, skip_reason=f"non-finite teacher values in {bad[:3]}", **base)
        micro, global_tokens, skipped_rows = self._micro_batches(table)
        if global_tokens == 0:
            self.step_count += 1
            return GroupStepMetrics(loss=float("nan"), gjs=float("nan"), tokens=0, grad_norm=float("nan"), lr=0.0,
                                    skipped=True, skip_reason="empty step: no response tokens to train on",
                                    skipped_rows=skipped_rows, **base)
        num_micro = max(1, max(len(m) for m in micro))
        prepare = time.perf_counter() - start
        results: list[StepMetrics] = ray.get(
            [a.call.remote("train_step", micro[r], global_tokens, num_micro) for r, a in enumerate(self.actors)],
            timeout=self.timeout_s,
        )
        skipped = any(m.skipped for m in results)
        self.step_count += 1
        if not skipped:
            self.version += 1
        seconds = {phase: max(m.seconds.get(phase, 0.0) for m in results) for phase in ("forward", "backward", "optimizer")}
        seconds["prepare"] = prepare
        seconds["total"] = time.perf_counter() - start
        return GroupStepMetrics(
            loss=sum(m.loss for m in results),
            gjs=sum(m.divergence_sum for m in results) / global_tokens,
            tokens=global_tokens,
            grad_norm=results[0].grad_norm,
            lr=results[0].lr,
            skipped=skipped,
            skip_reason=next((m.skip_reason for m in results if m.skipped), ""),
            clipped_tokens=sum(m.clipped_tokens for m in results),
            seconds=seconds,
            skipped_rows=skipped_rows,
            **base,
        )

    def _micro_batches(self, table: pa.Table):
        """Per-rank micro-batches of a checked table, the global response-token count, and rows left out."""
        kind = self.config.loss.kind
        contexts, skipped_rows = None, {}
        if kind == "full":
            plan = build_contexts(self.builder, table.column("problem").to_pylist(),
                                  table.column("solution").to_pylist(), table.column("response_ids").to_pylist(),
                                  self.full_teacher.max_context_tokens, self.full_teacher.on_overlength)
            contexts = [None] * table.num_rows
            for context in plan.contexts:
                contexts[context.row] = context
            skipped_rows = plan.skipped
        rows = rows_from_table(table, kind, contexts)
        shards = split_over_ranks(rows, len(self.actors))
        micro = [pack_micro_batches(shard, self.config.micro_batch_tokens, self.pad_id, kind) for shard in shards]
        return micro, sum(r.response_length for r in rows), skipped_rows

    def evaluate(self, table: pa.Table) -> float:
        """Mean GJS per response token of ``table`` under the current adapter (no update): the held-out metric."""
        self.check(table)
        micro, tokens, _ = self._micro_batches(table)
        num_micro = max(1, max(len(m) for m in micro))
        results = ray.get([a.call.remote("evaluate", micro[r], num_micro) for r, a in enumerate(self.actors)],
                          timeout=self.timeout_s)
        return sum(total for total, _ in results) / max(tokens, 1)

    # ------------------------------------------------------------------------------------------------------------
    def export_adapter(self, version: int | None = None) -> AdapterPayload:
        payloads = ray.get([a.call.remote("export_adapter", version or self.version) for a in self.actors],
                           timeout=self.timeout_s)
        return payloads[0]

    def logits(self, input_ids: list[list[int]]):
        return ray.get([a.call.remote("logits", input_ids) for a in self.actors], timeout=self.timeout_s)[0]

    def trainable_parameters(self) -> dict:
        # Gathering ZeRO-partitioned parameters is a collective: every rank takes part.
        return ray.get([a.call.remote("trainable_parameters") for a in self.actors], timeout=self.timeout_s)[0]

    def save_checkpoint(self, directory: str | Path, client_state: dict | None = None) -> Path:
        """Every rank writes into a temporary sibling directory; it is renamed into place once all are done.

        ``client_state`` (JSON-serialisable) is stored with the learner state and, with the group's step and
        version, in ``client_state.json``: a resuming caller reads it (:func:`read_client_state`) before it starts
        any actor."""
        state = {"group_step": self.step_count, "version": self.version, **(client_state or {})}
        with atomic_directory(directory, overwrite=True) as tmp:
            ray.get([a.call.remote("save_checkpoint", str(tmp), state) for a in self.actors], timeout=self.timeout_s)
            missing = [r for r in range(len(self.actors)) if not rng_state_path(tmp, r).is_file()]
            if missing:  # ranks on other nodes wrote to their own disks: this checkpoint could never be resumed
                raise RuntimeError(f"checkpoint {directory}: the files of learner ranks {missing} are not visible "
                                   "here; with learner ranks on several nodes, train.run_dir must be on storage "
                                   "every node shares (e.g. an NFS or cloud-bucket mount)")
            (tmp / CLIENT_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        return Path(directory).resolve()

    def load_checkpoint(self, directory: str | Path) -> dict:
        states = ray.get([a.call.remote("load_checkpoint", str(directory)) for a in self.actors], timeout=self.timeout_s)
        self.step_count, self.version = states[0]["group_step"], states[0]["version"]
        return states[0]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
