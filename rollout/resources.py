"""How a rollout engine is started: vLLM arguments, the process environment during the start, and CPU cores.

CPU engines get their KV cache size from config, run in-process on their own cores, without chunked prefill;
GPU engines keep vLLM's defaults. Why: docs/ARCHITECTURE.md ("Rollout engines").
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from opsd.configlib import ConfigError
from opsd.model import ModelSpec
from rollout.config import RolloutConfig, core_list

GIB = 1 << 30


@dataclass(frozen=True)
class EngineLaunch:
    """Everything needed to start one engine: ``vllm.LLM(**kwargs)`` with ``env`` applied, pinned to ``cpu_cores``."""

    kwargs: dict[str, Any]
    env: dict[str, str | None] = field(default_factory=dict)  # None: the variable is removed during the start
    cpu_cores: tuple[int, ...] | None = None  # None: no binding (GPU)


def engine_launch(model: ModelSpec, config: RolloutConfig, *, on_cpu: bool, lora_layers: Sequence[str] | None,
                  max_lora_rank: int = 64, cpu_cores: Sequence[int] | None = None) -> EngineLaunch:
    """Engine arguments and start environment for ``model`` under ``config`` (docs/ARCHITECTURE.md, "Rollout engines").

    ``lora_layers``: short names of the linear layers adapters may target (``q_proj``, ...; see
    :func:`opsd.lora.model_linear_shapes`). Only those get LoRA slots in the engine, of rank
    ``max_lora_rank``. None: an engine without LoRA (adapters served as merged weights, :mod:`rollout.serving`).
    """
    kwargs: dict[str, Any] = dict(
        model=model.path,
        tokenizer=model.tokenizer_path,
        revision=model.revision,
        tokenizer_revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=model.engine_dtype(on_cpu),
        seed=config.seed,
        max_model_len=config.max_model_len,
        enforce_eager=config.enforce_eager if config.enforce_eager is not None else on_cpu,
        # Log-probs of the sampled token as sampled: after temperature, top-k and top-p (see rollout.worker).
        logprobs_mode="processed_logprobs",
    )
    if lora_layers is not None:
        kwargs.update(
            enable_lora=True,
            max_lora_rank=max_lora_rank,
            # LoRA slots on the transformer blocks' linear layers only. Left to itself vLLM also wraps the output
            # head, and then adds a (vocabulary x rank) LoRA product to the logits at every step even for the base
            # model: on CPU that made decoding with a 151,936-token vocabulary many times slower.
            lora_target_modules=sorted(lora_layers),
            # One adapter version serves at a time; room for two while the next one loads.
            max_loras=1,
            max_cpu_loras=2,
        )
    if not on_cpu:
        kwargs.update(tensor_parallel_size=config.tensor_parallel_size,
                      gpu_memory_utilization=config.gpu_memory_utilization)
        return EngineLaunch(kwargs=kwargs)
    if config.tensor_parallel_size != 1:
        raise ConfigError("rollout.tensor_parallel_size",
                          f"must be 1 on CPU (one in-process engine per worker), got {config.tensor_parallel_size}")
    if not cpu_cores:
        raise ValueError("a CPU engine needs its cores (see cpu_cores_for)")
    cores = tuple(sorted(cpu_cores))
    kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=int(config.cpu_kv_cache_gib * GIB),
                  # With chunked prefill a batch of more prompt tokens than one step holds (4,096) is prefilled
                  # over several steps, and for a seeded request vLLM then sets the offset of a CPU random
                  # generator: "CPU Generator does not use offset". Every opsd trace is seeded, so CPU engines
                  # prefill each prompt whole (a step then holds up to max_model_len tokens).
                  enable_chunked_prefill=False)
    env: dict[str, str | None] = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": None,
        "VLLM_CPU_OMP_THREADS_BIND": core_list(cores),
        "OMP_NUM_THREADS": str(len(cores)),
    }
    return EngineLaunch(kwargs=kwargs, env=env, cpu_cores=cores)


@contextmanager
def scoped_environ(env: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, remove) variables for the duration of the block; restore the previous values after."""
    previous = {name: os.environ.get(name) for name in env}
    try:
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def bind_process_to_cores(cores: Sequence[int]) -> None:
    """Pin every thread of this process to ``cores`` and size torch's thread pool to match."""
    import torch

    allowed = set(cores)
    if not hasattr(os, "sched_setaffinity"):  # macOS: no thread affinity; the thread count still applies
        warnings.warn(f"this platform cannot pin threads to cores; the engine only uses {len(allowed)} threads")
    else:
        for task in os.listdir("/proc/self/task"):
            try:
                os.sched_setaffinity(int(task), allowed)
            except ProcessLookupError:  # a thread that ended meanwhile
                continue
    torch.set_num_threads(len(allowed))
