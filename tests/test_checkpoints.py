"""Checkpoint retention: the newest N kept, and the best by held-out GJS when asked; nothing else touched."""

from __future__ import annotations

import pytest

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


# -- integrity -------------------------------------------------------------------------------------------------------
def complete(run_dir, step, payload: bytes = b"weights" * 100):
    folder = checkpoints.checkpoint_dir(run_dir, step)
    (folder / "learner").mkdir(parents=True)
    (folder / "learner" / "model_states.pt").write_bytes(payload)
    (folder / "client_state.json").write_text(
        f'{{"group_step": {step}, "version": {step}, "cursor": {{"epoch": 0, "position": {step}}}}}')
    checkpoints.write_manifest(folder)
    return folder


def test_the_manifest_names_a_truncated_altered_or_missing_file(tmp_path):
    folder = complete(tmp_path, 2)
    assert checkpoints.verify(folder) is None
    weights = folder / "learner" / "model_states.pt"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert "model_states.pt has 690 bytes, the manifest says 700" in checkpoints.verify(folder)
    weights.write_bytes(b"Weights" * 100)  # same size, other bytes
    assert "model_states.pt does not match its SHA-256" in checkpoints.verify(folder)
    weights.unlink()
    assert "model_states.pt is missing" in checkpoints.verify(folder)
    (folder / checkpoints.MANIFEST).unlink()
    assert "MANIFEST.json is missing: it was not completed" in checkpoints.verify(folder)


def test_resume_latest_falls_back_to_the_newest_checkpoint_that_verifies(tmp_path):
    from opsd.configlib import ConfigError
    from orchestrator.config import load_config
    from orchestrator.train import find_resume_point

    run_dir = tmp_path / "run"
    complete(run_dir, 2)
    newest = complete(run_dir, 4)
    (newest / "learner" / "model_states.pt").write_bytes(b"x")  # truncated on disk
    cfg = load_config(None, ["data.path=d.jsonl", f"train.run_dir={run_dir}", "train.resume=latest"])
    log: list[str] = []
    point = find_resume_point(cfg, total_steps=10, log=log.append)
    assert point.step == 2 and point.checkpoint.name == "step-2"
    assert len(log) == 1 and "skipping checkpoint step-4" in log[0] and "model_states.pt has 1 bytes" in log[0]
    # Named explicitly, a checkpoint that does not verify is refused, naming the file.
    cfg = load_config(None, ["data.path=d.jsonl", f"train.run_dir={run_dir}", f"train.resume={newest}"])
    with pytest.raises(ConfigError, match=r"train.resume.*step-4 cannot be resumed from.*model_states.pt has 1 bytes"):
        find_resume_point(cfg, total_steps=10)
    (run_dir / "checkpoints" / "step-2" / "client_state.json").write_text("{}")
    with pytest.raises(ConfigError, match="'latest': no complete checkpoint"):
        find_resume_point(load_config(None, ["data.path=d.jsonl", f"train.run_dir={run_dir}",
                                             "train.resume=latest"]), total_steps=10, log=log.append)
