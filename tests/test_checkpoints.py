"""Checkpoint retention: the newest N kept, and the best by held-out GJS when asked; nothing else touched."""

from __future__ import annotations

from orchestrator import checkpoints


def make(run_dir, steps):
    for step in steps:
        folder = checkpoints.checkpoint_dir(run_dir, step)
        folder.mkdir(parents=True)
        (folder / "client_state.json").write_text("{}")
    (run_dir / "checkpoints" / ".step-99.tmp-x").mkdir()  # a save in progress is never a checkpoint


def test_keep_the_newest_n(tmp_path):
    make(tmp_path, [25, 50, 75, 100])
    assert checkpoints.checkpoint_steps(tmp_path) == [25, 50, 75, 100]
    assert checkpoints.prune(tmp_path, None) == [] and checkpoints.checkpoint_steps(tmp_path) == [25, 50, 75, 100]
    assert checkpoints.prune(tmp_path, 2) == [25, 50]
    assert checkpoints.checkpoint_steps(tmp_path) == [75, 100]
    assert (tmp_path / "checkpoints" / ".step-99.tmp-x").is_dir()


def test_the_best_held_out_checkpoint_is_kept_too(tmp_path):
    make(tmp_path, [25, 50, 75, 100])
    gjs = {0: 0.9, 25: 0.5, 50: 0.3, 75: 0.4, 100: 0.45, 110: 0.1}  # step 110 has no checkpoint
    assert checkpoints.prune(tmp_path, 1, gjs) == [25, 75]
    assert checkpoints.checkpoint_steps(tmp_path) == [50, 100]
    # The newest is kept whatever its GJS: it is what resume=latest continues from.
    assert checkpoints.prune(tmp_path, 1, {50: 0.9, 100: 0.1}) == [50]
