"""End to end on the tiny model on CPU: rollout (vLLM) -> teacher -> DeepSpeed learner -> adapter push, on Ray.

One module-scoped run serves several tests: its records, its outputs, the metrics Ray served while it ran, and a
second run that resumes from its step-2 checkpoint.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

from orchestrator.config import OPSDConfig, load_config  # noqa: E402
from orchestrator.metrics import read_metrics  # noqa: E402

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "tests" / "fixtures" / "data" / "gsm8k.jsonl"  # 5 problems


def tiny_config(model_dir: Path, run_dir: Path, *overrides: str) -> OPSDConfig:
    return load_config(REPO_ROOT / "recipes" / "tiny-cpu.yaml", [
        f"model.path={model_dir}", f"data.path={DATA}", "data.limit=null", "train.prompts_per_step=1",
        "rollout.max_response_tokens=8", f"train.run_dir={run_dir}", "train.checkpoint_every=2",
        "rollout.cpu_threads_per_worker=1", "train.heldout_rows=1", "learner.optim.lr=5e-3", *overrides,
    ])


class MetricsScraper(threading.Thread):
    """Reads Ray's metrics endpoint every second while a run goes on; keeps the ``opsd_`` sample lines it saw."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.seen, self.stop = url, set(), threading.Event()

    def wait_for(self, name: str, timeout_s: float) -> None:
        """Block (the run's progress line calls this) until ``name`` was seen at the endpoint, or ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while name not in self.seen and time.monotonic() < deadline:
            time.sleep(0.2)

    def run(self) -> None:
        while not self.stop.wait(1.0):
            try:
                text = urllib.request.urlopen(self.url, timeout=5).read().decode()
            except OSError:
                continue
            self.seen |= {line.split("{")[0] for line in text.splitlines()
                          if line.startswith("ray_opsd_") and not line.startswith("#")}


@dataclass
class Run:
    run_dir: Path
    lines: list[str]
    metric_names: set[str]


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tmp_path_factory) -> Run:
    import ray

    from orchestrator.train import train

    run_dir = tmp_path_factory.mktemp("train") / "run"
    lines: list[str] = []
    # Ray exports metrics every 10 s by default, longer than this run's steps: every second here (Ray's processes
    # read their config from RAY_<name> variables when they start).
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_metrics_report_interval_ms", "1000")
    with local_ray(num_cpus=4):
        scraper = MetricsScraper(f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics")
        scraper.start()

        def print_fn(line: str) -> None:
            lines.append(line)
            if line.startswith("step 2/"):  # recorded with the step-2 evaluation: the run waits for the scraper
                scraper.wait_for("ray_opsd_eval", timeout_s=20)

        try:
            train(tiny_config(tiny_model_dir, run_dir, "eval.every=2", "eval.sets=[gsm8k]", "eval.limit=2",
                              "eval.n=2", "eval.max_tokens=8", "eval.grade_processes=1",
                              "tracking.backends=[tensorboard]"), print_fn=print_fn)
        finally:
            scraper.stop.set()
            scraper.join(timeout=10)
            monkeypatch.undo()
    return Run(run_dir, lines, scraper.seen)


def test_every_row_once_and_every_adapter_version_reaches_the_rollout_workers(first_run):
    records = read_metrics(first_run.run_dir)
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


def test_run_directory_and_progress(first_run):
    run_dir, lines = first_run.run_dir, first_run.lines
    assert (run_dir / "adapters" / "v4" / "adapter_model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step-2" / "client_state.json").is_file()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "summary.json").is_file()
    assert any(line.startswith("step 4/4") for line in lines)
    summary = json.loads((run_dir / "summary.json").read_text())
    records = read_metrics(run_dir)
    assert set(summary["heldout_gjs"]) == {"0", "4"} and records[-1]["heldout_gjs"] == summary["heldout_gjs"]["4"]
    assert any("held-out GJS" in line and "before" in line for line in lines)


def test_eval_set_evaluation_every_n_steps_is_logged(first_run):
    records = read_metrics(first_run.run_dir)
    evaluated = [r["step"] for r in records if "eval/gsm8k/avg@2" in r]
    assert evaluated == [2, 4]
    for r in records:
        if r["step"] in evaluated:
            assert 0.0 <= r["eval/gsm8k/avg@2"] <= 1.0 and "eval/gsm8k/maj@2" in r and "eval/gsm8k/pass@2" in r
    summary = json.loads((first_run.run_dir / "summary.json").read_text())
    assert set(summary["eval"]) == {"0", "2", "4"}  # the base model's score before training, then every 2 steps
    assert sum("opsd: eval after step" in line for line in first_run.lines) == 3


def test_the_run_is_tracked_in_tensorboard(first_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reader = EventAccumulator(str(first_run.run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    records = read_metrics(first_run.run_dir)
    assert [(e.step, e.value) for e in reader.Scalars("loss")] == [
        (r["step"], pytest.approx(r["loss"])) for r in records]
    assert [e.step for e in reader.Scalars("heldout_gjs")] == [0, 4]  # before training and at the end
    assert [e.step for e in reader.Scalars("eval/gsm8k/avg@2")] == [0, 2, 4]
    assert {"_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(reader.PluginTagToContent("hparams"))
    assert [e.step for e in reader.Images("curves")] == [4]


def test_opsd_metrics_appear_at_the_ray_metrics_endpoint_during_the_run(first_run):
    expected = {"ray_opsd_loss", "ray_opsd_gjs", "ray_opsd_step_seconds", "ray_opsd_tokens_per_second",
                "ray_opsd_policy_staleness", "ray_opsd_adapter_sync_seconds", "ray_opsd_eval"}
    assert expected <= first_run.metric_names, f"seen at the endpoint: {sorted(first_run.metric_names)}"


def test_resume_from_a_checkpoint_continues_with_the_next_rows_and_the_same_losses(first_run, tiny_model_dir,
                                                                                    tmp_path):
    from orchestrator.train import train

    checkpoint = first_run.run_dir / "checkpoints" / "step-2"
    lines: list[str] = []
    with local_ray(num_cpus=4):
        run_dir = train(tiny_config(tiny_model_dir, tmp_path / "resumed", f"train.resume={checkpoint}"),
                        print_fn=lines.append)
    resumed, straight = read_metrics(run_dir), read_metrics(first_run.run_dir)
    assert [r["step"] for r in resumed] == [3, 4]
    assert any(f"resumed from {checkpoint}" in line for line in lines)
    # The data cursor, the learner state (adapter, optimizer, schedule) and the adapter on the rollout workers came
    # back: the same rows, the same policy versions and the same losses as the run that never stopped.
    for a, b in zip(resumed, straight[2:]):
        assert a["sample_ids"] == b["sample_ids"] and a["policy_versions"] == b["policy_versions"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["learning_rate"] == b["learning_rate"]
    summary = json.loads((run_dir / "summary.json").read_text())
    before = json.loads((first_run.run_dir / "summary.json").read_text())["heldout_gjs"]
    assert summary["heldout_gjs"]["0"] == before["0"]  # the held-out baseline travels with the checkpoint
    assert summary["heldout_gjs"]["4"] == pytest.approx(before["4"], rel=1e-4)


def test_resume_without_a_checkpoint_fails_before_any_work(tmp_path, tiny_model_dir):
    from opsd.configlib import ConfigError
    from orchestrator.train import train

    cfg = tiny_config(tiny_model_dir, tmp_path / "fresh", "train.resume=latest")
    with pytest.raises(ConfigError, match="train.resume.*no complete checkpoint"):
        train(cfg)
    assert not (tmp_path / "fresh").exists()


def test_an_ema_teacher_run_versions_its_teacher_and_resumes_it(tiny_model_dir, tmp_path):
    """teacher.kind=ema end to end: after each applied step the teacher actors get the learner's EMA (step n is scored
    by version n - 1), and a run resumed from a checkpoint loads the checkpoint's EMA on them: the same losses."""
    from orchestrator.train import train

    ema = ("teacher.kind=ema", "teacher.ema_decay=0.5", "learner.optim.lr=2e-2", "train.steps=3",
           "train.heldout_rows=0")
    lines: list[str] = []
    with local_ray(num_cpus=4):
        straight = read_metrics(train(tiny_config(tiny_model_dir, tmp_path / "straight", *ema), lines.append))
        checkpoint = tmp_path / "straight" / "checkpoints" / "step-2"
        resumed = read_metrics(train(tiny_config(tiny_model_dir, tmp_path / "resumed", *ema,
                                                 f"train.resume={checkpoint}"), lines.append))
    assert [r["teacher_version"] for r in straight] == [0, 1, 2]
    assert [(r["step"], r["teacher_version"]) for r in resumed] == [(3, 2)]
    assert resumed[0]["sample_ids"] == straight[2]["sample_ids"]
    assert resumed[0]["loss"] == pytest.approx(straight[2]["loss"], rel=1e-4)
