"""``opsd plot RUN_DIR``: the run's curves from ``metrics.jsonl`` to one PNG.

Panels, by step: the distillation loss and GJS of the training batches (with the held-out GJS as points where it
was evaluated), the student's accuracy on its training traces (when graded), tokens per second of each stage, and
the step time split by stage. Works on a run that is still
going (the file is appended and flushed per step) and on a finished one.
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
    fig, axes = plt.subplots(3 + accuracy, 1, figsize=(8, 10 + 3 * accuracy), sharex=True)
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
    for ax in axes:
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
