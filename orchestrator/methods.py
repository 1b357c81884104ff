"""What a training step does for each ``train.method``: OPSD, and the SFT and GRPO baselines on the same stack.

    method = method_for(cfg)
    batch = method.launch(stages, problems)                    # OPSD, GRPO: sampling; SFT: the problems as they are
    rollouts = method.collect(stages, batch)                   # SFT: the problems table, nothing sampled
    inputs = method.learner_inputs(stages, rollouts, grader)   # OPSD: teacher scores; GRPO: rewards -> advantages
    stages.learner.train_step(inputs.tables, inputs.columns)

The loop (``orchestrator/train.py``) is the same for every method; only these pieces differ. docs/ARCHITECTURE.md
("Baselines: SFT and GRPO").
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Sequence

import pyarrow as pa

from opsd.schema import RolloutStats, parse_sample_id
from opsd.tables import TableRefs
from orchestrator.accuracy import StudentAccuracy
from rollout.pool import RolloutBatch, Rollouts, RolloutSummary
from teacher.pool import Scored

if TYPE_CHECKING:
    from orchestrator.config import OPSDConfig
    from orchestrator.stages import Stages

# GRPO's advantage: (r - mean) / (std + GRPO_STD_EPS) within a group, std with Bessel's correction (n - 1), as TRL's
# GRPOTrainer and verl's compute_grpo_outcome_advantage compute it. A group whose rewards are all equal gets 0.
GRPO_STD_EPS = 1e-6


@dataclass
class ProblemBatch:
    """SFT's batch in flight: the step's problems, which it trains on as they are (nothing is sampled)."""

    problems: pa.Table

    @property
    def num_rows(self) -> int:
        return self.problems.num_rows


@dataclass
class LearnerInputs:
    """What one learner step gets, and what the step record reports about how it was made."""

    tables: TableRefs  # the step table's shards in the object store
    scored: Scored  # the teacher's summary (rows it skipped, tokens it ran); empty without a teacher
    columns: pa.Table | None = None  # per-row values the ranks join on by sample id (GRPO: advantage)
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds: "teacher" (OPSD), "reward" (GRPO)
    accuracy: Future | None = None  # the traces' accuracy metrics (train.student_accuracy)
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own step metrics (GRPO: rewards)


class Method:
    """One ``train.method``: how a step's batch is sampled and what the learner trains on."""

    name: ClassVar[str]
    samples: ClassVar[bool] = True  # the rollout workers sample traces every step
    data_fields: ClassVar[tuple[str, ...]] = ("problem", "solution")  # what every training row must have

    def launch(self, stages: Stages, problems: pa.Table) -> RolloutBatch | ProblemBatch:
        return stages.rollout.launch(problems)

    def collect(self, stages: Stages, batch: RolloutBatch | ProblemBatch) -> Rollouts:
        return stages.rollout.collect(batch)

    def learner_inputs(self, stages: Stages, rollouts: Rollouts, accuracy: StudentAccuracy | None) -> LearnerInputs:
        raise NotImplementedError


class OPSD(Method):
    """The teacher's scores on the traces (or the traces as they are, when the learner runs the teacher); the
    traces' answers graded in the background meanwhile."""

    name = "opsd"

    def learner_inputs(self, stages, rollouts, accuracy):
        graded = accuracy.submit(rollouts.summary) if accuracy is not None else None
        started = time.perf_counter()
        scored = stages.score(rollouts)
        return LearnerInputs(scored.tables, scored, seconds={"teacher": time.perf_counter() - started},
                             accuracy=graded)


class GRPO(Method):
    """Rewards from the run's grader (1: the final answer matches the problem's answer), advantages normalised
    within each prompt's group of rollout.n traces, sent to the learner ranks as a side table keyed by sample id."""

    name = "grpo"
    data_fields = ("problem", "answer")

    def learner_inputs(self, stages, rollouts, accuracy):
        if accuracy is None:
            raise ValueError("GRPO's rewards are the grader's verdicts: it needs train.student_accuracy")
        started = time.perf_counter()
        summary = rollouts.summary
        statuses = accuracy.grade(summary)
        rewards = grpo_rewards(summary.sample_ids, statuses)
        groups = group_advantages(summary.sample_ids, rewards)
        graded: Future = Future()
        graded.set_result(StudentAccuracy.metrics(statuses))
        columns = pa.table({"sample_id": pa.array(summary.sample_ids, pa.string()),
                            "advantage": pa.array(groups.advantages, pa.float64())})
        metrics = {"reward_mean": sum(rewards) / len(rewards) if rewards else math.nan,
                   "zero_advantage_groups": groups.zero / groups.count if groups.count else math.nan}
        return LearnerInputs(rollouts.tables, Scored(rollouts.tables, {}, 0), columns,
                             {"reward": time.perf_counter() - started}, graded, metrics)


class SFT(Method):
    """The problems table itself: the learner ranks tokenize each reference solution after its student prompt."""

    name = "sft"
    samples = False

    def launch(self, stages, problems):
        return ProblemBatch(problems)

    def collect(self, stages, batch):
        ids = tuple(batch.problems.column("sample_id").to_pylist())
        summary = RolloutSummary(ids, (), (), RolloutStats(prompts=len(ids), samples=0))
        return Rollouts(TableRefs.put(batch.problems), summary)

    def learner_inputs(self, stages, rollouts, accuracy):
        return LearnerInputs(rollouts.tables, Scored(rollouts.tables, {}, 0))


METHODS: dict[str, Method] = {m.name: m for m in (OPSD(), SFT(), GRPO())}


def method_for(cfg: OPSDConfig) -> Method:
    return METHODS[cfg.train.method]


# -- GRPO's rewards and advantages -----------------------------------------------------------------------------------
def grpo_rewards(sample_ids: Sequence[str], statuses: Sequence[str | None]) -> list[float]:
    """1.0 for a trace graded correct, 0.0 otherwise (wrong, no answer, grading timeout or error)."""
    missing = [sample for sample, status in zip(sample_ids, statuses) if status is None]
    if missing:
        raise ValueError(f"GRPO needs a reference answer for every trace; {missing[0]!r} has none")
    return [1.0 if status == "correct" else 0.0 for status in statuses]


class GroupAdvantages(NamedTuple):
    advantages: list[float]  # per trace, in the order given
    count: int  # groups (prompts)
    zero: int  # groups whose rewards are all equal: every advantage 0, no gradient


def group_advantages(sample_ids: Sequence[str], rewards: Sequence[float],
                     eps: float = GRPO_STD_EPS) -> GroupAdvantages:
    """GRPO's advantages: each reward minus its group's mean, divided by the group's standard deviation (Bessel's
    correction) plus ``eps``. A group is the traces of one prompt in one epoch: the sample ids ``ROW@eEPOCHrROLLOUT``
    that differ only in ROLLOUT. A group of one trace has advantage 0."""
    groups: OrderedDict[tuple[str, int], list[int]] = OrderedDict()
    for i, sample in enumerate(sample_ids):
        parsed = parse_sample_id(sample)
        if parsed is None:
            raise ValueError(f"sample id {sample!r} does not name its prompt (ROW@eEPOCHrROLLOUT): no GRPO group")
        groups.setdefault(parsed[:2], []).append(i)
    advantages = [0.0] * len(rewards)
    zero = 0
    for members in groups.values():
        values = [float(rewards[i]) for i in members]
        if all(v == values[0] for v in values):
            zero += 1
            continue  # all equal: every advantage is exactly 0
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        for i, v in zip(members, values):
            advantages[i] = (v - mean) / (std + eps)
    return GroupAdvantages(advantages, len(groups), zero)
