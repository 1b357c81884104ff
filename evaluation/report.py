"""An evaluation's run directory, its Markdown table, and the comparison of two runs.

A run directory holds (written together, atomically: a crash never leaves half a run):

    samples.jsonl   one line per sample: eval set, problem id, sample index, response, extracted answer, reference,
                    grade status, correct, finish reason, response tokens, adapter version
    results.json    model, adapter, prompt, settings, per-eval-set scores with 95% intervals, timings
    results.md      the Markdown table (percentages)

``opsd eval --compare RUN_A RUN_B`` recomputes both runs' per-problem scores from their ``samples.jsonl`` and
prints, per eval set and metric, A, B and B - A with the 95% interval of the paired difference over the problems
both runs evaluated; the difference "exceeds noise" when that interval excludes 0.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

from opsd.atomic import atomic_directory
from opsd.errors import UserInputError
from evaluation.scores import Estimate, ProblemScore, default_ks, paired_difference
from evaluation.records import EvalResult, EvalSetResult, SampleRecord, problem_scores

SAMPLES_FILE = "samples.jsonl"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.1f}"


def _with_interval(estimate: Estimate) -> str:
    if math.isnan(estimate.low):
        return _percent(estimate.mean)
    return f"{_percent(estimate.mean)} [{_percent(estimate.low)}, {_percent(estimate.high)}]"


def markdown_table(results: Mapping[str, EvalSetResult]) -> str:
    """One row per eval set: scores in percent, avg@n with its 95% interval, and what went wrong."""
    metrics: list[str] = []
    for result in results.values():
        metrics += [name for name in result.scores if name not in metrics]
    header = ["eval set", "problems"] + metrics + ["no answer", "grading timeouts", "truncated", "mean tokens"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for result in results.values():
        cells = [result.name, str(result.problems)]
        for metric in metrics:
            estimate = result.scores.get(metric)
            if estimate is None:
                cells.append("")
            else:
                cells.append(_with_interval(estimate) if metric.startswith("avg@") else _percent(estimate.mean))
        samples = max(result.samples, 1)
        cells += [
            f"{result.statuses.get('no_answer', 0)} ({_percent(result.statuses.get('no_answer', 0) / samples)}%)",
            str(result.statuses.get("timeout", 0) + result.statuses.get("error", 0)),
            f"{result.truncated} ({_percent(result.truncated / samples)}%)",
            "n/a" if math.isnan(result.mean_response_tokens) else f"{result.mean_response_tokens:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    notes = "Scores in %; avg@n with its 95% interval over problems. Grading timeouts and errors count as wrong."
    skipped = {name: r.skipped for name, r in results.items() if r.skipped}
    if skipped:
        notes += " Problems left out (prompt too long): " + ", ".join(f"{k} {v}" for k, v in skipped.items()) + "."
    return "\n".join(lines) + "\n\n" + notes + "\n"


def write_run(out: str | os.PathLike, result: EvalResult, info: Mapping[str, Any], overwrite: bool = False
              ) -> Path:
    """Write ``samples.jsonl``, ``results.json`` and ``results.md`` into ``out``, atomically. ``info``: what was
    evaluated (model, adapter, prompt, config, engines), stored in results.json as given."""
    results = {
        **info,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "policy_version": result.policy_version,
        "eval_sets": {name: r.to_dict() for name, r in result.eval_sets.items()},
        "seconds": result.seconds,
    }
    header = f"# Evaluation of {info.get('model', '?')}" + (f" + {info['adapter']}" if info.get("adapter") else "")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        with open(tmp / SAMPLES_FILE, "w", encoding="utf-8") as f:
            for sample in result.samples:
                f.write(json.dumps(sample.__dict__, ensure_ascii=False) + "\n")
        (tmp / RESULTS_FILE).write_text(json.dumps(_finite(results), indent=2) + "\n", encoding="utf-8")
        (tmp / TABLE_FILE).write_text(header + "\n\n" + markdown_table(result.eval_sets), encoding="utf-8")
    return Path(out)


def _finite(value: Any) -> Any:
    """NaN (an undefined interval) as null: results.json stays strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def read_run(path: str | os.PathLike) -> tuple[dict[str, Any], list[SampleRecord]]:
    """A run directory's results.json and samples (clear errors for what is not a run directory)."""
    folder = Path(path)
    results_file, samples_file = folder / RESULTS_FILE, folder / SAMPLES_FILE
    for file in (results_file, samples_file):
        if not file.is_file():
            raise UserInputError(f"{folder} is not an evaluation run directory: {file.name} is missing")
    try:
        info = json.loads(results_file.read_text(encoding="utf-8"))
        samples = []
        with open(samples_file, encoding="utf-8") as f:
            for line_number, line in enumerate(f, start=1):
                if line.strip():
                    samples.append(SampleRecord.from_dict(json.loads(line)))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        where = f"line {line_number} of {samples_file}" if "line_number" in locals() else str(results_file)
        raise UserInputError(f"{where}: not a valid evaluation record ({type(exc).__name__}: {exc})") from exc
    return info, samples


# Settings that do not change what a response is scored against (which problems are compared is shown anyway).
_NOT_SETTINGS = {"sets", "mapping", "columns", "limit", "every", "pass_k", "grade_processes",
                 "generate_timeout_s"}


def _setting_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """What differs between two runs' model, adapter, sampling, grading and prompt settings."""
    keys = ["model", "adapter"]
    differences = [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]
    for section in ("config", "prompt"):
        sa, sb = a.get(section) or {}, b.get(section) or {}
        for key in sorted(set(sa) | set(sb)):
            if key not in _NOT_SETTINGS and sa.get(key) != sb.get(key):
                differences.append(f"{section}.{key}: {sa.get(key)!r} vs {sb.get(key)!r}")
    return differences


def _comparable_metrics(a: list[ProblemScore], b: list[ProblemScore]) -> list[tuple[str, str]]:
    """(label, per-problem metric) both runs define: avg always, pass@k for k both can estimate, maj at equal n."""
    na, nb = a[0].n, b[0].n
    label = (lambda kind: f"{kind}@{na}") if na == nb else (lambda kind: f"{kind}@{na}/{nb}")
    rows = [(label("avg"), "avg")]
    rows += [(f"pass@{k}", f"pass@{k}") for k in default_ks(min(na, nb))]
    if na == nb:
        rows.append((f"maj@{na}", "maj"))
    return rows


def common_problems(a: list[ProblemScore], b: list[ProblemScore]) -> tuple[list[ProblemScore], list[ProblemScore]]:
    """The problems both runs scored, paired: in ``a``'s order, ``b``'s matched by problem id."""
    by_id_b = {p.problem_id: p for p in b}
    common_a = [p for p in a if p.problem_id in by_id_b]
    return common_a, [by_id_b[p.problem_id] for p in common_a]


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> str:
    """The text ``opsd eval --compare`` prints (see the module docstring)."""
    info_a, samples_a = read_run(run_a)
    info_b, samples_b = read_run(run_b)
    scores_a, scores_b = problem_scores(samples_a), problem_scores(samples_b)
    lines = [f"A: {run_a}  ({info_a.get('model')}{' + ' + str(info_a['adapter']) if info_a.get('adapter') else ''})",
             f"B: {run_b}  ({info_b.get('model')}{' + ' + str(info_b['adapter']) if info_b.get('adapter') else ''})",
             ""]
    header = ["eval set", "metric", "A", "B", "B - A [95% CI]", "exceeds noise", "problems"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(["---", "---"] + ["---:"] * 4 + ["---:"]) + "|"]
    only = []
    for eval_set in list(scores_a) + [name for name in scores_b if name not in scores_a]:
        if eval_set not in scores_a or eval_set not in scores_b:
            only.append(f"{eval_set} (only in {'A' if eval_set in scores_a else 'B'})")
            continue
        common_a, common_b = common_problems(scores_a[eval_set], scores_b[eval_set])
        if not common_a:
            only.append(f"{eval_set} (no problem in common)")
            continue
        for label, metric in _comparable_metrics(common_a, common_b):
            d = paired_difference([p.value(metric) for p in common_a], [p.value(metric) for p in common_b])
            interval = "" if math.isnan(d.low) else f" [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"
            verdict = {True: "yes", False: "no", None: "n/a"}[d.beyond_noise]
            lines.append(f"| {eval_set} | {label} | {_percent(d.a)} | {_percent(d.b)} | {100 * d.diff:+.1f}{interval} "
                         f"| {verdict} | {d.count} |")
    lines.append("")
    lines.append("Scores in %, over the problems both runs evaluated; the interval is that of the mean paired "
                 "difference per problem (normal, 95%): 'yes' when it excludes 0.")
    if only:
        lines.append("Not compared: " + ", ".join(only) + ".")
    differences = _setting_differences(info_a, info_b)
    if differences:
        lines.append("Settings that differ: " + "; ".join(differences) + ".")
    return "\n".join(lines) + "\n"
