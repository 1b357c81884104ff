"""Run metrics at Ray's metrics endpoint: a gauge keeps its last value there for as long as the run goes on."""

from __future__ import annotations

import sys
import time
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from local_ray import local_ray  # noqa: E402

pytestmark = pytest.mark.slow


def scrape(url: str) -> set[str]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {line.split("{")[0] for line in text.splitlines() if line.startswith("ray_opsd_")}


def test_gauges_stay_at_the_endpoint_between_steps(tmp_path, monkeypatch):
    """Ray 2.60 drops a gauge from its endpoint about two seconds after the last ``set``; a step takes minutes on a
    GPU. The sink sets the latest values again until it is closed."""
    import ray

    from orchestrator.metrics import MetricsSink

    monkeypatch.setenv("RAY_metrics_report_interval_ms", "500")
    with local_ray(num_cpus=1):
        url = f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics"
        sink = MetricsSink(tmp_path, refresh_s=0.5)
        sink.record({"step": 1, "loss": 0.25, "tokens_per_second/rollout": 10.0, "eval/gsm8k/avg@2": 0.5})
        seen_late: list[set[str]] = []
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:  # well past Ray's two seconds, with no new record
            time.sleep(1)
            seen_late.append(scrape(url))
        sink.close()
        assert all({"ray_opsd_loss", "ray_opsd_tokens_per_second", "ray_opsd_eval"} <= seen for seen in seen_late[2:]), \
            seen_late
        time.sleep(4)  # closed: nothing keeps them alive any more
        assert "ray_opsd_loss" not in scrape(url)
