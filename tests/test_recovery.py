"""A dead rollout or teacher worker: its shard goes to a fresh worker; every row comes back exactly once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"


def test_gather_shards_redoes_dead_workers_only():
    import ray

    from orchestrator.recovery import WorkerLostError, gather_shards

    @ray.remote(num_cpus=0)
    class Worker:
        def work(self, x: int, seconds: float = 0.0) -> int:
            import time

            time.sleep(seconds)
            return x * 10

        def fail(self) -> int:
            raise ValueError("bad shard")

    with local_ray(num_cpus=2):
        workers = [Worker.remote() for _ in range(3)]
        refs = [w.work.remote(i, 5.0 if i == 1 else 0.0) for i, w in enumerate(workers)]
        ray.kill(workers[1])  # dies while its shard is running
        redone, log = [], []

        def redo(i):
            redone.append(i)
            workers[i] = Worker.remote()
            return workers[i].work.remote(i)

        assert gather_shards(refs, redo, timeout_s=60, max_retries=1, what="test", log=log.append) == [0, 10, 20]
        assert redone == [1] and "test worker 1 died" in log[0]

        # An error raised inside the task is not a death: it is raised, not retried.
        with pytest.raises(ray.exceptions.RayTaskError, match="bad shard"):
            gather_shards([workers[0].fail.remote()], redo, timeout_s=60, max_retries=1, what="test", log=log.append)

        # A worker that keeps dying: bounded.
        def redo_dead(i):
            dead = Worker.remote()
            ray.kill(dead)
            return dead.work.remote(i)

        ray.kill(workers[2])
        with pytest.raises(WorkerLostError, match="test worker 0 died 3 times"):
            gather_shards([workers[2].work.remote(2)], redo_dead, timeout_s=60, max_retries=2, what="test",
                          log=log.append)


def test_killed_rollout_and_teacher_workers_are_replaced_and_rows_come_back_once(tiny_model_dir):
    import ray

    from orchestrator.config import load_config
    from orchestrator.sampler import EpochSampler
    from orchestrator.data import load_dataset
    from orchestrator.stages import start_stages

    cfg = load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=null", "rollout.num_workers=2",
        "rollout.cpu_threads_per_worker=1", "rollout.max_response_tokens=8", "rollout.temperature=1.0",
    ])
    problems = EpochSampler(load_dataset(cfg.data, required=("problem", "solution"))[0], 4, seed=0).next_batch()
    with local_ray(num_cpus=4):
        log: list[str] = []
        stages = start_stages(cfg, total_steps=1, log=log.append)
        try:
            expected = stages.collect_rollouts(stages.launch_rollouts(problems))
            expected_scored = stages.score(expected)[0]

            batch = stages.launch_rollouts(problems)
            dead = stages.rollout[0]
            ray.kill(dead)
            got = stages.collect_rollouts(batch)
            assert stages.replaced["rollout"] == 1 and stages.rollout[0] is not dead
            assert any("rollout worker 0 died" in line for line in log)
            # Same rows, once each, in order, with the same traces (per-row seeds): nothing dropped or doubled.
            assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
            assert got.column("response_ids").to_pylist() == expected.column("response_ids").to_pylist()
            ray.get(stages.rollout[0].info.remote(), timeout=60)  # the replacement serves

            ray.kill(stages.teachers[0])
            scored = stages.score(got)[0]
            assert stages.replaced["teacher"] == 1
            assert scored.column("teacher_topk_ids").to_pylist() == expected_scored.column("teacher_topk_ids").to_pylist()

            # After an update, a replacement worker serves the adapter version the others serve.
            assert not stages.learner.train_step(scored).skipped
            stages.push_adapter(stages.learner.export_adapter())
            batch = stages.launch_rollouts(problems)
            ray.kill(stages.rollout[1])
            got = stages.collect_rollouts(batch)
            assert stages.replaced["rollout"] == 2
            assert set(got.column("policy_version").to_pylist()) == {1}
            assert got.column("sample_id").to_pylist() == expected.column("sample_id").to_pylist()
        finally:
            stages.shutdown()
