"""TeacherPool: the teacher stage as one object. It starts its TeacherScorer actors (in their placement bundles),
gives each a contiguous share of the rollout stage's rows (refs into the object store, never fetched here), gathers
the scored shards (a dead or hung actor is replaced and its share sent again) and reports what was skipped. With an
EMA teacher it loads each version of the learner's EMA adapter on every actor.

    pool = TeacherPool(model, teacher_config, prompts, temperature=1.1, actor_options=reservation_options)
    scored = pool.score(rollouts.tables)     # Scored: table refs for the learner + a summary for metrics
    pool.load_adapter(payload)               # teacher.kind=ema: every actor scores with it from the next call on
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import ray

from opsd.actors import ProcessSetup, gather_shards, get, kill_actors, set_up_first
from opsd.adapter import AdapterPayload
from opsd.model import ModelSpec, as_model_spec
from opsd.prompts import PromptConfig
from opsd.tables import TableRefs
from teacher.config import TeacherConfig
from teacher.scorer import ScoreSummary, TeacherScorer

TeacherActor = ray.remote(set_up_first(TeacherScorer))

MAX_SHARD_RETRIES = 2


@dataclass
class Scored:
    """A step's scored rows: the shards' tables in the object store, and what was left out or run."""

    tables: TableRefs
    skipped: dict[str, int]  # rows the teacher left out, by reason
    tokens: int  # teacher tokens run (contexts, unpadded)
    teacher_version: int | None = None  # the adapter version the actors scored with (0: base); None: no actors ran


class TeacherPool:
    def __init__(self, model: ModelSpec | str, config: TeacherConfig, prompts: PromptConfig | None = None, *,
                 temperature: float, actor_options: Sequence[dict[str, Any]] | None = None,
                 device: str | None = None, call_timeout_s: float = 3600.0, log: Callable[[str], None] = print,
                 log_dir: str | None = None, torch_threads: int | None = None, wait: bool = True):
        """``actor_options[i]``: actor i's Ray options (its placement bundle and resources). ``device``: "cpu" to
        keep the teacher off GPUs; None picks CUDA when the actor sees one. ``log_dir``: each actor's output goes to
        ``log_dir/teacher-<i>.log``; ``torch_threads``: its CPU threads (default: Ray's, one per reserved CPU).
        ``wait=False``: return while the actors load the model; :meth:`wait_ready` before any use."""
        config.validate()
        if actor_options is not None and len(actor_options) != config.num_workers:
            raise ValueError(f"actor_options lists {len(actor_options)} actors, teacher.num_workers is "
                             f"{config.num_workers}")
        self.model, self.config, self.prompts = as_model_spec(model), config, prompts
        self.temperature, self.actor_options, self.device = temperature, actor_options, device
        self.call_timeout_s, self.log = call_timeout_s, log
        self.log_dir, self.torch_threads = log_dir, torch_threads
        self.replaced = 0
        self.adapter: tuple[int, ray.ObjectRef | None] = (0, None)  # the version every actor scores with, its payload
        self.actors = [self._new_actor(i) for i in range(config.num_workers)]
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Every actor's model loaded, or its error raised (and the pool's actors killed); bounded by
        ``call_timeout_s``."""
        try:
            get([actor.__ray_ready__.remote() for actor in self.actors], self.call_timeout_s)
        except BaseException:
            kill_actors(self.actors)
            raise

    def _new_actor(self, index: int):
        options = self.actor_options[index] if self.actor_options is not None else {}
        log_file = f"{self.log_dir}/teacher-{index}.log" if self.log_dir else None
        return TeacherActor.options(**options).remote(self.model, self.config, temperature=self.temperature,
                                                      prompt=self.prompts, device=self.device,
                                                      process=ProcessSetup(log_file, self.torch_threads))

    def score(self, rollouts: TableRefs) -> Scored:
        """Teacher columns for every row, the rows split evenly over the actors (each reads its pieces of the
        rollout shards from the object store)."""
        shares = [(i, pieces) for i, pieces in enumerate(rollouts.pieces(len(self.actors))) if pieces]
        if not shares:  # no rows: one actor still returns an (empty) scored table, with its metadata
            shares = [(0, [(0, 0, 0)])]
        tables: dict[int, ray.ObjectRef] = {}

        def send(slot: int) -> ray.ObjectRef:
            index, pieces = shares[slot]
            refs = [rollouts.refs[shard] for shard in sorted({p[0] for p in pieces})]
            local = {shard: k for k, shard in enumerate(sorted({p[0] for p in pieces}))}
            pieces = [(local[shard], start, stop) for shard, start, stop in pieces]
            tables[slot], summary = self.actors[index].score_pieces.options(num_returns=2).remote(pieces, *refs)
            return summary

        def redo(slot: int) -> ray.ObjectRef:
            index = shares[slot][0]
            ray.kill(self.actors[index], no_restart=True)
            self.actors[index] = self._new_actor(index)
            if self.adapter[0] != 0:  # the fresh actor scores with the version the others serve
                get(self.actors[index].load_adapter.remote(*self.adapter), self.call_timeout_s)
            self.replaced += 1
            return send(slot)

        summaries: list[ScoreSummary] = gather_shards([send(slot) for slot in range(len(shares))], redo,
                                                      timeout_s=self.call_timeout_s, max_retries=MAX_SHARD_RETRIES,
                                                      what="teacher", log=self.log)
        skipped: dict[str, int] = {}
        for s in summaries:
            for reason, count in s.skipped.items():
                skipped[reason] = skipped.get(reason, 0) + count
        versions = {s.teacher_version for s in summaries}
        if versions != {self.adapter[0]}:
            raise RuntimeError(f"teacher actors scored with adapter versions {sorted(versions)}, not the pool's "
                               f"{self.adapter[0]}")
        return Scored(TableRefs(tuple(tables[slot] for slot in range(len(shares))), tuple(s.rows for s in summaries)),
                      skipped, sum(s.tokens for s in summaries), self.adapter[0])

    # -- adapter versions (teacher.kind=ema) -------------------------------------------------------------------
    def load_adapter(self, payload: AdapterPayload | None) -> None:
        """Score with the base model plus ``payload`` (None: the base model, version 0) on every actor: one
        ``ray.put``, every actor reads the same object. A bad adapter raises ``AdapterError``."""
        version = payload.version if payload is not None else 0
        ref = ray.put(payload) if payload is not None else None
        get([actor.load_adapter.remote(version, ref) for actor in self.actors], self.call_timeout_s)
        self.adapter = (version, ref)

    @property
    def version(self) -> int:
        """The adapter version every actor scores with (0: the base model)."""
        return self.adapter[0]

    def shutdown(self) -> None:
        kill_actors(self.actors)
        self.actors = []
