"""Evaluation with real engines: `opsd eval` end to end on the tiny model (vLLM RolloutWorkers on an embedded Ray,
a LoRA adapter, math-verify grading), and the in-training API on an already-started rollout pool.

The tiny model is random, so it answers nothing: these tests check the machinery (every output written, every
sample accounted for, adapters served, sampling reproducible), not accuracy. Grading itself is checked against
hand-checked cases in test_eval.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from helpers.local_ray import local_ray  # first: sets Ray's loopback switch before ray is imported

import pytest

from orchestrator.cli import main
from evaluation.grading import GRADE_STATUSES

pytestmark = pytest.mark.slow

EVAL_DATA = Path(__file__).resolve().parents[1] / "data" / "eval"
LIMIT, N, MAX_TOKENS = 5, 2, 16


@pytest.fixture(scope="module")
def adapter(tiny_model_dir: Path, tmp_path_factory) -> Path:
    from helpers.rollout_reference import make_lora_adapter

    return make_lora_adapter(tiny_model_dir, tmp_path_factory.mktemp("eval-engine") / "adapter", rank=8, seed=5)


def wait_for_free_cpus(expected: float, timeout_s: float = 60.0) -> None:
    import ray

    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < expected:
        assert time.monotonic() < deadline, f"rollout actors still hold CPUs: {ray.available_resources()}"
        time.sleep(0.5)


def test_opsd_eval_end_to_end_writes_every_output(tiny_model_dir, adapter, tmp_path, capsys):
    files = sorted(EVAL_DATA.glob("*.jsonl"))
    assert [f.stem for f in files] == ["aime24", "aime25", "hmmt25", "math500"]
    out = tmp_path / "run"
    argv = ["eval", "--model", str(tiny_model_dir), "--adapter", str(adapter),
            "--sets", ",".join(f"{f.stem}={f}" for f in files), "--limit", str(LIMIT), "--n", str(N),
            "--max-tokens", str(MAX_TOKENS), "--max-model-len", "1024", "--kv-cache-gib", "0.25",
            # Two engines of one core each: the data-parallel path. (It also keeps each engine's first step under
            # vLLM-CPU's 4,096-token prefill budget; see the issue note on chunked prefill with seeded sampling.)
            "--workers", "2", "--out", str(out)]
    started = time.perf_counter()
    with local_ray(num_cpus=2):
        assert main(argv) == 0
        wait_for_free_cpus(2)  # the engines were stopped
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == len(files) * LIMIT * N
    for s in samples:
        assert s["status"] in GRADE_STATUSES and s["correct"] == (s["status"] == "correct")
        assert s["policy_version"] == 1  # the adapter was served
        assert 1 <= s["response_tokens"] <= MAX_TOKENS and s["finish_reason"] in ("stop", "length")
        assert isinstance(s["response"], str) and s["reference"]
        assert s["extracted"] is None or s["status"] != "no_answer"
    by_problem = {(s["eval_set"], s["problem_id"]): [] for s in samples}
    for s in samples:
        by_problem[(s["eval_set"], s["problem_id"])].append(s["sample_index"])
    assert len(by_problem) == len(files) * LIMIT and all(sorted(v) == list(range(N)) for v in by_problem.values())
    assert [k for k in by_problem if k[0] == "aime24"][0] == ("aime24", "aime24-0")  # in file order

    results = json.loads((out / "results.json").read_text())
    assert results["adapter"] == str(adapter) and results["policy_version"] == 1
    assert results["config"]["n"] == N and results["engines"]["workers"] == 2
    assert results["config"]["sets"] == [f"{f.stem}={f}" for f in files]
    assert results["eval_set_files"] == {f.stem: str(f) for f in files}
    for f in files:
        eval_set = results["eval_sets"][f.stem]
        assert eval_set["problems"] == LIMIT and eval_set["samples"] == LIMIT * N
        assert set(eval_set["scores"]) == {f"avg@{N}", f"pass@{N}", f"maj@{N}"}
        assert sum(eval_set["statuses"].values()) == LIMIT * N
    table = (out / "results.md").read_text()
    assert "| eval set | problems |" in table
    assert all(f"| {f.stem} | {LIMIT} |" in table for f in files) and f"| {files[0].stem} |" in printed
    assert results["seconds"]["generate"] > 0 and results["seconds"]["engine_start"] > 0
    print(f"opsd eval end to end: {seconds:.1f} s, {results['seconds']}")

    assert main(["eval", "--compare", str(out), str(out)]) == 0
    compared = capsys.readouterr().out
    assert compared.count("| +0.0") == len(files) * 3 and "| yes |" not in compared


def test_run_eval_on_an_already_started_rollout_pool(tiny_model_dir, adapter):
    """The in-training API: the orchestrator's rollout pool (whatever adapter it serves), eval sets loaded once."""
    from evaluation.config import EvalConfig
    from evaluation.run import Evaluator
    from opsd.adapter import read_adapter_dir
    from opsd.hf import load_tokenizer
    from opsd.model import ModelSpec
    from rollout.config import RolloutConfig
    from rollout.pool import RolloutPool

    rollout = RolloutConfig(num_workers=2, gpus_per_worker=0, cpu_kv_cache_gib=0.25, max_model_len=512,
                            max_response_tokens=MAX_TOKENS)
    config = EvalConfig(sets=["gsm8k", "aime24"], limit=3, n=3, max_tokens=8, pass_k=[1, 2])
    with local_ray(num_cpus=2), Evaluator(config, load_tokenizer(str(tiny_model_dir))) as evaluator:
        evaluator.check_prompts(512)
        pool = RolloutPool(ModelSpec(str(tiny_model_dir)), rollout, max_lora_rank=8, call_timeout_s=300)
        try:
            first = evaluator.run(pool)
            again = evaluator.run(pool)
            pool.load_adapter(read_adapter_dir(adapter, 1))
            tuned = evaluator.run(pool)
        finally:
            pool.shutdown()

    metrics = first.metrics()
    for eval_set in ("gsm8k", "aime24"):
        for key in ("avg@3", "avg@3_ci95_low", "avg@3_ci95_high", "pass@1", "pass@2", "maj@3", "no_answer_rate",
                    "grading_timeouts", "truncation_rate", "response_tokens"):
            assert f"eval/{eval_set}/{key}" in metrics, key
        assert metrics[f"eval/{eval_set}/pass@1"] == metrics[f"eval/{eval_set}/avg@3"]
    assert metrics["eval/seconds"] > 0 and len(first.samples) == 2 * 3 * 3
    assert [s.response for s in first.samples] == [s.response for s in again.samples]  # seeded per sample id
    assert len({s.response for s in first.samples if s.problem_id == "test-0"}) > 1  # the n samples differ
    assert first.policy_version == 0 and tuned.policy_version == 1
    assert [s.response for s in tuned.samples] != [s.response for s in first.samples]
