"""The run's checkpoints on disk: ``RUN_DIR/checkpoints/step-N``, which of them to keep, and whether one is whole.

``train.keep_checkpoints = N`` keeps the newest N after each save; ``train.keep_best_checkpoint`` also keeps the one
with the lowest held-out GJS (measured at its step). The newest is always kept: it is what ``train.resume=latest``
continues from. Each checkpoint holds a manifest of its files' sizes and SHA-256 (``opsd.manifest``, written last by
the learner group, before the directory appears); a resume checks it, and ``latest`` falls back to the newest
checkpoint that verifies.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from opsd.errors import UserInputError
from opsd.manifest import MANIFEST, verify, write_manifest  # noqa: F401 - the checkpoint manifest, re-exported

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


# -- integrity -------------------------------------------------------------------------------------------------------
def newest_valid(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported and skipped."""
    for step in reversed(checkpoint_steps(run_dir)):
        directory = checkpoint_dir(run_dir, step)
        problem = verify(directory)
        if problem is None:
            return directory
        log(f"opsd: warning: skipping checkpoint {directory.name}: {problem}")
    return None


# -- a write that fails ----------------------------------------------------------------------------------------------
class CheckpointWriteError(UserInputError):
    """A checkpoint (or adapter directory) could not be written; the previous ones are intact."""


def write_failure(path: Path, exc: BaseException, run_dir: str | Path) -> CheckpointWriteError:
    """The error to show for a failed write of ``path``: what failed, the free space there, and what the last
    checkpoint took (a fair estimate of what the next one needs)."""
    cause = getattr(exc, "cause", None) or exc  # an error raised in a learner rank arrives wrapped by Ray
    free = shutil.disk_usage(_existing_parent(path)).free
    steps = checkpoint_steps(run_dir)
    last = _tree_size(checkpoint_dir(run_dir, steps[-1])) if steps else None
    need = f"; the last checkpoint took {_mib(last)}" if last else ""
    return CheckpointWriteError(f"could not write {path}: {type(cause).__name__}: {cause} ({_mib(free)} free "
                                f"there{need}). The previous checkpoints are intact; free space, or set "
                                "train.keep_checkpoints to keep fewer")


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _tree_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"
