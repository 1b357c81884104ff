"""Configuration of the rollout stage: vLLM engines that sample the student's traces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

from opsd.configlib import ConfigError, check
from opsd.sampling import Sampling, check_sampling

AdapterServing = Literal["lora", "merged"]
ADAPTER_SERVING_CHOICES = ("auto", "lora", "merged")


@dataclass
class RolloutConfig:
    """The student's sampling: how many vLLM engines, their resources, and the sampling parameters."""

    num_workers: int = field(default=1, metadata={"doc": "Number of RolloutWorker actors (vLLM engines)."})
    gpus_per_worker: float = field(
        default=1.0,
        metadata={"doc": "GPUs reserved per rollout worker (a fraction shares a GPU). 0 on CPU-only machines."},
    )
    tensor_parallel_size: int = field(
        default=1, metadata={"doc": "vLLM tensor parallelism: GPUs one engine spreads the model over."}
    )
    gpu_memory_utilization: float = field(
        default=0.85,
        metadata={"doc": "Fraction of each GPU's memory vLLM may take (weights + KV cache), in (0, 1]."},
    )
    cpu_kv_cache_gib: float = field(
        default=2.0,
        metadata={
            "doc": "KV cache size in GiB per engine on CPU (VLLM_CPU_KVCACHE_SPACE). Always set explicitly: "
            "vLLM's own default takes most of the machine's RAM. Ignored on GPU."
        },
    )
    cpu_threads_per_worker: int | None = field(
        default=None,
        metadata={
            "doc": "CPU cores bound to each engine on CPU (worker i gets the i-th block of that many cores of the "
            "machine). None: the machine's cores split evenly over num_workers."
        },
    )
    max_response_tokens: int = field(
        default=2048, metadata={"doc": "Most tokens sampled per trace (the paper uses 2,048)."}
    )
    temperature: float = field(
        default=1.0, metadata={"doc": "Sampling temperature, >= 0 (0 is greedy)."}
    )
    top_p: float = field(default=1.0, metadata={"doc": "Nucleus sampling probability mass, in (0, 1]; 1 is off."})
    top_k: int = field(default=-1, metadata={"doc": "Sample among the k most likely tokens; -1 is off."})
    n: int = field(default=1, metadata={"doc": "Rollouts sampled per prompt (the paper uses 1)."})
    seed: int = field(
        default=0,
        metadata={
            "doc": "Sampling seed. Each trace's random stream is derived from (seed, sample_id), so a row gives the "
            "same trace whatever worker, batch or shard it lands in (and when it is re-dispatched)."
        },
    )
    enforce_eager: bool | None = field(
        default=None,
        metadata={"doc": "Run vLLM without CUDA graphs / compilation (faster start, slower decoding on GPU). None: "
                  "eager on CPU (compiling gave no speed-up there), CUDA graphs on GPU."},
    )
    max_model_len: int | None = field(
        default=None,
        metadata={"doc": "Longest prompt + response an engine holds, in tokens. None: the model's own maximum."},
    )
    adapter_serving: Literal["auto", "lora", "merged"] = field(
        default="auto",
        metadata={
            "doc": "How an engine serves the learner's adapter versions. 'lora': vLLM's LoRA support (the adapter "
            "is applied at every token; fast with vLLM's GPU kernels). 'merged': the engine runs without LoRA and "
            "each version is written into its weights as W0 + scale * B @ A (CPU only: vLLM 0.32's CPU LoRA path "
            "decodes ~10x slower than the base model). 'auto': 'merged' on CPU, 'lora' on GPU."
        },
    )
    on_long_prompt: Literal["error", "skip"] = field(
        default="error",
        metadata={
            "doc": "A student prompt longer than max_model_len - max_response_tokens: 'error' rejects the batch "
            "before generating, naming the sample ids; 'skip' leaves those rows out and counts them."
        },
    )

    def sampling(self) -> Sampling:
        """The run's sampling parameters (a call may pass its own, e.g. evaluation)."""
        return Sampling(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, n=self.n,
                        max_tokens=self.max_response_tokens, seed=self.seed)

    def validate(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}")
        check(self.gpus_per_worker >= 0, "gpus_per_worker", f"must be >= 0, got {self.gpus_per_worker}")
        check(
            self.tensor_parallel_size >= 1,
            "tensor_parallel_size",
            f"must be >= 1, got {self.tensor_parallel_size}",
        )
        check(
            0 < self.gpu_memory_utilization <= 1,
            "gpu_memory_utilization",
            f"must be in (0, 1], got {self.gpu_memory_utilization}",
        )
        check(self.cpu_kv_cache_gib > 0, "cpu_kv_cache_gib", f"must be > 0, got {self.cpu_kv_cache_gib}")
        check(
            self.cpu_threads_per_worker is None or self.cpu_threads_per_worker >= 1,
            "cpu_threads_per_worker",
            f"must be >= 1 or null, got {self.cpu_threads_per_worker}",
        )
        check(
            self.max_response_tokens >= 1,
            "max_response_tokens",
            f"must be >= 1, got {self.max_response_tokens}",
        )
        check_sampling(self.temperature, self.top_p, self.top_k, self.n, self.seed)
        check(
            self.adapter_serving in ADAPTER_SERVING_CHOICES,
            "adapter_serving",
            f"must be one of {', '.join(map(repr, ADAPTER_SERVING_CHOICES))}, got {self.adapter_serving!r}",
        )
        if self.max_model_len is not None:
            # The engine must hold a prompt and a full-length response.
            check(
                self.max_model_len > self.max_response_tokens,
                "max_model_len",
                f"must be > max_response_tokens ({self.max_response_tokens}) to leave room for the prompt, "
                f"got {self.max_model_len}",
            )


def resolve_adapter_serving(mode: str, *, on_cpu: bool) -> AdapterServing:
    """The serving mode an engine uses on this device: ``auto`` is ``merged`` on CPU and ``lora`` on GPU.

    ``merged`` writes weights into the engine through its in-process model (see :mod:`rollout.serving`), which only
    the CPU engine is (on GPU vLLM runs its engine core in another process); there vLLM's LoRA kernels serve
    adapters at full speed anyway. So ``merged`` on GPU is refused rather than quietly served as LoRA.
    """
    if mode == "auto":
        return "merged" if on_cpu else "lora"
    if mode == "merged" and not on_cpu:
        raise ConfigError("rollout.adapter_serving", "'merged' is implemented for CPU engines only (vLLM in-process); "
                          "on GPU use 'lora' or 'auto' (vLLM's LoRA kernels serve adapters at full speed there)")
    if mode not in ("lora", "merged"):
        raise ConfigError("rollout.adapter_serving",
                          f"must be one of {', '.join(map(repr, ADAPTER_SERVING_CHOICES))}, got {mode!r}")
    return mode  # type: ignore[return-value]


def cpu_cores_for(worker_index: int, num_workers: int, threads_per_worker: int | None,
                  available: Sequence[int]) -> tuple[int, ...]:
    """The cores of worker ``worker_index`` of ``num_workers`` engines sharing a machine with usable ``available``."""
    cores = sorted(available)
    if threads_per_worker is None:
        per_worker = len(cores) // num_workers
        if per_worker < 1:
            raise ConfigError("rollout.num_workers", f"{num_workers} rollout workers need a core each; this machine "
                              f"has {len(cores)} usable cores ({core_list(cores)})")
    else:
        per_worker = threads_per_worker
        if per_worker * num_workers > len(cores):
            raise ConfigError("rollout.cpu_threads_per_worker", f"{num_workers} rollout workers x {per_worker} cores "
                              f"do not fit the {len(cores)} usable cores of this machine ({core_list(cores)})")
    if not 0 <= worker_index < num_workers:
        raise ValueError(f"worker_index {worker_index} is not in [0, {num_workers})")
    return tuple(cores[worker_index * per_worker:(worker_index + 1) * per_worker])


def core_list(cores: Sequence[int]) -> str:
    return ",".join(str(c) for c in cores)
