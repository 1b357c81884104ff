"""The OPSD training loop on Ray: rollout -> teacher -> learner -> adapter push, one step after another.

    opsd train --config recipes/tiny-cpu.yaml [key=value ...]
    ray job submit --working-dir . -- python -m orchestrator.train --config recipes/tiny-cpu.yaml

With no cluster address (``placement.address`` / ``RAY_ADDRESS``) an embedded single-node Ray starts on 127.0.0.1
with its dashboard; otherwise the job attaches to the cluster. The orchestrator moves tables and object refs; all
model work happens in the stage actors:

    problems (EpochSampler) -> RolloutWorker actors (vLLM, policy vN)  -> rollout table
                            -> TeacherScorer actors (frozen base + solution) -> scored table   [not for kind 'full']
                            -> LearnerGroup (DeepSpeed LoRA, GJS)      -> adapter vN+1 -> every RolloutWorker

``train.max_staleness`` 0 (the paper): the rollouts of step n+1 start after adapter n+1 is loaded. 1: they start
right after the rollouts of step n, on adapter n, and overlap the teacher and learner of step n.
Outputs go to ``train.run_dir``: ``config.yaml``, ``metrics.jsonl``, ``adapters/vN/`` (PEFT directories),
``checkpoints/step-N/``, ``summary.json``. The actors and the calls on them live in :mod:`orchestrator.stages`.
"""

from __future__ import annotations

from orchestrator.cluster import ray_session  # noqa: I001 - first: sets Ray's listener address before ray's import

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Sequence  # noqa: E402

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from learner.group import read_client_state  # noqa: E402
from opsd.adapter import write_adapter_dir  # noqa: E402
from opsd.atomic import write_text_atomic  # noqa: E402
from opsd.configlib import ConfigError  # noqa: E402
from orchestrator.config import OPSDConfig, load_config, save_config  # noqa: E402
from orchestrator.data import load_dataset  # noqa: E402
from orchestrator.metrics import MetricsSink, read_metrics, run_throughput  # noqa: E402
from orchestrator.sampler import Cursor, EpochSampler  # noqa: E402
from orchestrator.stages import logical_cpus, start_stages  # noqa: E402
from rollout.table import rollout_stats  # noqa: E402


@dataclass
class TrainingData:
    """The training rows in epoch order, the held-out problems, and how many steps the run takes."""

    sampler: EpochSampler
    held_out: pa.Table | None
    total_steps: int
    description: str


def prepare_data(cfg: OPSDConfig) -> TrainingData:
    """Load and check the data (bad input fails here, before any actor starts); hold out the last rows."""
    problems, report = load_dataset(cfg.data, required=("problem", "solution"))
    held_out = None
    if cfg.train.eval_rows:
        if cfg.train.eval_rows >= problems.num_rows:
            raise ConfigError("train.eval_rows", f"{cfg.train.eval_rows} held-out rows leave no training rows of "
                              f"the {problems.num_rows} in {report.path}")
        held_out = EpochSampler(problems.slice(problems.num_rows - cfg.train.eval_rows), cfg.train.eval_rows,
                                seed=0).next_batch()
        problems = problems.slice(0, problems.num_rows - cfg.train.eval_rows)
    sampler = EpochSampler(problems, cfg.train.prompts_per_step, cfg.train.seed)
    total_steps = cfg.train.steps or cfg.train.epochs * sampler.steps_per_epoch
    return TrainingData(sampler, held_out, total_steps, f"{problems.num_rows} problems from {report.path}")


@dataclass
class ResumePoint:
    """Where a resumed run picks up: read from the checkpoint's ``client_state.json`` before any actor starts."""

    checkpoint: Path
    step: int  # steps already done
    cursor: Cursor
    heldout_gjs: dict[int, float]


def find_resume_point(cfg: OPSDConfig, total_steps: int) -> ResumePoint | None:
    resume = cfg.train.resume
    if resume is None:
        return None
    if resume == "latest":
        candidates = [p for p in (Path(cfg.train.run_dir) / "checkpoints").glob("step-*") if p.name[5:].isdigit()]
        if not candidates:
            raise ConfigError("train.resume", f"'latest': no checkpoint in {Path(cfg.train.run_dir) / 'checkpoints'}")
        checkpoint = max(candidates, key=lambda p: int(p.name[5:]))
    else:
        checkpoint = Path(resume)
    try:
        state = read_client_state(checkpoint)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ConfigError("train.resume", str(e)) from None
    if state["group_step"] >= total_steps:
        raise ConfigError("train.resume", f"{checkpoint} is at step {state['group_step']}: nothing left of the "
                          f"{total_steps} steps this config runs (raise train.steps or train.epochs)")
    return ResumePoint(checkpoint.resolve(), state["group_step"], Cursor(**state["cursor"]),
                       {int(k): v for k, v in state.get("heldout_gjs", {}).items()})


def train(cfg: OPSDConfig, print_fn=print) -> Path:
    """Run the whole training job; returns the run directory."""
    run_dir = Path(cfg.train.run_dir)
    data = prepare_data(cfg)
    resume = find_resume_point(cfg, data.total_steps)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    sampler, total_steps, first_step = data.sampler, data.total_steps, 0
    print_fn(f"opsd: {data.description}; {total_steps} steps of {cfg.train.prompts_per_step} prompts; "
             f"loss {cfg.learner.loss.kind}; run dir {run_dir}")
    evaluator = benchmark_evaluator(cfg)  # bad benchmark files fail here, before Ray starts
    with ray_session(cfg.placement.address, num_cpus=logical_cpus(cfg)) as session:
        print_fn(f"opsd: Ray {session.where}" + (f"; dashboard {session.dashboard}" if session.dashboard else ""))
        stages = start_stages(cfg, total_steps, log=print_fn)
        evaluations: dict[int, float] = {}
        benchmarks: dict[int, dict[str, float]] = {}
        sink = None
        try:
            held_table = None
            if data.held_out is not None:  # traces of the initial policy, scored once: the same table before and after
                held_table = stages.score(stages.collect_rollouts(stages.launch_rollouts(data.held_out)))[0]
            if resume is not None:
                stages.learner.load_checkpoint(resume.checkpoint)
                sampler.cursor, first_step, evaluations = resume.cursor, resume.step, dict(resume.heldout_gjs)
                payload = stages.learner.export_adapter()
                stages.push_adapter(payload)
                print_fn(f"opsd: resumed from {resume.checkpoint} at step {first_step} (adapter v{payload.version})")
            sink = MetricsSink(run_dir, keep_steps_up_to=first_step if resume is not None else None)
            if held_table is not None and 0 not in evaluations:
                evaluations[0] = stages.learner.evaluate(held_table)
                print_fn(f"opsd: held-out GJS before training: {evaluations[0]:.5f} ({held_table.num_rows} traces)")
            if evaluator is not None and resume is None:
                benchmarks[0] = run_benchmarks(evaluator, stages, 0, print_fn)
            in_flight_from = sampler.cursor  # the data position of the batch in flight: where a resume restarts
            pending = stages.launch_rollouts(sampler.next_batch())
            for step in range(first_step, total_steps):
                started = time.perf_counter()
                rollouts = stages.collect_rollouts(pending)
                rollout_seconds = time.perf_counter() - started
                last = step == total_steps - 1
                if cfg.train.max_staleness == 1 and not last:
                    in_flight_from = sampler.cursor
                    pending = stages.launch_rollouts(sampler.next_batch())  # overlaps teacher + learner of this step
                t0 = time.perf_counter()
                scored, teacher_skipped, teacher_tokens = stages.score(rollouts)
                teacher_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                learned = stages.learner.train_step(scored)
                learner_seconds = time.perf_counter() - t0
                t0 = time.perf_counter()
                payload = stages.learner.export_adapter()
                if not learned.skipped:
                    stages.push_adapter(payload)
                sync_seconds = time.perf_counter() - t0
                benchmark_metrics = {}
                if evaluator is not None and (last or (step + 1) % cfg.eval.every == 0):
                    benchmark_metrics = benchmarks[step + 1] = run_benchmarks(evaluator, stages, step + 1, print_fn)
                if cfg.train.max_staleness == 0 and not last:
                    in_flight_from = sampler.cursor
                    pending = stages.launch_rollouts(sampler.next_batch())
                record = step_record(step, sampler, rollouts, learned, teacher_skipped, teacher_tokens,
                                     dict(rollout=rollout_seconds, teacher=teacher_seconds, learner=learner_seconds),
                                     sync_seconds, time.perf_counter() - started, stages.learner.version)
                record["rows_in_flight"] = 0 if last else pending.num_rows  # the next step's, already sampling
                record["workers_replaced"] = sum(stages.replaced.values())
                record.update(benchmark_metrics)
                if held_table is not None and (last or (cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0)):
                    evaluations[step + 1] = record["heldout_gjs"] = stages.learner.evaluate(held_table)
                sink.record(record)
                print_fn(progress_line(record, total_steps))
                every = cfg.train.checkpoint_every
                if (every and (step + 1) % every == 0) or last:
                    write_adapter_dir(payload, run_dir / "adapters" / f"v{payload.version}")
                if every and (step + 1) % every == 0:
                    # The rollouts in flight are not part of the checkpoint: a resumed run samples them again, on
                    # the checkpoint's adapter, from the cursor they started at.
                    cursor = sampler.cursor if last else in_flight_from
                    stages.learner.save_checkpoint(run_dir / "checkpoints" / f"step-{step + 1}",
                                                   {"cursor": cursor.__dict__, "heldout_gjs": evaluations})
        finally:
            if sink is not None:
                sink.close()
            if evaluator is not None:
                evaluator.close()
            stages.shutdown()
    throughput = run_throughput(read_metrics(run_dir))
    summary = {"steps": total_steps, "final_adapter_version": stages.learner.version, "run_dir": str(run_dir),
               "heldout_gjs": evaluations, "tokens_per_second": throughput, "eval": benchmarks}
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    if evaluations:
        first, final = evaluations[0], evaluations[max(evaluations)]
        print_fn(f"opsd: held-out GJS {first:.5f} before, {final:.5f} after ({(final - first) / first:+.1%})")
    print_fn("opsd: tokens/s over the run: " + ", ".join(f"{stage} {rate:,.0f}" for stage, rate in throughput.items()))
    print_fn(f"opsd: run directory {run_dir.resolve()} (curves: opsd plot {run_dir})")
    return run_dir


def benchmark_evaluator(cfg: OPSDConfig):
    """The in-training evaluator (``eval.every`` > 0): benchmarks loaded and checked, prompts checked against the
    engines' context; None when off."""
    if not cfg.eval.every:
        return None
    from opsd.hf import load_tokenizer
    from orchestrator.evaluation.run import Evaluator, model_context
    from orchestrator.stages import model_spec

    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path, cfg.model.revision, cfg.model.trust_remote_code)
    evaluator = Evaluator(cfg.eval, tokenizer)
    try:
        evaluator.check_prompts(cfg.prompt, cfg.rollout.max_model_len or model_context(model_spec(cfg)))
    except BaseException:
        evaluator.close()
        raise
    return evaluator


def run_benchmarks(evaluator, stages, step: int, print_fn) -> dict[str, float]:
    """Evaluate what the rollout workers serve now; flat ``eval/<benchmark>/<metric>`` numbers."""
    result = evaluator.run(stages.rollout)
    metrics = result.metrics()
    n = evaluator.config.n
    scores = ", ".join(f"{name} avg@{n} {metrics[f'eval/{name}/avg@{n}']:.3f} "
                       f"[{metrics[f'eval/{name}/avg@{n}_ci95_low']:.3f}, {metrics[f'eval/{name}/avg@{n}_ci95_high']:.3f}]"
                       for name in result.benchmarks)
    print_fn(f"opsd: eval after step {step}: {scores} ({metrics.get('eval/seconds', 0.0):.0f} s)")
    return metrics


def step_record(step, sampler, rollouts, learned, teacher_skipped, teacher_tokens, seconds, sync_seconds, total,
                adapter_version):
    stats = rollout_stats(rollouts)
    lengths = pc.list_value_length(rollouts.column("response_ids")).to_pylist() or [0]
    versions = set(rollouts.column("policy_version").to_pylist())
    record = {
        "step": step + 1, "epoch": sampler.cursor.epoch, "loss": learned.loss, "gjs": learned.gjs,
        "grad_norm": learned.grad_norm, "learning_rate": learned.lr, "tokens": learned.tokens,
        "rows": rollouts.num_rows, "skipped": learned.skipped, "skip_reason": learned.skip_reason,
        "skipped_rows": stats.skipped + sum(teacher_skipped.values()) + sum(learned.skipped_rows.values()),
        "sample_ids": rollouts.column("sample_id").to_pylist(), "policy_versions": sorted(versions),
        "policy_staleness": learned.staleness_mean, "step_seconds": total, "adapter_sync_seconds": sync_seconds,
        "rollout_length_mean": sum(lengths) / len(lengths),
        "truncation_rate": stats.truncated / max(stats.samples, 1),
        "adapter_version": adapter_version,
    }
    stage_tokens = {"rollout": stats.generated_tokens, "teacher": teacher_tokens, "learner": learned.tokens}
    for stage, secs in seconds.items():
        record[f"stage_seconds/{stage}"] = secs
        record[f"tokens_per_second/{stage}"] = stage_tokens[stage] / secs if secs > 0 else 0.0
    return record


def progress_line(r: dict, total_steps: int) -> str:
    return (f"step {r['step']}/{total_steps} | loss {r['loss']:.5f} | gjs {r['gjs']:.5f} | "
            f"tok/s rollout {r['tokens_per_second/rollout']:,.0f} teacher {r['tokens_per_second/teacher']:,.0f} "
            f"learner {r['tokens_per_second/learner']:,.0f} | {r['step_seconds']:.1f} s"
            + (f" | skipped: {r['skip_reason']}" if r["skipped"] else ""))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="opsd train", description="Train with OPSD (see orchestrator/train.py).")
    parser.add_argument("--config", default=None, help="YAML config (recipes/ has examples)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    train(load_config(args.config, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
