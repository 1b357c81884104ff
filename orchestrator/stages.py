"""The stage pools of a training run, started in the resource plan's bundles, and stopped together; and the run's
method (``orchestrator.methods``), which says what a step samples and what the learner trains on.

    stages = Stages.start(cfg, total_steps)
    rollouts = stages.collect(stages.launch(problems))    # SFT: the problems, nothing sampled
    inputs = stages.learner_inputs(rollouts, grader)      # OPSD: the teacher's scores; GRPO: rewards, advantages
    metrics = stages.learner.train_step(inputs.tables, inputs.columns)
    stages.push_adapter(stages.learner.export_adapter())  # the rollout workers; with teacher.kind=ema the teacher's
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from learner.group import FullTeacherSettings, LearnerGroup
from opsd.lora import engine_lora_rank
from opsd.adapter import AdapterPayload
from orchestrator.accuracy import StudentAccuracy
from orchestrator.config import OPSDConfig
from orchestrator.methods import LearnerInputs, Method, ProblemBatch, method_for
from orchestrator.placement import ClusterView, Reservation, ResourcePlan, reserve
from rollout.pool import RolloutBatch, RolloutPool, Rollouts
from teacher.pool import Scored, TeacherPool


def new_learner_group(cfg: OPSDConfig, total_steps: int, reservation: Reservation,
                      log_dir: str | None = None) -> LearnerGroup:
    return LearnerGroup(
        cfg.model, cfg.learner, total_steps=total_steps, seed=cfg.train.seed, expected_top_k=cfg.teacher.top_k,
        full_teacher=FullTeacherSettings(cfg.prompt, teacher_context_tokens(cfg), cfg.teacher.on_overlength),
        ema_decay=cfg.teacher.ema_decay if cfg.teacher.kind == "ema" else None, objective=cfg.learner_objective(),
        actor_options=reservation.stage_options("learner"), timeout_s=cfg.train.stage_timeout_s,
        log_dir=log_dir, torch_threads=cpu_threads(cfg, reservation.plan, "learner"),
    )


def cpu_threads(cfg: OPSDConfig, plan: ResourcePlan, stage: str) -> int | None:
    """On CPU with max_staleness 0 the stages run one after another: each actor of the stage running may use its
    share of every core, not just the one CPU its bundle reserves. None elsewhere (GPU, or overlapping stages)."""
    if not plan.on_cpu or cfg.train.max_staleness != 0:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, plan.num_actors(stage)))


def teacher_context_tokens(cfg: OPSDConfig) -> int:
    """The longest teacher context: teacher.max_context_tokens, else the model's own maximum (what the teacher
    actors use too), so the learner's in-process teacher applies the same length policy."""
    return cfg.teacher.max_context_tokens or cfg.model.context_length() or 32_768


@dataclass
class Stages:
    rollout: RolloutPool | None  # None for SFT without evaluation (eval.every 0): nothing is ever sampled
    teacher: TeacherPool | None  # None when the loss kind runs the teacher inside the learner, or with no teacher
    learner: LearnerGroup
    reservation: Reservation
    method: Method
    log_dir: str | None = None

    @classmethod
    def start(cls, cfg: OPSDConfig, total_steps: int, log: Callable[[str], None] = print,
              log_dir: str | None = None) -> Stages:
        """Reserve the plan's placement groups (bounded by ``placement.placement_timeout_s``), then start every
        pool's actors in their bundles (each call bounded by ``train.stage_timeout_s``). The pools start together:
        the rollout engines and the teacher load while the learner ranks set up, then each is awaited (each
        process's start is mostly single-threaded imports and loading, so starting them one after another would
        leave cores idle). Where pools may share a GPU, the rollout engines are up first: vLLM sizes its KV cache
        from the GPU's free memory, which the teacher and learner must not change while it measures. ``log_dir``:
        every actor's output goes to a file of its own there."""
        plan = ResourcePlan.from_config(cfg, ClusterView.current())
        log(plan.describe())
        reservation = reserve(plan, timeout_s=cfg.placement.placement_timeout_s,
                              autoscaling=cfg.placement.autoscaling, log=log)
        timeout = cfg.train.stage_timeout_s
        try:
            rollout = None
            if plan.num_actors("rollout"):
                rollout = RolloutPool(cfg.model, cfg.rollout, cfg.prompt,
                                      actor_options=reservation.stage_options("rollout"),
                                      max_lora_rank=engine_lora_rank(cfg.learner.lora.rank), call_timeout_s=timeout,
                                      log=log, log_dir=log_dir, wait=plan.shares_gpus)
            teacher = None
            if plan.num_actors("teacher"):
                teacher = TeacherPool(cfg.model, cfg.teacher, cfg.prompt, temperature=cfg.learner.loss.tau,
                                      actor_options=reservation.stage_options("teacher"),
                                      device="cpu" if plan.on_cpu else None, call_timeout_s=timeout, log=log,
                                      log_dir=log_dir, torch_threads=cpu_threads(cfg, plan, "teacher"), wait=False)
            learner = new_learner_group(cfg, total_steps, reservation, log_dir)
            for pool in (rollout, teacher):
                if pool is not None:
                    pool.wait_ready()
        except BaseException:
            reservation.release()  # removing the placement groups kills every actor placed in them
            raise
        return cls(rollout, teacher, learner, reservation, method_for(cfg), log_dir)

    # -- the method's pieces of a step ---------------------------------------------------------------------------
    def launch(self, problems: pa.Table) -> RolloutBatch | ProblemBatch:
        """Start a step's batch: sampling on the rollout workers (SFT: nothing to sample)."""
        return self.method.launch(self, problems)

    def collect(self, batch: RolloutBatch | ProblemBatch) -> Rollouts:
        return self.method.collect(self, batch)

    def learner_inputs(self, rollouts: Rollouts, accuracy: StudentAccuracy | None) -> LearnerInputs:
        return self.method.learner_inputs(self, rollouts, accuracy)

    def push_adapter(self, payload: AdapterPayload | None) -> None:
        """Serve ``payload`` (None: the base model) on the rollout workers, if any; with an EMA teacher, the
        learner's EMA adapter on the teacher actors."""
        if self.rollout is not None:
            self.rollout.load_adapter(payload)
        self.sync_teacher()

    # -- the stages ------------------------------------------------------------------------------------------------
    def score(self, rollouts: Rollouts) -> Scored:
        """The teacher's columns for the rollouts, or the rollouts as they are when the learner is the teacher."""
        if self.teacher is None:
            return Scored(rollouts.tables, {}, 0)
        return self.teacher.score(rollouts.tables)

    def sync_teacher(self) -> None:
        """With an EMA teacher and teacher actors, load the learner's EMA adapter on them (after an applied step,
        and on resume). The full-vocabulary kind's in-process teacher uses the learner's EMA itself."""
        if self.teacher is not None and self.learner.ema_decay is not None:
            self.teacher.load_adapter(self.learner.export_teacher_adapter())

    def restart_learner(self, cfg: OPSDConfig, total_steps: int) -> None:
        """A new learner group in the same bundles (its state comes from a checkpoint: the caller loads it)."""
        self.learner.shutdown()
        self.learner = new_learner_group(cfg, total_steps, self.reservation, self.log_dir)

    @property
    def replaced(self) -> int:
        return (self.rollout.replaced if self.rollout is not None else 0) + \
            (self.teacher.replaced if self.teacher is not None else 0)

    def shutdown(self) -> None:
        try:
            self.learner.shutdown()
            if self.rollout is not None:
                self.rollout.shutdown()
            if self.teacher is not None:
                self.teacher.shutdown()
        finally:
            self.reservation.release()
