"""The run's checkpoints on disk: ``RUN_DIR/checkpoints/step-N``, which of them to keep.

``train.keep_checkpoints = N`` keeps the newest N after each save; ``train.keep_best_checkpoint`` also keeps the one
with the lowest held-out GJS (measured at its step). The newest is always kept: it is what ``train.resume=latest``
continues from.
"""

from __future__ import annotations

import shutil
from pathlib import Path

PREFIX = "step-"


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the checkpoints in ``run_dir/checkpoints``, oldest first (temporary directories ignored)."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[len(PREFIX):]) for p in folder.iterdir()
                  if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit())


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{PREFIX}{step}"


def prune(run_dir: str | Path, keep_last: int | None, heldout_gjs: dict[int, float] | None = None) -> list[int]:
    """Remove the checkpoints beyond the newest ``keep_last`` (None: keep all). With ``heldout_gjs`` (step -> GJS),
    the checkpoint of the lowest held-out GJS among the checkpointed steps is kept too. Returns the removed steps."""
    steps = checkpoint_steps(run_dir)
    if keep_last is None or len(steps) <= keep_last:
        return []
    keep = set(steps[-keep_last:])
    measured = {step: gjs for step, gjs in (heldout_gjs or {}).items() if step in steps}
    if measured:
        keep.add(min(measured, key=lambda step: (measured[step], -step)))
    removed = [step for step in steps if step not in keep]
    for step in removed:
        shutil.rmtree(checkpoint_dir(run_dir, step))
    return removed
