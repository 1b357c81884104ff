"""Running an evaluation: RolloutWorker actors sample, the driver extracts and grades, the records are scored.

In training, with the orchestrator's rollout actors (they serve the current adapter)::

    evaluator = Evaluator(cfg.eval, tokenizer=load_tokenizer(model_path))   # loads and checks the benchmarks
    evaluator.check_prompts(cfg.prompt, cfg.rollout.max_model_len or model_context(model_spec))  # before engines
    result = evaluator.run(stages.rollout)                                  # -> EvalResult
    sink.record({"step": step, **result.metrics()})                         # eval/<benchmark>/avg@n, ...
    evaluator.close()                                                       # stops the grading processes

From the command line (``opsd eval``), :func:`evaluate` checks every input first (benchmarks, the output
directory, the adapter against the base model, prompt lengths against the context), then starts the actors on an
embedded Ray (or the cluster at ``RAY_ADDRESS``), one per GPU (or per two CPU cores), loads the adapter, evaluates
and writes the run directory (:mod:`orchestrator.evaluation.report`).

All benchmarks go to the actors as one batch, rows shuffled so that long and short problems spread evenly over the
workers. The prompt is the actors' own student prompt (``opsd.prompts``), thinking mode included: in training it
is the run's ``prompt`` section. Problem ids become sample ids ``<benchmark>:<id>@e0r<i>``, i = 0..n-1, so each
response has its own seed (``rollout.table.trace_seed``) and the same settings give the same responses.
"""

from __future__ import annotations

from orchestrator.cluster import ray_session  # noqa: I001 - first: sets Ray's listener address before ray's import

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from opsd.configlib import ConfigError, to_dict, validate_all
from opsd.errors import UserInputError
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.schema import PROBLEM_SCHEMA, sample_id
from orchestrator.evaluation.benchmarks import Benchmark, load_benchmarks
from orchestrator.evaluation.config import EvalConfig
from orchestrator.evaluation.extract import extract_answer
from orchestrator.evaluation.grading import Grader
from orchestrator.evaluation.records import EvalResult, SampleRecord, summarize
from rollout.config import VLLM_MAX_LORA_RANKS, RolloutConfig
from rollout.resources import ModelSpec
from rollout.table import parse_sample_id, rollout_stats
from rollout.worker import Sampling


def sampling_of(config: EvalConfig) -> Sampling:
    return Sampling(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k, n=config.n,
                    max_tokens=config.max_tokens, seed=config.seed)


def problem_table(benchmarks: Sequence[Benchmark], shuffle_seed: int = 0) -> pa.Table:
    """Every benchmark's problems as one problems table (ids ``<benchmark>:<id>@e0r0``), rows shuffled."""
    ids, problems, answers = [], [], []
    for bench in benchmarks:
        ids += [sample_id(f"{bench.name}:{row_id}", 0, 0) for row_id in bench.table.column("id").to_pylist()]
        problems += bench.table.column("problem").to_pylist()
        answers += bench.table.column("answer").to_pylist()
    table = pa.table({"sample_id": ids, "problem": problems, "solution": [None] * len(ids), "answer": answers},
                     schema=PROBLEM_SCHEMA)
    order = np.random.default_rng(shuffle_seed).permutation(table.num_rows)
    return table.take(pa.array(order, pa.int64()))


def split_sample_id(value: str) -> tuple[str, str, int]:
    """``"aime24:aime24-3@e0r5"`` -> ``("aime24", "aime24-3", 5)``."""
    parsed = parse_sample_id(value)
    if parsed is None or ":" not in parsed[0]:
        raise ValueError(f"not an evaluation sample id: {value!r}")
    benchmark, problem_id = parsed[0].split(":", 1)
    return benchmark, problem_id, parsed[2]


def decode_responses(table: pa.Table, tokenizer: Any, rows_per_batch: int = 256) -> list[str]:
    """Response texts (special tokens dropped), decoded a slice of rows at a time: long thinking traces would
    otherwise sit in memory as Python lists of token ids all at once."""
    texts: list[str] = []
    for start in range(0, table.num_rows, rows_per_batch):
        ids = table.column("response_ids").slice(start, rows_per_batch).to_pylist()
        texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    return texts


def load_config_benchmarks(config: EvalConfig) -> list[Benchmark]:
    return load_benchmarks(config.benchmarks, config.limit, config.mapping, config.columns)


def run_eval(actors: Sequence[Any], benchmarks: Sequence[Benchmark], config: EvalConfig, tokenizer: Any,
             grader: Grader | None = None) -> EvalResult:
    """Evaluate what ``actors`` (RolloutWorker actors) serve now on ``benchmarks``; see the module docstring.

    ``tokenizer`` decodes the responses (the model's). ``grader``: a pool to reuse across calls; None starts one
    for this call and stops it after. Waits at most ``config.generate_timeout_s`` for the responses."""
    from rollout.actor import generate_sharded

    started = time.perf_counter()
    table = generate_sharded(actors, problem_table(benchmarks, config.seed), sampling_of(config),
                             timeout_s=config.generate_timeout_s)
    generated = time.perf_counter()

    responses = decode_responses(table, tokenizer)
    extracted = [extract_answer(text) for text in responses]
    references = table.column("answer").to_pylist()
    if grader is None:
        with Grader(config.grade_processes, config.grade_timeout_s) as own:
            statuses = own.grade(list(zip(extracted, references)))
    else:
        statuses = grader.grade(list(zip(extracted, references)))
    graded = time.perf_counter()

    samples = []
    columns = {name: table.column(name).to_pylist() for name in ("sample_id", "finish_reason", "policy_version")}
    lengths = pc.list_value_length(table.column("response_ids")).to_pylist()
    for i, sid in enumerate(columns["sample_id"]):
        benchmark, problem_id, index = split_sample_id(sid)
        samples.append(SampleRecord(
            benchmark=benchmark, problem_id=problem_id, sample_index=index, sample_id=sid,
            reference=references[i], extracted=extracted[i], status=statuses[i],
            correct=statuses[i] == "correct", finish_reason=columns["finish_reason"][i],
            response_tokens=lengths[i], policy_version=columns["policy_version"][i],
            response=responses[i]))
    position = {(b.name, pid): (k, j) for k, b in enumerate(benchmarks)
                for j, pid in enumerate(b.table.column("id").to_pylist())}
    samples.sort(key=lambda s: (position[(s.benchmark, s.problem_id)], s.sample_index))

    skipped: dict[str, int] = {}
    for prompt_id in rollout_stats(table).skipped_ids:
        name = split_sample_id(prompt_id)[0]
        skipped[name] = skipped.get(name, 0) + 1
    versions = set(columns["policy_version"])
    return EvalResult(
        benchmarks=summarize(samples, config.ks(), skipped, order=[b.name for b in benchmarks]),
        samples=samples,
        seconds={"generate": generated - started, "grade": graded - generated,
                 "total": time.perf_counter() - started},
        policy_version=versions.pop() if len(versions) == 1 else None,
    )


class Evaluator:
    """Benchmarks loaded and checked once, a tokenizer and a grading pool: :meth:`run` it every N training steps.

    Bad benchmarks (unknown name, missing file, a row without problem or answer) raise here, at construction."""

    def __init__(self, config: EvalConfig, tokenizer: Any, benchmarks: Sequence[Benchmark] | None = None):
        """``benchmarks``: already loaded ones (default: load ``config``'s)."""
        validate_all(config)
        self.config = config
        self.tokenizer = tokenizer
        self.benchmarks = list(benchmarks) if benchmarks is not None else load_config_benchmarks(config)
        self.grader = Grader(config.grade_processes, config.grade_timeout_s)

    def check_prompts(self, prompt: PromptConfig | None, context_tokens: int | None) -> None:
        """Refuse, naming the problems, student prompts that leave less than ``max_tokens`` of a
        ``context_tokens`` context (what the engines would refuse after starting), and a ``max_tokens`` that
        leaves no room for any prompt. ``context_tokens`` None: no check."""
        if context_tokens is None:
            return
        max_tokens = self.config.max_tokens
        if max_tokens >= context_tokens:
            raise ConfigError("max_tokens", f"{max_tokens} does not fit the engines' context of {context_tokens} "
                              "tokens with a prompt; lower it or raise max_model_len")
        builder = PromptBuilder(self.tokenizer, prompt)
        limit = context_tokens - max_tokens
        too_long = []
        for bench in self.benchmarks:
            for row_id, problem in zip(bench.table.column("id").to_pylist(), bench.table.column("problem").to_pylist()):
                length = len(builder.student_prompt_ids(problem))
                if length > limit:
                    too_long.append(f"'{bench.name}:{row_id}' ({length} tokens)")
        if too_long:
            more = f" and {len(too_long) - 5} more" if len(too_long) > 5 else ""
            raise UserInputError(
                f"{len(too_long)} student prompt(s) too long: {', '.join(too_long[:5])}{more}. With max_tokens "
                f"{max_tokens} in a {context_tokens}-token context a prompt may hold {limit} tokens; raise "
                "max_model_len (up to the model's context) or lower max_tokens")

    def run(self, actors: Sequence[Any]) -> EvalResult:
        return run_eval(actors, self.benchmarks, self.config, self.tokenizer, self.grader)

    def close(self) -> None:
        self.grader.close()

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- opsd eval ---------------------------------------------------------------------------------------------------
@dataclass
class EvalRun:
    """What ``opsd eval`` runs besides the EvalConfig: the model, the adapter, the engines and the output."""

    model: ModelSpec
    out: Path
    adapter: Path | None = None
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(enable_thinking=True))
    workers: int | None = None  # None: one per GPU (tensor_parallel_size GPUs each), or per 2 CPU cores
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # None: the model's own
    cpu_kv_cache_gib: float = 2.0
    overwrite: bool = False
    address: str | None = None  # Ray cluster; None: RAY_ADDRESS, else an embedded one
    start_timeout_s: float = 1800.0


def evaluate(config: EvalConfig, run: EvalRun, print_fn=print) -> tuple[EvalResult, Path]:
    """``opsd eval``: check every input, start the engines, evaluate, write ``run.out``. Returns the result and
    the run directory."""
    from opsd.hf import load_tokenizer
    from orchestrator.evaluation.report import markdown_table, write_run

    started = time.perf_counter()
    validate_all(config)
    out = Path(run.out)
    if out.exists() and not run.overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    benchmarks = load_config_benchmarks(config)
    tokenizer = load_tokenizer(run.model.tokenizer_path, run.model.revision, run.model.trust_remote_code)
    with Evaluator(config, tokenizer, benchmarks) as evaluator:
        evaluator.check_prompts(run.prompt, run.max_model_len or model_context(run.model))
        payload, lora_rank = _checked_adapter(run)
        problems = sum(b.num_problems for b in evaluator.benchmarks)
        print_fn(f"opsd eval: {problems} problems x {config.n} samples from "
                 f"{', '.join(f'{b.name} ({b.num_problems})' for b in evaluator.benchmarks)}")

        from rollout.actor import stop_rollout_actors

        with ray_session(run.address, num_cpus=len(os.sched_getaffinity(0)), dashboard=False):
            import ray

            gpus = int(ray.cluster_resources().get("GPU", 0))
            rollout = _rollout_config(config, run, gpus, lora_rank)
            where = f"{gpus} GPU(s)" if gpus else f"{len(os.sched_getaffinity(0))} CPU core(s)"
            print_fn(f"opsd eval: starting {rollout.num_workers} rollout worker(s) on {where}")
            engines_started = time.perf_counter()
            actors = _start_actors(run, rollout)
            try:
                engine_seconds = time.perf_counter() - engines_started
                if payload is not None:
                    from rollout.actor import load_adapter_on_all

                    load_adapter_on_all(actors, 1, payload)
                print_fn(f"opsd eval: engines up in {engine_seconds:.0f} s; sampling")
                result = evaluator.run(actors)
            finally:
                stop_rollout_actors(actors)
        result.seconds["engine_start"] = engine_seconds
        result.seconds["total"] = time.perf_counter() - started
        info = {
            "model": run.model.path, "adapter": str(run.adapter) if run.adapter else None,
            "benchmark_files": {b.name: str(b.path) for b in evaluator.benchmarks},
            "prompt": to_dict(run.prompt), "config": to_dict(config),
            "engines": {"workers": rollout.num_workers, "gpus_per_worker": rollout.gpus_per_worker,
                        "max_model_len": run.max_model_len},
        }
    path = write_run(out, result, info, overwrite=run.overwrite)
    print_fn(markdown_table(result.benchmarks), end="")
    print_fn(f"opsd eval: generate {result.seconds['generate']:.1f} s, grade {result.seconds['grade']:.1f} s, "
             f"total {result.seconds['total']:.1f} s; outputs in {path}")
    return result, path


def model_context(model: ModelSpec) -> int | None:
    """The model's longest sequence (``max_position_embeddings``), what vLLM uses when max_model_len is unset."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model.path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserInputError(f"cannot read the model config of {model.path!r}: {exc}") from exc
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None


def _checked_adapter(run: EvalRun) -> tuple[Any, int]:
    """The adapter (version 1) checked against the base model before any engine starts, and the engines' LoRA
    rank (the smallest vLLM choice that holds it; 8 without an adapter)."""
    if run.adapter is None:
        return None, 8
    from opsd.adapter import AdapterError, read_adapter_dir
    from rollout.adapters import AdapterTarget, model_linear_shapes, validate_adapter

    payload = read_adapter_dir(run.adapter, version=1)
    ranks = [payload.rank] + [int(r) for r in (payload.config.get("rank_pattern") or {}).values()]
    fitting = [r for r in VLLM_MAX_LORA_RANKS if r >= max(ranks)]
    if not fitting:
        raise AdapterError(f"{run.adapter}: LoRA rank {max(ranks)} exceeds vLLM's largest, {VLLM_MAX_LORA_RANKS[-1]}")
    target = AdapterTarget(run.model.path, fitting[0],
                           model_linear_shapes(run.model.path, run.model.revision, run.model.trust_remote_code))
    try:
        validate_adapter(payload, target)
    except AdapterError as exc:
        raise AdapterError(f"{run.adapter}: {exc}") from exc
    return payload, fitting[0]


def _rollout_config(config: EvalConfig, run: EvalRun, gpus: int, lora_rank: int) -> RolloutConfig:
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
        top_k=config.top_k, n=config.n, seed=config.seed, max_model_len=run.max_model_len,
        max_lora_rank=lora_rank, on_long_prompt="error")
    validate_all(rollout)
    return rollout


def _start_actors(run: EvalRun, rollout: RolloutConfig) -> list[Any]:
    from rollout.actor import start_rollout_actors

    return start_rollout_actors(run.model, rollout, run.prompt, timeout_s=run.start_timeout_s)


