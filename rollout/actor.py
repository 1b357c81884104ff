"""The RolloutWorker as a Ray actor, and the few calls the orchestrator makes on a group of them.

The actor is the plain class, unchanged (``ray.remote(RolloutWorker)``): one engine per actor process, which is
also what vLLM needs (its in-process CPU engine must be built under ``__main__`` or in an actor). Resource requests
follow the config: on CPU the actor asks Ray for as many CPUs as the cores its engine binds to, on GPU for
``gpus_per_worker`` GPUs; ``start_rollout_actors(options=...)`` puts each worker on its placement-group bundle
(``orchestrator.placement``), overriding those defaults. Every wait is bounded.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import pyarrow as pa
import ray

from opsd.adapter import AdapterPayload
from opsd.prompts import PromptConfig
from rollout.config import RolloutConfig
from rollout.resources import ModelSpec
from rollout.sharding import merge_tables, shard_rows
from rollout.worker import AdapterInfo, RolloutWorker, Sampling, WorkerInfo

RolloutActor = ray.remote(RolloutWorker)

DEFAULT_START_TIMEOUT_S = 600.0


def actor_options(config: RolloutConfig, cpu_cores: Sequence[int] | None = None) -> dict[str, Any]:
    """Ray resources of one rollout actor. CPU-only when ``gpus_per_worker`` is 0."""
    if config.gpus_per_worker > 0:
        return {"num_gpus": config.gpus_per_worker, "num_cpus": 1}
    if cpu_cores is not None:
        cpus = len(cpu_cores)
    elif config.cpu_threads_per_worker is not None:
        cpus = config.cpu_threads_per_worker
    else:
        cpus = max(1, (os.cpu_count() or 1) // config.num_workers)
    return {"num_gpus": 0, "num_cpus": cpus}


def start_rollout_actors(model: ModelSpec, config: RolloutConfig, prompts: PromptConfig | None = None, *,
                         cpu_cores: Sequence[Sequence[int]] | None = None,
                         options: Sequence[Mapping[str, Any]] | None = None,
                         timeout_s: float = DEFAULT_START_TIMEOUT_S) -> list[ray.actor.ActorHandle]:
    """``config.num_workers`` actors, each with its engine started (``cpu_cores[i]``: worker i's cores on CPU;
    default: the i-th block of the machine's cores). ``options[i]``: Ray actor options of worker i (e.g. its
    placement-group bundle, ``orchestrator.placement.Reservation.options_for("rollout", i)``), merged over
    :func:`actor_options`. Raises ``ray.exceptions.GetTimeoutError`` after ``timeout_s``."""
    for name, given in (("cpu_cores", cpu_cores), ("options", options)):
        if given is not None and len(given) != config.num_workers:
            raise ValueError(f"{name} lists {len(given)} workers, config.num_workers is {config.num_workers}")
    actors = []
    for index in range(config.num_workers):
        cores = cpu_cores[index] if cpu_cores is not None else None
        merged = {**actor_options(config, cores), **(options[index] if options is not None else {})}
        actors.append(RolloutActor.options(**merged).remote(
            model, config, prompts, worker_index=index, cpu_cores=cores))
    try:
        ray.get([actor.info.remote() for actor in actors], timeout=timeout_s)  # engines up, or the start error
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return actors


def worker_infos(actors: Sequence[ray.actor.ActorHandle], timeout_s: float = 60.0) -> list[WorkerInfo]:
    return ray.get([actor.info.remote() for actor in actors], timeout=timeout_s)


def load_adapter_on_all(actors: Sequence[ray.actor.ActorHandle], version: int,
                        payload: AdapterPayload | ray.ObjectRef | None, timeout_s: float = 300.0
                        ) -> list[AdapterInfo]:
    """Load one adapter version on every actor (``ray.put`` once: every actor reads the same object).

    Raises the first worker's error (an :class:`opsd.adapter.AdapterError` for a bad adapter). The actors are
    independent: a bad adapter fails on every one of them and each keeps its version; after any other failure some
    may serve the new version and some the old, which the rows' ``policy_version`` shows.
    """
    ref = payload if isinstance(payload, ray.ObjectRef) or payload is None else ray.put(payload)
    return ray.get([actor.load_adapter.remote(version, ref) for actor in actors], timeout=timeout_s)


def generate_sharded(actors: Sequence[ray.actor.ActorHandle], problems: pa.Table, sampling: Sampling | None = None,
                     timeout_s: float = 3600.0) -> pa.Table:
    """Shard ``problems`` over ``actors``, generate concurrently, merge the tables back in the batch's order."""
    shards = shard_rows(problems, len(actors))
    refs = [actor.generate.remote(shard, sampling) for actor, shard in zip(actors, shards)]
    return merge_tables(ray.get(refs, timeout=timeout_s))


def stop_rollout_actors(actors: Sequence[ray.actor.ActorHandle], timeout_s: float = 60.0) -> None:
    """Let the engines remove their adapter scratch files (bounded), then kill the actors by handle."""
    try:
        ray.get([actor.close.remote() for actor in actors], timeout=timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
        pass
    for actor in actors:
        ray.kill(actor)
