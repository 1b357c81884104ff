"""The comparison's tables: each model's held-out score with its interval, what its training spent, and paired
differences per problem (the same statistics as ``opsd eval --compare``), written as ``results.md`` and
``results.json``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from evaluation.records import SampleRecord, problem_scores, summarize
from evaluation.report import common_problems, read_run
from evaluation.scores import ProblemScore, paired_difference
from orchestrator.metrics import read_metrics
from opsd.atomic import write_text_atomic

# Which differences the report shows: every arm against the base model, then OPSD against each baseline.
PAIRS = (("base", "opsd"), ("base", "sft"), ("base", "grpo"), ("base", "opsd-curriculum"), ("sft", "opsd"),
         ("grpo", "opsd"), ("opsd", "opsd-curriculum"))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _mean(entry: Mapping[str, Any] | None) -> str:
    return "-" if not entry or entry.get("mean") is None else f"{entry['mean']:.4f}"


def model_row(name: str, samples: list[SampleRecord], run_dir: Path | None) -> dict[str, Any]:
    """One model's held-out scores and, for a trained arm, what its run did (steps, tokens, seconds)."""
    (result,) = summarize(samples).values()
    avg = next(v for k, v in result.scores.items() if k.startswith("avg@"))
    maj = next(v for k, v in result.scores.items() if k.startswith("maj@"))
    row: dict[str, Any] = {
        "model": name, "n": result.n, "problems": result.problems, "avg": avg.mean, "avg_low": avg.low,
        "avg_high": avg.high, "maj": maj.mean, "no_answer": result.statuses.get("no_answer", 0) / result.samples,
        "truncated": result.truncated / result.samples,
        "mean_response_tokens": result.mean_response_tokens,
    }
    if run_dir is not None:
        records = read_metrics(run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        row.update(steps=len(records), train_seconds=sum(r.get("step_seconds", 0.0) for r in records),
                   generated_tokens=summary.get("generated_tokens_total", 0),
                   trained_rows=sum(r.get("rows", 0) for r in records))
    return row


def paired(scores: Mapping[str, list[ProblemScore]], a: str, b: str) -> dict[str, Any]:
    """B - A in avg@n over the held-out problems both scored, per problem, with its 95% interval."""
    common_a, common_b = common_problems(scores[a], scores[b])
    d = paired_difference([p.value("avg") for p in common_a], [p.value("avg") for p in common_b])
    return {"a": a, "b": b, "a_avg": d.a, "b_avg": d.b, "diff": d.diff, "low": d.low, "high": d.high,
            "problems": d.count, "beyond_noise": d.beyond_noise}


def write_report(out: Path, settings: Mapping[str, Any], evals: Mapping[str, Path], divergence: Mapping[str, Any],
                 seconds: Mapping[str, float], total_s: float) -> Path:
    samples = {name: read_run(path)[1] for name, path in evals.items()}  # each evaluation read once
    rows = [model_row(name, samples[name], None if name == "base" else out / "runs" / name) for name in evals]
    scores = {name: next(iter(problem_scores(s).values())) for name, s in samples.items()}
    pairs = [paired(scores, a, b) for a, b in PAIRS if a in evals and b in evals]
    n = rows[0]["n"]
    lines = [f"# Held-out accuracy: {rows[0]['problems']} problems, avg@{n} (95% interval)", "",
             f"| model | avg@{n} % | 95% CI | maj@{n} % | no answer % | truncated % | response tokens | steps | "
             "rows trained | training tokens sampled | training s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        trained = "steps" in r
        spent = (f"{r['steps']} | {r['trained_rows']} | {r['generated_tokens']:,} | {r['train_seconds']:.0f}"
                 if trained else "- | - | - | -")
        lines.append(f"| {r['model']} | {_pct(r['avg'])} | [{_pct(r['avg_low'])}, {_pct(r['avg_high'])}] | "
                     f"{_pct(r['maj'])} | {_pct(r['no_answer'])} | {_pct(r['truncated'])} | "
                     f"{r['mean_response_tokens']:.0f} | {spent} |")
    lines += ["", f"# Paired differences (B - A, avg@{n} points, per problem, 95% interval)", "",
              "| A | B | A % | B % | B - A | 95% CI | exceeds noise |", "|---|---|---:|---:|---:|---:|---|"]
    for p in pairs:
        verdict = {True: "yes", False: "no", None: "n/a"}[p["beyond_noise"]]
        lines.append(f"| {p['a']} | {p['b']} | {_pct(p['a_avg'])} | {_pct(p['b_avg'])} | {100 * p['diff']:+.1f} | "
                     f"[{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] | {verdict} |")
    if divergence:
        lines += ["", f"# Teacher-student divergence on the base model's held-out traces ({divergence['traces']} "
                  f"traces, GJS beta {divergence['beta']}, temperature {divergence['temperature']})", "",
                  "| token kind | tokens | mean divergence | share of the total | mean in correct traces | "
                  "mean in wrong traces |", "|---|---:|---:|---:|---:|---:|"]
        outcome = divergence["by_outcome"]
        for kind, d in divergence["kinds"].items():
            right, wrong = outcome.get(f"correct/{kind}"), outcome.get(f"wrong/{kind}")
            cells = [_mean(d), f"{100 * d['share']:.1f}%", _mean(right), _mean(wrong)]
            lines.append(f"| {kind} | {d['tokens']} | " + " | ".join(cells) + " |")
    lines += ["", f"Total {total_s / 60:.1f} min; per arm (training and evaluation): "
              + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()),
              "", "Settings: `" + json.dumps(settings) + "`", ""]
    report = out / "results.md"
    write_text_atomic(report, "\n".join(lines))
    write_text_atomic(out / "results.json", json.dumps(
        {"settings": settings, "models": rows, "paired": pairs, "divergence": divergence, "seconds": seconds,
         "total_s": total_s}, indent=2, default=str) + "\n")
    return report
