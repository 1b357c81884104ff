"""End to end on the tiny model on CPU: rollout (vLLM) -> teacher -> DeepSpeed learner -> adapter push, on Ray."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from orchestrator.config import load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]


def test_end_to_end_training_on_cpu(tiny_model_dir, tmp_path):
    from orchestrator.train import train

    data = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"  # 5 problems
    cfg = load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={tiny_model_dir}", f"data.path={data}", "data.limit=null", "train.prompts_per_step=1",
        "rollout.max_response_tokens=8", f"train.run_dir={tmp_path / 'run'}", "train.checkpoint_every=2",
        "rollout.cpu_threads_per_worker=1", "train.eval_rows=1", "learner.optim.lr=5e-3",
    ])
    lines = []
    with local_ray(num_cpus=4):
        run_dir = train(cfg, print_fn=lines.append)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 4 training rows (1 held out), 1 per step, 1 epoch
    # Every training row trained on exactly once in the epoch; the held-out row never.
    rows = Counter(sid.split("@")[0] for r in records for sid in r["sample_ids"])
    assert sorted(rows) == [f"gsm8k-{i}" for i in range(4)] and set(rows.values()) == {1}
    # Strictly on-policy: step n's rollouts came from adapter n-1, so versions 1..N-1 reached the rollout workers.
    assert [r["policy_versions"] for r in records] == [[0], [1], [2], [3]]
    assert [r["adapter_version"] for r in records] == [1, 2, 3, 4]
    assert all(r["tokens"] > 0 and r["loss"] == r["loss"] for r in records)
    for stage in ("rollout", "teacher", "learner"):
        assert all(r[f"tokens_per_second/{stage}"] > 0 for r in records)
    assert (run_dir / "adapters" / "v4" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-2").is_dir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert any(line.startswith("step 4/4") for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["heldout_gjs"]) == {"0", "4"} and records[-1]["heldout_gjs"] == summary["heldout_gjs"]["4"]
    assert any("held-out GJS" in line and "before" in line for line in lines)
