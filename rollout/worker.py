"""RolloutWorker: a vLLM engine that samples the student's traces and hot-loads LoRA adapter versions.

A plain class (``rollout.pool`` runs it as Ray actors), serving one base model and one adapter version at a time::

    worker = RolloutWorker(ModelSpec("Qwen/Qwen3-1.7B"), rollout_config)
    table = worker.generate(problems)             # problems table in, rollout table out (opsd.schema)
    worker.load_adapter(1, payload)               # AdapterPayload from the learner (or a PEFT directory)

Log-probs, prompt lengths, CPU engines and adapter versions: docs/ARCHITECTURE.md ("Rollout engines", "Adapters").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pyarrow as pa

from opsd.adapter import AdapterError, AdapterPayload, read_adapter_dir
from opsd.answers import extract_answer
from opsd.errors import UserInputError
from opsd.hf import tokenizer_fingerprint
from opsd.lora import VLLM_LORA_RANKS
from opsd.model import ModelSpec, as_model_spec
from opsd.prompts import PromptBuilder, PromptConfig
from opsd.sampling import Sampling
from opsd.schema import (
    FINISH_REASONS,
    RolloutStats,
    TableError,
    TableMetadata,
    check_table,
    with_metadata,
    with_rollout_stats,
)
from opsd.lora import AdapterTarget, model_linear_shapes, validated_lora_weights
from rollout.config import RolloutConfig, cpu_cores_for, resolve_adapter_serving
from rollout.resources import bind_process_to_cores, engine_launch, scoped_environ
from rollout.serving import AdapterServer, EngineWeightsError, LoraServing, MergedServing
from rollout.table import (
    RolloutSummary,
    Trace,
    check_no_rollout_columns,
    rollout_sample_ids,
    rollout_table,
    trace_seed,
)


class PromptTooLongError(UserInputError):
    """Student prompts that leave no room for the response budget; ``sample_ids`` names every one of them."""

    def __init__(self, sample_ids: Sequence[str], lengths: Sequence[int], max_prompt_tokens: int,
                 max_model_len: int, max_tokens: int):
        self.sample_ids = list(sample_ids)
        self.lengths = list(lengths)
        self.max_prompt_tokens = max_prompt_tokens
        self.max_model_len = max_model_len
        self.max_tokens = max_tokens
        shown = ", ".join(f"{s!r} ({n} tokens)" for s, n in zip(self.sample_ids[:5], self.lengths[:5]))
        more = f" and {len(self.sample_ids) - 5} more" if len(self.sample_ids) > 5 else ""
        super().__init__(
            f"{len(self.sample_ids)} student prompt(s) too long for the rollout engine: {shown}{more}. A prompt may "
            f"hold at most {max_prompt_tokens} tokens (max_model_len {max_model_len} - max_response_tokens "
            f"{max_tokens}). Shorten those problems, raise rollout.max_model_len, or set "
            "rollout.on_long_prompt=skip to leave such rows out"
        )

    def __reduce__(self):  # picklable across Ray, with its fields
        return (type(self), (self.sample_ids, self.lengths, self.max_prompt_tokens, self.max_model_len,
                             self.max_tokens))


@dataclass(frozen=True)
class AdapterInfo:
    """The adapter version a worker serves after a load."""

    version: int
    rank: int  # 0 for the base model
    layers: int  # LoRA layers in the adapter
    seconds: float  # validation + engine load (lora: write the PEFT directory, add it; merged: merge, write weights)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker runs: for logs, placement checks and tests."""

    pid: int
    model: str
    policy_version: int
    max_model_len: int
    vocab_size: int
    tokenizer: str  # fingerprint
    on_cpu: bool
    cpu_cores: tuple[int, ...] | None  # cores the engine was bound to (CPU)
    affinity: tuple[int, ...]  # cores this process may run on now
    torch_threads: int
    engine_start_seconds: float
    kv_block_size: int  # tokens per KV-cache block: prompts share cached blocks only when they span whole blocks
    prefix_caching: bool
    adapter_serving: str  # "lora" or "merged": rollout.adapter_serving as resolved for this device
    engine_lora: bool  # whether the engine was built with vLLM LoRA (lora mode only)
    base_weights_bytes: int  # host copy of the target layers' base weights (merged mode; 0 in lora mode)


class RolloutWorker:
    """One vLLM engine serving the student: ``generate`` rollouts, ``load_adapter`` versions."""

    def __init__(self, model: ModelSpec | str, config: RolloutConfig | None = None,
                 prompts: PromptConfig | None = None, *, worker_index: int = 0,
                 cpu_cores: Sequence[int] | None = None, max_lora_rank: int = 64):
        """``worker_index`` picks this worker's block of cores on CPU (``cpu_cores`` overrides it) and names its
        temp directory. Building the engine binds this process to those cores (CPU). ``max_lora_rank``: the
        largest adapter rank this worker will load (one of ``opsd.lora.VLLM_LORA_RANKS``)."""
        self.model = as_model_spec(model)
        self.config = config if config is not None else RolloutConfig()
        self.config.validate()
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {VLLM_LORA_RANKS} (vLLM's choices), got {max_lora_rank}")
        self.worker_index = worker_index
        self.tokenizer = self.model.load_tokenizer()
        self.prompts = PromptBuilder(self.tokenizer, prompts)

        self._target = AdapterTarget(
            base_model=self.model.path,
            max_rank=max_lora_rank,
            linear_shapes=model_linear_shapes(self.model.path, self.model.revision, self.model.trust_remote_code),
        )
        on_cpu = _vllm_on_cpu()
        serving = resolve_adapter_serving(self.config.adapter_serving, on_cpu=on_cpu)
        base = None
        if serving == "merged":  # before the engine: a checkpoint merging cannot use fails in seconds
            from rollout.merge import read_base_weights

            base = read_base_weights(self.model.path, self._target.linear_shapes, self.model.revision)
        if on_cpu and cpu_cores is None:
            cpu_cores = cpu_cores_for(worker_index, self.config.num_workers, self.config.cpu_threads_per_worker,
                                      sorted(os.sched_getaffinity(0)))
        launch = engine_launch(self.model, self.config, on_cpu=on_cpu,
                               lora_layers=self._target.layer_names if serving == "lora" else None,
                               max_lora_rank=max_lora_rank, cpu_cores=cpu_cores if on_cpu else None)
        started = time.perf_counter()
        with scoped_environ(launch.env):
            if launch.cpu_cores:
                bind_process_to_cores(launch.cpu_cores)
            from vllm import LLM

            self.llm = LLM(**launch.kwargs)
        self._start_seconds = time.perf_counter() - started
        self._on_cpu, self._cpu_cores = on_cpu, launch.cpu_cores

        model_config = self.llm.llm_engine.model_config
        self.max_model_len = int(model_config.max_model_len)
        self.metadata = TableMetadata(model=self.model.path, tokenizer=tokenizer_fingerprint(self.tokenizer),
                                      vocab_size=int(model_config.get_vocab_size()))
        self._adapter_root = Path(tempfile.mkdtemp(prefix=f"opsd-rollout-{worker_index}-"))
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._adapter_root), True)
        self._server: AdapterServer = (LoraServing(self.llm, self._adapter_root) if base is None
                                       else MergedServing(self.llm, base))
        self._version = 0
        self._broken: str | None = None  # set when a weight write failed part-way: the engine must not sample

    # -- state ---------------------------------------------------------------------------------------------------
    def policy_version(self) -> int:
        return self._version

    def info(self) -> WorkerInfo:
        import torch

        cache = self.llm.llm_engine.vllm_config.cache_config
        return WorkerInfo(
            pid=os.getpid(), model=self.model.path, policy_version=self._version, max_model_len=self.max_model_len,
            vocab_size=self.metadata.vocab_size, tokenizer=self.metadata.tokenizer, on_cpu=self._on_cpu,
            cpu_cores=self._cpu_cores, affinity=tuple(sorted(os.sched_getaffinity(0))),
            torch_threads=torch.get_num_threads(), engine_start_seconds=self._start_seconds,
            kv_block_size=int(cache.block_size), prefix_caching=bool(cache.enable_prefix_caching),
            adapter_serving=self._server.mode,
            engine_lora=self.llm.llm_engine.vllm_config.lora_config is not None,
            base_weights_bytes=self._server.base.nbytes if isinstance(self._server, MergedServing) else 0,
        )

    def close(self) -> None:
        """Remove this worker's adapter files (the engine goes with the process)."""
        self._cleanup()

    # -- rollouts ------------------------------------------------------------------------------------------------
    def _builder(self, prompts: PromptConfig | None) -> PromptBuilder:
        """The run's prompt builder, or one for a call's own prompts (evaluation uses its own)."""
        if prompts is None or prompts == self.prompts.config:
            return self.prompts
        return PromptBuilder(self.tokenizer, prompts)

    def generate(self, problems: pa.Table, sampling: Sampling | None = None,
                 prompts: PromptConfig | None = None) -> pa.Table:
        """Sample ``n`` traces for each problem row (docs/ARCHITECTURE.md, "The step table" and "Rollout engines")."""
        started = time.perf_counter()
        if self._broken is not None:
            raise EngineWeightsError(f"this rollout worker cannot sample: {self._broken}")
        check_table(problems, "problems")
        check_no_rollout_columns(problems)
        sampling = sampling if sampling is not None else self.config.sampling()
        sampling.validate(self.max_model_len)
        prompt_ids_by_row = problems.column("sample_id").to_pylist()
        _check_unique(prompt_ids_by_row, "problem")
        builder = self._builder(prompts)
        prompts = [builder.student_prompt_ids(p) for p in problems.column("problem").to_pylist()]

        max_prompt = self.max_model_len - sampling.max_tokens
        too_long = [i for i, p in enumerate(prompts) if len(p) > max_prompt]
        if too_long and self.config.on_long_prompt == "error":
            raise PromptTooLongError([prompt_ids_by_row[i] for i in too_long], [len(prompts[i]) for i in too_long],
                                     max_prompt, self.max_model_len, sampling.max_tokens)
        skipped = set(too_long)

        rows: list[int] = []
        ids: list[str] = []
        for row, prompt_id in enumerate(prompt_ids_by_row):
            if row in skipped:
                continue
            for trace_id in rollout_sample_ids(prompt_id, sampling.n):
                rows.append(row)
                ids.append(trace_id)
        _check_unique(ids, "rollout")

        traces = self._sample([prompts[r] for r in rows], ids, sampling)
        table = rollout_table(problems, rows, ids, traces, self._version)
        stats = RolloutStats(
            prompts=problems.num_rows,
            samples=len(traces),
            skipped_ids=tuple(prompt_ids_by_row[i] for i in too_long),
            generated_tokens=sum(len(t.response_ids) for t in traces),
            truncated=sum(t.finish_reason == "length" for t in traces),
            generate_seconds=time.perf_counter() - started,
        )
        return with_rollout_stats(with_metadata(table, self.metadata), stats)

    def generate_shard(self, problems: pa.Table, sampling: Sampling | None = None,
                       prompts: PromptConfig | None = None) -> tuple[pa.Table, RolloutSummary]:
        """``generate``, and what the driver needs to know of the table without fetching it (a pool calls this
        with two return values: the table stays in the object store, on its way to the next stage)."""
        table = self.generate(problems, sampling, prompts)
        responses = self.tokenizer.batch_decode(table.column("response_ids").to_pylist(), skip_special_tokens=True)
        answer_format = self._builder(prompts).config.answer_format
        return table, RolloutSummary.of(table, [extract_answer(text, answer_format) for text in responses])

    def _sample(self, prompts: list[list[int]], ids: list[str], sampling: Sampling) -> list[Trace]:
        if not prompts:
            return []
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = sampling.temperature == 0
        params = [
            SamplingParams(
                n=1,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0 if sampling.top_k == -1 else sampling.top_k,  # vLLM: 0 is off
                max_tokens=sampling.max_tokens,
                seed=None if greedy else trace_seed(sampling.seed, trace_id),
                logprobs=0,  # the sampled token's only
                flat_logprobs=True,
                detokenize=False,
            )
            for trace_id in ids
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                    lora_request=self._server.lora_request, use_tqdm=False)
        return [_trace(prompt, output, trace_id) for prompt, output, trace_id in zip(prompts, outputs, ids)]

    # -- adapter versions ----------------------------------------------------------------------------------------
    def load_adapter(self, version: int, payload: AdapterPayload | str | os.PathLike | None = None) -> AdapterInfo:
        """Serve adapter ``version`` from the next ``generate`` on; version 0 (no payload) is the base model.

        ``payload`` is the learner's :class:`AdapterPayload` (bytes from the object store) or a PEFT adapter
        directory. On any problem with the adapter this raises :class:`AdapterError` and the previous version stays
        in service. (An :class:`EngineWeightsError`, a weight write that failed part-way, leaves the worker unable
        to sample.)
        """
        started = time.perf_counter()
        if self._broken is not None:
            raise EngineWeightsError(f"this rollout worker cannot load adapters: {self._broken}")
        if version < 0:
            raise AdapterError(f"adapter version must be >= 0, got {version}")
        if version == 0:
            if payload is not None:
                raise AdapterError("adapter version 0 is the base model: it takes no payload")
            self._switch(0, self._server.serve_base)
            return AdapterInfo(version=0, rank=0, layers=0, seconds=time.perf_counter() - started)
        if payload is None:
            raise AdapterError(f"adapter version {version} needs a payload (AdapterPayload or a PEFT directory)")
        if isinstance(payload, (str, os.PathLike)):
            payload = read_adapter_dir(payload, version)
        elif payload.version != version:
            raise AdapterError(f"load_adapter({version}) was given the payload of version {payload.version}")
        lora = validated_lora_weights(payload, self._target)
        self._switch(version, lambda: self._server.serve(payload, lora))
        return AdapterInfo(version=version, rank=payload.rank, layers=len(lora),
                           seconds=time.perf_counter() - started)

    def _switch(self, version: int, serve: Callable[[], None]) -> None:
        """Run ``serve``; the served version changes only if it returns. A failed weight write breaks the worker."""
        try:
            serve()
        except EngineWeightsError as exc:
            self._broken = f"adapter version {version}: {exc}"
            raise
        self._version = version


def _vllm_on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _check_unique(ids: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for value in ids:
        if value in seen:
            raise TableError(f"{what} sample id {value!r} appears more than once")
        seen.add(value)


def _trace(prompt: list[int], output: Any, trace_id: str) -> Trace:
    """A :class:`Trace` from one vLLM ``RequestOutput`` (one completion, flat log-probs of the sampled tokens)."""
    completion = output.outputs[0]
    tokens = list(completion.token_ids)
    flat = completion.logprobs
    # logprobs=0: exactly one entry per position, the sampled token. Anything else is a vLLM behaviour change.
    if flat is None or len(flat.start_indices) != len(tokens):
        raise RuntimeError(f"sample {trace_id!r}: vLLM returned no per-token log-prob for every response token")
    if [flat.token_ids[s] for s in flat.start_indices] != tokens:
        raise RuntimeError(f"sample {trace_id!r}: vLLM's log-probs are not those of the sampled tokens")
    if completion.finish_reason not in FINISH_REASONS:
        raise RuntimeError(f"sample {trace_id!r}: vLLM finished with {completion.finish_reason!r}")
    return Trace(prompt_ids=prompt, response_ids=tokens,
                 response_logprobs=[flat.logprobs[s] for s in flat.start_indices],
                 finish_reason=completion.finish_reason)
