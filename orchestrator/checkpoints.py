"""The run's checkpoints on disk: ``RUN_DIR/checkpoints/step-N``, which of them to keep, and whether one is whole.

``train.keep_checkpoints = N`` keeps the newest N after each save; ``train.keep_best_checkpoint`` also keeps the one
with the lowest held-out GJS (measured at its step). The newest is always kept: it is what ``train.resume=latest``
continues from. Each checkpoint gets a manifest of its files' sizes and SHA-256, written last; a resume checks it,
and ``latest`` falls back to the newest checkpoint that verifies.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from opsd.atomic import write_text_atomic
from opsd.errors import UserInputError

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
MANIFEST = "MANIFEST.json"


def write_manifest(directory: str | Path) -> Path:
    """Sizes and SHA-256 of every file of a written checkpoint, written last (atomically): a checkpoint without it
    was never completed."""
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    return write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def verify(directory: str | Path) -> str | None:
    """Why the checkpoint cannot be resumed from (naming the file), or None when every file matches its manifest."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing: the checkpoint was not completed"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest} is not a manifest ({exc})"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{path} has {size} bytes, the manifest says {expected['size']} (truncated or altered)"
        if _sha256(path) != expected["sha256"]:
            return f"{path} does not match its SHA-256 in the manifest (altered)"
    return None


def newest_valid(run_dir: str | Path, log: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint that verifies; each newer one that does not is reported and skipped."""
    for step in reversed(checkpoint_steps(run_dir)):
        directory = checkpoint_dir(run_dir, step)
        problem = verify(directory)
        if problem is None:
            return directory
        log(f"opsd: warning: skipping checkpoint {directory.name}: {problem}")
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
