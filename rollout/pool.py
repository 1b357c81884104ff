"""RolloutPool: the rollout stage as one object. It starts its RolloutWorker actors (in their placement bundles),
shards each batch over them, gathers the shards (a dead or hung worker is replaced and its shard sent again), and
loads adapter versions on every worker.

    pool = RolloutPool(model, rollout_config, prompts, actor_options=reservation_options, max_lora_rank=64)
    batch = pool.launch(problems)            # generating
    rollouts = pool.collect(batch)           # Rollouts: table refs (for the next stage) + a summary (for metrics)
    pool.load_adapter(payload)               # every worker serves payload.version from the next launch on
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
import ray

from opsd.actors import ProcessSetup, gather_shards, get, kill_actors, set_up_first
from opsd.adapter import AdapterError, AdapterPayload
from opsd.model import ModelSpec, as_model_spec
from opsd.prompts import PromptConfig
from opsd.sampling import Sampling
from opsd.tables import TableRefs, concat_tables, shard_rows
from rollout.config import RolloutConfig
from opsd.schema import with_rollout_stats
from rollout.table import RolloutSummary
from rollout.worker import RolloutWorker, WorkerInfo

RolloutActor = ray.remote(set_up_first(RolloutWorker))


class AdapterLoadError(RuntimeError):
    """An adapter version that some rollout workers serve and one cannot load, even after being replaced."""

# A shard whose worker dies (or hangs) is sent to a fresh worker at most this many times per step.
MAX_SHARD_RETRIES = 2


def default_actor_options(config: RolloutConfig) -> dict[str, Any]:
    """Ray resources of one rollout actor without a placement plan: the cores its engine binds on CPU, else
    ``gpus_per_worker`` GPUs."""
    if config.gpus_per_worker > 0:
        return {"num_gpus": config.gpus_per_worker, "num_cpus": 1}
    if config.cpu_threads_per_worker is not None:
        cpus = config.cpu_threads_per_worker
    else:
        cpus = max(1, (os.cpu_count() or 1) // config.num_workers)
    return {"num_gpus": 0, "num_cpus": cpus}


@dataclass
class RolloutBatch:
    """One batch of problems, sharded over the workers, generating."""

    shards: list[pa.Table]
    sampling: Sampling | None
    prompts: PromptConfig | None
    tables: list[ray.ObjectRef]
    summaries: list[ray.ObjectRef]
    adapter: tuple[int, ray.ObjectRef | None] = (0, None)  # the version the batch was launched on

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)


@dataclass
class Rollouts:
    """A batch's rollouts: the shards' tables in the object store and what the driver knows of them."""

    tables: TableRefs
    summary: RolloutSummary


class RolloutPool:
    def __init__(self, model: ModelSpec | str, config: RolloutConfig, prompts: PromptConfig | None = None, *,
                 actor_options: Sequence[dict[str, Any]] | None = None, max_lora_rank: int = 64,
                 call_timeout_s: float = 3600.0, log: Callable[[str], None] = print, log_dir: str | None = None,
                 wait: bool = True):
        """``actor_options[i]``: worker i's Ray options (its placement bundle), over :func:`default_actor_options`.
        ``max_lora_rank``: the engines' LoRA rank (``opsd.lora.engine_lora_rank`` of the adapters to serve).
        ``call_timeout_s`` bounds every wait: engine start, a shard's generation, an adapter load. ``log_dir``: each
        worker's output goes to ``log_dir/rollout-<i>.log`` instead of the driver's terminal. ``wait=False``: return
        while the engines start, so that other stages start meanwhile; :meth:`wait_ready` before any use."""
        config.validate()
        if actor_options is not None and len(actor_options) != config.num_workers:
            raise ValueError(f"actor_options lists {len(actor_options)} workers, rollout.num_workers is "
                             f"{config.num_workers}")
        self.model, self.config, self.prompts = as_model_spec(model), config, prompts
        self.actor_options, self.max_lora_rank = actor_options, max_lora_rank
        self.call_timeout_s, self.log, self.log_dir = call_timeout_s, log, log_dir
        self.replaced = 0
        self.adapter: tuple[int, ray.ObjectRef | None] = (0, None)  # the version every worker serves, its payload
        self.actors = [self._new_actor(i) for i in range(config.num_workers)]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Every engine up, or its start error raised (and the pool's actors killed); bounded by ``call_timeout_s``."""
        try:
            get([actor.info.remote() for actor in self.actors], self.call_timeout_s)
        except BaseException:
            kill_actors(self.actors)
            raise

    def _new_actor(self, index: int):
        options = {**default_actor_options(self.config),
                   **(self.actor_options[index] if self.actor_options is not None else {})}
        log_file = f"{self.log_dir}/rollout-{index}.log" if self.log_dir else None
        return RolloutActor.options(**options).remote(self.model, self.config, self.prompts, worker_index=index,
                                                      max_lora_rank=self.max_lora_rank,
                                                      process=ProcessSetup(log_file=log_file))

    # -- sampling ----------------------------------------------------------------------------------------------
    def launch(self, problems: pa.Table, sampling: Sampling | None = None,
               prompts: PromptConfig | None = None) -> RolloutBatch:
        """Start generating: the run's sampling and prompts, or a call's own (evaluation)."""
        batch = RolloutBatch(shard_rows(problems, len(self.actors)), sampling, prompts, [], [], self.adapter)
        for actor, shard in zip(self.actors, batch.shards):
            table, summary = actor.generate_shard.options(num_returns=2).remote(shard, sampling, prompts)
            batch.tables.append(table)
            batch.summaries.append(summary)
        return batch

    def collect(self, batch: RolloutBatch, timeout_s: float | None = None) -> Rollouts:
        """The batch's shards, in order; a worker that died or did not answer within ``timeout_s`` (default: the
        pool's call timeout) is replaced and its shard generated again."""
        def redo(i: int) -> ray.ObjectRef:
            self._replace(i)  # serves the current version
            actor, stale = self.actors[i], batch.adapter[0] != self.adapter[0]
            if stale:  # launched before the last push (max_staleness 1): the shard is redone on its own version
                actor.load_adapter.remote(*batch.adapter)  # an actor runs one caller's calls in order
            batch.tables[i], batch.summaries[i] = actor.generate_shard.options(num_returns=2).remote(
                batch.shards[i], batch.sampling, batch.prompts)
            if stale:
                actor.load_adapter.remote(*self.adapter)
            return batch.summaries[i]

        summaries = gather_shards(batch.summaries, redo, timeout_s=timeout_s or self.call_timeout_s,
                                  max_retries=MAX_SHARD_RETRIES, what="rollout", log=self.log)
        return Rollouts(TableRefs(tuple(batch.tables), tuple(s.rows for s in summaries)),
                        RolloutSummary.merge(summaries))

    def generate(self, problems: pa.Table, sampling: Sampling | None = None, prompts: PromptConfig | None = None,
                 timeout_s: float | None = None) -> pa.Table:
        """Launch, collect and fetch: the whole rollout table here, with the combined statistics (evaluation)."""
        rollouts = self.collect(self.launch(problems, sampling, prompts), timeout_s)
        return with_rollout_stats(concat_tables(get(list(rollouts.tables.refs), self.call_timeout_s)),
                                  rollouts.summary.stats)

    # -- adapter versions --------------------------------------------------------------------------------------
    def load_adapter(self, payload: AdapterPayload | None) -> None:
        """Serve ``payload`` (None: the base model, version 0) on every worker: one ``ray.put``, every worker
        reads the same object. After it returns every worker serves that version, so no batch is ever sampled
        with two policy versions:

        * a bad adapter (refused by every worker, ``AdapterError``) is raised and every worker keeps its version;
        * a worker that fails while others loaded it (died, hung, or failed in its engine) is replaced by a fresh
          worker loading this version; if that fails too, :class:`AdapterLoadError` names the version and worker.
        """
        version = payload.version if payload is not None else 0
        ref = ray.put(payload) if payload is not None else None
        calls = [actor.load_adapter.remote(version, ref) for actor in self.actors]
        failed: dict[int, BaseException] = {}
        for index, call in enumerate(calls):
            try:
                get(call, self.call_timeout_s)
            except (AdapterError, ray.exceptions.RayError) as exc:
                failed[index] = exc
        if failed and all(isinstance(e, AdapterError) for e in failed.values()) and len(failed) == len(calls):
            raise next(iter(failed.values()))  # the adapter itself is bad: every worker refused it, none changed
        self.adapter = (version, ref)
        for index, exc in failed.items():
            self.log(f"opsd: rollout worker {index} failed to load adapter v{version} ({type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}); replacing it")
            try:
                self._replace(index)
            except (AdapterError, ray.exceptions.RayError) as again:
                raise AdapterLoadError(f"adapter v{version} could not be loaded on rollout worker {index}, nor on "
                                       f"a fresh one ({type(again).__name__}: {again}); the run stops rather than "
                                       "sample with two policy versions") from again

    @property
    def version(self) -> int:
        return self.adapter[0]

    # -- workers -----------------------------------------------------------------------------------------------
    def _replace(self, index: int) -> None:
        """A fresh worker ``index`` in the same bundle, serving the version the others serve."""
        ray.kill(self.actors[index], no_restart=True)
        self.actors[index] = self._new_actor(index)
        get(self.actors[index].info.remote(), self.call_timeout_s)
        if self.adapter[0] != 0:
            get(self.actors[index].load_adapter.remote(*self.adapter), self.call_timeout_s)
        self.replaced += 1

    def infos(self) -> list[WorkerInfo]:
        return get([actor.info.remote() for actor in self.actors], self.call_timeout_s)

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Let the engines remove their adapter scratch files (bounded), then kill the actors by handle."""
        try:
            ray.get([actor.close.remote() for actor in self.actors], timeout=timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError):
            pass
        kill_actors(self.actors)
        self.actors = []
