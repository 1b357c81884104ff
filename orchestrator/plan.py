"""``opsd plan``: what a config will ask of a cluster, printed before anything starts.

    opsd plan --config recipes/opsd-qwen3-1.7b.yaml [--nodes 1 --gpus-per-node 8]

The resource plan (pools, bundles, placement groups), whether it fits the cluster described, the batch each actor
gets per step, where the teacher runs, and the keys that have no effect in this run.
"""

from __future__ import annotations

import math

from orchestrator.config import OPSDConfig, ineffective_keys
from orchestrator.placement import ClusterView, ResourcePlan, fit_problems


def describe_run(cfg: OPSDConfig, cluster: ClusterView, node_cores: int | None = None) -> str:
    """``node_cores``: the cores a node's CPU engines split (default: this machine's)."""
    plan = ResourcePlan.from_config(cfg, cluster, node_cores=node_cores)
    lines = [plan.describe()]
    problems = fit_problems(plan, cluster)
    lines.append(f"cluster: {cluster.describe()}: " + ("the plan fits" if not problems else "the plan does NOT fit:"))
    lines.extend(f"  - {p}" for p in problems)
    rows = cfg.train.prompts_per_step * cfg.rollout.n
    kind = cfg.learner.loss.loss_kind
    rollout, learner = plan.num_actors("rollout"), plan.num_actors("learner")
    method = cfg.train.method
    if method == "sft":
        lines.append(f"step: {cfg.train.prompts_per_step} reference solutions (up to "
                     f"{cfg.rollout.max_response_tokens} tokens) after their student prompts; "
                     f"~{math.ceil(cfg.train.prompts_per_step / learner)} per learner rank; nothing sampled"
                     + (" (rollout workers for evaluation only)" if rollout else ""))
    else:
        lines.append(f"step: {cfg.train.prompts_per_step} prompts x {cfg.rollout.n} rollouts = {rows} traces of up to "
                     f"{cfg.rollout.max_response_tokens} tokens; ~{math.ceil(rows / rollout)} per rollout engine, "
                     f"~{math.ceil(rows / learner)} per learner rank")
    if method != "opsd":
        what = "cross-entropy on the reference solutions" if method == "sft" else \
            f"rewards graded against each answer, the clipped policy gradient (clip_eps {cfg.grpo.clip_eps})"
        lines.append(f"teacher: none (train.method={method}: {what})")
    elif kind.needs_teacher_stage:
        lines.append(f"teacher: {plan.num_actors('teacher')} teacher actor(s), top-{cfg.teacher.top_k} + tail sent "
                     f"to the learner (loss {kind.name})")
    else:
        lines.append(f"teacher: the frozen base inside each learner rank (loss {kind.name}: no teacher actors)")
    steps = f"{cfg.train.steps} steps" if cfg.train.steps else f"{cfg.train.epochs} epoch(s) of the data"
    every = {what: f"every {n} steps" if n else "never" for what, n in
             (("checkpoints", cfg.train.checkpoint_every), ("evaluation", cfg.eval.every))}
    lines.append(f"run: {steps}; checkpoints {every['checkpoints']}; evaluation on eval sets {every['evaluation']}")
    lines.extend(f"warning: {note}" for note in ineffective_keys(cfg, on_cpu=plan.on_cpu))
    return "\n".join(lines)


def cluster_of(nodes: int, gpus_per_node: float, cpus_per_node: float) -> ClusterView:
    return ClusterView(tuple({"GPU": float(gpus_per_node), "CPU": float(cpus_per_node)} for _ in range(nodes)))
