"""Where the teacher and the student disagree: OPSD's per-token signal, by kind of token.

The base model's own held-out traces (the ``samples.jsonl`` of its evaluation) are read twice by the same model:
as the student (the problem alone) and as the teacher (the problem and its reference solution, the run's teacher
prompt). At every response token, the generalized Jensen-Shannon divergence of the two next-token distributions
(the loss's beta and temperature) is what OPSD trains on. Grouped by what the token is (a number, an operator,
answer formatting, a word, anything else), it shows which tokens carry the signal, as the paper's token-level
analysis does.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

TOKEN_KINDS = ("number", "operator", "format", "word", "other")
_OPERATOR = re.compile(r"^[+\-=*/x×÷<>]+$")


def token_kind(text: str) -> str:
    """The kind of a decoded token: number (has a digit), operator, format (LaTeX, braces), word, other."""
    t = text.strip()
    if any(c.isdigit() for c in t):
        return "number"
    if t and _OPERATOR.match(t):
        return "operator"
    if "\\" in t or "{" in t or "}" in t or "boxed" in t:
        return "format"
    if any(c.isalpha() for c in t):
        return "word"
    return "other"


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float,
                    temperature: float) -> torch.Tensor:
    """Per-position GJS_beta = beta KL(T || M) + (1 - beta) KL(S || M), M = beta T + (1 - beta) S, on the logits
    divided by ``temperature``, in float64 (beta 0: forward KL(T || S); 1: reverse KL(S || T), as the loss)."""
    s = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits.double() / temperature, dim=-1)
    if beta == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if beta == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


@torch.no_grad()
def response_logits(model: Any, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Logits predicting each response token [len(response), V] after ``prompt_ids``."""
    ids = torch.tensor([prompt_ids + response_ids])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt_ids) - 1: len(prompt_ids) + len(response_ids) - 1]


def divergence_by_kind(model_dir: Path, eval_dir: Path, data_file: Path, cfg: Any,
                       max_traces: int = 200) -> dict[str, Any]:
    """Mean per-token divergence and share of the total by token kind, over the first ``max_traces`` traces of
    ``eval_dir``; also split by whether the trace's answer was correct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opsd.prompts import PromptBuilder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(tokenizer, cfg.prompt)
    solutions = {}
    with open(data_file, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            solutions[row["id"]] = (row["problem"], row["solution"])
    beta, temperature = cfg.learner.loss.beta, cfg.learner.loss.tau
    sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    traces = 0
    with open(eval_dir / "samples.jsonl", encoding="utf-8") as f:
        for line in f:
            if traces >= max_traces:
                break
            sample = json.loads(line)
            problem, solution = solutions[sample["problem_id"]]
            response_ids = builder.encode(sample["response"])
            if not response_ids:
                continue
            student = response_logits(model, builder.student_prompt_ids(problem), response_ids)
            teacher = response_logits(model, builder.teacher_prompt_ids(problem, solution), response_ids)
            values = generalized_jsd(student, teacher, beta, temperature).tolist()
            outcome = "correct" if sample["correct"] else "wrong"
            for token, value in zip(response_ids, values):
                kind = token_kind(tokenizer.decode([token]))
                for key in (kind, f"{outcome}/{kind}", "all", f"{outcome}/all"):
                    sums[key][0] += value
                    sums[key][1] += 1
            traces += 1
    total = sums["all"][0] or 1.0
    kinds = {kind: {"tokens": sums[kind][1], "mean": sums[kind][0] / sums[kind][1] if sums[kind][1] else None,
                    "share": sums[kind][0] / total} for kind in TOKEN_KINDS}
    by_outcome = {key: {"tokens": n, "mean": value / n} for key, (value, n) in sums.items() if "/" in key and n}
    return {"traces": traces, "beta": beta, "temperature": temperature, "kinds": kinds, "by_outcome": by_outcome,
            "mean": sums["all"][0] / sums["all"][1] if sums["all"][1] else None}
