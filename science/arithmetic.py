"""Procedurally generated arithmetic word problems with worked solutions: the small-scale task of `opsd science`.

Each problem is one of six kinds, from a bare sum to a two-step story problem; its reference solution works the
steps out in words and ends with ``\\boxed{answer}``, the format the student prompt asks for, so that the teacher
(OPSD), the SFT targets and the graders all read the same answer. The numbers are small enough that SmolLM2-135M-
Instruct solves part of them: a task on which training can move the score both ways.

``generate(n, seed)`` is deterministic: the same seed gives the same rows on every machine (Python's own
``random.Random``, no global state); ids are ``arith-<seed>-<index>``. Train and held-out sets use different seeds
and no held-out problem text appears among the training rows (``split``).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from opsd.atomic import write_text_atomic

NAMES = ("Tom", "Anna", "Ben", "Maria", "Sam", "Lily", "Omar", "Emma", "Jack", "Nora")
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells")


@dataclass(frozen=True)
class Problem:
    id: str
    kind: str
    problem: str
    solution: str
    answer: str


def _boxed(value: int) -> str:
    return f"The answer is \\boxed{{{value}}}."


def _sum(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return f"What is {a} + {b}?", f"We add the two numbers: {a} + {b} = {a + b}.", a + b


def _difference(rng: random.Random) -> tuple[str, str, int]:
    a = rng.randint(5, 20)
    b = rng.randint(1, a - 1)
    return f"What is {a} - {b}?", f"We subtract: {a} - {b} = {a - b}.", a - b


def _product(rng: random.Random) -> tuple[str, str, int]:
    a, b = rng.randint(2, 12), rng.randint(2, 15)
    return f"What is {a} times {b}?", f"We multiply: {a} x {b} = {a * b}.", a * b


def _buys(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(1, 10), rng.randint(1, 10)
    return (f"{name} has {a} {item}. {name} buys {b} more {item}. How many {item} does {name} have now?",
            f"{name} starts with {a} {item} and gets {b} more, so {name} has {a} + {b} = {a + b} {item}.", a + b)


def _gives(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(3, 15)
    b = rng.randint(1, a - 1)
    return (f"{name} has {a} {item} and gives {b} of them to a friend. How many {item} does {name} have left?",
            f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {a - b} {item} are left.", a - b)


def _two_steps(rng: random.Random) -> tuple[str, str, int]:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 10), rng.randint(1, 6)
    c = rng.randint(1, a + b - 1)
    return (f"{name} has {a} {item}. {name} buys {b} more, then gives {c} to a friend. How many {item} does "
            f"{name} have now?",
            f"After buying, {name} has {a} + {b} = {a + b} {item}.\nAfter giving {c} away, {name} has "
            f"{a + b} - {c} = {a + b - c} {item}.", a + b - c)


KINDS: dict[str, Callable[[random.Random], tuple[str, str, int]]] = {
    "sum": _sum, "difference": _difference, "product": _product, "buys": _buys, "gives": _gives,
    "two_steps": _two_steps,
}


def generate(n: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """``n`` distinct problems (kinds in turn), none whose text is in ``exclude``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    kinds = list(KINDS.items())
    rows: list[Problem] = []
    seen = set(exclude)
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n:
            raise ValueError(f"cannot draw {n} distinct problems (seed {seed}); the kinds have too few")
        kind, make = kinds[len(rows) % len(kinds)]
        problem, steps, answer = make(rng)
        if problem in seen:
            continue
        seen.add(problem)
        rows.append(Problem(f"arith-{seed}-{len(rows)}", kind, problem, f"{steps}\n{_boxed(answer)}", str(answer)))
    return rows


def split(train_rows: int, heldout_rows: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """Training and held-out problems from two seeds; no held-out problem text among the training rows."""
    heldout = generate(heldout_rows, seed=seed + 1)
    train = generate(train_rows, seed=seed, exclude={p.problem for p in heldout})
    return train, heldout


def write_jsonl(rows: list[Problem], path: str | os.PathLike) -> Path:
    """One JSON object per line (id, kind, problem, solution, answer), written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(asdict(r)) + "\n" for r in rows))
    return path
