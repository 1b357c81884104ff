"""Waiting on stage actors: bounded gets that surface input errors plainly, and shards redone when a worker dies.

A stage pool sends one shard per actor and gathers the results in order. When a shard's actor died (killed, OOM,
node lost: ``RayActorError``) or did not answer within the call timeout (hung), the pool's ``redo(i)`` replaces that
actor and sends the same shard again, a bounded number of times. Work is reproducible per row (rollout seeds derive
from sample ids; the teacher is deterministic), so a redone shard gives the same rows: nothing is dropped or
doubled. An exception raised *inside* a task (bad input, a bug) is not a death and is never retried.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from opsd.errors import UserInputError


class WorkerLostError(RuntimeError):
    """A shard's actor died (or hung) more often than the retries allow."""


def get(refs: Any, timeout_s: float) -> Any:
    """``ray.get`` bounded by ``timeout_s``; an input error raised in an actor is re-raised as itself (one clear
    line for the user), not wrapped in the remote traceback."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, UserInputError):
            raise exc.cause from None
        raise


def gather_shards(refs: Sequence[Any], redo: Callable[[int], Any], *, timeout_s: float, max_retries: int,
                  what: str, log: Callable[[str], None] = print) -> list[Any]:
    """The results of ``refs`` in order. Shard ``i`` whose actor died or hung is redone with ``redo(i)`` (which must
    replace the actor and return the new ref), at most ``max_retries`` times; each wait is bounded by
    ``timeout_s``."""
    import ray

    results = []
    for index, ref in enumerate(refs):
        retries = 0
        while True:
            started = time.monotonic()
            try:
                results.append(get(ref, timeout_s))
                break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as e:
                hung = isinstance(e, ray.exceptions.GetTimeoutError)
                if retries >= max_retries:
                    raise WorkerLostError(f"{what} worker {index} {'hung' if hung else 'died'} {retries + 1} times in "
                                          f"one step (last: {type(e).__name__}); giving up") from e
                retries += 1
                happened = (f"did not answer within {timeout_s:g} s" if hung
                            else f"died after {time.monotonic() - started:.1f} s ({type(e).__name__})")
                log(f"opsd: {what} worker {index} {happened}; its shard goes to a fresh worker "
                    f"(retry {retries}/{max_retries})")
                ref = redo(index)
    return results


def kill_actors(actors: Sequence[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)


# -- the actor's process ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessSetup:
    """How a stage actor's process is set up before its class is built: where its output goes (one file per actor,
    so the driver's terminal shows progress, not every engine's logs) and how many threads torch may use (on CPU,
    a stage that runs alone may use every core)."""

    log_file: str | None = None
    torch_threads: int | None = None

    def apply(self) -> None:
        if self.log_file is not None:
            redirect_output(self.log_file)
        if self.torch_threads is not None:
            import torch

            torch.set_num_threads(self.torch_threads)


def redirect_output(path: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2: C extensions' output too) to ``path``."""
    import os
    import sys

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def set_up_first(cls: type) -> type:
    """``cls`` taking one more keyword, ``process: ProcessSetup``, applied before ``cls.__init__`` runs (the class
    stays usable without it, and keeps its name: Ray names the actor's process after it)."""

    class Actor(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, process: ProcessSetup | None = None, **kwargs):
            if process is not None:
                process.apply()
            super().__init__(*args, **kwargs)

    Actor.__name__ = Actor.__qualname__ = cls.__name__
    Actor.__doc__ = cls.__doc__
    return Actor
