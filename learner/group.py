"""The learner group: L Ray actors, one ``LearnerWorker`` per rank, trained as one data-parallel DeepSpeed job.

    group = LearnerGroup(model, learner_config, total_steps=100, actor_options=reservation_options)
    metrics = group.train_step(scored)        # table refs of the previous stage (or a table): one optimizer step
    payload = group.export_adapter()          # AdapterPayload for the rollout workers
    teacher = group.export_teacher_adapter()  # with an EMA teacher: its adapter for the teacher actors

Every rank reads the step's table from the object store itself, checks it, and computes the same split
(:mod:`learner.batch`); the driver only sends refs and reads metrics back.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import ray

from learner.batch import StepPlan, plan_step, rows_from_table
from learner.config import LearnerConfig, LearnerObjective
from learner.worker import LearnerWorker, StepMetrics, free_port, rng_state_path
from opsd.actors import ProcessSetup, get, kill_actors, set_up_first
from opsd.adapter import AdapterPayload
from opsd.atomic import atomic_directory
from opsd.hf import tokenizer_fingerprint
from opsd.manifest import write_manifest
from opsd.model import ModelSpec, as_model_spec
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.schema import TableMetadata
from opsd.tables import TableRefs, concat_tables, join_columns
from opsd.teacher_context import build_contexts

CLIENT_STATE_FILE = "client_state.json"


def read_client_state(directory: str | Path) -> dict:
    """The state a checkpoint was saved with (``group_step``, ``version`` and the caller's ``client_state``)."""
    path = Path(directory) / CLIENT_STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a learner checkpoint: it has no {CLIENT_STATE_FILE}")
    return json.loads(path.read_text())


@dataclass(frozen=True)
class FullTeacherSettings:
    """What the learner needs to build teacher contexts itself (full-vocabulary loss): the same prompt templates and
    length policy as the teacher stage."""

    prompt: PromptConfig = field(default_factory=PromptConfig)
    max_context_tokens: int = 32_768
    on_overlength: str = "truncate_solution"


@dataclass(frozen=True)
class RankSetup:
    """What every rank is built from (the same for all ranks but the rank number)."""

    model: ModelSpec
    config: LearnerConfig
    world_size: int
    master_addr: str
    master_port: int
    total_steps: int
    seed: int
    expected_top_k: int | None
    full_teacher: FullTeacherSettings
    ema_decay: float | None  # an EMA teacher (teacher.kind=ema); None: the frozen base
    objective: LearnerObjective = field(default_factory=LearnerObjective)


@dataclass
class RankStep:
    """One rank's step: the plan it computed (the same on every rank) and, unless the step was skipped before any
    forward, its metrics."""

    rows: int
    global_tokens: int
    skipped_rows: dict[str, int]
    staleness: list[int]
    skip_reason: str = ""
    metrics: StepMetrics | None = None
    prepare_seconds: float = 0.0
    teacher_version: int | None = None  # the in-process teacher's version in this step (None: teacher actors)


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
    clip_fraction: float = 0.0  # clipped tokens or entries / what could be clipped (learner.loss.clip_mode)
    staleness_mean: float = 0.0
    staleness_max: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    skipped_rows: dict[str, int] = field(default_factory=dict)
    # The version of the teacher the learner ran itself in this step (full-vocabulary kind): 0 the base model, n the
    # EMA after n applied steps. None when teacher actors scored the table.
    teacher_version: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class LearnerLost(RuntimeError):
    """A learner rank died: the group cannot step any more (every rank's state is needed)."""


class LearnerRank:
    """One rank, as a Ray actor: its address for the rendezvous, then a ``LearnerWorker`` built in place. It reads,
    checks and splits each step's table itself."""

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, rank: int, setup: RankSetup) -> None:
        self.rank, self.setup_ = rank, setup
        self.worker = LearnerWorker(setup.model, setup.config, rank=rank, world_size=setup.world_size,
                                    master_addr=setup.master_addr, master_port=setup.master_port,
                                    total_steps=setup.total_steps, seed=setup.seed, ema_decay=setup.ema_decay,
                                    objective=setup.objective)
        tokenizer = setup.model.load_tokenizer()
        vocab_size = int(setup.model.load_config().vocab_size)
        self.kind = self.worker.kind
        self.expected = TableMetadata(setup.model.path, tokenizer_fingerprint(tokenizer), vocab_size,
                                      setup.expected_top_k, setup.config.loss.tau)
        # Teacher contexts (full-vocabulary kind) and SFT rows use the run's prompts (setup.full_teacher.prompt).
        self.builder = PromptBuilder(tokenizer, setup.full_teacher.prompt) if self.kind.needs_prompts else None

    def _table(self, tables: Sequence[pa.Table], columns: pa.Table | None = None) -> pa.Table:
        """The step table from its shards (an SFT problems table is one shard without opsd metadata), with the
        driver's per-row ``columns`` (GRPO: the advantages) joined on by sample id, checked for the kind."""
        table = tables[0] if len(tables) == 1 else concat_tables(tables)
        if columns is not None:
            table = join_columns(table, columns)
        self.kind.check_table(table, self.expected)
        return table

    def _plan(self, table: pa.Table) -> StepPlan:
        contexts = None
        if self.kind.runs_teacher_in_learner:
            settings = self.setup_.full_teacher
            contexts = build_contexts(self.builder, table.column("problem").to_pylist(),
                                      table.column("solution").to_pylist(), table.column("response_ids").to_pylist(),
                                      settings.max_context_tokens, settings.on_overlength)
        rows = rows_from_table(table, self.kind, contexts, self.builder)
        return plan_step(rows, self.setup_.world_size, self.setup_.config.micro_batch_tokens,
                         contexts.skipped if contexts is not None else None)

    def train_step(self, version: int, *tables: pa.Table, columns: pa.Table | None = None) -> RankStep:
        started = time.perf_counter()
        table = self._table(tables, columns)
        sampled = "policy_version" in table.column_names  # SFT trains on problems: nothing was sampled
        staleness = [version - v for v in table.column("policy_version").to_pylist()] if sampled else []
        teacher_version = self.worker.teacher_version if self.kind.runs_teacher_in_learner else None
        bad = self.kind.non_finite_rows(table)
        if bad:
            return RankStep(table.num_rows, 0, {}, staleness, f"non-finite {self.kind.non_finite_what} in {bad[:3]}")
        plan = self._plan(table)
        step = RankStep(table.num_rows, plan.global_tokens, plan.skipped_rows, staleness,
                        teacher_version=teacher_version)
        if plan.global_tokens == 0:
            step.skip_reason = "empty step: no response tokens to train on"
            return step
        micro = plan.micro_batches(self.rank, self.kind, self.worker.pad_id)
        step.prepare_seconds = time.perf_counter() - started
        step.metrics = self.worker.train_step(micro, plan.global_tokens, plan.num_micro_batches)
        return step

    def evaluate(self, *tables: pa.Table) -> tuple[float, int]:
        """This rank's share of the summed divergence, and the global token count."""
        plan = self._plan(self._table(tables))
        total, _ = self.worker.evaluate(plan.micro_batches(self.rank, self.kind, self.worker.pad_id),
                                        plan.num_micro_batches)
        return total, plan.global_tokens

    def export_adapter(self, version: int) -> AdapterPayload | None:
        return self.worker.export_adapter(version)

    def export_teacher_adapter(self) -> AdapterPayload | None:
        return self.worker.export_teacher_adapter()

    def trainable_parameters(self) -> dict:
        return self.worker.trainable_parameters()

    def logits(self, input_ids: list[list[int]]):
        return self.worker.logits(input_ids)

    def save_checkpoint(self, directory: str, client_state: dict) -> None:
        self.worker.save_checkpoint(directory, client_state)

    def load_checkpoint(self, directory: str) -> dict:
        return self.worker.load_checkpoint(directory)


LearnerActor = ray.remote(set_up_first(LearnerRank))


class LearnerGroup:
    """The learner stage: its ranks started in their bundles, stepped together; the driver sends refs and reads
    metrics."""

    def __init__(
        self,
        model: ModelSpec | str,
        config: LearnerConfig,
        *,
        total_steps: int,
        seed: int = 0,
        expected_top_k: int | None = None,
        full_teacher: FullTeacherSettings | None = None,
        ema_decay: float | None = None,
        objective: LearnerObjective | None = None,
        actor_options: dict | Sequence[dict] | None = None,
        timeout_s: float = 3600.0,
        log_dir: str | None = None,
        torch_threads: int | None = None,
    ):
        """``ema_decay``: keep an EMA of the LoRA weights as the teacher (``teacher.kind=ema``): the in-process
        teacher of the full-vocabulary kind runs it, :meth:`export_teacher_adapter` gives it to teacher actors.
        None: the teacher is the frozen base model. ``objective``: what the ranks minimise (default: the
        distillation loss of ``config.loss``; SFT and GRPO: docs/ARCHITECTURE.md, "Baselines"). ``log_dir``: each
        rank's output goes to ``log_dir/learner-<rank>.log``; ``torch_threads``: its CPU threads (default: one per
        reserved CPU)."""
        config.validate()
        self.model, self.config, self.timeout_s = as_model_spec(model), config, timeout_s
        self.ema_decay = ema_decay
        self.version = 0  # adapter version the learner holds: 0 = base model, +1 per applied step
        self.step_count = 0
        n = config.num_workers
        options = list(actor_options) if isinstance(actor_options, (list, tuple)) else [dict(actor_options or {})] * n
        self.actors = [LearnerActor.options(**options[r]).remote(process=ProcessSetup(
            f"{log_dir}/learner-{r}.log" if log_dir else None, torch_threads)) for r in range(n)]
        address, port = get(self.actors[0].address.remote(), timeout_s)
        setup = RankSetup(self.model, config, n, address, port, total_steps, seed, expected_top_k,
                          full_teacher or FullTeacherSettings(), ema_decay, objective or LearnerObjective())
        get([a.setup.remote(r, setup) for r, a in enumerate(self.actors)], timeout_s)

    def _get(self, refs):
        """The ranks' results; a rank that died (process killed, OOM, node lost) raises :class:`LearnerLost`: its
        optimizer shard is gone, so the group must be rebuilt from a checkpoint (the training loop does)."""
        try:
            return get(refs, self.timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise LearnerLost(f"a learner rank died ({type(exc).__name__}); the group's state is lost") from exc

    def _refs(self, tables: pa.Table | TableRefs) -> tuple:
        return (tables if isinstance(tables, TableRefs) else TableRefs.put(tables)).refs

    def train_step(self, tables: pa.Table | TableRefs, columns: pa.Table | None = None) -> GroupStepMetrics:
        """One optimizer step on the step table (refs from the previous stage, or a table in this process).
        ``columns``: a small table of per-row values keyed by ``sample_id`` (GRPO: ``advantage``), put in the object
        store once; every rank joins it onto the step table."""
        start = time.perf_counter()
        refs = self._refs(tables)
        extra = ray.put(columns) if columns is not None else None
        steps: list[RankStep] = self._get([a.train_step.remote(self.version, *refs, columns=extra)
                                           for a in self.actors])
        first = steps[0]
        staleness = first.staleness or [0]
        base = dict(step=self.step_count, rows=first.rows, staleness_mean=sum(staleness) / len(staleness),
                    staleness_max=max(staleness), skipped_rows=first.skipped_rows,
                    teacher_version=first.teacher_version)
        self.step_count += 1
        if first.metrics is None:
            return GroupStepMetrics(loss=float("nan"), gjs=float("nan"), tokens=0, grad_norm=float("nan"), lr=0.0,
                                    skipped=True, skip_reason=first.skip_reason, **base)
        results = [s.metrics for s in steps]
        skipped = any(m.skipped for m in results)
        if not skipped:
            self.version += 1
        seconds = {phase: max(m.seconds.get(phase, 0.0) for m in results) for phase in ("forward", "backward", "optimizer")}
        seconds["prepare"] = max(s.prepare_seconds for s in steps)
        seconds["total"] = time.perf_counter() - start
        return GroupStepMetrics(
            loss=sum(m.loss for m in results),
            gjs=sum(m.divergence_sum for m in results) / first.global_tokens,
            tokens=first.global_tokens,
            grad_norm=results[0].grad_norm,
            lr=results[0].lr,
            skipped=skipped,
            skip_reason=next((m.skip_reason for m in results if m.skipped), ""),
            clip_fraction=sum(m.clipped for m in results) / max(sum(m.clip_entries for m in results), 1),
            seconds=seconds,
            **base,
        )

    def evaluate(self, tables: pa.Table | TableRefs) -> float:
        """Mean GJS per response token of the table under the current adapter (no update): the held-out metric.
        The full-vocabulary kind's teacher here is always the frozen base, whatever the training teacher: the same
        yardstick as a held-out table the teacher actors scored once, before training."""
        refs = self._refs(tables)
        results = self._get([a.evaluate.remote(*refs) for a in self.actors])
        return sum(total for total, _ in results) / max(results[0][1], 1)

    # ------------------------------------------------------------------------------------------------------------
    def export_adapter(self, version: int | None = None) -> AdapterPayload:
        payloads = self._get([a.export_adapter.remote(version or self.version) for a in self.actors])
        return payloads[0]

    def export_teacher_adapter(self) -> AdapterPayload | None:
        """The EMA teacher's adapter (``ema_decay`` set); its version is the learner's adapter version (the EMA is
        updated at every applied step). None while the teacher is the base model (before the first applied step).
        Every rank holds the same EMA: rank 0 answers."""
        if self.ema_decay is None:
            raise ValueError("this learner group keeps no EMA teacher (ema_decay is None)")
        return self._get(self.actors[0].export_teacher_adapter.remote())

    def logits(self, input_ids: list[list[int]]):
        return self._get([a.logits.remote(input_ids) for a in self.actors])[0]

    def trainable_parameters(self) -> dict:
        # Gathering ZeRO-partitioned parameters is a collective: every rank takes part.
        return self._get([a.trainable_parameters.remote() for a in self.actors])[0]

    def save_checkpoint(self, directory: str | Path, client_state: dict | None = None) -> Path:
        """Every rank writes into a temporary sibling directory; it is renamed into place once all are done.

        ``client_state`` (JSON-serialisable) is stored with the learner state and, with the group's step and
        version, in ``client_state.json``: a resuming caller reads it (:func:`read_client_state`) before it starts
        any actor. The directory's manifest (``opsd.manifest``: every file's size and SHA-256) is written last,
        before the rename: a checkpoint directory exists complete and verifiable, or not at all."""
        state = {"group_step": self.step_count, "version": self.version, **(client_state or {})}
        with atomic_directory(directory, overwrite=True) as tmp:
            self._get([a.save_checkpoint.remote(str(tmp), state) for a in self.actors])
            missing = [r for r in range(len(self.actors)) if not rng_state_path(tmp, r).is_file()]
            if missing:  # ranks on other nodes wrote to their own disks: this checkpoint could never be resumed
                raise RuntimeError(f"checkpoint {directory}: the files of learner ranks {missing} are not visible "
                                   "here; with learner ranks on several nodes, train.run_dir must be on storage "
                                   "every node shares (e.g. an NFS or cloud-bucket mount)")
            (tmp / CLIENT_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
            write_manifest(tmp)
        return Path(directory).resolve()

    def load_checkpoint(self, directory: str | Path) -> dict:
        states = self._get([a.load_checkpoint.remote(str(directory)) for a in self.actors])
        self.step_count, self.version = states[0]["group_step"], states[0]["version"]
        return states[0]

    def shutdown(self) -> None:
        kill_actors(self.actors)
        self.actors = []
