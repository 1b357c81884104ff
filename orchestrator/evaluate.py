"""``opsd eval``: every input checked first, then a RolloutPool started through the resource plan, the evaluation,
and the run directory written.

    result, path = evaluate(EvalConfig(sets=["aime24"]), EvalRun(model=ModelSpec("Qwen/Qwen3-1.7B"), out=...))

Checked before any engine starts: the eval sets, the output directory, the adapter against the base model, and the
prompt lengths against the engines' context. Engines run on an embedded Ray (or the cluster at ``RAY_ADDRESS``), one
per GPU (``tensor_parallel_size`` GPUs each) or per two CPU cores.
"""

from __future__ import annotations

from orchestrator.cluster import ray_session  # noqa: I001 - first: sets Ray's listener address before ray's import

import os  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from evaluation.config import EvalConfig  # noqa: E402
from evaluation.records import EvalResult  # noqa: E402
from evaluation.report import markdown_table, write_run  # noqa: E402
from evaluation.run import Evaluator, load_config_eval_sets  # noqa: E402
from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir  # noqa: E402
from opsd.configlib import to_dict, validate_all  # noqa: E402
from opsd.lora import VLLM_LORA_RANKS, engine_lora_rank  # noqa: E402
from opsd.model import ModelSpec  # noqa: E402
from orchestrator.placement import ClusterView, PlanRequest, PoolRequest, ResourcePlan, reserve  # noqa: E402
from rollout.config import RolloutConfig  # noqa: E402
from rollout.pool import RolloutPool  # noqa: E402


@dataclass
class EvalRun:
    """What ``opsd eval`` runs besides the EvalConfig: the model, the adapter, the engines and the output."""

    model: ModelSpec
    out: Path
    adapter: Path | None = None
    workers: int | None = None  # None: one per GPU (tensor_parallel_size GPUs each), or per 2 CPU cores
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's own
    cpu_kv_cache_gib: float = 2.0
    overwrite: bool = False
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS, else an embedded one
    start_timeout_s: float = 1800.0


def evaluate(config: EvalConfig, run: EvalRun, print_fn=print) -> tuple[EvalResult, Path]:
    """Check every input, start the engines, evaluate, write ``run.out``. Returns the result and the run
    directory."""
    started = time.perf_counter()
    validate_all(config)
    out = Path(run.out)
    if out.exists() and not run.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    eval_sets = load_config_eval_sets(config)
    with Evaluator(config, run.model.load_tokenizer(), eval_sets) as evaluator:
        evaluator.check_prompts(run.max_model_len or run.model.context_length())
        payload, lora_rank = checked_adapter(run)
        problems = sum(s.num_problems for s in evaluator.eval_sets)
        print_fn(f"opsd eval: {problems} problems x {config.n} samples from "
                 f"{', '.join(f'{s.name} ({s.num_problems})' for s in evaluator.eval_sets)}")
        with ray_session(run.address, num_cpus=len(os.sched_getaffinity(0)), dashboard=False):
            cluster = ClusterView.current()
            rollout = rollout_config(config, run, int(cluster.total("GPU")))
            plan = ResourcePlan.for_request(PlanRequest(
                (PoolRequest("rollout", rollout.num_workers, rollout.gpus_per_worker),),
                tensor_parallel_size=rollout.tensor_parallel_size,
                cpu_threads_per_worker=rollout.cpu_threads_per_worker), cluster)
            print_fn(f"opsd eval: {plan.describe()}")
            engines_started = time.perf_counter()
            with reserve(plan, timeout_s=run.start_timeout_s, log=print_fn) as reservation:
                pool = RolloutPool(run.model, rollout, config.prompt(), actor_options=reservation.stage_options("rollout"),
                                   max_lora_rank=lora_rank,
                                   call_timeout_s=run.start_timeout_s, log=print_fn)
                try:
                    engine_seconds = time.perf_counter() - engines_started
                    if payload is not None:
                        pool.load_adapter(payload)
                    print_fn(f"opsd eval: engines up in {engine_seconds:.0f} s; sampling")
                    result = evaluator.run(pool)
                finally:
                    pool.shutdown()
        result.seconds["engine_start"] = engine_seconds
        result.seconds["total"] = time.perf_counter() - started
        info: dict[str, Any] = {
            "model": run.model.path, "adapter": str(run.adapter) if run.adapter else None,
            "eval_set_files": {s.name: str(s.path) for s in evaluator.eval_sets},
            "prompt": to_dict(config.prompt()), "config": to_dict(config),
            "engines": {"workers": rollout.num_workers, "gpus_per_worker": rollout.gpus_per_worker,
                        "max_model_len": run.max_model_len},
        }
    path = write_run(out, result, info, overwrite=run.overwrite)
    print_fn(markdown_table(result.eval_sets), end="")
    print_fn(f"opsd eval: generate {result.seconds['generate']:.1f} s, grade {result.seconds['grade']:.1f} s, "
             f"total {result.seconds['total']:.1f} s; outputs in {path}")
    return result, path


def checked_adapter(run: EvalRun) -> tuple[AdapterPayload | None, int]:
    """The adapter (version 1), checked against the base model before any engine starts, and the engines' LoRA
    rank: the smallest vLLM rank that holds all its ranks (``rank_pattern`` included); 8 without an adapter."""
    if run.adapter is None:
        return None, VLLM_LORA_RANKS[1]
    from opsd.lora import AdapterTarget, model_linear_shapes, validate_adapter

    payload = read_adapter_dir(run.adapter, version=1)
    ranks = [payload.rank] + [int(r) for r in (payload.config.get("rank_pattern") or {}).values()]
    try:
        rank = engine_lora_rank(max(ranks))
    except ValueError as exc:
        raise AdapterError(f"{run.adapter}: {exc}") from None
    target = AdapterTarget(run.model.path, rank,
                           model_linear_shapes(run.model.path, run.model.revision, run.model.trust_remote_code))
    try:
        validate_adapter(payload, target)
    except AdapterError as exc:
        raise AdapterError(f"{run.adapter}: {exc}") from exc
    return payload, rank


def rollout_config(config: EvalConfig, run: EvalRun, gpus: int) -> RolloutConfig:
    """Engines for this cluster: GPUs in groups of tensor_parallel_size, or CPU engines of 2 cores each."""
    cores = len(os.sched_getaffinity(0))
    if gpus:
        workers = run.workers or max(1, gpus // run.tensor_parallel_size)
    else:
        workers = run.workers or max(1, cores // 2)
    rollout = RolloutConfig(
        num_workers=workers, gpus_per_worker=float(run.tensor_parallel_size) if gpus else 0.0,
        tensor_parallel_size=run.tensor_parallel_size, cpu_kv_cache_gib=run.cpu_kv_cache_gib,
        max_response_tokens=config.max_tokens, temperature=config.temperature, top_p=config.top_p,
        top_k=config.top_k, n=config.n, seed=config.seed, max_model_len=run.max_model_len, on_long_prompt="error")
    validate_all(rollout)
    return rollout
