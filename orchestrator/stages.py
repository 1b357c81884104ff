"""The stage actors of a run, and the calls the training loop makes on them.

    stages = start_stages(cfg, total_steps)
    batch = stages.launch_rollouts(problems)          # shards in flight on the rollout workers (object refs)
    rollouts = stages.collect_rollouts(batch)         # merged in the batch's order; dead workers replaced
    scored, skipped, tokens = stages.score(rollouts)  # teacher columns, sharded over the teacher actors
    metrics = stages.learner.train_step(scored)
    stages.push_adapter(stages.learner.export_adapter())

A rollout or teacher actor that dies mid-step is replaced by a fresh one (the rollout worker gets the adapter
version the others serve) and its shard is sent again (:mod:`orchestrator.recovery`), so every row is trained on
exactly once. A learner rank that dies ends the run: its optimizer state is gone, and the run resumes from its last
checkpoint (``train.resume=latest``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa
import ray

from learner.group import FullTeacherSettings, LearnerGroup
from opsd.adapter import AdapterPayload
from orchestrator.config import OPSDConfig
from orchestrator.placement import ClusterView, Reservation, ResourcePlan, reserve
from orchestrator.recovery import gather_shards
from rollout.actor import RolloutActor, actor_options, stop_rollout_actors
from rollout.resources import ModelSpec
from rollout.sharding import merge_tables, shard_rows
from teacher.actor import TeacherActor

# A shard whose worker dies is sent to a fresh worker at most this many times per step.
MAX_SHARD_RETRIES = 2


@dataclass
class InFlight:
    """One step's problems, sharded over the rollout workers, generating."""

    shards: list[pa.Table]
    refs: list[ray.ObjectRef]

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


@dataclass
class Stages:
    cfg: OPSDConfig
    rollout: list
    teachers: list
    learner: LearnerGroup
    reservation: Reservation
    log: Callable[[str], None] = print
    adapter: tuple[int, ray.ObjectRef] | None = None  # the version every rollout worker serves (None: base model)
    replaced: dict[str, int] = field(default_factory=lambda: {"rollout": 0, "teacher": 0})

    @property
    def timeout_s(self) -> float:
        return self.cfg.placement.placement_timeout_s

    # -- rollout ---------------------------------------------------------------------------------------------------
    def launch_rollouts(self, problems: pa.Table) -> InFlight:
        shards = shard_rows(problems, len(self.rollout))
        return InFlight(shards, [actor.generate.remote(s) for actor, s in zip(self.rollout, shards)])

    def collect_rollouts(self, batch: InFlight) -> pa.Table:
        def redo(i: int) -> ray.ObjectRef:
            self.rollout[i] = self._fresh_rollout_worker(i)
            return self.rollout[i].generate.remote(batch.shards[i])

        return merge_tables(gather_shards(batch.refs, redo, timeout_s=self.timeout_s, max_retries=MAX_SHARD_RETRIES,
                                          what="rollout", log=self.log))

    def push_adapter(self, payload: AdapterPayload) -> None:
        """Load ``payload`` on every rollout worker (one ``ray.put``; every worker reads the same object)."""
        ref = ray.put(payload)
        ray.get([actor.load_adapter.remote(payload.version, ref) for actor in self.rollout], timeout=self.timeout_s)
        self.adapter = (payload.version, ref)

    def _fresh_rollout_worker(self, index: int):
        ray.kill(self.rollout[index], no_restart=True)
        actor = new_rollout_worker(self.cfg, index, self.reservation)
        ray.get(actor.info.remote(), timeout=self.timeout_s)
        if self.adapter is not None:
            ray.get(actor.load_adapter.remote(*self.adapter), timeout=self.timeout_s)
        self.replaced["rollout"] += 1
        return actor

    # -- teacher ---------------------------------------------------------------------------------------------------
    def score(self, rollouts: pa.Table) -> tuple[pa.Table, dict[str, int], int]:
        """Teacher columns for every row (sharded over the teacher actors); rows the teacher skips are counted."""
        if not self.teachers:
            return rollouts, {}, 0
        shards = [s for s in shard_rows(rollouts, len(self.teachers)) if s.num_rows]

        def redo(i: int) -> ray.ObjectRef:
            ray.kill(self.teachers[i], no_restart=True)
            self.teachers[i] = new_teacher(self.cfg, i, self.reservation)
            self.replaced["teacher"] += 1
            return self.teachers[i].score.remote(shards[i])

        results = gather_shards([t.score.remote(s) for t, s in zip(self.teachers, shards)], redo,
                                timeout_s=self.timeout_s, max_retries=MAX_SHARD_RETRIES, what="teacher", log=self.log)
        skipped: dict[str, int] = {}
        for r in results:
            for reason, count in r.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
        return merge_tables([r.table for r in results]), skipped, sum(r.tokens for r in results)

    def shutdown(self) -> None:
        try:
            self.learner.shutdown()
            stop_rollout_actors(self.rollout)
            for actor in self.teachers:
                ray.kill(actor)
        finally:
            self.reservation.release()


def logical_cpus(cfg: OPSDConfig) -> int:
    """CPUs an embedded cluster declares. On CPU the stages run one after another and time-share the cores, so each
    actor gets its own logical CPUs and the declared total may exceed the physical cores."""
    cores = os.cpu_count() or 1
    teachers = cfg.teacher.num_workers if cfg.learner.loss.kind != "full" else 0
    return max(cores, cores + teachers + cfg.learner.num_workers)


def model_spec(cfg: OPSDConfig) -> ModelSpec:
    m = cfg.model
    return ModelSpec(m.path, m.tokenizer, m.revision, m.trust_remote_code, m.dtype)


def new_rollout_worker(cfg: OPSDConfig, index: int, reservation: Reservation):
    """Rollout worker ``index`` in its bundle of the reservation (its engine starting; wait on ``info``)."""
    options = {**actor_options(cfg.rollout), **reservation.options_for("rollout", index)}
    return RolloutActor.options(**options).remote(model_spec(cfg), cfg.rollout, cfg.prompt, worker_index=index)


def new_teacher(cfg: OPSDConfig, index: int, reservation: Reservation):
    m = cfg.model
    return TeacherActor.options(**reservation.options_for("teacher", index)).remote(
        m.path, cfg.teacher, temperature=cfg.learner.loss.temperature, prompt=cfg.prompt, tokenizer_path=m.tokenizer,
        revision=m.revision, trust_remote_code=m.trust_remote_code,
        device="cpu" if reservation.plan.on_cpu else None)


def start_stages(cfg: OPSDConfig, total_steps: int, log: Callable[[str], None] = print) -> Stages:
    """The resource plan reserved (placement groups), then every stage actor started in its bundle; every wait is
    bounded by ``placement.placement_timeout_s``."""
    timeout = cfg.placement.placement_timeout_s
    plan = ResourcePlan.from_config(cfg, ClusterView.current())
    log(plan.describe())
    reservation = reserve(plan, timeout_s=timeout, autoscaling=cfg.placement.autoscaling, log=log)
    try:
        rollout = [new_rollout_worker(cfg, i, reservation) for i in range(plan.num_actors("rollout"))]
        teachers = [new_teacher(cfg, i, reservation) for i in range(plan.num_actors("teacher"))]
        ray.get([a.info.remote() for a in rollout] + [t.__ray_ready__.remote() for t in teachers], timeout=timeout)
        learner = LearnerGroup(
            cfg.model.path, cfg.learner, total_steps=total_steps, seed=cfg.train.seed,
            expected_top_k=cfg.teacher.top_k,
            full_teacher=FullTeacherSettings(cfg.prompt, cfg.teacher.max_context_tokens or 32_768,
                                             cfg.teacher.on_overlength),
            tokenizer_path=cfg.model.tokenizer, revision=cfg.model.revision,
            trust_remote_code=cfg.model.trust_remote_code,
            actor_options=reservation.stage_options("learner"), timeout_s=timeout,
        )
    except BaseException:
        reservation.release()  # removing the placement groups kills every actor placed in them
        raise
    return Stages(cfg, rollout, teachers, learner, reservation, log=log)
