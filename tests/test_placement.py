"""The resource plan (orchestrator.placement): pure plan tests, and placement groups on a local Ray with fake GPUs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402  (first: sets Ray's loopback switch before ray is imported)

from opsd.configlib import ConfigError  # noqa: E402
from opsd.errors import UserInputError  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.placement import (  # noqa: E402
    GROUP_NAME_PREFIX,
    Bundle,
    ClusterView,
    PlacementError,
    ResourcePlan,
    fit_problems,
    reserve,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
ONE_NODE_8_GPUS = ClusterView(({"GPU": 8.0, "CPU": 16.0},))


def config(*overrides: str, recipe: str | None = None):
    return load_config(REPO_ROOT / "recipes" / recipe if recipe else None, ["data.path=unused.jsonl", *overrides])


def split(rollout: int, teacher: int, learner: int, *more: str):
    return config("placement.mode=split", "learner.loss.kind=topk_tail", f"rollout.num_workers={rollout}",
                  f"teacher.num_workers={teacher}", f"learner.num_workers={learner}", *more)


# -- plans ------------------------------------------------------------------------------------------------------


def test_split_4_2_2_gives_each_pool_its_group_and_each_actor_its_bundle():
    plan = ResourcePlan.from_config(split(4, 2, 2))
    assert plan.mode == "split" and not plan.on_cpu
    assert not plan.shares_gpus  # whole GPUs: the pools start together
    assert plan.pools == ("rollout", "teacher", "learner")
    for pool, count in (("rollout", 4), ("teacher", 2), ("learner", 2)):
        (group,) = plan.pool_groups(pool)
        assert group.strategy == "PACK"
        assert group.bundles == (Bundle(gpu=1, cpu=1),) * count
        assert plan.num_actors(pool) == count
        slots = [plan.slot(pool, i) for i in range(count)]
        assert [s.bundle for s in slots] == list(range(count))  # one bundle per actor
        assert {plan.groups[s.group].pool for s in slots} == {pool}
        assert all(s.num_gpus == 1 and s.num_cpus == 1 for s in slots)
    assert plan.totals() == {"GPU": 8, "CPU": 8}
    assert plan.describe_pool("learner") == "2 x {GPU: 1, CPU: 1}"
    assert "learner   2 x {GPU: 1, CPU: 1}  PACK" in plan.describe()


def test_no_teacher_pool_with_the_full_vocabulary_loss():
    plan = ResourcePlan.from_config(split(4, 2, 2, "learner.loss.kind=full"))
    assert plan.pools == ("rollout", "learner") and plan.num_actors("teacher") == 0
    with pytest.raises(KeyError, match="no teacher actor 0"):
        plan.slot("teacher", 0)


def test_fractional_gpus_in_split_mode():
    plan = ResourcePlan.from_config(split(4, 1, 1, "rollout.gpus_per_worker=0.5"))
    assert plan.pool_groups("rollout")[0].bundles == (Bundle(gpu=0.5, cpu=1),) * 4
    assert plan.totals()["GPU"] == 4
    assert plan.shares_gpus  # two engines may share a GPU: the rollout pool starts first
    with pytest.raises(ConfigError, match=r"learner.gpus_per_worker: must be a fraction of one GPU or a whole"):
        ResourcePlan.from_config(split(4, 1, 1, "learner.gpus_per_worker=1.5"))


def test_learner_ranks_need_a_gpu_each():
    with pytest.raises(ConfigError, match=r"learner.gpus_per_worker: must be >= 1 with 2 learner ranks: NCCL"):
        ResourcePlan.from_config(split(4, 2, 2, "learner.gpus_per_worker=0.5"))
    assert ResourcePlan.from_config(split(4, 2, 1, "learner.gpus_per_worker=0.5")).totals()["GPU"] == 6.5
    with pytest.raises(ConfigError, match=r"learner.num_workers: must be 1 with placement.mode=colocate"):
        ResourcePlan.from_config(config("placement.mode=colocate", "learner.num_workers=2"))


def test_split_refuses_a_stage_without_gpus():
    with pytest.raises(ConfigError, match=r"teacher.gpus_per_worker: must be > 0 with placement.mode=split.*"
                                          r"placement.mode=cpu"):
        ResourcePlan.from_config(split(4, 2, 2, "teacher.gpus_per_worker=0"))


def test_tensor_parallel_engine_gets_a_strict_pack_group_of_one_gpu_bundles():
    plan = ResourcePlan.from_config(split(2, 1, 2, "rollout.tensor_parallel_size=2", "rollout.gpus_per_worker=2"))
    engines = plan.pool_groups("rollout")
    assert len(engines) == 2  # one placement group per engine: vLLM uses its group's first tp GPU bundles
    for group in engines:
        assert group.strategy == "STRICT_PACK"  # the TP all-reduce stays inside a node
        assert group.bundles == (Bundle(gpu=1, cpu=1), Bundle(gpu=1))  # vLLM refuses bundles of > 1 GPU
    slots = [plan.slot("rollout", i) for i in range(2)]
    assert [(s.group, s.bundle, s.num_gpus, s.num_cpus) for s in slots] == [(0, 0, 0, 1), (1, 0, 0, 1)]
    assert plan.totals() == {"GPU": 4 + 1 + 2, "CPU": 2 + 1 + 2}
    assert plan.describe_pool("rollout") == "2 x [1 x {GPU: 1, CPU: 1} + 1 x {GPU: 1}] (one node each)"
    with pytest.raises(ConfigError, match=r"rollout.gpus_per_worker: must equal rollout.tensor_parallel_size \(2\)"):
        ResourcePlan.from_config(split(2, 1, 2, "rollout.tensor_parallel_size=2"))


def test_colocate_shares_one_gpu_bundle_with_fractions():
    cfg = config("placement.mode=colocate", "learner.loss.kind=topk_tail", "rollout.gpus_per_worker=0.4",
                 "teacher.gpus_per_worker=0.3", "learner.gpus_per_worker=0.3")
    plan = ResourcePlan.from_config(cfg)
    (group,) = plan.groups
    assert group.pool == "colocated" and group.bundles == (Bundle(gpu=1, cpu=3),)
    assert plan.shares_gpus
    assert [(s.stage, s.group, s.bundle, s.num_gpus) for s in plan.slots] == [
        ("rollout", 0, 0, 0.4), ("teacher", 0, 0, 0.3), ("learner", 0, 0, 0.3)]


def test_colocate_refuses_fractions_over_one_gpu_and_tensor_parallelism():
    with pytest.raises(ConfigError, match=r"placement.mode: colocate shares one GPU.*rollout 1 x 1 \+ teacher 1 x 1 "
                                          r"\+ learner 1 x 1 = 3.*rollout.gpus_per_worker=0.33"):
        ResourcePlan.from_config(config("placement.mode=colocate", "learner.loss.kind=topk_tail"))
    with pytest.raises(ConfigError, match=r"learner.gpus_per_worker: must be a fraction in \(0, 1\]"):
        ResourcePlan.from_config(config("placement.mode=colocate", "learner.gpus_per_worker=0"))
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size: must be 1 with placement.mode=colocate"):
        ResourcePlan.from_config(config("placement.mode=colocate", "rollout.tensor_parallel_size=2"))


def test_cpu_plan_gives_each_engine_the_cpus_of_its_cores_and_fits_the_embedded_cluster():
    from orchestrator.placement import logical_cpus

    cfg = config(recipe="tiny-cpu.yaml")
    plan = ResourcePlan.from_config(cfg, node_cores=2)
    assert plan.on_cpu and plan.mode == "cpu" and plan.notes == () and not plan.shares_gpus
    assert plan.pool_groups("rollout")[0].bundles == (Bundle(cpu=2),)  # one engine binds both cores
    assert [s.num_gpus for s in plan.slots] == [0, 0, 0]
    assert plan.totals() == {"CPU": 4}
    # The embedded cluster (stages.logical_cpus: the machine's cores plus one per teacher and learner actor, since
    # the stages time-share the cores) holds the CPU plan of this machine.
    for overrides in ([], ["rollout.num_workers=2"], ["rollout.cpu_threads_per_worker=1"],
                      ["teacher.num_workers=2", "learner.num_workers=2"]):
        cfg = config(*overrides, recipe="tiny-cpu.yaml")
        plan = ResourcePlan.from_config(cfg, node_cores=os.cpu_count())
        assert plan.totals()["CPU"] <= logical_cpus(cfg)
    plan = ResourcePlan.from_config(config("rollout.num_workers=2", recipe="tiny-cpu.yaml"), node_cores=2)
    assert [s.num_cpus for s in plan.slots if s.stage == "rollout"] == [1, 1]


def test_cpu_plan_refuses_what_the_cores_cannot_hold():
    with pytest.raises(ConfigError, match="rollout.num_workers: 3 rollout workers need a core each"):
        ResourcePlan.from_config(config("rollout.num_workers=3", recipe="tiny-cpu.yaml"), node_cores=2)
    with pytest.raises(ConfigError, match="rollout.cpu_threads_per_worker"):
        ResourcePlan.from_config(config("rollout.cpu_threads_per_worker=3", recipe="tiny-cpu.yaml"), node_cores=2)
    with pytest.raises(ConfigError, match="rollout.tensor_parallel_size: must be 1 on CPU"):
        ResourcePlan.from_config(config("rollout.tensor_parallel_size=2", recipe="tiny-cpu.yaml"), node_cores=2)


def test_explicit_cpu_mode_says_which_gpu_settings_it_leaves_unused():
    plan = ResourcePlan.from_config(config("placement.mode=cpu", "learner.gpus_per_worker=0", "rollout.num_workers=1"),
                                    node_cores=2)
    assert plan.on_cpu and all(s.num_gpus == 0 for s in plan.slots)
    assert plan.notes == ("rollout.gpus_per_worker=1 is not used (placement.mode=cpu)",)
    assert "note: rollout.gpus_per_worker=1 is not used" in plan.describe()


def test_auto_mode_resolution():
    no_gpus = ClusterView(({"CPU": 2.0, "GPU": 0.0},))
    plan = ResourcePlan.from_config(config("placement.mode=auto", recipe="tiny-cpu.yaml"), node_cores=2)
    assert plan.on_cpu and plan.reason == "placement.mode=auto: no stage asks for GPUs"
    gpu_cfg = config("placement.mode=auto")
    assert ResourcePlan.from_config(gpu_cfg, ONE_NODE_8_GPUS).mode == "split"
    plan = ResourcePlan.from_config(gpu_cfg, no_gpus, node_cores=2)
    assert plan.on_cpu and "the cluster has no GPU and placement.autoscaling is off" in plan.reason
    assert len(plan.notes) == 2  # rollout and learner gpus_per_worker (no teacher with the default full loss)
    plan = ResourcePlan.from_config(config("placement.mode=auto", "placement.autoscaling=true"), no_gpus)
    assert plan.mode == "split" and "GPU nodes are requested" in plan.reason
    with pytest.raises(ValueError, match="needs the cluster's resources"):
        ResourcePlan.from_config(gpu_cfg)


def test_autoscaling_key_is_a_validated_bool():
    assert config().placement.autoscaling is False
    assert config("placement.autoscaling=true").placement.autoscaling is True
    with pytest.raises(ConfigError, match="placement.autoscaling"):
        config("placement.autoscaling=sometimes")


# -- fit check ----------------------------------------------------------------------------------------------------


def test_fit_check_names_the_pool_and_what_is_missing():
    assert fit_problems(ResourcePlan.from_config(split(4, 2, 2)), ONE_NODE_8_GPUS) == []
    problems = fit_problems(ResourcePlan.from_config(split(6, 2, 2)), ONE_NODE_8_GPUS)
    assert problems == ["learner pool needs 2 x {GPU: 1, CPU: 1}; the cluster has 8 GPU, rollout+teacher already "
                        "take 8: missing 2 GPU"]
    small_cpu = ClusterView(({"GPU": 8.0, "CPU": 4.0},))
    problems = fit_problems(ResourcePlan.from_config(split(4, 2, 2)), small_cpu)
    assert problems == ["teacher pool needs 2 x {GPU: 1, CPU: 1}; the cluster has 4 CPU, rollout already takes 4: "
                        "missing 4 CPU"]
    assert fit_problems(ResourcePlan.from_config(split(1, 1, 1)), ClusterView(())) == [
        "rollout pool needs 1 x {GPU: 1, CPU: 1}; the cluster has 0 GPU: missing 3 GPU",
        "rollout pool needs 1 x {GPU: 1, CPU: 1}; the cluster has 0 CPU: missing 3 CPU"]


def test_fit_check_needs_each_bundle_and_each_tensor_parallel_group_on_one_node():
    two_nodes = ClusterView(({"GPU": 4.0, "CPU": 8.0}, {"GPU": 4.0, "CPU": 8.0}))
    tp8 = ResourcePlan.from_config(split(1, 1, 1, "rollout.tensor_parallel_size=8", "rollout.gpus_per_worker=8",
                                         "learner.loss.kind=full"))
    # 9 GPUs in total would not fit either; on a cluster of 16 GPUs in four 4-GPU nodes only the node rule fails
    four_nodes = ClusterView(two_nodes.nodes * 2)
    assert fit_problems(tp8, four_nodes) == [
        "rollout pool: a placement group (STRICT_PACK: one node) needs {GPU: 8, CPU: 1} on one node; the largest "
        "node has {GPU: 4, CPU: 8}: missing 4 GPU on one node"]
    big_bundle = ResourcePlan.from_config(split(1, 1, 1, "learner.gpus_per_worker=8"))
    assert fit_problems(big_bundle, four_nodes) == [
        "learner pool: a bundle needs {GPU: 8, CPU: 1} on one node; the largest node has {GPU: 4, CPU: 8}: missing "
        "4 GPU on one node"]


def test_placement_error_is_an_input_error():
    assert issubclass(PlacementError, UserInputError)


# -- on Ray, with fake GPUs -------------------------------------------------------------------------------------

TIMEOUT_S = 60


def _probe_class():
    import ray

    @ray.remote
    class Probe:
        def where(self) -> dict:
            context = ray.get_runtime_context()
            return {"gpus": sorted(str(g) for g in ray.get_gpu_ids()), "pg": context.get_placement_group_id(),
                    "resources": context.get_assigned_resources()}

        def start_tp_workers(self, tp: int) -> list[dict]:
            """What vLLM's Ray executor does for a TP engine: one worker per GPU bundle of the current group."""
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = ray.util.get_current_placement_group()
            workers = [Probe.options(num_cpus=0, num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                group, placement_group_bundle_index=i, placement_group_capture_child_tasks=True)).remote()
                for i in range(tp)]
            try:
                return ray.get([w.where.remote() for w in workers], timeout=TIMEOUT_S)
            finally:
                for w in workers:
                    ray.kill(w)

    return Probe


def _start(reservation, Probe) -> dict[str, list]:
    plan = reservation.plan
    return {stage: [Probe.options(**reservation.options_for(stage, i)).remote() for i in range(plan.num_actors(stage))]
            for stage in ("rollout", "teacher", "learner")}


def _opsd_groups() -> dict[str, dict]:
    import ray

    return {pg_id: info for pg_id, info in ray.util.placement_group_table().items()
            if info["name"].startswith(GROUP_NAME_PREFIX)}


def _wait_removed(deadline_s: float = 10.0) -> dict[str, str]:
    """States of every opsd placement group once all are removed (bounded)."""
    import ray

    end = time.monotonic() + deadline_s
    while True:
        states = {pg_id: info["state"] for pg_id, info in _opsd_groups().items()}
        if all(s == "REMOVED" for s in states.values()) and ray.available_resources().get("GPU", 0) == \
                ray.cluster_resources().get("GPU", 0):
            return states
        if time.monotonic() > end:
            return states
        time.sleep(0.1)


@pytest.fixture(scope="class")
def eight_fake_gpus():
    with local_ray(num_cpus=16, num_gpus=8):
        yield


@pytest.mark.slow
@pytest.mark.usefixtures("eight_fake_gpus")
class TestEightFakeGPUs:
    def test_4_2_2_places_every_actor_on_its_pool(self):
        import ray

        Probe = _probe_class()
        plan = ResourcePlan.from_config(split(4, 2, 2))
        logs: list[str] = []
        reservation = reserve(plan, timeout_s=TIMEOUT_S, log=logs.append)
        try:
            actors = _start(reservation, Probe)
            where = {stage: ray.get([a.where.remote() for a in group], timeout=TIMEOUT_S)
                     for stage, group in actors.items()}
            gpus = {}
            for stage, found in where.items():
                for index, info in enumerate(found):
                    assert info["pg"] == reservation.placement_group(stage, index).id.hex()
                    assert len(info["gpus"]) == 1 and info["resources"]["GPU"] == 1
                gpus[stage] = {g for info in found for g in info["gpus"]}
                assert len(gpus[stage]) == plan.num_actors(stage)  # no two actors of a pool share a GPU
            assert len({pg for s in where.values() for pg in (i["pg"] for i in s)}) == 3  # one group per pool
            assert set().union(*gpus.values()) == {str(i) for i in range(8)}  # pools disjoint, all 8 GPUs used
            assert logs == []  # placed at once: nothing to report
        finally:
            reservation.release()
        assert set(_wait_removed().values()) == {"REMOVED"}

    def test_tensor_parallel_engine_workers_get_their_groups_gpus(self):
        import ray

        Probe = _probe_class()
        plan = ResourcePlan.from_config(split(2, 1, 2, "learner.loss.kind=full", "rollout.tensor_parallel_size=2",
                                              "rollout.gpus_per_worker=2"))
        with reserve(plan, timeout_s=TIMEOUT_S) as reservation:
            actors = _start(reservation, Probe)
            engines = [ray.get(a.where.remote(), timeout=TIMEOUT_S) for a in actors["rollout"]]
            assert all(e["gpus"] == [] for e in engines)  # the engine actor holds no GPU ...
            tp_workers = ray.get([a.start_tp_workers.remote(2) for a in actors["rollout"]], timeout=TIMEOUT_S)
            for index, workers in enumerate(tp_workers):  # ... its TP workers take its group's two GPUs
                assert {w["pg"] for w in workers} == {reservation.placement_group("rollout", index).id.hex()}
                assert all(len(w["gpus"]) == 1 for w in workers)
            engine_gpus = [{g for w in workers for g in w["gpus"]} for workers in tp_workers]
            assert [len(g) for g in engine_gpus] == [2, 2] and not engine_gpus[0] & engine_gpus[1]
        assert set(_wait_removed().values()) == {"REMOVED"}

    def test_cpu_plan_reserves_cpus_only(self):
        import ray

        Probe = _probe_class()
        plan = ResourcePlan.from_config(config(recipe="tiny-cpu.yaml"), node_cores=2)
        with reserve(plan, timeout_s=TIMEOUT_S) as reservation:
            actors = _start(reservation, Probe)
            rollout = ray.get(actors["rollout"][0].where.remote(), timeout=TIMEOUT_S)
            assert rollout["gpus"] == [] and rollout["resources"] == {"CPU": 2.0}
        _wait_removed()

    def test_impossible_plan_fails_fast_naming_what_is_missing(self):
        before = set(_opsd_groups())
        started = time.monotonic()
        with pytest.raises(PlacementError) as error:
            reserve(ResourcePlan.from_config(split(6, 2, 2)), timeout_s=TIMEOUT_S)
        assert time.monotonic() - started < 5
        message = str(error.value)
        assert "learner pool needs 2 x {GPU: 1, CPU: 1}; the cluster has 8 GPU, rollout+teacher already take 8: " \
               "missing 2 GPU" in message
        assert "1 node, 8 GPU, 16 CPU" in message and "placement.autoscaling=true" in message
        assert set(_opsd_groups()) == before  # nothing was reserved
        with pytest.raises(PlacementError, match=r"needs \{GPU: 16, CPU: 1\} on one node.*missing 8 GPU on one node"):
            reserve(ResourcePlan.from_config(split(1, 1, 1, "learner.loss.kind=full", "rollout.gpus_per_worker=16",
                                                   "rollout.tensor_parallel_size=16")), timeout_s=TIMEOUT_S)

    def test_autoscaling_wait_is_bounded_reported_and_cleaned_up(self):
        import ray

        logs: list[str] = []
        started = time.monotonic()
        with pytest.raises(PlacementError) as error:
            reserve(ResourcePlan.from_config(split(6, 2, 2)), timeout_s=3, autoscaling=True, log=logs.append,
                    report_every_s=0.5)
        elapsed = time.monotonic() - started
        assert 3 <= elapsed < 8
        message = str(error.value)
        assert message.startswith("placement groups not ready after 3 s (placement.placement_timeout_s): still "
                                  "waiting for ")
        assert "missing 2 GPU" in message and "the autoscaler did not add the nodes in time" in message
        assert "The placement groups were removed." in message
        assert logs and all(line.startswith("opsd: waiting for placement groups (") for line in logs)
        assert "autoscaling): " in logs[0] and "pool (" in logs[0]
        states = _wait_removed()
        assert states and set(states.values()) == {"REMOVED"}
        assert ray.available_resources().get("GPU") == 8


@pytest.mark.slow
def test_colocate_plan_shares_one_gpu():
    import ray

    Probe = _probe_class()
    cfg = config("placement.mode=colocate", "learner.loss.kind=topk_tail", "rollout.gpus_per_worker=0.4",
                 "teacher.gpus_per_worker=0.3", "learner.gpus_per_worker=0.3")
    with local_ray(num_cpus=4, num_gpus=1):
        with reserve(ResourcePlan.from_config(cfg), timeout_s=TIMEOUT_S) as reservation:
            actors = _start(reservation, Probe)
            found = ray.get([a.where.remote() for group in actors.values() for a in group], timeout=TIMEOUT_S)
            assert [f["gpus"] for f in found] == [["0"]] * 3  # the same GPU for every stage
            assert [f["resources"]["GPU"] for f in found] == [0.4, 0.3, 0.3]
            assert {f["pg"] for f in found} == {reservation.placement_groups[0].id.hex()}
        assert set(_wait_removed().values()) == {"REMOVED"}
