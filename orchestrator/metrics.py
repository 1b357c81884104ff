"""Per-step metrics: to Ray's metrics endpoint (gauges ``opsd_<field>``, the dashboard, Prometheus) and to
``metrics.jsonl``. Tags and the gauge refresh: docs/ARCHITECTURE.md ("The loop").
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Any

from opsd.atomic import write_text_atomic

# name -> description, for the gauges of the dashboard
GAUGES: dict[str, str] = {
    "step": "Training step just finished",
    "loss": "Token-level mean loss of the step: the clipped divergences (OPSD), the NLL (SFT), the clipped surrogate "
            "(GRPO)",
    "gjs": "Mean generalized Jensen-Shannon divergence per response token",
    "grad_norm": "Global gradient norm before clipping",
    "clip_fraction": "Fraction of tokens (clip_mode token) or vocabulary entries (pointwise) whose divergence was capped",
    "learning_rate": "Learning rate of the step",
    "step_seconds": "Wall time of the step",
    "adapter_sync_seconds": "Time to export the adapter and load it on every rollout worker (and an EMA teacher's on "
                            "every teacher actor)",
    "policy_staleness": "Mean adapter versions between the rollout's policy and the learner's",
    "rows_in_flight": "Rows generated or scored but not yet trained on",
    "rollout_length_mean": "Mean response length in tokens",
    "truncation_rate": "Fraction of responses cut at the token budget",
    "skipped_rows": "Rows left out of the step (over-long prompts or contexts)",
    "heldout_gjs": "Mean GJS per token on the held-out traces (when evaluated)",
    "student_accuracy": "Fraction of the step's traces whose final answer matches the reference (not used by OPSD)",
    "generated_tokens": "Tokens the rollout workers sampled for the step's training traces (0 for SFT)",
    "generated_tokens_total": "Training tokens sampled so far in the run: the x axis of accuracy against tokens",
    "reward_mean": "GRPO: mean reward of the step's traces (1: the final answer matches the reference)",
    "zero_advantage_groups": "GRPO: share of the step's prompts whose traces all got the same reward (no gradient)",
}
STAGE_GAUGES: dict[str, str] = {
    "tokens_per_second": "Tokens per second of a stage",
    "stage_seconds": "Seconds a stage took in the step",
}
STAGES = ("rollout", "teacher", "learner")
# The tag every opsd_* gauge carries: the run's name.
RUN_TAG = "run"
# Tags of the opsd_eval gauge besides RUN_TAG: one series per eval set and metric.
EVAL_TAGS = ("eval_set", "metric")


def run_name(run_dir: str | os.PathLike) -> str:
    """The default ``run`` tag of a run: the last component of its run directory (``runs/qwen3-a`` -> ``qwen3-a``)."""
    return Path(run_dir).resolve().name or str(Path(run_dir).resolve())


class MetricsSink:
    """Writes each step's record to ``metrics.jsonl`` and, when Ray is up, to its metrics endpoint."""

    def __init__(self, run_dir: str | os.PathLike, export_to_ray: bool = True, keep_steps_up_to: int | None = None,
                 run: str | None = None, refresh_s: float = 1.0):
        """``keep_steps_up_to`` (a resumed run): records of later steps, written after the checkpoint the run
        resumes from, are dropped first, so every step appears once. None: a new run, the file starts empty.
        ``run``: the value of the ``run`` tag of every gauge; None: ``run_name(run_dir)``."""
        self.run = run if run else run_name(run_dir)
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_steps_up_to is not None and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= keep_steps_up_to]
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        self._gauges: dict[str, Any] = {}
        self._eval_gauge = None
        self._latest: dict[tuple, tuple[Any, float, dict | None]] = {}  # (gauge, tags) -> what was last set
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._refresher: threading.Thread | None = None
        if export_to_ray:
            self._make_gauges()
        if self._gauges:
            self._refresher = threading.Thread(target=self._refresh, args=(refresh_s,), name="opsd-metrics",
                                               daemon=True)
            self._refresher.start()

    def _make_gauges(self) -> None:
        import ray
        from ray.util.metrics import Gauge

        if not ray.is_initialized():
            return
        for name, description in GAUGES.items():
            self._gauges[name] = Gauge(f"opsd_{name}", description=description, tag_keys=(RUN_TAG,))
        for name, description in STAGE_GAUGES.items():
            self._gauges[name] = Gauge(f"opsd_{name}", description=description, tag_keys=(RUN_TAG, "stage"))
        self._eval_gauge = Gauge("opsd_eval", description="Evaluation on eval sets during training: the value of "
                                 "`metric` (avg@n, pass@k, maj@n, ...) on `eval_set`",
                                 tag_keys=(RUN_TAG, *EVAL_TAGS))
        for gauge in (*self._gauges.values(), self._eval_gauge):
            gauge.set_default_tags({RUN_TAG: self.run})

    def record(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")
        self._file.flush()
        for name, gauge in self._gauges.items():
            if name in STAGE_GAUGES:
                for stage in STAGES:
                    value = record.get(f"{name}/{stage}")
                    if _is_number(value):
                        self._set(gauge, float(value), {"stage": stage})
            elif _is_number(record.get(name)):
                self._set(gauge, float(record[name]))
        if self._eval_gauge is not None:
            for key, value in record.items():  # eval/<set>/<metric>
                parts = key.split("/")
                if len(parts) == 3 and parts[0] == "eval" and _is_number(value):
                    self._set(self._eval_gauge, float(value), {"eval_set": parts[1], "metric": parts[2]})

    def _set(self, gauge: Any, value: float, tags: dict[str, str] | None = None) -> None:
        gauge.set(value, tags=tags)
        with self._lock:
            self._latest[(id(gauge), tuple(sorted((tags or {}).items())))] = (gauge, value, tags)

    def _refresh(self, every_s: float) -> None:
        while not self._closed.wait(every_s):
            with self._lock:
                latest = list(self._latest.values())
            for gauge, value, tags in latest:
                gauge.set(value, tags=tags)

    def close(self) -> None:
        self._closed.set()
        if self._refresher is not None:
            self._refresher.join(timeout=10)
        self._file.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_throughput(records: list[dict[str, Any]]) -> dict[str, float]:
    """Tokens per second of each stage over a whole run: all its tokens over all its seconds (not a mean of rates)."""
    out = {}
    for stage in STAGES:
        seconds = tokens = 0.0
        for r in records:
            rate, secs = r.get(f"tokens_per_second/{stage}"), r.get(f"stage_seconds/{stage}")
            if _is_number(rate) and _is_number(secs):
                seconds, tokens = seconds + secs, tokens + rate * secs
        out[stage] = tokens / seconds if seconds > 0 else 0.0
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
