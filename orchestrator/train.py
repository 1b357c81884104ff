"""The OPSD training loop on Ray: rollout -> teacher -> learner -> adapter push, one step after another. The SFT and
GRPO baselines (train.method) run the same loop with their own pieces (:mod:`orchestrator.methods`).

    opsd train --config recipes/tiny-cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python -m orchestrator.train --config recipes/tiny-cpu.yaml

The loop holds the stage pools (:mod:`orchestrator.stages`), passes object refs from pool to pool and reads back
only metrics. The steps and outputs: docs/ARCHITECTURE.md ("The loop"); staleness: ("Adapters"); resuming:
("Failures and resuming").
"""

from __future__ import annotations

from orchestrator.cluster import ray_session  # noqa: I001 - first: sets Ray's listener address before ray's import

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from concurrent.futures import Future  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from learner.group import GroupStepMetrics, LearnerLost, read_client_state  # noqa: E402
from opsd.adapter import AdapterPayload, write_adapter_dir  # noqa: E402
from opsd.atomic import write_text_atomic  # noqa: E402
from opsd.configlib import ConfigError  # noqa: E402
from orchestrator.config import OPSDConfig, ineffective_keys, load_config, save_config  # noqa: E402
from opsd.curriculum import difficulty_scores  # noqa: E402
from opsd.data import DataError, load_dataset  # noqa: E402
from orchestrator.metrics import MetricsSink, read_metrics, run_throughput  # noqa: E402
from orchestrator import checkpoints  # noqa: E402
from orchestrator.accuracy import StudentAccuracy  # noqa: E402
from orchestrator.methods import method_for  # noqa: E402
from orchestrator.placement import logical_cpus  # noqa: E402
from orchestrator.sampler import Cursor, EpochSampler  # noqa: E402
from orchestrator.stages import Stages  # noqa: E402
from orchestrator.tracking import Trackers  # noqa: E402
from rollout.pool import Rollouts  # noqa: E402
from teacher.pool import Scored  # noqa: E402


@dataclass
class TrainingData:
    """The training rows in epoch order, the held-out problems, and how many steps the run takes."""

    sampler: EpochSampler
    held_out: pa.Table | None
    total_steps: int
    description: str


def prepare_data(cfg: OPSDConfig) -> TrainingData:
    """Load and check the data (bad input fails here, before any actor starts); hold out the last rows."""
    method = method_for(cfg)
    try:
        problems, report = load_dataset(cfg.data, required=method.data_fields)
    except DataError as e:
        raise DataError(f"train.method={method.name} needs {' and '.join(method.data_fields)} in every row: {e}") \
            from None
    held_out = None
    if cfg.train.heldout_rows:
        if cfg.train.heldout_rows >= problems.num_rows:
            raise ConfigError("train.heldout_rows", f"{cfg.train.heldout_rows} held-out rows leave no training rows "
                              f"of the {problems.num_rows} in {report.path}")
        held_out = EpochSampler(problems.slice(problems.num_rows - cfg.train.heldout_rows), cfg.train.heldout_rows,
                                seed=0).next_batch()
        problems = problems.slice(0, problems.num_rows - cfg.train.heldout_rows)
    difficulty = difficulty_scores(problems, cfg.data.order, cfg.data.difficulty)
    sampler = EpochSampler(problems, cfg.train.prompts_per_step, cfg.train.seed, difficulty=difficulty)
    total_steps = cfg.train.steps or cfg.train.epochs * sampler.steps_per_epoch
    order = "" if difficulty is None else (
        f", easiest first by {'solution length' if cfg.data.difficulty is None else 'base pass rate'}")
    return TrainingData(sampler, held_out, total_steps, f"{problems.num_rows} problems from {report.path}{order}")


@dataclass
class ResumePoint:
    """Where a resumed run picks up: read from the checkpoint's ``client_state.json`` before any actor starts."""

    checkpoint: Path
    step: int  # steps already done
    cursor: Cursor
    heldout_gjs: dict[int, float]
    generated_tokens: int = 0  # training tokens sampled up to the checkpoint


def find_resume_point(cfg: OPSDConfig, total_steps: int, log: Callable[[str], None] = print) -> ResumePoint | None:
    """The checkpoint to continue from, verified against its manifest: ``latest`` skips (and reports) newer ones that
    do not verify; a directory given by path must verify."""
    resume = cfg.train.resume
    if resume is None:
        return None
    if resume == "latest":
        checkpoint = checkpoints.newest_valid(cfg.train.run_dir, log)
        if checkpoint is None:
            raise ConfigError("train.resume", f"'latest': no complete checkpoint in "
                              f"{Path(cfg.train.run_dir) / 'checkpoints'}")
    else:
        checkpoint = Path(resume)
        problem = checkpoints.verify(checkpoint) if checkpoint.is_dir() else None
        if problem is not None:
            raise ConfigError("train.resume", f"{checkpoint} cannot be resumed from: {problem}")
    try:
        state = read_client_state(checkpoint)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError("train.resume", str(e)) from None
    if state["group_step"] >= total_steps:
        raise ConfigError("train.resume", f"{checkpoint} is at step {state['group_step']}: nothing left of the "
                          f"{total_steps} steps this config runs (raise train.steps or train.epochs)")
    return ResumePoint(checkpoint.resolve(), state["group_step"], Cursor(**state["cursor"]),
                       {int(k): v for k, v in state.get("heldout_gjs", {}).items()},
                       state.get("generated_tokens_total", 0))


@dataclass(frozen=True)
class AfterStep:
    """What follows step ``done`` besides the update. Decided here, once, for every step (the last one included)."""

    launch_next: bool  # sample the next step's problems
    eval_sets: bool  # evaluate on the eval section's eval sets
    heldout: bool  # the held-out GJS
    adapter: bool  # write adapters/vN
    checkpoint: bool

    @classmethod
    def of(cls, done: int, total: int, cfg: OPSDConfig) -> AfterStep:
        last = done == total

        def every(n: int) -> bool:
            return n > 0 and done % n == 0

        return cls(launch_next=not last, eval_sets=cfg.eval.every > 0 and (last or every(cfg.eval.every)),
                   heldout=cfg.train.heldout_rows > 0 and (last or every(cfg.train.heldout_every)),
                   adapter=last or every(cfg.train.checkpoint_every), checkpoint=every(cfg.train.checkpoint_every))


@dataclass
class InFlight:
    """A step's problems being sampled (SFT: just drawn), and the data cursor they were drawn from (where a resume
    samples them again: rollouts in flight are not part of a checkpoint)."""

    batch: Any  # RolloutBatch, or methods.ProblemBatch
    cursor: Cursor


@dataclass
class StepResult:
    rollouts: Rollouts
    scored: Scored
    learned: GroupStepMetrics
    adapter: AdapterPayload  # the learner's adapter after the step
    seconds: dict[str, float]
    sync_seconds: float
    next: InFlight | None  # the next step's batch, when it was launched before the update (max_staleness 1)
    accuracy: Future | None = None  # the traces' graded answers (train.student_accuracy), computed meanwhile
    method: str = "opsd"
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own (GRPO: reward_mean, ...)


def launch(stages: Stages, sampler: EpochSampler) -> InFlight:
    cursor = Cursor(**sampler.cursor.__dict__)
    return InFlight(stages.launch(sampler.next_batch()), cursor)


def train_step(stages: Stages, in_flight: InFlight, prefetch: Callable[[], InFlight] | None,
               accuracy: StudentAccuracy | None = None) -> StepResult:
    """One step: gather the rollouts in flight, score them, one learner update, the new adapter to every rollout
    worker. ``prefetch`` (max_staleness 1) launches the next batch right after the rollouts, on the old adapter;
    ``accuracy`` grades the traces' answers (in the background; GRPO waits: they are its rewards). The method's
    pieces (train.method): SFT samples nothing and trains on the problems; GRPO's learner input is advantages."""
    started = time.perf_counter()
    rollouts = stages.collect(in_flight.batch)
    seconds = {"rollout": time.perf_counter() - started} if stages.method.samples else {}
    following = prefetch() if prefetch is not None else None
    inputs = stages.learner_inputs(rollouts, accuracy)  # OPSD: the teacher's scores; GRPO: rewards -> advantages
    seconds.update(inputs.seconds)
    t0 = time.perf_counter()
    learned = stages.learner.train_step(inputs.tables, inputs.columns)
    seconds["learner"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    adapter = stages.learner.export_adapter()
    if not learned.skipped:
        stages.push_adapter(adapter)
    return StepResult(rollouts, inputs.scored, learned, adapter, seconds, time.perf_counter() - t0, following,
                      inputs.accuracy, stages.method.name, inputs.metrics)


@dataclass
class Progress:
    """What the run has measured so far: held-out GJS and eval-set results by step, training tokens sampled."""

    heldout_gjs: dict[int, float] = field(default_factory=dict)
    eval_sets: dict[int, dict[str, float]] = field(default_factory=dict)
    generated_tokens: int = 0

    def count_generated(self, record: dict) -> None:
        """Add the step's sampled tokens to the run's and write the running sum into the record."""
        self.generated_tokens += record["generated_tokens"]
        record["generated_tokens_total"] = self.generated_tokens


def train(cfg: OPSDConfig, print_fn=print, verbose: bool = False) -> Path:
    """Run the whole training job; returns the run directory. The terminal shows the plan, one line per step, the
    warnings and the summary; every actor's output goes to ``RUN_DIR/logs/`` (``verbose``: to the terminal too)."""
    run_dir = Path(cfg.train.run_dir)
    cfg.model.check()  # a model or tokenizer that cannot load fails here, before the data and any actor
    data = prepare_data(cfg)
    resume = find_resume_point(cfg, data.total_steps, print_fn)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    trackers = Trackers(cfg)  # tracking.backends: a package missing fails here, before Ray starts
    sampler, total_steps = data.sampler, data.total_steps
    what = f"loss {cfg.learner.loss.kind}" if cfg.train.method == "opsd" else f"method {cfg.train.method}"
    print_fn(f"opsd: {data.description}; {total_steps} steps of {cfg.train.prompts_per_step} prompts; "
             f"{what}; run dir {run_dir}")
    evaluator = evaluator_for(cfg)  # bad eval set files fail here, before Ray starts
    # GRPO waits for the grades (its rewards): more grading processes there.
    accuracy = StudentAccuracy(processes=1 if cfg.train.method != "grpo" else 4) if cfg.grades_traces else None
    progress = Progress()
    log_dir = None if verbose else str(run_dir / "logs")
    with trackers, ray_session(cfg.placement.address, num_cpus=logical_cpus(cfg), log_to_driver=verbose) as session:
        print_fn(f"opsd: Ray {session.where}" + (f"; dashboard {session.dashboard}" if session.dashboard else "")
                 + (f"; actor logs in {log_dir}" if log_dir else ""))
        stages = Stages.start(cfg, total_steps, log=print_fn, log_dir=log_dir)
        for note in ineffective_keys(cfg, on_cpu=stages.reservation.plan.on_cpu):
            print_fn(f"opsd: warning: {note}")
        loop = None
        try:
            # The held-out traces: sampled once from the initial policy and scored once, the same before and after.
            heldout = stages.score(stages.rollout.collect(stages.rollout.launch(data.held_out))).tables \
                if data.held_out is not None else None
            first_step = 0
            if resume is not None:
                first_step = restore(stages, sampler, resume, progress, print_fn)
            loop = Loop(cfg, stages, sampler, MetricsSink(run_dir, keep_steps_up_to=first_step if resume else None),
                        trackers, progress, evaluator, accuracy, heldout, total_steps, print_fn)
            if heldout is not None and 0 not in progress.heldout_gjs:
                progress.heldout_gjs[0] = stages.learner.evaluate(heldout)
                print_fn(f"opsd: held-out GJS before training: {progress.heldout_gjs[0]:.5f} "
                         f"({heldout.num_rows} traces)")
            if evaluator is not None and resume is None:
                progress.eval_sets[0] = run_eval_sets(evaluator, stages, 0, print_fn)
            trackers.log_metrics(0, {"heldout_gjs": progress.heldout_gjs.get(0), **progress.eval_sets.get(0, {})})
            loop.in_flight = launch(stages, sampler)
            loop.started = time.perf_counter()  # the time budget and the ETA count from here
            step = first_step
            while step < loop.total_steps:
                try:
                    run_step(loop, step)
                    step += 1
                except LearnerLost as lost:  # a rank died: rebuild the group and replay from the last checkpoint
                    step = recover_learner(loop, lost, resume)
        finally:
            if loop is not None:
                loop.sink.close()
            if evaluator is not None:
                evaluator.close()
            if accuracy is not None:
                accuracy.close()
            stages.shutdown()
        trackers.finish(finish(run_dir, loop.total_steps if loop is not None else total_steps,
                               stages.learner.version, progress, print_fn))
    return run_dir


@dataclass
class Loop:
    """What the steps of a run share."""

    cfg: OPSDConfig
    stages: Stages
    sampler: EpochSampler
    sink: MetricsSink
    trackers: Trackers
    progress: Progress
    evaluator: object | None
    accuracy: StudentAccuracy | None
    heldout: object | None  # the held-out traces' table refs
    total_steps: int
    print_fn: Callable[[str], None]
    in_flight: InFlight | None = None
    learner_restarts: int = 0
    started: float = field(default_factory=time.perf_counter)
    steps_done: int = 0  # in this process (the ETA's rate)


def run_step(loop: Loop, step: int) -> None:
    """Step ``step + 1``: the update, its record, and what follows it (evaluation, held-out GJS, outputs)."""
    cfg, stages, sampler = loop.cfg, loop.stages, loop.sampler
    budget = cfg.train.time_budget_s
    if budget is not None and step + 1 < loop.total_steps and time.perf_counter() - loop.started >= budget:
        loop.print_fn(f"opsd: time budget of {budget:.0f} s spent: step {step + 1} is the last")
        loop.total_steps = step + 1
    after = AfterStep.of(step + 1, loop.total_steps, cfg)
    prefetch = (lambda: launch(stages, sampler)) if after.launch_next and cfg.train.max_staleness else None
    result = train_step(stages, loop.in_flight, prefetch, loop.accuracy)
    loop.in_flight = result.next
    record = step_record(step, sampler, result, stages.learner.version, stages.replaced)
    loop.progress.count_generated(record)
    if result.accuracy is not None:
        record.update(result.accuracy.result(timeout=cfg.train.stage_timeout_s))
    if after.eval_sets:
        loop.progress.eval_sets[step + 1] = run_eval_sets(loop.evaluator, stages, step + 1, loop.print_fn)
        record.update(loop.progress.eval_sets[step + 1])
    if loop.in_flight is None and after.launch_next:
        loop.in_flight = launch(stages, sampler)
    record["rows_in_flight"] = loop.in_flight.batch.num_rows if loop.in_flight is not None else 0
    record["learner_restarts"] = loop.learner_restarts
    if after.heldout:
        loop.progress.heldout_gjs[step + 1] = record["heldout_gjs"] = stages.learner.evaluate(loop.heldout)
    loop.sink.record(record)
    loop.trackers.log_metrics(record["step"], record)
    loop.steps_done += 1
    elapsed = time.perf_counter() - loop.started
    eta = elapsed / loop.steps_done * (loop.total_steps - step - 1)
    if budget is not None:  # the budget ends the run first: about one step past it
        eta = min(eta, max(0.0, budget - elapsed) + elapsed / loop.steps_done)
    loop.print_fn(progress_line(record, loop.total_steps, eta_s=eta))
    save_outputs(stages, cfg, step + 1, after, result.adapter, sampler, loop.in_flight, loop.progress, loop.print_fn)


def recover_learner(loop: Loop, lost: LearnerLost, resumed_from: ResumePoint | None) -> int:
    """A new learner group, rewound with the whole loop to the newest checkpoint that verifies (or the run's
    start): the steps since are trained again with the same rows and seeds, so the run ends as if nothing happened.
    Returns the step to continue from."""
    cfg, stages = loop.cfg, loop.stages
    loop.learner_restarts += 1
    if loop.learner_restarts > cfg.train.learner_restarts:
        raise RuntimeError(f"a learner rank died {loop.learner_restarts} times (train.learner_restarts="
                           f"{cfg.train.learner_restarts}); resume with train.resume=latest") from lost
    if loop.in_flight is not None:  # rows sampled for a step that is now replayed: drop them
        stages.collect(loop.in_flight.batch)
    stages.restart_learner(cfg, loop.total_steps)
    checkpoint = checkpoints.newest_valid(cfg.train.run_dir, loop.print_fn)
    point = find_resume_point(replace(cfg, train=replace(cfg.train, resume=str(checkpoint))), loop.total_steps) \
        if checkpoint is not None else resumed_from
    if point is not None:
        step = restore(stages, loop.sampler, point, loop.progress, loop.print_fn)
    else:
        step = 0
        loop.sampler.cursor = Cursor()
        loop.progress.generated_tokens = 0
        stages.push_adapter(None)
    for measured in (loop.progress.heldout_gjs, loop.progress.eval_sets):
        for later in [s for s in measured if s > step]:
            del measured[later]
    loop.sink.close()
    loop.sink = MetricsSink(cfg.train.run_dir, keep_steps_up_to=step, run=loop.sink.run)
    loop.in_flight = launch(stages, loop.sampler)
    loop.print_fn(f"opsd: warning: {lost} (restart {loop.learner_restarts} of {cfg.train.learner_restarts}); the "
                  f"learner group was rebuilt and continues from step {step}")
    return step


def restore(stages: Stages, sampler: EpochSampler, resume: ResumePoint, progress: Progress, print_fn) -> int:
    """The learner state, data cursor and held-out GJS of a checkpoint; its adapter on the rollout workers."""
    stages.learner.load_checkpoint(resume.checkpoint)
    sampler.cursor = resume.cursor
    progress.heldout_gjs.update(resume.heldout_gjs)
    progress.generated_tokens = resume.generated_tokens
    version = stages.learner.version
    stages.push_adapter(stages.learner.export_adapter() if version else None)  # v0: the base model
    print_fn(f"opsd: resumed from {resume.checkpoint} at step {resume.step} (adapter v{version})")
    return resume.step


def save_outputs(stages: Stages, cfg: OPSDConfig, done: int, after: AfterStep, adapter: AdapterPayload,
                 sampler: EpochSampler, in_flight: InFlight | None, progress: Progress, print_fn) -> None:
    """The adapter directory and the checkpoint due after step ``done`` (complete with its manifest; older ones pruned
    as configured). A write that fails (a full disk) stops the run, or with ``train.checkpoint_failure=warn`` is
    reported and the run goes on; the previous checkpoints are intact either way."""
    run_dir = Path(cfg.train.run_dir)
    target = run_dir / "adapters" / f"v{adapter.version}"
    try:
        if after.adapter:
            write_adapter_dir(adapter, target)
        if after.checkpoint:
            target = checkpoints.checkpoint_dir(run_dir, done)
            cursor = in_flight.cursor if in_flight is not None else sampler.cursor
            stages.learner.save_checkpoint(target, {"cursor": cursor.__dict__, "heldout_gjs": progress.heldout_gjs,
                                                    "generated_tokens_total": progress.generated_tokens})
            checkpoints.prune(run_dir, cfg.train.keep_checkpoints,
                              progress.heldout_gjs if cfg.train.keep_best_checkpoint else None)
    except (OSError, ray.exceptions.RayTaskError) as exc:
        if isinstance(exc, ray.exceptions.RayTaskError) and not isinstance(exc.cause, OSError):
            raise
        error = checkpoints.write_failure(target, exc, run_dir)
        if cfg.train.checkpoint_failure != "warn":
            raise error from None
        print_fn(f"opsd: warning: {error} (train.checkpoint_failure=warn: the run goes on)")


def finish(run_dir: Path, total_steps: int, version: int, progress: Progress, print_fn) -> dict:
    throughput = run_throughput(read_metrics(run_dir))
    summary = {"steps": total_steps, "final_adapter_version": version, "run_dir": str(run_dir),
               "heldout_gjs": progress.heldout_gjs, "tokens_per_second": throughput, "eval": progress.eval_sets,
               "generated_tokens_total": progress.generated_tokens}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if progress.heldout_gjs:
        first, final = progress.heldout_gjs[0], progress.heldout_gjs[max(progress.heldout_gjs)]
        print_fn(f"opsd: held-out GJS {first:.5f} before, {final:.5f} after ({(final - first) / first:+.1%})")
    print_fn("opsd: tokens/s over the run: " + ", ".join(f"{stage} {rate:,.0f}" for stage, rate in throughput.items())
             + f"; {progress.generated_tokens:,} training tokens sampled")
    print_fn(f"opsd: run directory {run_dir.resolve()} (curves: opsd plot {run_dir})")
    return summary


def evaluator_for(cfg: OPSDConfig):
    """The in-training evaluator (``eval.every`` > 0): eval sets loaded and checked, prompts checked against the
    engines' context; None when off."""
    if not cfg.eval.every:
        return None
    from evaluation.run import Evaluator

    evaluator = Evaluator(cfg.eval, cfg.model.load_tokenizer())
    try:
        evaluator.check_prompts(cfg.rollout.max_model_len or cfg.model.context_length())
    except BaseException:
        evaluator.close()
        raise
    return evaluator


def run_eval_sets(evaluator, stages: Stages, step: int, print_fn) -> dict[str, float]:
    """Evaluate what the rollout workers serve now on the eval sets; flat ``eval/<set>/<metric>`` numbers."""
    result = evaluator.run(stages.rollout)
    metrics = result.metrics()
    n = evaluator.config.n
    scores = ", ".join(f"{name} avg@{n} {metrics[f'eval/{name}/avg@{n}']:.3f} "
                       f"[{metrics[f'eval/{name}/avg@{n}_ci95_low']:.3f}, {metrics[f'eval/{name}/avg@{n}_ci95_high']:.3f}]"
                       for name in result.eval_sets)
    print_fn(f"opsd: eval after step {step}: {scores} ({metrics.get('eval/seconds', 0.0):.0f} s)")
    return metrics


def step_record(step: int, sampler: EpochSampler, result: StepResult, adapter_version: int, replaced: int) -> dict:
    summary, learned = result.rollouts.summary, result.learned
    stats = summary.stats
    lengths = summary.response_lengths or (0,)
    sampled = stats.samples > 0  # SFT samples nothing: no rollout length or truncation to report
    record = {
        "step": step + 1, "epoch": sampler.cursor.epoch, "loss": learned.loss,
        "gjs": learned.gjs if result.method == "opsd" else None,  # SFT: loss is the NLL; GRPO: the clipped surrogate
        "grad_norm": learned.grad_norm, "learning_rate": learned.lr, "tokens": learned.tokens,
        "clip_fraction": learned.clip_fraction,
        "rows": summary.rows, "skipped": learned.skipped, "skip_reason": learned.skip_reason,
        "skipped_rows": stats.skipped + sum(result.scored.skipped.values()) + sum(learned.skipped_rows.values()),
        "sample_ids": list(summary.sample_ids), "policy_versions": sorted(set(summary.policy_versions)),
        "policy_staleness": learned.staleness_mean, "step_seconds": sum(result.seconds.values()) + result.sync_seconds,
        "adapter_sync_seconds": result.sync_seconds,
        "rollout_length_mean": sum(lengths) / len(lengths) if sampled else None,
        "truncation_rate": stats.truncated / stats.samples if sampled else None,
        # Training tokens the rollout workers sampled for this step (accuracy vs tokens: the efficiency axis).
        "generated_tokens": stats.generated_tokens,
        "adapter_version": adapter_version, "workers_replaced": replaced,
        # The teacher this step's table was scored with: 0 the base model, n the EMA after n applied steps.
        "teacher_version": result.scored.teacher_version if result.scored.teacher_version is not None
        else learned.teacher_version,
    }
    stage_tokens = {"rollout": stats.generated_tokens, "teacher": result.scored.tokens, "learner": learned.tokens}
    for stage, secs in result.seconds.items():  # the stages the method ran, and GRPO's reward grading
        record[f"stage_seconds/{stage}"] = secs
        if stage in stage_tokens:
            record[f"tokens_per_second/{stage}"] = stage_tokens[stage] / secs if secs > 0 else 0.0
    record.update(result.metrics)
    return record


def progress_line(r: dict, total_steps: int, eta_s: float | None = None) -> str:
    def number(key: str, fmt: str) -> str:
        value = r.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) and value == value else ""

    parts = [f"step {r['step']}/{total_steps}", f"loss {r['loss']:.5f}"]
    parts += [f"{label} {number(key, fmt)}" for label, key, fmt in
              (("gjs", "gjs", ".5f"), ("reward", "reward_mean", ".2f"), ("acc", "student_accuracy", ".2f"))
              if number(key, fmt)]
    rates = " ".join(f"{stage} {number(f'tokens_per_second/{stage}', ',.0f')}" for stage in ("rollout", "teacher",
                                                                                            "learner")
                     if number(f"tokens_per_second/{stage}", ",.0f"))
    parts += [f"tok/s {rates}", f"{r['step_seconds']:.1f} s"]
    if eta_s is not None and r["step"] < total_steps:
        parts.append(f"ETA {_duration(eta_s)}")
    return " | ".join(parts) + (f" | skipped: {r['skip_reason']}" if r["skipped"] else "")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsd train", description="Train with OPSD (see orchestrator/train.py).")
    parser.add_argument("--config", default=None, help="YAML config (recipes/ has examples)")
    parser.add_argument("--verbose", action="store_true", help="show every actor's output in the terminal too")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides), verbose=args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
