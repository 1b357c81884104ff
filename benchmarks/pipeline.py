"""The whole loop against its slowest stage: what orchestration costs, with max_staleness 0 and 1, in one run.

    python benchmarks/pipeline.py                          # tiny Qwen3 (built offline), CPU
    python benchmarks/pipeline.py --model smollm2 --response 64 --steps 6

Each setting runs ``orchestrator.train.train`` on an embedded Ray (a fresh cluster per setting) and reads its
``metrics.jsonl``. Per step the loop records the seconds of each stage measured on its own (rollout: waiting for the
traces; teacher; learner) and the end-to-end step time. Reported, over the steps after the first (warm-up):
  steps/s and tokens/s end to end (trained response tokens per second of wall time),
  the slowest stage's time alone (median over steps, from the max_staleness 0 run where stages run one at a time),
  ratio = end-to-end step time / slowest stage time: 1.0 would be a perfect pipeline, the sum of the stages / the
  slowest one is what running them one after another costs.
On a CPU the stages share the same cores, so overlapping them (max_staleness 1) cannot win much; on GPUs with split
pools it can hide the teacher and learner behind the rollouts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # before this folder: no benchmark script may shadow a package
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a benchmark's throwaway cluster needs no token
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

STAGES = ("rollout", "teacher", "learner")


def model_dir(kind: str, scratch: Path) -> str:
    from orchestrator.offline_models import build_tiny_qwen3, import_gguf

    if kind == "tiny":
        return str(build_tiny_qwen3(scratch / "tiny-qwen3"))
    if kind == "smollm2":
        existing = REPO_ROOT / "models" / "smollm2-135m-instruct"
        return str(existing if (existing / "config.json").is_file() else import_gguf(scratch / "smollm2"))
    return kind


def run(model: str, staleness: int, args, scratch: Path) -> dict:
    from orchestrator.config import load_config
    from orchestrator.metrics import read_metrics
    from orchestrator.train import train

    cfg = load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={model}", "data.limit=null", f"train.steps={args.steps}",
        f"train.prompts_per_step={args.prompts}", f"rollout.max_response_tokens={args.response}",
        f"train.max_staleness={staleness}", f"train.run_dir={scratch / f'run-s{staleness}'}", "train.heldout_rows=0",
        "train.checkpoint_every=0",
    ])
    start = time.perf_counter()
    train(cfg, print_fn=lambda line: None)
    wall = time.perf_counter() - start
    records = read_metrics(cfg.train.run_dir)[1:]  # the first step warms up every stage
    step_s = statistics.median(r["step_seconds"] for r in records)
    stage_s = {s: statistics.median(r[f"stage_seconds/{s}"] for r in records) for s in STAGES}
    tokens = statistics.median(r["tokens"] for r in records)
    return dict(step_s=step_s, stage_s=stage_s, tokens=tokens, wall=wall,
                sync_s=statistics.median(r["adapter_sync_seconds"] for r in records),
                staleness=statistics.fmean(r["policy_staleness"] for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model directory")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--response", type=int, default=32, help="response tokens per trace")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = model_dir(args.model, scratch)
        results = {s: run(model, s, args, scratch) for s in (0, 1)}
    slowest_stage = max(STAGES, key=lambda s: results[0]["stage_s"][s])
    slowest = results[0]["stage_s"][slowest_stage]
    print(f"model {args.model}, {args.steps} steps x {args.prompts} prompts x {args.response} tokens; "
          f"medians over steps 2..{args.steps}")
    print("| max_staleness | step (s) | steps/s | trained tokens/s | rollout (s) | teacher (s) | learner (s) | "
          "adapter sync (s) | measured staleness | step / slowest stage |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for staleness, r in results.items():
        stages = " | ".join(f"{r['stage_s'][s]:.2f}" for s in STAGES)
        print(f"| {staleness} | {r['step_s']:.2f} | {1 / r['step_s']:.3f} | {r['tokens'] / r['step_s']:,.0f} | "
              f"{stages} | {r['sync_s']:.2f} | {r['staleness']:.2f} | {r['step_s'] / slowest:.2f}x |")
    print(f"slowest stage alone: {slowest_stage}, {slowest:.2f} s (from the max_staleness 0 run)")


if __name__ == "__main__":
    main()
