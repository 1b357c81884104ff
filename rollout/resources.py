"""How a rollout engine is started: vLLM arguments, the process environment during the start, and CPU cores.

CPU (no GPU visible to vLLM):

* **KV cache from config, always.** Left to itself vLLM's CPU backend takes a large share of the machine's RAM.
  The size is passed as the engine argument ``kv_cache_memory_bytes`` (``rollout.cpu_kv_cache_gib``), and the
  legacy ``VLLM_CPU_KVCACHE_SPACE`` variable is removed while the engine starts: vLLM lets it override the
  argument, and it only takes whole GiB.
* **In-process engine** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): the
  engine runs in the worker's own process, so it starts in seconds instead of half a minute and one rollout worker
  is one process. ``tensor_parallel_size`` must be 1 on CPU.
* **Own cores.** vLLM binds CPU threads only in its multiprocess executor; in-process, the worker binds itself:
  every thread of the process is pinned to the worker's cores (``sched_setaffinity``) and torch gets one thread per
  core, before the engine starts (vLLM then forbids changing the thread count). ``OMP_NUM_THREADS`` is set to the
  same count so that vLLM keeps it, and ``VLLM_CPU_OMP_THREADS_BIND`` to the core list (only vLLM's multiprocess
  executor reads it; set so that it never contradicts the actual binding). By default worker ``i`` of
  ``num_workers`` gets the ``i``-th block of ``cpu_threads_per_worker`` cores (or an even split): with two
  workers on a 2-core machine, cores 0 and 1.
* **No LoRA in the engine by default** (``rollout.adapter_serving: auto`` is ``merged`` on CPU): vLLM 0.32's CPU
  LoRA path re-copies the LoRA weights at every token of every LoRA layer, so decoding with an adapter ran ~10x
  slower than the base model (benchmarks/RESULTS.md). Adapter versions are merged into the engine's weights instead
  (:mod:`rollout.serving`) and the engine is built without ``enable_lora``. With ``adapter_serving: lora`` the
  engine gets LoRA slots on the transformer blocks only (``lora_target_modules``, see :func:`engine_launch`).
* **No chunked prefill**: with it, vLLM's CPU build fails on seeded requests whose batch needs more than one
  prefill step (see :func:`engine_launch`); every opsd trace is seeded.
* ``enforce_eager`` (config, default on): compiling took 88 s to start and gave no speed-up on CPU.

GPU: vLLM's defaults (engine core in its own process), with ``tensor_parallel_size`` and
``gpu_memory_utilization`` from config; no variables are set and no cores are bound. Adapters are served with vLLM's
LoRA kernels (``adapter_serving: auto`` is ``lora`` there).

Environment variables are set only around the engine's construction and restored afterwards, so nothing leaks into
the caller's process (vLLM caches its variables once its engine is up). In a Ray actor the process is the worker's
own anyway. The thread binding is per process by nature: a process that builds a CPU engine is bound to its cores.
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
    """The engine arguments and start environment for ``model`` under ``config`` (see the module docstring).

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
        enforce_eager=config.enforce_eager,
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
