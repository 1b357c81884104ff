"""A soak run: many steps of the tiny recipe with max_staleness 1 while a rollout, a teacher and a learner actor are
killed at random steps; then an audit of what the run recorded.

    python benchmarks/soak.py [--steps 200] [--seed 0] [--out DIR]

Audited from metrics.jsonl: every row of each epoch trained exactly once (the last epoch may be partial), no step
sampled with two adapter versions, one record per step, and the kills seen (workers replaced, learner restarts).
Memory: the resident set of the driver and of every actor process, sampled every second; for each role, the process
alive at the end (a killed actor's replacement is a new process with a steady state of its own) is followed from its
own warm-up (--warmup steps after it appears) to the end, and its growth from the first fifth of that window to the
last must stay under 10%. A benchmark, not a CI test: a few minutes on a 2-core CPU.
Prints a Markdown report for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from orchestrator.cluster import ray_session  # noqa: E402,F401 - first: Ray's listener address before ray's import


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=40, help="training problems (an epoch is rows / prompts)")
    parser.add_argument("--prompts", type=int, default=2, help="prompts per step")
    parser.add_argument("--seed", type=int, default=0, help="chooses the steps the kills happen at")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the memory baseline")
    parser.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    return parser.parse_args()


class Monitor(threading.Thread):
    """Samples (step, role, rss) every few seconds; kills one actor of a role when the run reaches its step."""

    def __init__(self, run_dir: Path, kills: dict[int, str], every_s: float = 3.0):
        super().__init__(daemon=True)
        self.run_dir, self.kills, self.every_s = run_dir, dict(kills), every_s
        self.samples: list[tuple[int, str, int, int]] = []  # (step, role, pid, rss)
        self.killed: list[tuple[int, str, int]] = []
        self.stop = threading.Event()

    def step(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return sum(1 for _ in path.open()) if path.is_file() else 0

    def run(self) -> None:
        import psutil

        driver = psutil.Process()
        while not self.stop.wait(self.every_s):
            step = self.step()
            actors = {}
            for p in psutil.process_iter(["cmdline"]):
                title = " ".join(p.info["cmdline"] or [])
                for role in ("RolloutWorker", "TeacherScorer", "LearnerRank"):
                    if title.startswith(f"ray::{role}"):
                        actors.setdefault(role, []).append(p)
            try:
                self.samples.append((step, "driver", driver.pid, driver.memory_info().rss))
                for role, processes in actors.items():
                    for p in processes:
                        self.samples.append((step, role, p.pid, p.memory_info().rss))
            except psutil.NoSuchProcess:
                continue
            for at, role in list(self.kills.items()):
                if step >= at and actors.get(role):
                    victim = actors[role][0]
                    os.kill(victim.pid, signal.SIGKILL)
                    self.killed.append((step, role, victim.pid))
                    del self.kills[at]


def main() -> int:
    args = parse_args()
    from opsd.configlib import from_dict, load_yaml
    from orchestrator.config import OPSDConfig
    from orchestrator.metrics import read_metrics
    from orchestrator.offline_models import build_tiny_qwen3
    from orchestrator.train import train

    rng = random.Random(args.seed)
    third = args.steps // 3
    kills = {rng.randrange(args.warmup, third): "RolloutWorker", rng.randrange(third, 2 * third): "TeacherScorer",
             rng.randrange(2 * third, args.steps - 5): "LearnerRank"}
    scratch = Path(tempfile.mkdtemp(prefix="opsd-soak-"))
    run_dir = Path(args.out) if args.out else scratch / "run"
    model = build_tiny_qwen3(scratch / "tiny-qwen3")
    data = load_yaml(REPO_ROOT / "recipes" / "tiny-cpu.yaml")
    data["model"]["path"] = str(model)
    data["data"].update(path=str(REPO_ROOT / "data" / "gsm8k" / "train-1k.jsonl"), limit=args.rows)
    data["rollout"].update(max_response_tokens=16, cpu_threads_per_worker=1)
    data["train"].update(steps=args.steps, prompts_per_step=args.prompts, max_staleness=1, checkpoint_every=10,
                         keep_checkpoints=2, run_dir=str(run_dir), epochs=1)
    cfg = from_dict(OPSDConfig, data)

    monitor = Monitor(run_dir, kills, every_s=1.0)
    monitor.start()
    started = time.perf_counter()
    lines: list[str] = []
    try:
        train(cfg, print_fn=lines.append)
    finally:
        monitor.stop.set()
        monitor.join(timeout=30)
    seconds = time.perf_counter() - started

    records = read_metrics(run_dir)
    steps = [r["step"] for r in records]
    per_epoch: dict[int, Counter] = defaultdict(Counter)
    for r in records:
        for sid in r["sample_ids"]:
            row, rest = sid.split("@", 1)
            per_epoch[int(rest[1:].split("r")[0])][row] += 1
    full_epochs = sorted(per_epoch)[:-1]  # the last one may be partial
    once = all(set(per_epoch[e].values()) == {1} and len(per_epoch[e]) == args.rows for e in full_epochs)
    last = per_epoch[max(per_epoch)]
    mixed = [r["step"] for r in records if len(r["policy_versions"]) != 1]

    growth = {}
    for role in sorted({role for _, role, _, _ in monitor.samples}):
        # The process of the role alive at the end (a killed actor's replacement is a new process with its own
        # steady state): from its own warm-up (args.warmup steps after its first sample, or after the run's
        # warm-up) to the end.
        survivor = [pid for _, r, pid, _ in monitor.samples if r == role][-1]
        own = [(step, rss) for step, r, pid, rss in monitor.samples if r == role and pid == survivor]
        settled = max(args.warmup, own[0][0] + args.warmup if own[0][0] > 0 else 0)
        series = [(step, rss) for step, rss in own if step >= settled]
        if len(series) < 4:
            continue
        window = max(2, len(series) // 5)
        first = statistics.mean(rss for _, rss in series[:window])
        final = statistics.mean(rss for _, rss in series[-window:])
        growth[role] = (first, final, (final - first) / first, series[0][0])

    ok = (steps == list(range(1, args.steps + 1)) and once and set(last.values()) <= {1} and not mixed
          and len(monitor.killed) == 3 and all(g < 0.10 for _, _, g, _ in growth.values()))
    print(f"\n### Soak run: {args.steps} steps, max_staleness 1, kills at steps "
          f"{', '.join(f'{s} ({r})' for s, r, _ in monitor.killed)} — {'PASS' if ok else 'FAIL'}\n")
    print(f"`python benchmarks/soak.py --steps {args.steps} --seed {args.seed}`: {seconds / 60:.1f} min; tiny Qwen3, "
          f"{args.rows} problems, {args.prompts} prompts per step ({len(per_epoch)} epochs).\n")
    print("| check | result |")
    print("|---|---|")
    print(f"| one record per step | {'yes' if steps == list(range(1, args.steps + 1)) else f'no: {steps[:10]}...'} |")
    print(f"| every row of each full epoch trained exactly once ({len(full_epochs)} full epochs) | "
          f"{'yes' if once else 'no'} |")
    print(f"| last (partial) epoch: no row twice | {'yes' if set(last.values()) <= {1} else 'no'} |")
    print(f"| steps sampled with two adapter versions | {len(mixed)} |")
    print(f"| workers replaced (rollout + teacher) | {records[-1].get('workers_replaced')} |")
    print(f"| learner restarts | {records[-1].get('learner_restarts')} |")
    print("\n| process (the one alive at the end) | from step | RSS after warm-up (MiB) | RSS at the end (MiB) | growth |")
    print("|---|---:|---:|---:|---:|")
    for role, (first, final, g, since) in growth.items():
        print(f"| {role} | {since} | {first / 2**20:,.0f} | {final / 2**20:,.0f} | {g:+.1%} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
