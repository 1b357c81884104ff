"""Is an extracted answer equivalent to the reference? math-verify decides, in worker processes, under a timeout.

math-verify parses LaTeX into SymPy and compares symbolically and numerically (``\\frac{1}{2}`` = ``0.5``,
``[-2,7]`` = ``[-2, 7]``, ``10\\text{ inches}`` = ``10``, ``x=5`` = ``5``). Some answers make SymPy run for minutes
(``1000000!``, ``(x+y+z)^{200}``), so every answer gets a deadline. math-verify's own timeout uses ``signal.alarm``,
which fails outside a process's main thread (Ray actor threads, a training loop's helper threads) and cannot
interrupt C code. So grading runs in a small pool of worker processes owned by a :class:`Grader`: the parent sends
one answer at a time to an idle worker and, when a worker passes its deadline, kills it, records ``timeout`` for
that answer (counted as wrong, and reported) and starts a replacement. math-verify's own timeouts are off.

Statuses: ``correct``; ``wrong``; ``no_answer`` (nothing extracted); ``timeout``; ``error`` (the worker died or
math-verify raised; counted as wrong and reported). An answer whose text equals the reference (up to surrounding
spaces) is correct without a worker.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, Sequence

GradeStatus = Literal["correct", "wrong", "no_answer", "timeout", "error"]
GRADE_STATUSES: tuple[str, ...] = ("correct", "wrong", "no_answer", "timeout", "error")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_START_TIMEOUT_S = 120.0


def verify_answer(answer: str, reference: str) -> bool:
    """math-verify's verdict on one answer, without any timeout (run it where it can be killed: a Grader worker).

    Both sides are wrapped in ``\\boxed{}`` so math-verify reads them as LaTeX answers, whatever they look like
    (a bare number, an interval, ``\\text{(C)}``)."""
    from math_verify import parse, verify

    gold = parse(f"\\boxed{{{reference}}}", parsing_timeout=None)
    target = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    return bool(verify(gold, target, timeout_seconds=None))


def _worker_main(conn: Connection) -> None:
    """A grading process: import and warm up math-verify, say ready, then answer (index, answer, reference)."""
    import logging

    import math_verify.grader
    import math_verify.parser

    # Timeouts are this pool's job: math-verify's warning that its own are off would be printed once per worker.
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    verify_answer("\\frac{1}{2}", "0.5")  # first parse builds the LaTeX parser (~0.2 s): not on an answer's clock
    conn.send(("ready", os.getpid()))
    while True:
        try:
            task = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if task is None:
            return
        index, answer, reference = task
        try:
            status = "correct" if verify_answer(answer, reference) else "wrong"
        except Exception:  # math-verify failed on this answer: a wrong answer, reported as a grading error
            status = "error"
        conn.send((index, status))


class _Worker:
    """One grading process and the end of its pipe; ``task``/``deadline`` are set while it grades."""

    def __init__(self, context: Any, start_timeout_s: float):
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child,), daemon=True, name="opsd-grader")
        self.process.start()
        child.close()
        self.ready = False
        self.start_deadline = time.monotonic() + start_timeout_s
        self.task: int | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join(timeout=10)
        self.conn.close()


@dataclass(frozen=True)
class GradeStats:
    """What one :meth:`Grader.grade` call did: answers graded by math-verify, and its time."""

    verified: int
    timeouts: int
    errors: int
    seconds: float


class Grader:
    """A pool of grading processes with a per-answer timeout (see the module docstring). Reuse one across calls
    (a training run grades every few steps); close it, or use it as a context manager.

    ``processes`` default: the machine's cores, at most 4. Workers start on the first answer that needs one.
    """

    def __init__(self, processes: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 start_timeout_s: float = DEFAULT_START_TIMEOUT_S):
        if processes is None:
            processes = min(4, len(os.sched_getaffinity(0)))
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.processes = processes
        self.timeout_s = float(timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        # spawn: a fresh interpreter. Forking a process that runs Ray or vLLM threads is unsafe.
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self.last_stats = GradeStats(0, 0, 0, 0.0)

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop every worker (bounded: a worker that does not exit within a few seconds is killed)."""
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (OSError, ValueError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=5)
            worker.conn.close()
        self._workers = []

    def grade(self, pairs: Sequence[tuple[str | None, str]]) -> list[GradeStatus]:
        """The status of each ``(extracted answer or None, reference answer)`` pair, in order.

        Identical pairs are graded once. Raises ``RuntimeError`` when no worker can be started in time."""
        started = time.perf_counter()
        statuses: list[Any] = [None] * len(pairs)
        todo: dict[tuple[str, str], list[int]] = {}
        for i, (answer, reference) in enumerate(pairs):
            if answer is None:
                statuses[i] = "no_answer"
            elif answer.strip() == reference.strip():
                statuses[i] = "correct"
            else:
                todo.setdefault((answer, reference), []).append(i)
        unique = list(todo)
        verdicts = self._run(unique) if unique else []
        for key, verdict in zip(unique, verdicts):
            for i in todo[key]:
                statuses[i] = verdict
        self.last_stats = GradeStats(
            verified=len(unique), timeouts=verdicts.count("timeout"), errors=verdicts.count("error"),
            seconds=time.perf_counter() - started)
        return statuses

    # -- the pool ----------------------------------------------------------------------------------------------
    def _run(self, tasks: list[tuple[str, str]]) -> list[GradeStatus]:
        results: list[Any] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        while len(self._workers) < min(self.processes, len(tasks)):
            self._workers.append(self._start_worker())
        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for worker in self._workers:
                if worker.ready and worker.task is None and pending:
                    index = pending.popleft()
                    worker.conn.send((index, *tasks[index]))
                    worker.task, worker.deadline = index, now + self.timeout_s
                elif not worker.ready and now > worker.start_deadline:
                    raise RuntimeError(f"a grading process did not start within {self.start_timeout_s:.0f} s")
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            deadlines += [w.start_deadline for w in self._workers if not w.ready]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 1.0
            ready = wait([w.conn for w in self._workers], timeout=timeout)
            for worker in list(self._workers):
                if worker.conn in ready:
                    self._receive(worker, results)
                elif worker.task is not None and time.monotonic() > worker.deadline:
                    results[worker.task] = "timeout"
                    self._replace(worker)
        return results

    def _receive(self, worker: _Worker, results: list[Any]) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):  # the process died (e.g. out of memory): its answer is a grading error
            if not worker.ready:
                code = worker.process.exitcode
                worker.kill()
                self._workers.remove(worker)
                raise RuntimeError(f"a grading process exited while starting (exit code {code}); is math-verify "
                                   "installed (pip install 'math-verify[antlr4_13_2]')?") from None
            if worker.task is not None:
                results[worker.task] = "error"
            self._replace(worker)
            return
        if message[0] == "ready":
            worker.ready = True
            return
        index, status = message
        results[index] = status
        worker.task = None

    def _start_worker(self) -> _Worker:
        return _Worker(self._context, self.start_timeout_s)

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = self._start_worker()
