"""The resource plan: which Ray resources each stage's actors get, reserved up front with placement groups.

    plan = ResourcePlan.from_config(cfg, ClusterView.current())
    reservation = reserve(plan, timeout_s=cfg.placement.placement_timeout_s, autoscaling=cfg.placement.autoscaling)
    pool = RolloutPool(..., actor_options=reservation.stage_options("rollout"))
    reservation.release()                         # removes the placement groups (and kills their actors)

Modes, tensor-parallel engines, the fit check and the bounded wait: docs/ARCHITECTURE.md ("Placement").
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Sequence

from opsd.configlib import ConfigError
from opsd.errors import UserInputError
from rollout.config import cpu_cores_for

if TYPE_CHECKING:
    from ray.util.placement_group import PlacementGroup

    from orchestrator.config import OPSDConfig

Stage = Literal["rollout", "teacher", "learner"]
Mode = Literal["split", "colocate", "cpu"]
Strategy = Literal["PACK", "STRICT_PACK", "SPREAD"]

STAGES: tuple[Stage, ...] = ("rollout", "teacher", "learner")
RESOURCES = ("GPU", "CPU")  # the only resources a plan asks for
GROUP_NAME_PREFIX = "opsd-"
_EPS = 1e-9


class PlacementError(UserInputError):
    """The plan does not fit the cluster (now, or within ``placement.placement_timeout_s``): the message names the
    pool, what it needs, what the cluster has and what is missing."""


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """One placement-group bundle: resources reserved together on one node."""

    gpu: float = 0.0
    cpu: float = 0.0

    def as_ray(self) -> dict[str, float]:
        """Ray's bundle dict; zero amounts are left out (Ray refuses a bundle of zeros)."""
        return {name: amount for name, amount in (("GPU", self.gpu), ("CPU", self.cpu)) if amount > 0}

    def __str__(self) -> str:
        return _format_resources(self.as_ray())


@dataclass(frozen=True)
class GroupPlan:
    """One placement group: its bundles and how Ray may spread them over nodes."""

    pool: str  # the pool it reserves: "rollout", "teacher", "learner", or "colocated" (every stage)
    bundles: tuple[Bundle, ...]
    strategy: Strategy

    def totals(self) -> dict[str, float]:
        return _sum_resources(b.as_ray() for b in self.bundles)


@dataclass(frozen=True)
class ActorSlot:
    """Where one actor runs (a bundle of a placement group) and what the actor itself asks for from that bundle."""

    stage: Stage
    index: int
    group: int  # index into ResourcePlan.groups
    bundle: int  # bundle index in that group
    num_gpus: float  # 0 for a tensor-parallel engine: its vLLM workers take the group's GPUs
    num_cpus: float


@dataclass(frozen=True)
class ResourcePlan:
    """Every actor's resources and the placement groups that reserve them (docs/ARCHITECTURE.md, "Placement")."""

    mode: Mode
    reason: str  # why this mode, for logs: "placement.mode=split", "placement.mode=auto: the cluster has no GPU"
    groups: tuple[GroupPlan, ...]
    slots: tuple[ActorSlot, ...]
    notes: tuple[str, ...] = ()  # config values the mode leaves unused, said out loud

    @classmethod
    def from_config(cls, cfg: OPSDConfig, cluster: ClusterView | None = None, *,
                    node_cores: int | None = None) -> ResourcePlan:
        """The plan for a training run's config (see :meth:`for_request`)."""
        return cls.for_request(PlanRequest.from_config(cfg), cluster, node_cores=node_cores)

    @classmethod
    def for_request(cls, req: PlanRequest, cluster: ClusterView | None = None, *,
                    node_cores: int | None = None) -> ResourcePlan:
        """The plan for ``req``. ``cluster`` is needed only to resolve ``placement.mode=auto`` when a stage asks
        for GPUs; ``node_cores``: usable cores of a node for CPU engines (default: this process's CPU affinity).
        Raises ``ConfigError`` (naming the key) for a request no cluster could place."""
        mode, reason, notes = _resolve_mode(req, cluster)
        if mode == "cpu":
            return _cpu_plan(req, reason, notes, node_cores if node_cores is not None else _usable_cores())
        if mode == "colocate":
            return _colocate_plan(req, reason)
        return _split_plan(req, reason)

    # -- queries ----------------------------------------------------------------------------------------------
    @property
    def on_cpu(self) -> bool:
        return self.mode == "cpu"

    @property
    def shares_gpus(self) -> bool:
        """Whether actors of different pools may hold the same GPU: colocate mode, or a fractional GPU bundle (Ray
        may pack fractional bundles of different placement groups onto one GPU)."""
        return self.mode == "colocate" or any(0 < b.gpu < 1 for g in self.groups for b in g.bundles)

    @property
    def pools(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(g.pool for g in self.groups))

    def num_actors(self, stage: Stage) -> int:
        return sum(1 for s in self.slots if s.stage == stage)

    def slot(self, stage: Stage, index: int) -> ActorSlot:
        for s in self.slots:
            if s.stage == stage and s.index == index:
                return s
        raise KeyError(f"the plan has no {stage} actor {index} (it has {self.num_actors(stage)})")

    def pool_groups(self, pool: str) -> tuple[GroupPlan, ...]:
        return tuple(g for g in self.groups if g.pool == pool)

    def pool_totals(self, pool: str) -> dict[str, float]:
        return _sum_resources(g.totals() for g in self.pool_groups(pool))

    def totals(self) -> dict[str, float]:
        return _sum_resources(g.totals() for g in self.groups)

    def describe_pool(self, pool: str) -> str:
        """What a pool reserves: ``2 x {GPU: 1, CPU: 1}``; for TP=2 engines
        ``4 x [1 x {GPU: 1, CPU: 1} + 1 x {GPU: 1}] (one node each)``."""
        groups = self.pool_groups(pool)
        if len(groups) == 1:
            return _describe_bundles(groups[0].bundles)
        first = groups[0]
        if all(g.bundles == first.bundles for g in groups):
            inner = "[" + _describe_bundles(first.bundles) + "]"
            where = " (one node each)" if first.strategy == "STRICT_PACK" else ""
            return f"{len(groups)} x {inner}{where}"
        return " + ".join(_describe_bundles(g.bundles) for g in groups)

    def describe(self) -> str:
        lines = [f"placement: {self.mode} ({self.reason})"]
        for pool in self.pools:
            strategies = "/".join(dict.fromkeys(g.strategy for g in self.pool_groups(pool)))
            stages = ", ".join(f"{stage} {self.num_actors(stage)}" for stage in STAGES
                               if any(s.stage == stage and self.groups[s.group].pool == pool for s in self.slots))
            lines.append(f"  {pool:<9} {self.describe_pool(pool)}  {strategies}  [{stages}]")
        lines.append(f"  {'total':<9} {_format_resources(self.totals())}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


@dataclass(frozen=True)
class PoolRequest:
    """What one stage asks for: ``count`` actors of ``gpus_per_worker`` GPUs each."""

    stage: Stage
    count: int
    gpus_per_worker: float


@dataclass(frozen=True)
class PlanRequest:
    """The pools a job needs and how they may share the cluster (``placement.mode``). A training run asks for its
    three stages (no teacher when the loss kind runs the teacher in the learner or the method has none; no rollout
    workers for SFT without evaluation); ``opsd eval`` for rollout only."""

    pools: tuple[PoolRequest, ...]
    mode: Literal["auto", "split", "colocate", "cpu"] = "auto"
    autoscaling: bool = False
    tensor_parallel_size: int = 1  # of a rollout engine
    cpu_threads_per_worker: int | None = None  # cores a CPU rollout engine binds (None: an even split)

    @classmethod
    def from_config(cls, cfg: OPSDConfig) -> PlanRequest:
        pools = []
        if cfg.runs_rollout_workers:
            pools.append(PoolRequest("rollout", cfg.rollout.num_workers, cfg.rollout.gpus_per_worker))
        if cfg.runs_teacher_actors:
            pools.append(PoolRequest("teacher", cfg.teacher.num_workers, cfg.teacher.gpus_per_worker))
        pools.append(PoolRequest("learner", cfg.learner.num_workers, cfg.learner.gpus_per_worker))
        return cls(tuple(pools), cfg.placement.mode, cfg.placement.autoscaling, cfg.rollout.tensor_parallel_size,
                   cfg.rollout.cpu_threads_per_worker)


def _resolve_mode(req: PlanRequest, cluster: ClusterView | None) -> tuple[Mode, str, tuple[str, ...]]:
    mode = req.mode
    if mode != "auto":
        reason = f"placement.mode={mode}"
        return mode, reason, _unused_gpu_notes(req, reason) if mode == "cpu" else ()
    asked = {stage: gpus for stage, gpus in _stage_gpus(req).items() if gpus > 0}
    if not asked:
        return "cpu", "placement.mode=auto: no stage asks for GPUs", ()
    if cluster is None:
        raise ValueError("placement.mode=auto with GPU requests needs the cluster's resources (ClusterView.current())")
    gpus = cluster.total("GPU")
    if gpus > 0:
        return "split", f"placement.mode=auto: the cluster has {_fmt(gpus)} GPU", ()
    if req.autoscaling:
        return "split", "placement.mode=auto: no GPU yet; placement.autoscaling is on, so GPU nodes are requested", ()
    reason = "placement.mode=auto: the cluster has no GPU and placement.autoscaling is off"
    return "cpu", reason, _unused_gpu_notes(req, reason)


def _stage_gpus(req: PlanRequest) -> dict[Stage, float]:
    return {pool.stage: pool.gpus_per_worker for pool in req.pools}


def _unused_gpu_notes(req: PlanRequest, reason: str) -> tuple[str, ...]:
    return tuple(f"{stage}.gpus_per_worker={_fmt(gpus)} is not used ({reason})"
                 for stage, gpus in _stage_gpus(req).items() if gpus > 0)


def _stage_sizes(req: PlanRequest) -> dict[Stage, int]:
    return {pool.stage: pool.count for pool in req.pools}


def _split_plan(req: PlanRequest, reason: str) -> ResourcePlan:
    groups: list[GroupPlan] = []
    slots: list[ActorSlot] = []
    tp = req.tensor_parallel_size
    for stage, count in _stage_sizes(req).items():
        gpus = _stage_gpus(req)[stage]
        key = f"{stage}.gpus_per_worker"
        if gpus <= 0:
            raise ConfigError(key, f"must be > 0 with placement.mode=split (each stage gets its own GPUs), got "
                              f"{_fmt(gpus)}; for a run without GPUs set placement.mode=cpu")
        if stage == "rollout" and tp > 1:
            if gpus != tp:
                raise ConfigError(key, f"must equal rollout.tensor_parallel_size ({tp}): a tensor-parallel engine "
                                  f"takes one whole GPU per rank; got {_fmt(gpus)}")
            engine = (Bundle(gpu=1, cpu=1),) + (Bundle(gpu=1),) * (tp - 1)
            for index in range(count):
                slots.append(ActorSlot(stage, index, group=len(groups), bundle=0, num_gpus=0, num_cpus=1))
                groups.append(GroupPlan("rollout", engine, "STRICT_PACK"))
            continue
        _check_gpu_amount(gpus, key)
        if stage == "learner" and count > 1 and gpus < 1:
            raise ConfigError(key, f"must be >= 1 with {count} learner ranks: NCCL runs one rank per GPU, and "
                              f"fractional bundles may put two ranks on one GPU; got {_fmt(gpus)}")
        for index in range(count):
            slots.append(ActorSlot(stage, index, group=len(groups), bundle=index, num_gpus=gpus, num_cpus=1))
        groups.append(GroupPlan(stage, (Bundle(gpu=gpus, cpu=1),) * count, "PACK"))
    return ResourcePlan("split", reason, tuple(groups), tuple(slots))


def _colocate_plan(req: PlanRequest, reason: str) -> ResourcePlan:
    tp = req.tensor_parallel_size
    if tp != 1:
        raise ConfigError("rollout.tensor_parallel_size", f"must be 1 with placement.mode=colocate (one GPU), got {tp}")
    sizes, gpus = _stage_sizes(req), _stage_gpus(req)
    if sizes.get("learner", 0) > 1:
        raise ConfigError("learner.num_workers", f"must be 1 with placement.mode=colocate: NCCL cannot run two ranks "
                          f"on one GPU; got {sizes['learner']}")
    for stage, fraction in gpus.items():
        if not 0 < fraction <= 1:
            raise ConfigError(f"{stage}.gpus_per_worker", f"must be a fraction in (0, 1] with placement.mode=colocate "
                              f"(every stage shares one GPU), got {_fmt(fraction)}")
    total = sum(sizes[stage] * gpus[stage] for stage in sizes)
    if total > 1 + _EPS:
        terms = " + ".join(f"{stage} {sizes[stage]} x {_fmt(gpus[stage])}" for stage in sizes)
        share = math.floor(100 / sum(sizes.values())) / 100
        example = " ".join(f"{stage}.gpus_per_worker={_fmt(share)}" for stage in sizes)
        raise ConfigError("placement.mode", f"colocate shares one GPU: the actors' GPU fractions must sum to <= 1, "
                          f"got {terms} = {_fmt(total)}; set the fractions, e.g. {example}")
    slots = []
    for stage, count in sizes.items():
        slots.extend(ActorSlot(stage, index, group=0, bundle=0, num_gpus=gpus[stage], num_cpus=1)
                     for index in range(count))
    group = GroupPlan("colocated", (Bundle(gpu=1, cpu=len(slots)),), "PACK")
    return ResourcePlan("colocate", reason, (group,), tuple(slots))


def _cpu_plan(req: PlanRequest, reason: str, notes: tuple[str, ...], node_cores: int) -> ResourcePlan:
    tp = req.tensor_parallel_size
    if tp != 1:
        raise ConfigError("rollout.tensor_parallel_size", f"must be 1 on CPU (one in-process engine per worker), "
                          f"got {tp}")
    groups: list[GroupPlan] = []
    slots: list[ActorSlot] = []
    for stage, count in _stage_sizes(req).items():
        cpus: list[float] = [1.0] * count
        if stage == "rollout":  # as many CPUs as the cores each engine binds to (and the same validation)
            cpus = [float(len(cpu_cores_for(i, count, req.cpu_threads_per_worker, range(node_cores))))
                    for i in range(count)]
        for index in range(count):
            slots.append(ActorSlot(stage, index, group=len(groups), bundle=index, num_gpus=0, num_cpus=cpus[index]))
        groups.append(GroupPlan(stage, tuple(Bundle(cpu=c) for c in cpus), "PACK"))
    return ResourcePlan("cpu", reason, tuple(groups), tuple(slots), notes)


def _check_gpu_amount(gpus: float, key: str) -> None:
    # Ray accepts a fraction of one GPU, or whole GPUs.
    if gpus > 1 and gpus != int(gpus):
        raise ConfigError(key, f"must be a fraction of one GPU or a whole number of GPUs, got {_fmt(gpus)}")


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------------------------
# The cluster and the fit check
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterView:
    """The cluster as the plan sees it: total GPUs and CPUs of each alive node, and what is free now."""

    nodes: tuple[dict[str, float], ...]
    available: dict[str, float] = field(default_factory=dict)

    @classmethod
    def current(cls) -> ClusterView:
        import ray

        nodes = tuple({name: float(n["Resources"].get(name, 0.0)) for name in RESOURCES}
                      for n in ray.nodes() if n.get("Alive"))
        free = ray.available_resources()
        return cls(nodes, {name: float(free.get(name, 0.0)) for name in RESOURCES})

    def total(self, resource: str) -> float:
        return sum(node.get(resource, 0.0) for node in self.nodes)

    def describe(self) -> str:
        totals = _format_resources({name: self.total(name) for name in RESOURCES}, braces=False)
        return f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}, {totals}"


def fit_problems(plan: ResourcePlan, cluster: ClusterView) -> list[str]:
    """Why ``plan`` can never be placed on ``cluster`` as it is (empty: it may fit). Checks the per-resource totals
    pool by pool, and that every bundle (every STRICT_PACK group as a whole) fits on one node."""
    problems = []
    needed = plan.totals()
    taken: dict[str, float] = {}
    takers: dict[str, list[str]] = {}
    reported: set[str] = set()
    for pool in plan.pools:
        need = plan.pool_totals(pool)
        for name in RESOURCES:
            amount = need.get(name, 0.0)
            if amount <= 0:
                continue
            have, before = cluster.total(name), taken.get(name, 0.0)
            if name not in reported and before + amount > have + _EPS:
                reported.add(name)
                text = f"{pool} pool needs {plan.describe_pool(pool)}; the cluster has {_fmt(have)} {name}"
                if before > 0:
                    text += f", {'+'.join(takers[name])} already take{'s' if len(takers[name]) == 1 else ''} " \
                            f"{_fmt(before)}"
                problems.append(f"{text}: missing {_fmt(needed[name] - have)} {name}")
            taken[name] = before + amount
            takers.setdefault(name, []).append(pool)
    if cluster.nodes:  # an empty cluster is already reported by the totals
        seen = set()
        for group in plan.groups:
            units = [group.totals()] if group.strategy == "STRICT_PACK" else [b.as_ray() for b in group.bundles]
            for unit in units:
                key = (group.pool, tuple(sorted(unit.items())))
                if key in seen or any(_fits(unit, node) for node in cluster.nodes):
                    continue
                seen.add(key)
                closest = min(cluster.nodes, key=lambda node: sum(_shortfall(unit, node).values()))
                what = "a placement group (STRICT_PACK: one node)" if group.strategy == "STRICT_PACK" else "a bundle"
                missing = ", ".join(f"{_fmt(v)} {k}" for k, v in _shortfall(unit, closest).items())
                problems.append(f"{group.pool} pool: {what} needs {_format_resources(unit)} on one node; the largest "
                                f"node has {_format_resources(closest)}: missing {missing} on one node")
    return problems


def _fits(unit: dict[str, float], node: dict[str, float]) -> bool:
    return all(node.get(name, 0.0) + _EPS >= amount for name, amount in unit.items())


def _shortfall(unit: dict[str, float], node: dict[str, float]) -> dict[str, float]:
    return {name: amount - node.get(name, 0.0) for name, amount in unit.items() if amount > node.get(name, 0.0) + _EPS}


def _misfit_message(plan: ResourcePlan, cluster: ClusterView, problems: Sequence[str]) -> str:
    pools = "; ".join(f"{pool} {plan.describe_pool(pool)}" for pool in plan.pools)
    return (f"the resource plan ({plan.mode}) does not fit this Ray cluster ({cluster.describe()}):\n"
            + "".join(f"  - {p}\n" for p in problems)
            + f"plan: {pools}; total {_format_resources(plan.totals())}.\n"
            "Use fewer workers or GPUs per worker, add nodes, or set placement.autoscaling=true if the cluster's "
            "autoscaler will add them (the wait is bounded by placement.placement_timeout_s).")


# ---------------------------------------------------------------------------------------------------------------
# Reserving
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Reservation:
    """The plan's placement groups, created and ready. ``options_for`` gives each actor's Ray options."""

    plan: ResourcePlan
    placement_groups: list[PlacementGroup]

    def options_for(self, stage: Stage, index: int) -> dict[str, Any]:
        """``ActorClass.options(**...)`` for actor ``index`` of ``stage``: its resources and its bundle. Child tasks
        and actors it starts (vLLM's TP workers) are placed in the same placement group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        slot = self.plan.slot(stage, index)
        return {
            "num_gpus": slot.num_gpus,
            "num_cpus": slot.num_cpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.placement_groups[slot.group],
                placement_group_bundle_index=slot.bundle,
                placement_group_capture_child_tasks=True,
            ),
        }

    def stage_options(self, stage: Stage) -> list[dict[str, Any]]:
        """``options_for`` of every actor of ``stage``, in index order."""
        return [self.options_for(stage, i) for i in range(self.plan.num_actors(stage))]

    def placement_group(self, stage: Stage, index: int) -> PlacementGroup:
        return self.placement_groups[self.plan.slot(stage, index).group]

    def release(self) -> None:
        """Remove the placement groups (Ray kills actors still in them). Safe to call twice."""
        _remove(self.placement_groups)
        self.placement_groups = []

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def reserve(plan: ResourcePlan, *, timeout_s: float, autoscaling: bool = False,
            log: Callable[[str], None] = print, report_every_s: float = 30.0) -> Reservation:
    """Create the plan's placement groups and wait (at most ``timeout_s``) until all are placed.

    Without ``autoscaling`` a plan that can never fit the cluster raises ``PlacementError`` before anything is
    created. On timeout the groups are removed and ``PlacementError`` names the pools still pending and what the
    cluster lacks now. While waiting, ``log`` gets what is awaited every ``report_every_s`` seconds.
    """
    import ray
    from ray.util.placement_group import placement_group

    cluster = ClusterView.current()
    if not autoscaling:
        problems = fit_problems(plan, cluster)
        if problems:
            raise PlacementError(_misfit_message(plan, cluster, problems))
    groups: list[PlacementGroup] = []
    try:
        for index, group in enumerate(plan.groups):
            groups.append(placement_group([b.as_ray() for b in group.bundles], strategy=group.strategy,
                                          name=f"{GROUP_NAME_PREFIX}{group.pool}-{index}"))
        started = time.monotonic()
        deadline = started + timeout_s
        ready_refs = [group.ready() for group in groups]
        first_wait = min(timeout_s, 2.0)  # most plans are placed at once: only report a real wait
        _, not_ready = ray.wait(ready_refs, num_returns=len(ready_refs), timeout=first_wait)
        while not_ready:
            pending = [i for i, ref in enumerate(ready_refs) if ref in not_ready]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            log(f"opsd: waiting for placement groups ({time.monotonic() - started:.0f} of {timeout_s:g} s"
                f"{', autoscaling' if autoscaling else ''}): {_pending_text(plan, pending)}")
            _, not_ready = ray.wait(not_ready, num_returns=len(not_ready), timeout=min(remaining, report_every_s))
        if not_ready:
            pending = [i for i, ref in enumerate(ready_refs) if ref in not_ready]
            raise PlacementError(_timeout_message(plan, pending, ClusterView.current(), timeout_s, autoscaling))
    except BaseException:
        _remove(groups)
        raise
    return Reservation(plan, groups)


def _pending_text(plan: ResourcePlan, pending: Sequence[int]) -> str:
    parts = []
    for pool in dict.fromkeys(plan.groups[i].pool for i in pending):
        waiting = [i for i in pending if plan.groups[i].pool == pool]
        if len(waiting) == len(plan.pool_groups(pool)):
            what = plan.describe_pool(pool)
        else:  # some of a pool's groups (tensor-parallel engines) are placed, others not
            need = _sum_resources(plan.groups[i].totals() for i in waiting)
            what = f"{len(waiting)} of its groups, {_format_resources(need)}"
        parts.append(f"{pool} pool ({what})")
    return ", ".join(parts)


def _timeout_message(plan: ResourcePlan, pending: Sequence[int], cluster: ClusterView, timeout_s: float,
                     autoscaling: bool) -> str:
    need = _sum_resources(plan.groups[i].totals() for i in pending)
    free = cluster.available
    missing = {name: amount - free.get(name, 0.0) for name, amount in need.items()
               if amount > free.get(name, 0.0) + _EPS}
    if missing:
        lack = "missing " + ", ".join(f"{_fmt(v)} {k}" for k, v in missing.items())
    else:
        lack = "enough is free in total, but not on the nodes these bundles need together"
    why = "the autoscaler did not add the nodes in time" if autoscaling else \
        "other work holds the resources, or the cluster lost nodes"
    return (f"placement groups not ready after {timeout_s:g} s (placement.placement_timeout_s): still waiting for "
            f"{_pending_text(plan, pending)}; the cluster ({cluster.describe()}) has "
            f"{_format_resources(free, braces=False)} free: {lack} ({why}). The placement groups were removed.")


def _remove(groups: Sequence[PlacementGroup]) -> None:
    from ray.util.placement_group import remove_placement_group

    for group in groups:
        try:
            remove_placement_group(group)
        except Exception:  # noqa: BLE001 - already removed, or the cluster is gone: nothing left to free
            pass


# ---------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------


def _fmt(amount: float) -> str:
    return f"{amount:g}"


def _format_resources(resources: dict[str, float], braces: bool = True) -> str:
    ordered = [name for name in RESOURCES if name in resources] + sorted(set(resources) - set(RESOURCES))
    if braces:
        return "{" + ", ".join(f"{name}: {_fmt(resources[name])}" for name in ordered) + "}"
    return ", ".join(f"{_fmt(resources[name])} {name}" for name in ordered)


def _sum_resources(items) -> dict[str, float]:
    total: dict[str, float] = {}
    for resources in items:
        for name, amount in resources.items():
            total[name] = total.get(name, 0.0) + amount
    return total


def _describe_bundles(bundles: Sequence[Bundle]) -> str:
    runs: list[tuple[Bundle, int]] = []
    for b in bundles:
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return " + ".join(f"{n} x {b}" for b, n in runs)


def logical_cpus(cfg: OPSDConfig) -> int:
    """CPUs an embedded cluster declares. On CPU the stages run one after another and time-share the cores, so each
    actor gets its own logical CPUs and the declared total may exceed the physical cores."""
    cores = os.cpu_count() or 1
    actors = sum(pool.count for pool in PlanRequest.from_config(cfg).pools if pool.stage != "rollout")
    return max(cores, cores + actors)
