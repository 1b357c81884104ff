"""``opsd plot RUN_DIR``: the run's curves from ``metrics.jsonl`` to one PNG.

Panels, by step: the loss and GJS of the training batches (with the held-out GJS as points where it was evaluated),
the student's accuracy on its training traces (when graded), tokens per second of each stage, and the step time split
by stage. Then, where the run sampled training tokens and measured an accuracy, accuracy against the training tokens
sampled so far (the training traces' accuracy, and avg@n on each eval set): the efficiency axis on which OPSD, GRPO
and SFT (which samples none) compare. Works on a run that is still going (the file is appended and flushed per step)
and on a finished one.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from opsd.atomic import atomic_file
from opsd.errors import UserInputError
from orchestrator.metrics import STAGES


class MetricsFileError(UserInputError):
    pass


def load_records(run_dir: str | os.PathLike) -> list[dict]:
    """Every step's record; a missing file or a line that is not a JSON object is an error naming the file and line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise MetricsFileError(f"{path}: no such file (is {run_dir} an opsd run directory?)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MetricsFileError(f"{path}, line {number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise MetricsFileError(f"{path}, line {number}: field 'step': expected a record with an integer step")
        records.append(record)
    if not records:
        raise MetricsFileError(f"{path}: no steps recorded yet")
    return records


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw the curves of ``run_dir`` into ``out`` (default ``RUN_DIR/curves.png``, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    records = load_records(run_dir)
    steps = [r["step"] for r in records]

    def series(key: str) -> list[float]:
        return [_number(r.get(key)) for r in records]

    accuracy = any(r.get("student_accuracy") is not None for r in records)
    by_tokens = _accuracy_by_tokens(records, run_dir)
    rows = 3 + accuracy + bool(by_tokens)
    fig, axes = plt.subplots(rows, 1, figsize=(8, 3 * rows + 1), squeeze=False)
    axes = list(axes[:, 0])
    if by_tokens:  # its own x axis (tokens), last
        ax_tokens = axes.pop()
        for label, points in by_tokens.items():
            ax_tokens.plot(*zip(*points), "o-", label=label)
        ax_tokens.set_xlabel("training tokens sampled")
        ax_tokens.set_ylabel("accuracy")
    for ax in axes[1:]:
        ax.sharex(axes[0])
    ax_loss, ax_tps, ax_time = axes[0], axes[-2], axes[-1]
    if accuracy:  # graded answers of the training traces (train.student_accuracy); OPSD does not train on it
        axes[1].plot(steps, series("student_accuracy"), label="student accuracy (training traces)")
        axes[1].set_ylabel("fraction correct")
    ax_loss.plot(steps, series("loss"), label="loss (batch)")
    ax_loss.plot(steps, series("gjs"), label="GJS (batch)", linestyle="--")
    held = [(r["step"], _number(r.get("heldout_gjs"))) for r in records if r.get("heldout_gjs") is not None]
    before = _heldout_before(run_dir)  # step 0 is measured before training: it lives in summary.json, not in a step
    if before is not None:
        held.insert(0, (0, before))
    if held:
        ax_loss.plot(*zip(*held), "o-", label="GJS (held-out)")
    ax_loss.set_ylabel("per response token")
    ax_loss.set_title(f"opsd run {Path(run_dir).resolve().name}")
    for stage in STAGES:
        ax_tps.plot(steps, series(f"tokens_per_second/{stage}"), label=stage)
        ax_time.plot(steps, series(f"stage_seconds/{stage}"), label=stage)
    ax_time.plot(steps, series("step_seconds"), label="step (total)", color="black", linewidth=1)
    ax_tps.set_ylabel("tokens / s")
    ax_time.set_ylabel("seconds")
    ax_time.set_xlabel("step")
    for ax in axes + ([ax_tokens] if by_tokens else []):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()

    out = Path(out) if out is not None else Path(run_dir) / "curves.png"
    try:
        with atomic_file(out) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return out


def _accuracy_by_tokens(records: list[dict], run_dir: str | os.PathLike) -> dict[str, list[tuple[float, float]]]:
    """Accuracy series against ``generated_tokens_total``: the training traces' (``student_accuracy``) and each eval
    set's avg@n (with the evaluation before training at 0 tokens, from summary.json). Empty when the run sampled no
    training tokens (SFT) or measured no accuracy."""
    if not any(_number(r.get("generated_tokens_total")) > 0 for r in records):
        return {}
    series: dict[str, list[tuple[float, float]]] = {}
    evals = _summary(run_dir).get("eval")
    before = evals.get("0") if isinstance(evals, dict) else None
    for key, value in (before.items() if isinstance(before, dict) else ()):
        if _is_avg(key):
            series.setdefault(f"{key.split('/')[1]} {key.split('/')[2]}", []).append((0.0, _number(value)))
    for r in records:
        tokens = _number(r.get("generated_tokens_total"))
        if tokens != tokens:
            continue
        for key, value in r.items():
            if key == "student_accuracy" or _is_avg(key):
                label = "training traces" if key == "student_accuracy" else f"{key.split('/')[1]} {key.split('/')[2]}"
                if _number(value) == _number(value):
                    series.setdefault(label, []).append((tokens, _number(value)))
    return series


def _is_avg(key: str) -> bool:
    parts = key.split("/")
    return len(parts) == 3 and parts[0] == "eval" and parts[2].startswith("avg@") and parts[2][4:].isdigit()


def _summary(run_dir: str | os.PathLike) -> dict:
    try:
        summary = json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return summary if isinstance(summary, dict) else {}


def _heldout_before(run_dir: str | os.PathLike) -> float | None:
    """The held-out GJS before training, from a finished run's ``summary.json`` (None while running, or without)."""
    path = Path(run_dir) / "summary.json"
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("heldout_gjs", {}).get("0")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
