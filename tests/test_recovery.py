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

    from opsd.actors import WorkerLostError, gather_shards

    @ray.remote(num_cpus=0)
    class Worker:
        def work(self, x: int, seconds: float = 0.0) -> int:
            import time

            time.sleep(seconds)
            return x * 10

        def fail(self) -> int:
            raise ValueError("bad shard")

        def die(self) -> int:
            import os

            os._exit(1)  # the process dies inside the call: a death, whatever the timing

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
            return Worker.remote().die.remote()

        with pytest.raises(WorkerLostError, match="test worker 0 died 3 times"):
            gather_shards([workers[2].die.remote()], redo_dead, timeout_s=60, max_retries=2, what="test",
                          log=log.append)


def test_killed_rollout_and_teacher_workers_are_replaced_and_rows_come_back_once(tiny_model_dir):
    import ray

    from orchestrator.config import load_config
    from opsd.data import load_dataset
    from orchestrator.sampler import EpochSampler
    from orchestrator.stages import Stages

    cfg = load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={tiny_model_dir}", f"data.path={DATA}", "data.limit=null", "rollout.num_workers=2",
        "rollout.cpu_threads_per_worker=1", "rollout.max_response_tokens=8", "rollout.temperature=1.0",
    ])
    problems = EpochSampler(load_dataset(cfg.data, required=("problem", "solution"))[0], 4, seed=0).next_batch()
    with local_ray(num_cpus=4):
        log: list[str] = []
        stages = Stages.start(cfg, total_steps=1, log=log.append)
        rollout, teacher = stages.rollout, stages.teacher
        try:
            expected = rollout.collect(rollout.launch(problems))
            expected_scored = teacher.score(expected.tables).tables.fetch()

            batch = rollout.launch(problems)
            dead = rollout.actors[0]
            ray.kill(dead)
            got = rollout.collect(batch)
            assert rollout.replaced == 1 and rollout.actors[0] is not dead
            assert any("rollout worker 0 died" in line for line in log)
            # Same rows, once each, in order, with the same traces (per-row seeds): nothing dropped or doubled.
            assert got.summary.sample_ids == expected.summary.sample_ids
            got_table = got.tables.fetch()
            assert got_table.column("response_ids").to_pylist() == \
                expected.tables.fetch().column("response_ids").to_pylist()
            ray.get(rollout.actors[0].info.remote(), timeout=60)  # the replacement serves

            ray.kill(teacher.actors[0])
            scored = teacher.score(got.tables)
            assert teacher.replaced == 1 and stages.replaced == 2
            assert scored.tables.fetch().column("teacher_topk_ids").to_pylist() == \
                expected_scored.column("teacher_topk_ids").to_pylist()

            # After an update, a replacement worker serves the adapter version the others serve.
            assert not stages.learner.train_step(scored.tables).skipped
            rollout.load_adapter(stages.learner.export_adapter())
            batch = rollout.launch(problems)
            ray.kill(rollout.actors[1])
            got = rollout.collect(batch)
            assert rollout.replaced == 2
            assert set(got.summary.policy_versions) == {1}
            assert got.summary.sample_ids == expected.summary.sample_ids
        finally:
            stages.shutdown()


def test_a_hung_rollout_worker_is_replaced_after_the_call_timeout(tiny_model_dir):
    """A worker that stops answering (here: blocked in a long call) counts as lost once the per-call timeout
    passes: it is replaced and its shard sent again."""
    from opsd.model import ModelSpec
    from rollout.config import RolloutConfig
    from rollout.pool import RolloutPool

    config = RolloutConfig(num_workers=1, gpus_per_worker=0, cpu_kv_cache_gib=0.25, max_model_len=256,
                           max_response_tokens=4, temperature=1.0)
    problems = problem_batch()
    with local_ray(num_cpus=2):
        log: list[str] = []
        pool = RolloutPool(ModelSpec(str(tiny_model_dir)), config, call_timeout_s=120, log=log.append)
        try:
            expected = pool.collect(pool.launch(problems))
            pool.actors[0].__ray_call__.remote(lambda self: __import__("time").sleep(600))  # the worker hangs
            batch = pool.launch(problems)
            got = pool.collect(batch, timeout_s=15)
            assert pool.replaced == 1 and any("did not answer within 15 s" in line for line in log)
            assert got.summary.sample_ids == expected.summary.sample_ids
            assert got.tables.fetch().column("response_ids").to_pylist() == \
                expected.tables.fetch().column("response_ids").to_pylist()
        finally:
            pool.shutdown(timeout_s=5)


def problem_batch():
    from orchestrator.config import DataConfig
    from opsd.data import load_dataset
    from orchestrator.sampler import EpochSampler

    table, _ = load_dataset(DataConfig(path=str(DATA), mapping="gsm8k"), required=("problem", "solution"))
    return EpochSampler(table, 2, seed=0).next_batch()
