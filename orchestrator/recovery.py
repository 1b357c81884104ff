"""Collecting a step's shards from stage actors, with a dead actor's shard sent again to a fresh one.

The design's failure rule: a row is trained on exactly once per epoch; if a worker dies, its rows are re-dispatched,
never dropped or doubled. Results are gathered per shard, in order; when the actor of a shard has died
(``RayActorError``: killed, OOM, node lost) the caller's ``redo(i)`` replaces that actor and submits the same shard
again. Rollouts are reproducible per row (each trace's seed derives from its sample id), so the redone shard holds
the same traces the dead worker would have produced. An error raised *inside* a task (bad input, a bug) is not a
death and is never retried.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import ray


class WorkerLostError(RuntimeError):
    """A shard's actor died more often than the retries allow."""


def gather_shards(refs: Sequence[ray.ObjectRef], redo: Callable[[int], ray.ObjectRef], *, timeout_s: float,
                  max_retries: int, what: str, log: Callable[[str], None] = print) -> list[Any]:
    """The results of ``refs`` in order. Shard ``i`` whose actor died is redone with ``redo(i)`` (which must replace
    the actor and return the new ref), at most ``max_retries`` times; each wait is bounded by ``timeout_s``."""
    results = []
    for index, ref in enumerate(refs):
        retries = 0
        while True:
            started = time.monotonic()
            try:
                results.append(ray.get(ref, timeout=timeout_s))
                break
            except ray.exceptions.RayActorError as e:
                if retries >= max_retries:
                    raise WorkerLostError(f"{what} worker {index} died {retries + 1} times in one step "
                                          f"(last: {type(e).__name__}); giving up") from e
                retries += 1
                log(f"opsd: {what} worker {index} died after {time.monotonic() - started:.1f} s "
                    f"({type(e).__name__}); its shard goes to a fresh worker (retry {retries}/{max_retries})")
                ref = redo(index)
    return results
